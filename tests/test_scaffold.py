"""`fabdeploy init`: what it finds in each project layout, its CLI, and a deploy of each layout.

The layouts are the small projects in tests/projects/ (their README lists
them); the edge cases are tables of files, as scaffold.py takes them.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from invoke.util import yaml  # Invoke's own YAML: what fab reads fabric.yaml with

from conftest import FAB, merged, wipe_host
from fabdeploy import scaffold
from fabdeploy.__main__ import read_project
from fabdeploy.errors import DeployError

PROJECTS = Path(__file__).resolve().parent / "projects"
FABDEPLOY = str(Path(sys.executable).with_name("fabdeploy"))  # the console script
NO_INIT = {"init_command": ""}

# project: (the fabdeploy settings init writes, ProxyFix advised, instance folder warned)
LAYOUTS = {
    "flat": ({"app": "hello-flat", "wsgi": "hello_flat:create_app()",
              "deploy_to": "/srv/hello-flat"}, True, False),
    "src": ({"app": "hellosrc", "wsgi": "hellosrc:create_app()", "deploy_to": "/srv/hellosrc",
             **NO_INIT}, False, False),
    "wsgi": ({"app": "hello-wsgi", "wsgi": "wsgi:app", "deploy_to": "/srv/hello-wsgi",
              **NO_INIT}, True, True),
    "setup_py": ({"app": "hello-setup", "wsgi": "hello_setup:make_app()",
                  "deploy_to": "/srv/hello-setup", **NO_INIT}, True, False),
    "flit": ({"app": "hello-flit", "wsgi": "hello_flit:app", "deploy_to": "/srv/hello-flit",
              **NO_INIT}, True, False),
    "hatch": ({"app": "hello-hatch", "wsgi": "hello_hatch:create_app()",
               "deploy_to": "/srv/hello-hatch", **NO_INIT}, True, False),
}


def settings_written(result: scaffold.Scaffold) -> dict:
    """The active keys of the fabric.yaml init wrote, as fab will read them."""
    return yaml.safe_load(result.files["fabric.yaml"])["fabdeploy"]


@pytest.mark.parametrize("name", LAYOUTS)
def test_init_finds_the_app_of_each_layout(name):
    expected, proxy_fix, instance = LAYOUTS[name]
    result = scaffold.scaffold(read_project(PROJECTS / name))
    assert settings_written(result) == expected
    assert result.files["fabfile.py"].startswith("from fabdeploy import ns")
    advice = "\n".join(result.advice)
    assert ("ProxyFix(app.wsgi_app, x_for=1, x_proto=1, x_host=1, x_port=1)" in advice) == proxy_fix
    assert ("instance folder" in advice) == instance


def test_the_lines_left_to_fill_are_comments_with_the_settings_new_names():
    text = scaffold.scaffold(read_project(PROJECTS / "flat")).files["fabric.yaml"]
    for line in ("# hosts: [deploy@hello-flat.example.com]", "# proxy:",
                 "#   server_name: hello-flat.example.com", "# tls:", "#   mode: acme"):
        assert line in text
    assert text.startswith("# ") and "written by `fabdeploy init` from pyproject.toml" in text


# -- edge cases, as tables of files ------------------------------------------------

FACTORY = "from flask import Flask\n\ndef create_app():\n    return Flask(__name__)\n"
OBJECT = "from flask import Flask\n\napp = Flask(__name__)\n"
SETUPTOOLS = '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'

CASES = {
    "setup.cfg, find: in src/, the factory in a submodule": (
        {"setup.cfg": "[metadata]\nname = shop\n[options]\npackages = find:\npackage_dir =\n"
                      "    = src\n[options.packages.find]\nwhere = src\n",
         "pyproject.toml": SETUPTOOLS, "src/shop/__init__.py": "",
         "src/shop/web.py": FACTORY},
        "shop", "shop.web:create_app()"),
    "setup.py py_modules, the name from a constant": (
        {"setup.py": 'from setuptools import setup\nNAME = "site"\n'
                     'setup(name=NAME, py_modules=["wsgi"])\n', "wsgi.py": OBJECT},
        "site", "wsgi:app"),
    "setup.py find_packages('src') and package_dir": (
        {"setup.py": 'from setuptools import setup, find_packages\nsetup(name="shop", '
                     'packages=find_packages("src"), package_dir={"": "src"})\n',
         "src/shop/__init__.py": FACTORY},
        "shop", "shop:create_app()"),
    "setup.py find_packages('.') and a wsgi.py it does not install": (
        {"setup.py": 'import setuptools\nsetuptools.setup(name="shop", packages=setuptools.find_packages("."))\n',
         "shop/__init__.py": "", "shop/web.py": FACTORY, "wsgi.py": OBJECT},
        "shop", "shop.web:create_app()"),
    "setuptools' discovery: one module at the top; tests, docs and the fabfile aside": (
        {"pyproject.toml": SETUPTOOLS + '[project]\nname = "one"\n', "app.py": OBJECT,
         "fabfile.py": scaffold.FABFILE, "tests/test_app.py": FACTORY, "docs/conf.py": OBJECT},
        "one", "app:app"),
    "pyproject [tool.setuptools] packages and package-dir": (
        {"pyproject.toml": SETUPTOOLS + '[project]\nname = "blog"\n[tool.setuptools]\n'
                           'packages = ["blog"]\npackage-dir = {"" = "lib"}\n',
         "lib/blog/__init__.py": FACTORY, "blog_old/__init__.py": FACTORY},
        "blog", "blog:create_app()"),
    "packages.find in pyproject": (
        {"pyproject.toml": SETUPTOOLS + '[project]\nname = "blog"\n'
                           '[tool.setuptools.packages.find]\nwhere = ["source"]\n',
         "source/blog/__init__.py": OBJECT},
        "blog", "blog:app"),
    "poetry, packages from src": (
        {"pyproject.toml": '[build-system]\nbuild-backend = "poetry.core.masonry.api"\n'
                           '[tool.poetry]\nname = "wiki"\npackages = [{include = "wiki", from = "src"}]\n',
         "src/wiki/__init__.py": FACTORY},
        "wiki", "wiki:create_app()"),
    "a factory beats a wsgi.py that calls it": (
        {"pyproject.toml": SETUPTOOLS + '[project]\nname = "notes"\n[tool.setuptools]\n'
                           'packages = ["notes"]\npy-modules = ["wsgi"]\n',
         "notes/__init__.py": FACTORY, "wsgi.py": "from notes import create_app\napp = create_app()\n"},
        "notes", "notes:create_app()"),
    "an app object in the package beats a factory deeper down, and tests are no app": (
        {"pyproject.toml": SETUPTOOLS + '[project]\nname = "notes"\n',
         "notes/__init__.py": OBJECT, "notes/tests/__init__.py": "",
         "notes/tests/conftest.py": FACTORY, "notes/factories/__init__.py": FACTORY},
        "notes", "notes:app"),
    "a factory that needs arguments is passed over for one that does not": (
        {"pyproject.toml": SETUPTOOLS + '[project]\nname = "notes"\n',
         "notes/__init__.py": "def create_app(config):\n    pass\n",
         "notes/wsgi.py": "def make_app(config='production'):\n    pass\n"},
        "notes", "notes.wsgi:make_app()"),
    "a distribution named unlike its package is deployed under the package's name": (
        {"pyproject.toml": SETUPTOOLS + '[project]\nname = "Flask-Notes"\n', "notes/__init__.py": FACTORY},
        "notes", "notes:create_app()"),
    "a flit module name of its own": (
        {"pyproject.toml": '[build-system]\nbuild-backend = "flit_core.buildapi"\n[project]\n'
                           'name = "notes-app"\n[tool.flit.module]\nname = "notes"\n',
         "notes.py": OBJECT},
        "notes-app", "notes:app"),
}


@pytest.mark.parametrize("case", CASES)
def test_init_decides(case):
    files, app, wsgi = CASES[case]
    result = scaffold.scaffold(files)
    assert (result.app, result.wsgi) == (app, wsgi)


ERRORS = {
    "no metadata": ({"app.py": OBJECT}, "no pyproject.toml, setup.cfg or setup.py in .",
                    "run fabdeploy init in your project"),
    "no name": ({"pyproject.toml": SETUPTOOLS, "setup.py": "from setuptools import setup\nsetup()\n"},
                "no project name in pyproject.toml or setup.py", "set [project] name"),
    "pyproject does not parse": ({"pyproject.toml": "[project\n"}, "pyproject.toml does not parse",
                                 "fix it"),
    "setup.py does not parse": ({"setup.py": "setup(\n"}, "setup.py does not parse: line 1",
                                "fix it"),
    "no app": ({"pyproject.toml": SETUPTOOLS + '[project]\nname = "x"\n', "x/__init__.py": "X = 1\n"},
               "found no create_app(), make_app() or app = Flask(...) in x/__init__.py",
               "set wsgi in fabric.yaml"),
    "only a factory with arguments": (
        {"pyproject.toml": SETUPTOOLS + '[project]\nname = "x"\n',
         "x/__init__.py": "def create_app(config, *, debug):\n    pass\n"},
        "create_app() in x/__init__.py needs arguments", "wsgi: \"x:create_app('production')\""),
    "nothing installed": ({"pyproject.toml": '[build-system]\nbuild-backend = "flit_core.buildapi"\n'
                                             '[project]\nname = "ghost"\n'},
                          "found no package or module that the wheel of ghost installs",
                          "check the packages"),
}


@pytest.mark.parametrize("case", ERRORS)
def test_init_refuses_with_one_line(case):
    files, what, hint = ERRORS[case]
    with pytest.raises(DeployError) as caught:
        scaffold.scaffold(files)
    assert caught.value.line().startswith(what) and hint in caught.value.line()
    assert "\n" not in str(caught.value)


INIT_DB = {
    "@click.command('init-db')": ("@click.command('init-db')\ndef init_db_command():\n    pass\n", True),
    "@app.cli.command() on init_db": ("@app.cli.command()\ndef init_db():\n    pass\n", True),
    "@bp.cli.command(name='init-db')": ("@bp.cli.command(name='init-db')\ndef x():\n    pass\n", True),
    "another command": ("@app.cli.command('seed')\ndef init_db():\n    pass\n", False),
    "none": ("def init_db():\n    pass\n", False),
}


@pytest.mark.parametrize("case", INIT_DB)
def test_init_command_is_turned_off_only_where_the_app_has_no_init_db(case):
    source, has = INIT_DB[case]
    files = {"pyproject.toml": SETUPTOOLS + '[project]\nname = "x"\n', "x/__init__.py": FACTORY,
             "x/db.py": "import click\n" + source}
    assert ("init_command" not in settings_written(scaffold.scaffold(files))) == has


@pytest.mark.parametrize("existing, force, refused", [
    (set(), False, None),
    ({"fabfile.py"}, False, "fabfile.py exists already (pass --force"),
    ({"fabfile.py", "fabric.yaml"}, False, "fabfile.py and fabric.yaml exist already"),
    ({"fabfile.py", "fabric.yaml"}, True, None),
    ({"fabric.yml"}, True, "fabric.yml exists, and fab would read it rather than the fabric.yaml"),
    ({"fabfile/__init__.py"}, False, "fabfile/ exists, and fab would read it rather than the fabfile.py"),
])
def test_existing_files_are_never_overwritten_unforced_nor_shadowed(existing, force, refused):
    if refused is None:
        scaffold.check_free(existing, force)
    else:
        with pytest.raises(DeployError, match=refused.replace("(", r"\(")):
            scaffold.check_free(existing, force)


@pytest.mark.parametrize("value, written", [
    ("hello", "hello"), ("hello_flat:create_app()", "hello_flat:create_app()"),
    ("/srv/hello-flat", "/srv/hello-flat"), ("~/srv/x", "~/srv/x"), ("", '""'), ("a: b", '"a: b"'),
    ("yes #", '"yes #"'), ("no", '"no"'), ("Null", '"Null"'), ("~", '"~"'), ("1.0", '"1.0"')])
def test_yaml_scalars_read_back_as_written(value, written):
    assert scaffold.scalar(value) == written
    assert yaml.safe_load(f"k: {written}")["k"] == value


# -- the command line ---------------------------------------------------------------

def copy_project(name: str, dest: Path) -> Path:
    shutil.copytree(PROJECTS / name, dest / name)
    return dest / name


def init(*args: str, cwd: Path, argv0: list[str] = [FABDEPLOY]) -> subprocess.CompletedProcess:
    return subprocess.run([*argv0, "init", *args], cwd=cwd, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=60)


def test_cli_writes_then_refuses_to_overwrite_then_forces(tmp_path):
    project = copy_project("flat", tmp_path)
    first = init(cwd=project)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("hello-flat: hello_flat:create_app() (found in "
                                   "hello_flat/__init__.py; the project is named in pyproject.toml)\n")
    assert "wrote fabfile.py, fabric.yaml" in first.stdout and "ProxyFix" in first.stdout
    (project / "fabfile.py").write_text("# mine\n")
    again = init(str(project), cwd=tmp_path)
    assert again.returncode == 1 and again.stdout == ""
    assert again.stderr == "fabdeploy: fabfile.py and fabric.yaml exist already " \
                           "(pass --force to replace, or edit by hand)\n"
    assert (project / "fabfile.py").read_text() == "# mine\n"
    forced = init("--force", str(project), cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr
    assert (project / "fabfile.py").read_text() == scaffold.FABFILE


def test_python_m_fabdeploy_is_the_same_command(tmp_path):
    project = copy_project("wsgi", tmp_path)
    result = init(cwd=project, argv0=[sys.executable, "-m", "fabdeploy"])
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load((project / "fabric.yaml").read_text())["fabdeploy"]["wsgi"] == "wsgi:app"
    assert "instance folder" in result.stdout


def test_cli_errors_are_one_line(tmp_path):
    result = init(str(tmp_path), cwd=tmp_path)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == f"fabdeploy: no pyproject.toml, setup.cfg or setup.py in {tmp_path} " \
                            "(run fabdeploy init in your project, or name its directory)\n"
    assert init(str(tmp_path / "nowhere"), cwd=tmp_path).stderr.count("\n") == 1


def test_setup_py_is_read_never_run(tmp_path):
    project = copy_project("setup_py", tmp_path)
    setup = project / "setup.py"
    setup.write_text(f"open({str(tmp_path / 'ran')!r}, 'w').close()\n" + setup.read_text())
    assert init(cwd=project).returncode == 0
    assert not (tmp_path / "ran").exists()


def test_the_projects_own_modules_are_not_imported(tmp_path):
    project = copy_project("flat", tmp_path)
    marker = tmp_path / "imported"
    module = project / "hello_flat" / "__init__.py"
    module.write_text(f"open({str(marker)!r}, 'w').close()\n" + module.read_text())
    assert init(cwd=project).returncode == 0
    assert not marker.exists()


# -- each layout deploys as init left it -----------------------------------------------

@pytest.mark.host
@pytest.mark.parametrize("name", LAYOUTS)
def test_each_layout_deploys_without_edits(name, host, tmp_path, fresh_wheel_cache):
    """init, then only the throwaway host's connection settings merged in, then fab deploy."""
    project = copy_project(name, tmp_path)
    result = init(cwd=project)
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load((project / "fabric.yaml").read_text())
    app = config["fabdeploy"]["app"]
    try:
        config = merged(config, host.fabric_yaml(app))
        (project / "fabric.yaml").write_text(json.dumps(config, indent=2))  # JSON is YAML
        deploy = subprocess.run([FAB, "-H", host.host_string, "deploy"], cwd=project,
                                capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)
        assert deploy.returncode == 0, deploy.stdout + deploy.stderr
        with urllib.request.urlopen(host.url, timeout=10) as response:
            assert response.read().decode() == f"hello from {name}\n"
    finally:
        wipe_host(host)

