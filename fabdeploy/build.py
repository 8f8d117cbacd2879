"""Build the app's wheel locally, once per invocation (PEP 517, via `build`)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from .errors import DeployError, tail

if sys.version_info >= (3, 11):
    import tomllib
else:  # build needs tomli on 3.10
    import tomli as tomllib


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
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "fabdeploy" / "wheels"


def isolation_needed(project_dir: Path, cache: Path) -> bool:
    """Build in an isolated env only when this one lacks the build requirements.

    Asking the backend takes a quarter to half a second, so the answer is
    kept per build system (pyproject.toml's [build-system]) and Python: a
    new version number in pyproject.toml does not ask again.
    """
    key = hashlib.sha256(build_system(project_dir) + sys.executable.encode()).hexdigest()[:32]
    memo = cache / f"isolation-{key}"
    if memo.exists():
        return memo.read_text() == "isolated"
    try:
        from build import BuildBackendException, ProjectBuilder, check_dependency
        from pyproject_hooks import quiet_subprocess_runner
        builder = ProjectBuilder(project_dir, runner=quiet_subprocess_runner)
        if any(any(check_dependency(req)) for req in builder.build_system_requires):
            needed = True
        else:
            try:
                needed = bool(builder.check_dependencies("wheel"))
            except BuildBackendException:
                # The backend is here and runs, but fails: the project is broken. Building
                # here shows its own error; an isolated env would only add a download (and
                # offline, show pip's error instead).
                needed = False
    except Exception:  # any other doubt: the isolated build is the safe one
        needed = True
    cache.mkdir(parents=True, exist_ok=True)
    memo.write_text("isolated" if needed else "shared")
    return needed


def build_system(project_dir: Path) -> bytes:
    """pyproject.toml's [build-system] table, canonical; the whole file if it does not parse.

    A project with only setup.py has PEP 517's fallback: setuptools' legacy backend.
    """
    path = project_dir / "pyproject.toml"
    if not path.exists():
        return b"setuptools.build_meta:__legacy__"
    text = path.read_bytes()
    try:
        table = tomllib.loads(text.decode()).get("build-system", {})
    except (ValueError, UnicodeDecodeError):
        return text
    return json.dumps(table, sort_keys=True).encode()


def build_wheel(project_dir: Path, cache: Path | None = None) -> Wheel:
    """The project's wheel: from the cache when the sources are unchanged, else built.

    A failed build shows the build's last lines.
    """
    cache = cache or cache_dir()
    out_dir = cache / source_key(project_dir)
    wheels = sorted(out_dir.glob("*.whl"))
    if len(wheels) == 1:
        os.utime(out_dir)  # a hit is a use: prune() drops the least recently used
        return Wheel(wheels[0], sha256(wheels[0]))
    tmp = Path(tempfile.mkdtemp(prefix="fabdeploy-build-"))
    try:
        # From a clean copy of exactly the hashed sources: setuptools reuses build/lib,
        # so a file deleted from the project would otherwise keep shipping.
        source = clean_copy(project_dir, tmp / "src")
        build = build_isolated if isolation_needed(project_dir, cache) else build_here
        build(source, tmp, project_dir)
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


def build_isolated(source: Path, out_dir: Path, project_dir: Path) -> None:
    """`python -m build` of the copy in source: a fresh environment with the build requirements."""
    argv = [sys.executable, "-m", "build", "--wheel", "--outdir", str(out_dir), str(source)]
    result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if result.returncode != 0:
        raise build_failed(project_dir, result.stdout + result.stderr)


def build_here(source: Path, out_dir: Path, project_dir: Path) -> None:
    """Only the backend's build_wheel hook, from this environment: one process, not three."""
    from build import BuildBackendException, ProjectBuilder
    from pyproject_hooks import quiet_subprocess_runner
    try:
        ProjectBuilder(source, runner=quiet_subprocess_runner).build("wheel", out_dir)
    except BuildBackendException as exc:
        output = getattr(exc.exception, "output", None) or str(exc)
        raise build_failed(project_dir, output.decode(errors="replace")
                           if isinstance(output, bytes) else output) from None


def prune(cache: Path, keep: int = 20) -> None:
    """Keep the newest wheels only: the cache is a speed-up, not an archive."""
    entries = sorted((d for d in cache.iterdir() if d.is_dir()), key=lambda d: d.stat().st_mtime)
    in_use = time.time() - 3600  # another fab on this machine may be uploading it right now
    for old in entries[:-keep]:
        if old.stat().st_mtime < in_use:
            shutil.rmtree(old, ignore_errors=True)
