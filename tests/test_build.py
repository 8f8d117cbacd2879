"""Local builds as a user has them: a venv holding only fabdeploy, real backends, real pip.

The first build of each [build-system] makes its build env (that needs the
package index); every build after it runs in a network namespace of its own
(`unshare -n`), so it can only pass without the network. Times are printed,
never asserted.
"""
import fcntl
import json
import os
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OFFLINE = ["unshare", "-n"]

DRIVER = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from fabdeploy import buildenv
    from fabdeploy.build import start_build
    from fabdeploy.errors import DeployError
    from fabdeploy.project import project_name

    what, project = sys.argv[1], Path(sys.argv[2])
    start = time.perf_counter()
    try:
        if what == "name":
            print(json.dumps({"name": project_name(project)}))
        else:
            wheel = start_build(project).result()
            env = buildenv.find(buildenv.envs_dir(), buildenv.build_system(project))
            print(json.dumps({"wheel": wheel.filename, "path": str(wheel.path),
                              "seconds": time.perf_counter() - start, "env": env and env.name}))
    except DeployError as exc:
        sys.exit(str(exc))
""")

PROJECTS = {
    "setuptools": {
        "pyproject.toml": """
            [build-system]
            requires = ["setuptools>=64"]
            build-backend = "setuptools.build_meta"

            [project]
            name = "stapp"
            version = "1.0"

            [tool.setuptools]
            packages = ["stapp"]
            """,
        "stapp/__init__.py": "GREETING = 'hello'\n",
    },
    "flit_core": {
        "pyproject.toml": """
            [build-system]
            requires = ["flit_core>=3.4,<4"]
            build-backend = "flit_core.buildapi"

            [project]
            name = "flitapp"
            version = "1.0"
            description = "a flit_core project"
            """,
        "flitapp/__init__.py": "GREETING = 'hello'\n",
    },
    "hatchling": {
        "pyproject.toml": """
            [build-system]
            requires = ["hatchling"]
            build-backend = "hatchling.build"

            [project]
            name = "hatchapp"
            version = "1.0"
            """,
        "hatchapp/__init__.py": "GREETING = 'hello'\n",
    },
    "setup.py only": {  # shaped like the Flask tutorial's seed projects
        "setup.py": """
            from setuptools import find_packages, setup
            setup(name="seedapp", version="1.0", packages=find_packages(),
                  include_package_data=True, zip_safe=False, install_requires=["flask"])
            """,
        "MANIFEST.in": "graft seedapp/templates\n",
        "seedapp/__init__.py": "GREETING = 'hello'\n",
        "seedapp/templates/base.html": "<title>seed</title>\n",
    },
}


def write_project(path: Path, files: dict) -> Path:
    for name, text in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(textwrap.dedent(text).lstrip())
    return path


def change_code(project: Path) -> None:
    (init,) = project.glob("*app/__init__.py")
    init.write_text(init.read_text() + "GREETING = 'changed'\n")


class User:
    """A venv holding only fabdeploy (pip installed, no test extras), and a cache of its own."""

    def __init__(self, venv: Path, cache: Path):
        self.python, self.cache = venv / "bin" / "python", cache
        self.driver = venv / "drive.py"
        self.driver.write_text(DRIVER)

    @property
    def envs(self) -> Path:
        return self.cache / "fabdeploy" / "build-envs"

    def env_dirs(self) -> dict:
        """Each build env, by name, with its directory's inode: a remade env has a new one."""
        return {p.parent.name: p.parent.stat().st_ino for p in self.envs.glob("*/fabdeploy-env.json")}

    def makes(self, cache: Path | None = None) -> list:
        """Every env made so far (made.jsonl): a build that reused one added no line."""
        log = (cache or self.cache) / "fabdeploy" / "build-envs" / "made.jsonl"
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    def holds(self, env: str) -> list:
        return json.loads((self.envs / env / "fabdeploy-env.json").read_text())["holds"]

    def run(self, what: str, project: Path, offline=False, cache: Path | None = None,
            check=True) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
        env["XDG_CACHE_HOME"] = str(cache or self.cache)
        prefix = []
        if offline:
            # No network at all, and no local package mirror either: pip has no index.
            prefix = OFFLINE
            env = {k: v for k, v in env.items() if not k.startswith("PIP_")}
            env["PIP_CONFIG_FILE"] = os.devnull
        result = subprocess.run(prefix + [str(self.python), str(self.driver), what, str(project)],
                                env=env, capture_output=True, text=True, timeout=300)
        if check:
            assert result.returncode == 0, result.stderr
        return result

    def build(self, project: Path, **kwargs) -> dict:
        return json.loads(self.run("build", project, **kwargs).stdout)

    def popen(self, project: Path, cache: Path) -> subprocess.Popen:
        env = dict(os.environ, XDG_CACHE_HOME=str(cache))
        return subprocess.Popen([str(self.python), str(self.driver), "build", str(project)],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    base = tmp_path_factory.mktemp("user")
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", str(ROOT)], check=True,
                   capture_output=True)
    listed = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "list", "--format=json"],
                            capture_output=True, text=True, check=True).stdout
    assert "wheel" not in {p["name"] for p in json.loads(listed)}  # as python -m venv has it
    return User(venv, base / "cache")


