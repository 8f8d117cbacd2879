"""Build environments: one venv per [build-system] and Python, made once, then reused.

A build runs the backend's PEP 517 hooks with the Python of a venv that holds
the build requirements. Unless fabdeploy's own environment already has them
(asked once per [build-system], then remembered), that venv is kept here:

    <XDG_CACHE_HOME or ~/.cache>/fabdeploy/build-envs/
        <env key>/         a venv; fabdeploy-env.json says what it holds
        declared/<key>     the env key that this declaration resolved to
        here/<key>         whether fabdeploy's own environment suffices
        made.jsonl         a line per env made (or found made alike, "twin")
        .lock              held while an env is made, or old ones pruned

The key is the resolution, not the declaration. An env is named by a hash of
its Python and the exact `name==version` list read back from it once its
install is done (the backend's get_requires_for_build_wheel included). Two
declarations that resolve alike ("setuptools>=61" and ">=64", or a setup.py
project's default "setuptools>=40.8.0") share one env.

No network on the fast path. A declaration does not say which versions it
resolves to without asking an index, so each declared [build-system] table
(with the Python) gets a pointer file naming the env it resolved to when it
was first made. A build reads that pointer and opens the env: file reads, no
installer, no index. Resolution, and so the network, happens only when a
declaration has no pointer yet (new or changed requirements, or its env was
pruned); a resolution that lands on an env already here only adds a pointer.
The backend's dynamic requirements are asked when an env is made, for the
project at hand; a project whose setup_requires or build hooks change later
keeps the env it had.

Two fabs at once. Envs are made under an exclusive flock and renamed into
place when complete, so an env that exists is whole, and a second fab waiting
for the same env finds it made. A build holds a shared flock on its env's
`.in-use` file, whose mtime is the last use; pruning (envs unused for 30
days) takes that lock without waiting and skips an env that is in use.

The installer is uv when there is one (on PATH, or the `uv` package), else
fabdeploy's own pip (`pip install --target`), into a venv made without pip.
"""
from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import venv
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import DeployError

if sys.version_info >= (3, 11):
    import tomllib
else:  # build needs tomli on 3.10
    import tomli as tomllib

# PEP 517's fallback for a project without pyproject.toml or [build-system], as `build` has it.
DEFAULT_BUILD_SYSTEM = {"requires": ["setuptools >= 40.8.0"],
                        "build-backend": "setuptools.build_meta:__legacy__"}
UNUSED_FOR = 30 * 86400  # seconds without a build before an env is pruned
IN_USE = ".in-use"
ABOUT = "fabdeploy-env.json"
LOG = "made.jsonl"


def user_cache() -> Path:
    """fabdeploy's folder in the user's cache: wheels, build envs, wheelhouses."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "fabdeploy"


def envs_dir() -> Path:
    return user_cache() / "build-envs"


def no_project(project_dir: Path) -> DeployError:
    return DeployError(f"{project_dir} has no pyproject.toml or setup.py", host="local",
                       hint="run fab from your project, or set fabdeploy.project_dir")


def read_pyproject(project_dir: Path) -> dict | None:
    """pyproject.toml as a dict; None when there is none."""
    path = project_dir / "pyproject.toml"
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise DeployError(f"{path} does not parse: {exc}", host="local",
                          hint="fix pyproject.toml") from None


def build_system(project_dir: Path) -> dict:
    """The project's [build-system] table, with PEP 517's defaults for a setup.py-only project."""
    pyproject = read_pyproject(project_dir)
    if pyproject is None and not (project_dir / "setup.py").exists():
        raise no_project(project_dir)
    table = (pyproject or {}).get("build-system") or DEFAULT_BUILD_SYSTEM
    requires = table.get("requires") if isinstance(table, dict) else None
    if not (isinstance(requires, list) and all(isinstance(r, str) for r in requires)):
        raise DeployError(f"{project_dir / 'pyproject.toml'} has no list of [build-system].requires",
                          host="local", hint='add one, e.g. requires = ["setuptools>=64"]')
    return {"requires": requires,
            "build-backend": table.get("build-backend", DEFAULT_BUILD_SYSTEM["build-backend"]),
            "backend-path": table.get("backend-path")}


def python_id() -> str:
    """The interpreter envs are made from: its version and the real path of the base Python."""
    base = getattr(sys, "_base_executable", None) or sys.executable
    return f"{platform.python_implementation()} {platform.python_version()} {os.path.realpath(base)}"


def digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:20]


def declared_key(table: dict) -> str:
    return digest(python_id(), json.dumps(table, sort_keys=True))


def env_key(holds: list[str]) -> str:
    """An env's name: what it holds after resolution, on which Python."""
    return digest(python_id(), *holds)


