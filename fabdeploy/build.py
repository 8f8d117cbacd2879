"""Build the app's wheel locally, once per invocation (PEP 517, via `build`).

Only the backend's build_wheel hook runs, with fabdeploy's own Python when it
has the build requirements, else in a build env of buildenv's: made once per
[build-system] and Python in the user's cache, then reused with no install.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from . import buildenv
from .errors import DeployError, tail


@dataclass(frozen=True)
class Wheel:
    path: Path
    sha256: str

    @property
    def filename(self) -> str:
        return self.path.name

    @property
    def version(self) -> str:
        # name-version-pythontag-abitag-platform.whl
        return self.path.name.split("-")[1]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


SKIP_DIRS = {".git", ".hg", ".venv", "venv", "build", "dist", "__pycache__", ".tox", ".nox",
             ".pytest_cache", ".mypy_cache", "node_modules", ".demo"}


def source_key(project_dir: Path) -> str:
    """A hash of the project's sources: same hash, same wheel."""
    digest = hashlib.sha256()
    for path in sorted(source_files(project_dir)):
        digest.update(str(path.relative_to(project_dir)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:32]


def source_files(project_dir: Path):
    for root, dirs, files in os.walk(project_dir):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        for name in files:
            if not name.endswith((".pyc", ".pyo")) and name not in ("fabric.yaml",):
                yield Path(root) / name


def clean_copy(project_dir: Path, dest: Path) -> Path:
    for path in source_files(project_dir):
        target = dest / path.relative_to(project_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    if (project_dir / ".git").exists():
        # Versions from git (setuptools-scm and the like) still find their history.
        (dest / ".git").symlink_to((project_dir / ".git").resolve())
    return dest


def cache_dir() -> Path:
    return buildenv.user_cache() / "wheels"


def cached_wheel(project_dir: Path, cache: Path | None = None) -> Wheel | None:
    """The wheel of exactly these sources, if it was built before: hashing them is quick."""
    out_dir = (cache or cache_dir()) / source_key(project_dir)
    wheels = sorted(out_dir.glob("*.whl"))
    if len(wheels) != 1:
        return None
    os.utime(out_dir)  # a hit is a use: prune() drops the least recently used
    return Wheel(wheels[0], sha256(wheels[0]))


def build_wheel(project_dir: Path, cache: Path | None = None) -> Wheel:
    """The project's wheel: from the cache when the sources are unchanged, else built.

    A failed build shows the build's last lines.
    """
    cache = cache or cache_dir()
    hit = cached_wheel(project_dir, cache)
    if hit is not None:
        return hit
    out_dir = cache / source_key(project_dir)
    tmp = Path(tempfile.mkdtemp(prefix="fabdeploy-build-"))
    try:
        # From a clean copy of exactly the hashed sources: setuptools reuses build/lib,
        # so a file deleted from the project would otherwise keep shipping.
        source = clean_copy(project_dir, tmp / "src")
        with buildenv.hook_python(source, project_dir) as python:
            build_with(python, source, tmp, project_dir)
        built = sorted(tmp.glob("*.whl"))
        if len(built) != 1:
            raise DeployError(f"the build of {project_dir} made {len(built)} wheels, not one",
                              host="local")
        out_dir.mkdir(parents=True, exist_ok=True)
        # Rename last: a wheel in the cache is always complete.
        final = out_dir / built[0].name
        shutil.move(str(built[0]), str(final))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed build too: it holds a copy of the sources
    prune(cache)
    return Wheel(final, sha256(final))


def start_build(project_dir: Path, cache: Path | None = None) -> "Future[Wheel]":
    """build_wheel in the background, so the hosts connect and lock meanwhile.

    The hook runs in a subprocess (pyproject_hooks), so this thread mostly
    waits; a cached wheel is ready at once.
    """
    future: Future[Wheel] = Future()
    try:  # an unchanged tree's wheel, at once: the first request to a host can then ask about it
        hit = cached_wheel(project_dir, cache)
    except OSError:
        hit = None
    if hit is not None:
        future.set_result(hit)
        return future

    def work() -> None:
        try:
            future.set_result(build_wheel(project_dir, cache))
        except BaseException as exc:  # handed to whoever waits for the wheel
            future.set_exception(exc)

    threading.Thread(target=work, name="fabdeploy-build", daemon=True).start()
    return future


def build_failed(project_dir: Path, output: str) -> DeployError:
    return DeployError(f"building the wheel of {project_dir} failed", host="local",
                       hint="fix the build, then deploy again", detail=tail(output))


def build_with(python: str, source: Path, out_dir: Path, project_dir: Path) -> None:
    """Only the backend's build_wheel hook, run by python: no install, one process."""
    from build import BuildBackendException, BuildException, ProjectBuilder
    from pyproject_hooks import quiet_subprocess_runner
    try:
        builder = ProjectBuilder(source, python_executable=python, runner=quiet_subprocess_runner)
        builder.build("wheel", out_dir)
    except BuildBackendException as exc:
        output = getattr(exc.exception, "output", None) or str(exc)
        raise build_failed(project_dir, output.decode(errors="replace")
                           if isinstance(output, bytes) else output) from None
    except BuildException as exc:  # e.g. a [build-system] table that is not valid
        raise DeployError(f"{project_dir / 'pyproject.toml'}: {exc}", host="local",
                          hint="fix its [build-system]") from None


def prune(cache: Path, keep: int = 20) -> None:
    """Keep the newest wheels only: the cache is a speed-up, not an archive."""
    entries = sorted((d for d in cache.iterdir() if d.is_dir()), key=lambda d: d.stat().st_mtime)
    in_use = time.time() - 3600  # another fab on this machine may be uploading it right now
    for old in entries[:-keep]:
        if old.stat().st_mtime < in_use:
            shutil.rmtree(old, ignore_errors=True)
