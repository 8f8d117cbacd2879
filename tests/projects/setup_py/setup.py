from setuptools import find_packages, setup

NAME = "hello-setup"

setup(
    name=NAME,
    version="1.0.0",
    packages=find_packages(exclude=["tests"]),
    python_requires=">=3.10",
    install_requires=["flask>=3.1"],
)
