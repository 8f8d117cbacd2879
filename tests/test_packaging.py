"""fabdeploy as a user gets it: the built wheel alone in a clean venv, and the README's steps.

The rest of the suite runs fabdeploy from this checkout, where every file
is at hand. Here it runs from what pip installed, so a template left out of
the wheel, or an import of a package nobody declared, fails a deploy.
"""
from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import urllib.request
import zipfile
from email.parser import Parser
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from invoke.util import yaml

import fabdeploy
from conftest import FAB, ROOT, merged, wipe_host
from harness.project import EXAMPLE, Project

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
README_HOST = "deploy@guestbook.example.com"  # the README's example host
GREETING = b"Hello from the guestbook"


def readme_block(name: str) -> str:
    """The README's code block marked `<!-- example: name -->`."""
    readme = (ROOT / "README.md").read_text()
    match = re.search(rf"<!-- example: {re.escape(name)} -->\n```\w*\n(.*?)```", readme, re.S)
    assert match, f"the README lost its {name} example"
    return match.group(1)


def declared(requirement: str) -> str:
    return re.split(r"[\s;<>=!~\[]", requirement, maxsplit=1)[0].lower().replace("_", "-")


# -- what the wheel declares and carries (no host) ---------------------------------------

def third_party_imports() -> set[str]:
    """Top-level names fabdeploy's modules import that are neither stdlib nor fabdeploy."""
    names = set()
    for path in (ROOT / "fabdeploy").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"fabdeploy", "__future__"} - OPTIONAL


# Imported only where installed, inside a try: buildenv.find_uv uses the `uv` package if it is there.
OPTIONAL = {"uv"}


def test_dependencies_are_exactly_what_fabdeploy_imports():
    owners = packages_distributions()  # import name -> the distributions that provide it
    imported = {declared(owners.get(name, [name])[0]) for name in third_party_imports()}
    assert imported == {declared(r) for r in PYPROJECT["project"]["dependencies"]}


def test_the_readme_and_the_metadata_name_the_same_repository():
    source = PYPROJECT["project"]["urls"]["Source"]
    assert f"pip install git+{source}\n" in readme_block("install")


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    """`./dev dist` into a directory of this module's: the sdist, and the wheel built from it."""
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([FAB, "-c", "tasks", "dist", "--outdir", str(out)], cwd=ROOT, check=True,
                   capture_output=True, stdin=subprocess.DEVNULL, timeout=300)
    return out


def wheel_of(dist: Path) -> Path:
    (wheel,) = dist.glob("fabdeploy-*.whl")
    return wheel


def test_the_wheel_carries_the_package_data_and_the_metadata(dist):
    with zipfile.ZipFile(wheel_of(dist)) as whl:
        names = set(whl.namelist())
        info = f"fabdeploy-{fabdeploy.__version__}.dist-info"
        metadata = Parser().parsestr(whl.read(f"{info}/METADATA").decode())
        entry_points = whl.read(f"{info}/entry_points.txt").decode()
    tracked = subprocess.run(["git", "ls-files", "fabdeploy"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.split()
    assert set(tracked) <= names  # every module, template, the agent and py.typed
    assert {n for n in names if not n.startswith(info)} == set(tracked)  # and nothing else
    assert metadata["Version"] == fabdeploy.__version__
    assert metadata["License-Expression"] == "MIT" and f"{info}/licenses/LICENSE" in names
    assert metadata.get_all("Project-URL") and "Typing :: Typed" in metadata.get_all("Classifier")
    assert "fabdeploy = fabdeploy.__main__:main" in entry_points


def test_the_sdist_carries_the_tests_and_their_projects(dist):
    (sdist,) = dist.glob("fabdeploy-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    wanted = [p for p in tracked if p.split("/")[0] in ("fabdeploy", "tests", "harness", "example",
                                                      "bench", "docs")]
    assert set(wanted) <= names
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]


# -- a clean venv with the wheel alone -------------------------------------------------

