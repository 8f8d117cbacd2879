"""Fixtures: throwaway hosts, and a copy of the example project to deploy."""
import shutil

import pytest

from harness.local_host import LocalHost
from harness.project import EXAMPLE, FAB, ROOT, Project, traversable_tmpdir  # noqa: F401


@pytest.fixture(scope="module")
def host():
    """A real sshd + nginx on loopback with its own deploy user, per test module."""
    workdir = traversable_tmpdir("fabdeploy-host-")
    with LocalHost(workdir) as h:
        yield h
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def project(tmp_path, host):
    """A fresh copy of the example app configured for `host`; the host is wiped after."""
    proj = Project(tmp_path / "guestbook", host)
    yield proj
    host.run_as_user("for p in ~/srv/guestbook/shared/run/*.pid; do [ -f \"$p\" ] && "
                     "kill \"$(cat \"$p\")\"; done; rm -rf ~/srv", check=False)
    # As on a fresh host: no site either (nginx keeps the old one in memory until a reload).
    (host.site_dir / "guestbook.conf").unlink(missing_ok=True)


@pytest.fixture(scope="module")
def fresh_wheel_cache(tmp_path_factory):
    """An empty wheel cache, so each project is really built; dependencies' wheelhouses shared.

    Every fab started meanwhile inherits it (XDG_CACHE_HOME).
    """
    from fabdeploy.build import cache_dir
    shared = cache_dir().parent / "wheelhouses"
    shared.mkdir(parents=True, exist_ok=True)
    home = tmp_path_factory.mktemp("xdg-cache")
    (home / "fabdeploy").mkdir()
    (home / "fabdeploy" / "wheelhouses").symlink_to(shared)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("XDG_CACHE_HOME", str(home))
        yield home


def wipe_host(host) -> None:
    """As a fresh host: every app's servers stopped, ~/srv and the proxy's sites gone."""
    host.run_as_user("for p in ~/srv/*/shared/run/*.pid; do [ -f \"$p\" ] && "
                     "kill \"$(cat \"$p\")\"; done; rm -rf ~/srv", check=False)
    for site in host.site_dir.glob("*.conf"):
        site.unlink()


def merged(base: dict, extra: dict) -> dict:
    """base with extra's keys laid over it, nested mappings merged (fabric.yaml's way)."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(
            out.get(key), dict) else value
    return out
