"""Fixtures: throwaway hosts, and a copy of the example project to deploy."""
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness.local_host import LocalHost  # noqa: E402

EXAMPLE = ROOT / "example"
FAB = str(Path(sys.executable).with_name("fab"))


def traversable_tmpdir(prefix: str) -> Path:
    """A directory under /tmp that the throwaway host's user can enter."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    return path


@pytest.fixture(scope="module")
def host():
    """A real sshd + nginx on loopback with its own deploy user, per test module."""
    workdir = traversable_tmpdir("fabdeploy-host-")
    with LocalHost(workdir) as h:
        yield h
    shutil.rmtree(workdir, ignore_errors=True)


class Project:
    """A copy of the example app with a fabfile and a fabric.yaml for one host."""

    def __init__(self, path: Path, host: LocalHost):
        self.path = path
        self.host = host

    def configure(self, **fabdeploy) -> None:
        config = self.host.fabric_yaml("guestbook")
        for key, value in fabdeploy.items():
            if isinstance(value, dict):
                config["fabdeploy"].setdefault(key, {}).update(value)
            else:
                config["fabdeploy"][key] = value
        # JSON is YAML, and keeps this free of a YAML dependency.
        (self.path / "fabric.yaml").write_text(json.dumps(config, indent=2))

    def set_version(self, version: str, greeting: str | None = None) -> None:
        pyproject = self.path / "pyproject.toml"
        text = pyproject.read_text()
        old = next(line for line in text.splitlines() if line.startswith("version ="))
        pyproject.write_text(text.replace(old, f'version = "{version}"'))
        if greeting:
            app = self.path / "guestbook" / "__init__.py"
            text = app.read_text()
            old = next(line for line in text.splitlines() if line.startswith("GREETING ="))
            app.write_text(text.replace(old, f"GREETING = {greeting!r}"))

    def fab(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        """Run the real `fab` CLI in the project, as a user would."""
        argv = [FAB, "-H", self.host.host_string, *args]
        result = subprocess.run(argv, cwd=self.path, capture_output=True, text=True,
                                stdin=subprocess.DEVNULL, timeout=timeout,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited {result.returncode}\n"
                                 f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}")
        return result

    @property
    def deploy_to(self) -> Path:
        return self.host.home / "srv" / "guestbook"


@pytest.fixture
def project(tmp_path, host):
    path = tmp_path / "guestbook"
    shutil.copytree(EXAMPLE, path, ignore=shutil.ignore_patterns("*.egg-info", "build", "dist",
                                                                  "__pycache__"))
    proj = Project(path, host)
    proj.configure()
    yield proj
    # Leave the host as the next test expects to find it: nothing deployed.
    host.run_as_user(f"for p in ~/srv/guestbook/shared/run/*.pid; do [ -f \"$p\" ] && "
                     f"kill \"$(cat \"$p\")\"; done; rm -rf ~/srv", check=False)