def clean_venv(path: Path) -> dict:
    """A new venv and an environment that runs its programs, and nothing of this checkout's."""
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, capture_output=True)
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "PYTHONSAFEPATH")}
    env["PATH"] = f"{path / 'bin'}:/usr/local/bin:/usr/bin:/bin"
    return env


def run(argv: list[str] | str, env: dict, cwd: Path, timeout: float = 300) -> str:
    result = subprocess.run(argv, cwd=cwd, env=env, shell=isinstance(argv, str), text=True,
                            capture_output=True, stdin=subprocess.DEVNULL, timeout=timeout)
    assert result.returncode == 0, f"{argv} exited {result.returncode}\n{result.stdout}{result.stderr}"
    return result.stdout


def assert_served_from_venv(venv: Path, env: dict, project: Path) -> None:
    """fabdeploy is imported from the venv's site-packages, not from this checkout."""
    where = run([str(venv / "bin" / "python"), "-c", "import fabdeploy; print(fabdeploy.__file__)"],
                env, project).strip()
    assert Path(where).is_relative_to(venv) and "site-packages" in where, where


@pytest.mark.host
def test_the_wheel_alone_deploys_from_a_clean_venv(dist, host, tmp_path):
    venv = tmp_path / "venv"
    env = clean_venv(venv)
    run([str(venv / "bin" / "pip"), "install", "--quiet", str(wheel_of(dist))], env, tmp_path)
    project = Project(tmp_path / "guestbook", host)
    assert_served_from_venv(venv, env, project.path)
    assert run([str(venv / "bin" / "fabdeploy"), "--version"], env, tmp_path).strip() \
        == f"fabdeploy {fabdeploy.__version__}"
    # An empty fabdeploy cache: the venv builds the app and fetches its dependencies itself.
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    try:
        run([str(venv / "bin" / "fab"), "-H", host.host_string, "deploy"], env, project.path)
        assert urllib.request.urlopen(host.url, timeout=10).read().startswith(GREETING)
    finally:
        wipe_host(host)


# -- the README, as written ----------------------------------------------------------------

def git_snapshot(dest: Path) -> Path:
    """This checkout's files (committed or not, never ignored ones) as a repository of their own."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    git = ["git", "-C", str(dest), "-c", "user.name=test", "-c", "user.email=test@localhost"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "snapshot"]):
        subprocess.run(git + args, check=True, capture_output=True)
    return dest


@pytest.mark.host
def test_the_readme_install_and_first_deploy_work_as_written(host, tmp_path):
    """pip install git+..., fabdeploy init, fab deploy: the README's blocks, run by a shell."""
    venv = tmp_path / "venv"
    env = clean_venv(venv)
    repository = git_snapshot(tmp_path / "fabdeploy")
    install = readme_block("install").replace(PYPROJECT["project"]["urls"]["Source"],
                                              f"file://{repository}")
    run(install, env, tmp_path)
    project = tmp_path / "guestbook"  # the user's project: no fabfile, no fabric.yaml yet
    shutil.copytree(EXAMPLE, project, ignore=shutil.ignore_patterns(
        "fabfile.py", "fabric.yaml", "*.egg-info", "build", "dist", "__pycache__"))
    assert_served_from_venv(venv, env, project)
    run(readme_block("init"), env, project)
    assert (project / "fabfile.py").read_text() == readme_block("fabfile.py")
    assert (project / "fabric.yaml").read_text() == readme_block("fabric.yaml")
    # Only what makes the throwaway host reachable is added to what init wrote.
    config = merged(yaml.safe_load((project / "fabric.yaml").read_text()), host.fabric_yaml("guestbook"))
    (project / "fabric.yaml").write_text(json.dumps(config, indent=2))  # JSON is YAML
    try:
        out = run("set -e\n" + readme_block("commands").replace(README_HOST, host.host_string),
                  env, project)
        assert urllib.request.urlopen(host.url, timeout=10).read().startswith(GREETING)
        assert "*" in out  # releases marks the current one
    finally:
        wipe_host(host)
