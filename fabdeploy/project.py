"""The app's project: its distribution name, from wherever the project keeps it."""
from __future__ import annotations

import configparser
import email.parser
import hashlib
import shutil
import tempfile
from pathlib import Path

from . import buildenv
from .build import clean_copy
from .errors import DeployError


def project_name(project_dir: Path) -> str:
    """[project].name of pyproject.toml, else setup.cfg's [metadata] name, else the backend's."""
    return (name_in_pyproject(project_dir) or name_in_setup_cfg(project_dir)
            or name_from_backend(project_dir))


def name_in_pyproject(project_dir: Path) -> str | None:
    pyproject = buildenv.read_pyproject(project_dir) or {}
    if "project" in pyproject and not pyproject["project"].get("name"):
        raise DeployError(f"{project_dir / 'pyproject.toml'} has no [project].name", host="local",
                          hint="add it, or set fabdeploy.app")
    return pyproject.get("project", {}).get("name")


def name_in_setup_cfg(project_dir: Path) -> str | None:
    config = configparser.ConfigParser(interpolation=None)
    try:
        config.read(project_dir / "setup.cfg", encoding="utf-8")
    except configparser.Error:
        return None  # setuptools reads it too, and says what is wrong with it
    name = config.get("metadata", "name", fallback="").strip()
    return name if name and not name.startswith(("attr:", "file:")) else None


def name_from_backend(project_dir: Path) -> str:
    """The Name in the metadata the build backend makes, kept per content of the files that say it."""
    buildenv.build_system(project_dir)  # neither pyproject.toml nor setup.py: say so first
    memo = buildenv.user_cache() / "names" / naming_files_key(project_dir)
    if memo.exists():
        return memo.read_text()
    name = backend_metadata(project_dir)["Name"]
    if not name or name == "UNKNOWN":  # setuptools' name for a project that gives none
        raise unnamed(project_dir)
    buildenv.write_atomic(memo, name)
    return name


def naming_files_key(project_dir: Path) -> str:
    """A hash of the files that name a project: same files, same name."""
    digest = hashlib.sha256()
    for name in ("pyproject.toml", "setup.py", "setup.cfg"):
        path = project_dir / name
        digest.update(name.encode() + b"\0" + (path.read_bytes() if path.exists() else b"-") + b"\0")
    return digest.hexdigest()[:32]


def backend_metadata(project_dir: Path):
    """prepare_metadata_for_build_wheel, in the project's build env, on a copy (setuptools
    writes an egg-info into the project it reads)."""
    from build import BuildBackendException, BuildException, ProjectBuilder
    from pyproject_hooks import quiet_subprocess_runner
    tmp = Path(tempfile.mkdtemp(prefix="fabdeploy-metadata-"))
    try:
        source = clean_copy(project_dir, tmp / "src")
        with buildenv.hook_python(source, project_dir) as python:
            try:
                builder = ProjectBuilder(source, python_executable=python,
                                         runner=quiet_subprocess_runner)
                dist_info = Path(builder.metadata_path(tmp / "out"))
            except (BuildBackendException, BuildException):
                raise unnamed(project_dir) from None
        return email.parser.Parser().parsestr((dist_info / "METADATA").read_text())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def unnamed(project_dir: Path) -> DeployError:
    setup = project_dir / ("setup.py" if (project_dir / "setup.py").exists() else "pyproject.toml")
    return DeployError(f"the project name could not be read from {setup}", host="local",
                       hint="set fabdeploy.app, or name = ... in setup.cfg's [metadata]")