@pytest.fixture(scope="module")
def built(user, tmp_path_factory):
    """Each backend's project built twice: first (its env made), then after a code change, offline.

    Entries: the project, both builds' results, and the envs after each.
    """
    base = tmp_path_factory.mktemp("projects")
    runs = {}
    for backend, files in PROJECTS.items():
        project = write_project(base / backend.replace(" ", "-").replace(".", "-"), files)
        before, makes = user.env_dirs(), len(user.makes())
        first = user.build(project)
        made, first_makes = user.env_dirs(), user.makes()[makes:]
        change_code(project)
        second = user.build(project, offline=True)
        runs[backend] = dict(project=project, first=first, second=second, before=before,
                             made=made, after=user.env_dirs(), first_makes=first_makes,
                             second_makes=user.makes()[makes + len(first_makes):])
    print("\nbuild times in a venv holding only fabdeploy (first: its env made; then cached):")
    for backend, run in runs.items():
        print(f"  {backend:14} first {run['first']['seconds']:.2f} s, "
              f"cached {run['second']['seconds']:.2f} s")
    return runs


@pytest.mark.parametrize("backend", list(PROJECTS))
def test_each_backend_builds_in_a_cached_env_then_reuses_it_offline(built, user, backend):
    run = built[backend]
    name = {"setuptools": "stapp", "flit_core": "flitapp", "hatchling": "hatchapp",
            "setup.py only": "seedapp"}[backend]
    assert run["first"]["wheel"].startswith(f"{name}-1.0-") and run["second"]["wheel"] == run["first"]["wheel"]
    with zipfile.ZipFile(run["second"]["path"]) as wheel:
        assert "GREETING = 'changed'" in wheel.read(f"{name}/__init__.py").decode()
        if backend == "setup.py only":
            assert f"{name}/templates/base.html" in wheel.namelist()  # MANIFEST.in's graft
    env = run["first"]["env"]
    assert env in run["made"] and run["second"]["env"] == env
    assert [m["env"] for m in run["first_makes"]] == [env]
    # The second build made nothing and remade nothing: same envs, same directories.
    assert run["second_makes"] == [] and run["after"] == run["made"]
    assert not list(user.envs.glob(".new-*"))


@pytest.mark.parametrize("backend,package", [("setuptools", "setuptools"), ("flit_core", "flit-core"),
                                             ("hatchling", "hatchling")])
def test_an_env_holds_its_backend_pinned_and_not_fabdeploy(built, user, backend, package):
    holds = user.holds(built[backend]["first"]["env"])
    assert any(line.startswith(f"{package}==") for line in holds), holds
    assert not any(line.startswith(("fabdeploy==", "fabric==", "wheel==")) for line in holds), holds


def test_a_setup_py_project_shares_the_env_its_resolution_names(built):
    """PEP 517's default "setuptools >= 40.8.0" and "setuptools>=64" resolve alike: one env."""
    setup_py, setuptools = built["setup.py only"], built["setuptools"]
    assert setup_py["first"]["env"] == setuptools["first"]["env"]
    # Made aside, found to resolve like one that is here, thrown away.
    assert [m.get("twin") for m in setup_py["first_makes"]] == [True]
    assert setup_py["made"] == setup_py["before"]