# -- this environment ---------------------------------------------------------

def here_suffices(table: dict, source: Path, root: Path) -> bool:
    """Whether fabdeploy's own environment has the build requirements (the backend's too).

    Asking the backend takes a quarter to half a second, so the answer is
    kept per [build-system] and environment: a new version number in
    pyproject.toml does not ask again.
    """
    memo = root / "here" / digest(sys.executable, json.dumps(table, sort_keys=True))
    if memo.exists():
        return memo.read_text() == "yes"
    try:
        from build import BuildBackendException, ProjectBuilder, check_dependency
        from pyproject_hooks import quiet_subprocess_runner
        builder = ProjectBuilder(source, runner=quiet_subprocess_runner)
        if any(any(check_dependency(req)) for req in builder.build_system_requires):
            suffices = False
        else:
            try:
                suffices = not builder.check_dependencies("wheel")
            except BuildBackendException:
                # The backend is here and runs, but fails: this project is broken. Building
                # here shows its own error, and a build env would only add a download; not
                # remembered, since it says nothing of other projects with this [build-system].
                return True
    except Exception:  # any other doubt: the build env is the safe one
        suffices = False
    write_atomic(memo, "yes" if suffices else "no")
    return suffices


# -- the cached envs ----------------------------------------------------------

@contextmanager
def hook_python(source: Path, project_dir: Path, root: Path | None = None) -> Iterator[str]:
    """The Python to run source's build hooks with, kept from pruning for the block.

    fabdeploy's own when it has the build requirements, else the cached build
    env's, made first when there is none (which needs the package index).
    """
    table = build_system(project_dir)
    root = root or envs_dir()
    if here_suffices(table, source, root):
        yield sys.executable
        return
    for _ in range(3):  # an env pruned between finding and holding it is made again
        env = find(root, table) or made(root, table, source, project_dir)
        held = hold(env)
        if held is not None:
            break
    else:
        raise DeployError(f"the build environment {env} keeps disappearing", host="local",
                          hint="is another program deleting it? try again")
    try:
        yield str(env / "bin" / "python")
    finally:
        os.close(held)


def find(root: Path, table: dict) -> Path | None:
    """The env this declaration resolved to, when it is still here: no installer, no network."""
    try:
        env = root / (root / "declared" / declared_key(table)).read_text().strip()
    except FileNotFoundError:
        return None
    return env if usable(env) else None


def usable(env: Path) -> bool:
    return (env / "bin" / "python").exists() and (env / IN_USE).exists()


def hold(env: Path) -> int | None:
    """A shared lock on env's .in-use file, its mtime made now; None if env went meanwhile."""
    try:
        fd = os.open(env / IN_USE, os.O_RDWR)
    except FileNotFoundError:
        return None
    fcntl.flock(fd, fcntl.LOCK_SH)
    if not (env / IN_USE).exists():  # pruned between the open and the lock
        os.close(fd)
        return None
    os.utime(fd)
    return fd


def made(root: Path, table: dict, source: Path, project_dir: Path) -> Path:
    """The env for table, made here unless another fab made it while we waited for the lock."""
    root.mkdir(parents=True, exist_ok=True)
    with locked(root / ".lock"):
        env = find(root, table)
        if env is None:
            env = make(root, table, source, project_dir)
            prune(root)
    return env


