"""Build the app's wheel locally, once per invocation (PEP 517, via `build`)."""
from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

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


def build_wheel(project_dir: Path, out_dir: Path | None = None) -> Wheel:
    """Run `python -m build --wheel`; a failure shows the build's last lines."""
    out_dir = Path(out_dir or tempfile.mkdtemp(prefix="fabdeploy-build-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(out_dir), str(project_dir)],
        stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if result.returncode != 0:
        raise DeployError(f"building the wheel of {project_dir} failed", host="local",
                          hint="fix the build, then deploy again",
                          detail=tail(result.stdout + result.stderr))
    wheels = sorted(out_dir.glob("*.whl"), key=lambda p: p.stat().st_mtime)
    if not wheels:
        raise DeployError(f"the build of {project_dir} made no wheel", host="local")
    return Wheel(wheels[-1], sha256(wheels[-1]))
