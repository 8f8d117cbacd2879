"""The dependencies' wheels, fetched here for the server's platform and shipped.

Servers then install with --no-index: no internet needed there, nothing
resolved twice, and the same versions on every host. The wheelhouse is
cached per set of requirements and platform, so a code-only change reuses it.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from .build import Wheel, cache_dir
from .catalog import BUILT_ON_SERVER
from .errors import DeployError, tail
from .model import HostFacts

TOOLS = ("pip", "uv")  # shipped too: pip to install, uv to install fast


@dataclass(frozen=True)
class Platform:
    """What a server's Python accepts: its version, machine and glibc."""

    python: str          # "3.11"
    machine: str         # "x86_64"
    glibc: tuple[int, int] | None

    def pip_options(self) -> list[str]:
        digits = self.python.replace(".", "")
        options = ["--python-version", self.python, "--implementation", "cp", "--abi", f"cp{digits}"]
        for tag in self.platform_tags():
            options += ["--platform", tag]
        return options

    def platform_tags(self) -> list[str]:
        """Every manylinux tag the server's glibc accepts, newest first (PEP 600)."""
        newest = self.glibc[1] if self.glibc and self.glibc[0] == 2 else 17
        tags = [f"manylinux_2_{minor}_{self.machine}" for minor in range(newest, 4, -1)]
        # The legacy names of glibc 2.17, 2.12 and 2.5 (PEP 599, 571, 513).
        for name, minor in (("manylinux2014", 17), ("manylinux2010", 12), ("manylinux1", 5)):
            if newest >= minor:
                tags.append(f"{name}_{self.machine}")
        return tags


def platform_of(facts: HostFacts) -> Platform:
    glibc = None
    if facts.glibc:
        major, _, minor = facts.glibc.partition(".")
        if major.isdigit() and minor.isdigit():
            glibc = (int(major), int(minor))
    return Platform(facts.python, facts.machine or "x86_64", glibc)


def requires(wheel: Wheel) -> list[str]:
    """The app's Requires-Dist lines, from the wheel's METADATA."""
    with zipfile.ZipFile(wheel.path) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        text = zf.read(name).decode()
    return sorted(line.split(":", 1)[1].strip() for line in text.splitlines()
                  if line.startswith("Requires-Dist:"))


_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def fetch(wheel: Wheel, packages: list[str], platform: Platform, cache: Path | None = None) -> list[Path]:
    """The wheels the app and packages need on `platform`, from the cache or pip download."""
    key = hashlib.sha256(repr((requires(wheel), sorted(packages), platform)).encode()).hexdigest()[:32]
    folder = (cache or cache_dir().parent / "wheelhouses") / key
    with _locks_guard:
        lock = _locks.setdefault(key, threading.Lock())
    with lock:  # hosts with the same platform fetch once
        if not (folder / "COMPLETE").exists():
            download(wheel, packages, platform, folder)
    return sorted(p for p in folder.iterdir() if p.name.endswith((".whl", SDIST)))


def download(wheel: Wheel, packages: list[str], platform: Platform, folder: Path) -> None:
    binary, source = built_here(packages)
    tools = sorted({tool for p in source for tool in BUILT_ON_SERVER[project(p)]})
    tmp = Path(tempfile.mkdtemp(prefix="fabdeploy-wheels-"))
    pip(tmp, platform, ["--only-binary=:all:", *platform.pip_options(),
                        str(wheel.path), *binary, *TOOLS, *tools])
    if source:
        # pip reads an sdist's metadata by running its setup.py, and mod_wsgi's asks apxs about
        # Apache: true answers nothing, which is enough for metadata. It is compiled on the server.
        pip(tmp, platform, ["--no-deps", "--no-binary=:all:", *source],
            env={**os.environ, "APXS": shutil.which("true") or "/bin/true"})
    (tmp / wheel.filename).unlink(missing_ok=True)  # the app's own wheel travels on its own
    (tmp / "COMPLETE").write_text("")
    folder.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(folder, ignore_errors=True)
    shutil.move(str(tmp), str(folder))  # COMPLETE arrives with the rest, never before


def pip(tmp: Path, platform: Platform, args: list[str], env: dict | None = None) -> None:
    """pip download into tmp; its failure, in one line."""
    argv = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
            "--dest", str(tmp), *args]
    result = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, env=env)
    if result.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DeployError(f"fetching the dependencies' wheels for Python {platform.python} on "
                          f"{platform.machine} failed", host="local",
                          hint="every dependency needs a wheel for the server; or set "
                               "wheelhouse: false to let the server install from PyPI",
                          detail=tail(result.stdout + result.stderr))


# -- packages built on the server ------------------------------------------------------------

SDIST = ".tar.gz"


def project(requirement: str) -> str:
    return canonicalize_name(Requirement(requirement).name)


def built_here(packages: list[str]) -> tuple[list[str], list[str]]:
    """The packages fetched as wheels, and those that ship none (their sdist is fetched)."""
    source = [p for p in packages if project(p) in BUILT_ON_SERVER]
    return [p for p in packages if p not in source], source


def unbuilt(shipped: list[Path], facts: HostFacts) -> list[Path]:
    """The shipped sdists the server's wheelhouse has no wheel of yet, for its Python and machine."""
    tag = "cp" + facts.python.replace(".", "")
    found = []
    for sdist in (p for p in shipped if p.name.endswith(SDIST)):
        name, _, version = sdist.name[: -len(SDIST)].rpartition("-")
        stem = f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}-{tag}-"
        if not any(w.lower().startswith(stem) and w.endswith(f"_{facts.machine}.whl") for w in facts.wheelhouse):
            found.append(sdist)
    return found


def tool_wheel(wheels: list[Path], name: str) -> Path | None:
    return next((w for w in wheels if w.name.split("-")[0].lower() == name), None)