def make(root: Path, table: dict, source: Path, project_dir: Path) -> Path:
    """Install table's requirements into a new venv, then put it where its resolution says.

    Built aside and renamed when complete: an env in its place is never half made.
    """
    tmp = Path(tempfile.mkdtemp(prefix=".new-", dir=root))
    try:
        venv.create(tmp, with_pip=False, symlinks=True)
        python = tmp / "bin" / "python"
        installer = install(tmp, table["requires"], project_dir)
        extra = dynamic_requires(python, source)
        if extra:  # together with the first ones: one resolution of all of them
            install(tmp, table["requires"] + extra, project_dir)
        holds = contents(python)
        env = root / env_key(holds)
        about = {"env": env.name, "python": python_id(), "declared": table, "holds": holds,
                 "installer": installer, "made": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        if usable(env):
            about["twin"] = True  # resolved to an env that is here: the new copy goes
        else:
            shutil.rmtree(env, ignore_errors=True)  # a broken leftover: nobody can be using it
            compile_for(python, tmp, env)
            (tmp / ABOUT).write_text(json.dumps(about, indent=2) + "\n")
            (tmp / IN_USE).touch()
            tmp.rename(env)
        write_atomic(root / "declared" / declared_key(table), env.name)
        with open(root / LOG, "a") as log:  # what was made when: why a build needed the network
            log.write(json.dumps(about) + "\n")
        return env
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def install(env: Path, requirements: list[str], project_dir: Path) -> str:
    """Install requirements into the venv env; the installer's name."""
    uv = find_uv()
    if uv is None and importlib.util.find_spec("pip") is None:
        raise DeployError("neither uv nor pip is here to make a build environment", host="local",
                          hint="install uv, or pip into fabdeploy's environment")
    argv = install_argv(env, requirements, uv)
    result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    name = "uv" if uv else "pip"
    if result.returncode != 0:
        raise DeployError(
            f"no build environment with {', '.join(requirements)} for Python "
            f"{platform.python_version()} is cached, and {name} could not install "
            f"{'them' if len(requirements) > 1 else 'it'}",
            host="local", hint=f"reach the package index once, later builds need none; or check "
                               f"the build requirements of {project_dir}")
    return name


def compile_for(python: Path, tmp: Path, env: Path) -> None:
    """Bytecode now, naming the paths it will have after the rename.

    Half of a setuptools build is compiling setuptools: without this, a user
    with PYTHONDONTWRITEBYTECODE set would pay that on every build.
    """
    subprocess.run([str(python), "-I", "-m", "compileall", "-q", "-j0", "-s", str(tmp), "-p", str(env),
                    str(tmp / "lib")], stdin=subprocess.DEVNULL, capture_output=True)


def find_uv() -> str | None:
    """uv on PATH, or from the `uv` package in this environment."""
    found = shutil.which("uv")
    if found:
        return found
    try:
        from uv import find_uv_bin
        return find_uv_bin()
    except Exception:  # no uv package, or one without its binary
        return None


def install_argv(env: Path, requirements: list[str], uv: str | None) -> list[str]:
    """The command that installs requirements into the venv env: uv's, else this env's pip."""
    if uv:
        return [uv, "pip", "install", "--quiet", "--python", str(env / "bin" / "python"), "--",
                *requirements]
    # --target, not --python, which pip before 22.3 lacks (Ubuntu 22.04's venvs have 22.0).
    # The env is made from this Python, so pip's markers and tags here are the env's; with
    # --target pip ignores what this env has installed. No bytecode yet: compile_for makes
    # it with the paths of the env's final place.
    site = sysconfig.get_path("purelib", "venv" if "venv" in sysconfig.get_scheme_names()
                              else "posix_prefix", vars={"base": str(env), "platbase": str(env)})
    return [sys.executable, "-m", "pip", "install", "--quiet", "--no-compile", "--upgrade",
            "--disable-pip-version-check", "--target", site, "--", *requirements]


def dynamic_requires(python: Path, source: Path) -> list[str]:
    """What the backend asks for on top of [build-system].requires (old setuptools: wheel)."""
    from build import BuildBackendException, BuildException, ProjectBuilder
    from pyproject_hooks import quiet_subprocess_runner
    try:
        builder = ProjectBuilder(source, python_executable=str(python), runner=quiet_subprocess_runner)
        return sorted(builder.get_requires_for_build("wheel"))
    except (BuildBackendException, BuildException):
        return []  # a broken project: its build shows why, with this env


CONTENTS = ("import importlib.metadata as m, json; "
            "print(json.dumps([[d.metadata['Name'], d.version] for d in m.distributions()]))")


def contents(python: Path) -> list[str]:
    """What python's venv holds, as sorted name==version lines."""
    from packaging.utils import canonicalize_name
    out = subprocess.run([str(python), "-I", "-c", CONTENTS], stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, check=True).stdout
    return sorted({f"{canonicalize_name(name)}=={version}" for name, version in json.loads(out)})


def prune(root: Path, now: float | None = None) -> None:
    """Drop envs unused for UNUSED_FOR, then pointers to envs that are gone. Under root's lock."""
    cutoff = (now or time.time()) - UNUSED_FOR
    for entry in root.iterdir():
        if entry.name.startswith((".new-", ".old-")):  # left by a crash: we hold the makers' lock
            shutil.rmtree(entry, ignore_errors=True)
        elif (entry / IN_USE).exists() and (entry / IN_USE).stat().st_mtime < cutoff:
            drop_unused(entry)
    for pointer in (root / "declared").glob("*"):
        if not (root / pointer.read_text().strip() / IN_USE).exists():
            pointer.unlink(missing_ok=True)


def drop_unused(env: Path) -> None:
    """Delete env unless a build holds it; renamed first, so no one finds half of it."""
    fd = os.open(env / IN_USE, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return
    trash = env.with_name(".old-" + env.name)
    env.rename(trash)
    os.close(fd)
    shutil.rmtree(trash, ignore_errors=True)


@contextmanager
def locked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Readers see the old file or the new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
