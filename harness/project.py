"""A copy of the example app, configured for a throwaway host, driven by the real `fab`."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "example"
FAB = str(Path(sys.executable).with_name("fab"))
COPY_IGNORE = shutil.ignore_patterns("*.egg-info", "build", "dist", "__pycache__")


def traversable_tmpdir(prefix: str) -> Path:
    """A directory under /tmp that a throwaway host's user can enter."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    return path


class Project:
    """The example app copied to `path`, with a fabfile and a fabric.yaml for `host`."""

    def __init__(self, path: Path, host, app: str = "guestbook", fab: str = FAB):
        self.path = path
        self.host = host
        self.app = app
        self.fab_program = fab  # another venv's `fab`: fabdeploy as a user installed it
        if not path.exists():
            shutil.copytree(EXAMPLE, path, ignore=COPY_IGNORE)
        self.configure()

    def configure(self, **fabdeploy) -> None:
        """Write fabric.yaml: the host's settings, with `fabdeploy` overrides merged in."""
        config = self.host.fabric_yaml(self.app)
        for key, value in fabdeploy.items():
            if isinstance(value, dict):
                config["fabdeploy"].setdefault(key, {}).update(value)
            else:
                config["fabdeploy"][key] = value
        # JSON is YAML, and keeps this free of a YAML dependency.
        (self.path / "fabric.yaml").write_text(json.dumps(config, indent=2))

    def set_version(self, version: str, greeting: str | None = None) -> None:
        """Change the code: a new version, and optionally a new greeting."""
        pyproject = self.path / "pyproject.toml"
        text = pyproject.read_text()
        old = next(line for line in text.splitlines() if line.startswith("version ="))
        pyproject.write_text(text.replace(old, f'version = "{version}"'))
        if greeting:
            app = self.path / "guestbook" / "__init__.py"
            text = app.read_text()
            old = next(line for line in text.splitlines() if line.startswith("GREETING ="))
            app.write_text(text.replace(old, f"GREETING = {greeting!r}"))

    def fab(self, *args: str, check: bool = True, timeout: float = 300,
            hosts: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
        """Run the real `fab` CLI in the project, as a user would."""
        hosts = self.host.host_string if hosts is None else hosts
        argv = [self.fab_program, *(["-H", hosts] if hosts else []), *args]
        result = subprocess.run(argv, cwd=self.path, capture_output=True, text=True,
                                stdin=subprocess.DEVNULL, timeout=timeout,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited {result.returncode}\n"
                                 f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}")
        return result

    @property
    def deploy_to(self) -> Path:
        return self.host.home / "srv" / self.app