def test_a_changed_requirement_set_makes_a_new_env_and_prunes_the_unused(built, user):
    """Making an env prunes those unused for 30 days, but not one that a build holds."""
    unused, held = built["hatchling"]["first"]["env"], built["flit_core"]["first"]["env"]
    month_ago = time.time() - 31 * 86400
    for env in (unused, held):
        os.utime(user.envs / env / ".in-use", (month_ago, month_ago))
    project = built["setuptools"]["project"]
    pyproject = project / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('"setuptools>=64"', '"setuptools>=64,<70"'))
    old, makes = user.env_dirs(), len(user.makes())
    with open(user.envs / held / ".in-use") as f:
        fcntl.flock(f, fcntl.LOCK_SH)  # as a build in another fab holds its env
        result = user.build(project)
    new = user.env_dirs()
    assert result["env"] not in old and set(new) == set(old) - {unused} | {result["env"]}
    assert held in new and new[held] == old[held]
    assert unused not in {p.read_text() for p in (user.envs / "declared").iterdir()}
    assert [(m["env"], m.get("twin")) for m in user.makes()[makes:]] == [(result["env"], None)]
    holds = user.holds(result["env"])
    # setuptools before 70.1 asks for wheel (get_requires_for_build_wheel): the env has it.
    assert any(line.startswith("setuptools==69.") for line in holds), holds
    assert any(line.startswith("wheel==") for line in holds), holds
    print(f"\n  setuptools<70 first {result['seconds']:.2f} s")


def test_two_concurrent_builds_both_succeed_with_one_env(user, tmp_path):
    cache = tmp_path / "cache"
    projects = [write_project(tmp_path / f"p{i}", PROJECTS["flit_core"]) for i in (1, 2)]
    change_code(projects[1])  # not the same sources: both really build
    procs = [user.popen(p, cache) for p in projects]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    assert [code for code, _, _ in results] == [0, 0], results
    envs = cache / "fabdeploy" / "build-envs"
    made = [p.parent.name for p in envs.glob("*/fabdeploy-env.json")]
    used = {json.loads(out)["env"] for _, out, _ in results}
    assert len(made) == 1 and used == set(made)
    # Made once: the second fab waited for the first one's env instead of making a twin.
    assert [(m["env"], m.get("twin")) for m in user.makes(cache)] == [(made[0], None)]
    assert not list(envs.glob(".new-*")) and not list(envs.glob(".old-*"))


def test_offline_a_cached_env_builds_and_without_one_a_line_says_what_is_missing(built, user, tmp_path):
    """The cached side: every second build in `built` ran offline. Here: a cache with no env."""
    project = write_project(tmp_path / "flitapp", PROJECTS["flit_core"])
    result = user.run("build", project, offline=True, cache=tmp_path / "empty", check=False)
    assert result.returncode == 1 and result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith("local: no build environment with flit_core>=3.4,<4 for Python "), line
    assert "could not install it" in line and "reach the package index once" in line, line
    # Nothing half made is left to be found later.
    assert not list((tmp_path / "empty" / "fabdeploy" / "build-envs").glob("*/fabdeploy-env.json"))


def test_a_directory_without_a_project_is_one_line(user, tmp_path):
    (tmp_path / "empty" / "app.py").parent.mkdir()
    (tmp_path / "empty" / "app.py").write_text("print('not a project')\n")
    for what in ("build", "name"):
        result = user.run(what, tmp_path / "empty", offline=True, check=False)
        assert result.returncode == 1
        assert result.stderr.splitlines() == [
            f"local: {tmp_path / 'empty'} has no pyproject.toml or setup.py "
            "(run fab from your project, or set fabdeploy.project_dir)"]


def test_project_name_for_each_layout(built, user, tmp_path):
    """Offline: a setup.py-only project's name comes from its backend, in the env its build made."""
    def name(project: Path) -> str:
        return json.loads(user.run("name", project, offline=True).stdout)["name"]

    for backend, expected in [("setuptools", "stapp"), ("flit_core", "flitapp"),
                              ("hatchling", "hatchapp"), ("setup.py only", "seedapp")]:
        assert name(built[backend]["project"]) == expected
    cfg = write_project(tmp_path / "cfg", {
        "setup.py": "from setuptools import setup\nsetup()\n",
        "setup.cfg": "[metadata]\nname = cfgapp\nversion = 1.0\n"})
    assert name(cfg) == "cfgapp"
    broken = write_project(tmp_path / "broken", {"setup.py": "raise SystemExit('no')\n"})
    result = user.run("name", broken, offline=True, check=False)
    assert result.returncode == 1 and result.stderr.splitlines() == [
        f"local: the project name could not be read from {broken / 'setup.py'} "
        "(set fabdeploy.app, or name = ... in setup.cfg's [metadata])"]
