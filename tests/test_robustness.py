"""Issue 16 on a production host: what a year of deploys meets, one case at a time.

One Debian 12 nspawn host, set up by provision alone, with systemd: a
rotation after a failed deploy, the warm standby after a reboot, a bad wsgi
named in about the health check's time, and logs that rotate.
"""
import json
import os
import re
import time
import urllib.request

import pytest

from harness.fleet import module_fleet
from harness.project import Project

pytestmark = [
    pytest.mark.nspawn,
    pytest.mark.skipif(os.geteuid() != 0, reason="systemd-nspawn hosts need root"),
]

APP = "guestbook"
ROOT = f"/srv/{APP}"


fleet = module_fleet(1, "robust")


@pytest.fixture(scope="module")
def project(fleet, tmp_path_factory):
    project = Project(tmp_path_factory.mktemp("project") / APP, fleet, app=APP)
    fleet.provision(project)
    project.fab("deploy")
    return project


@pytest.fixture
def host(fleet):
    return fleet.hosts[0]


def current(host) -> str:
    return host.run(f"readlink {ROOT}/current").stdout.strip().rsplit("/", 1)[-1]


def unit_state(host, release: str) -> dict:
    out = host.run(f"systemctl show {APP}@{release}.service -p ActiveState,NRestarts,"
                   "ActiveEnterTimestampMonotonic").stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def config_values(host) -> dict:
    values = {}
    exec(host.run(f"cat {ROOT}/shared/instance/config.py").stdout, values)
    return values


def served_release(host) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(host.url("/about"), timeout=10) as response:
        return json.loads(response.read())["release"]


def test_rotate_secret_after_a_failed_deploy_exits_0_and_rotates_once(project, host):
    """A release that failed its health check leaves no unit behind that a reload trips on."""
    key = config_values(host)["SECRET_KEY"]
    project.configure(health_path="/no-such-page", health_timeout=3)
    project.set_version("1.0.1")
    assert project.fab("deploy", check=False).returncode == 1
    project.configure()
    failed = host.run(f"systemctl list-units --all --plain --no-legend --state=failed '{APP}@*'").stdout
    assert failed.strip() == "", f"a failed release's unit is left failed: {failed}"
    project.fab("rotate-secret")  # exits 0, or fab() raises
    values = config_values(host)
    assert values["SECRET_KEY"] != key and values["SECRET_KEY_FALLBACKS"] == [key]
    audit = host.run(f"cat /var/log/fabdeploy/{APP}/audit.jsonl").stdout.splitlines()
    assert json.loads(audit[-1])["event"] == "rotate-secret"


def test_after_a_reboot_the_previous_release_is_warm_for_a_rollback(project, host):
    project.set_version("1.0.2")
    project.fab("deploy")
    now, before = current(host), None
    releases = host.run(f"ls {ROOT}/releases").stdout.split()
    before = max(r for r in releases if r < now and
                 host.run(f"test -f {ROOT}/releases/{r}/RELEASE.json -a ! -f {ROOT}/releases/{r}/FAILED",
                          check=False).returncode == 0)
    host.run("systemctl reboot --no-block")
    assert host.proc.wait(60) == 133, host.log_tail()
    host.kill_leader()
    host.remove_nspawn_state()
    host.boot()
    host.wait_for_ssh(60)
    deadline = time.monotonic() + 60
    while unit_state(host, before).get("ActiveState") != "active" and time.monotonic() < deadline:
        time.sleep(0.25)
    started_at = unit_state(host, before)["ActiveEnterTimestampMonotonic"]
    assert unit_state(host, before)["ActiveState"] == "active", "the standby did not come back at boot"
    project.fab("rollback")
    assert current(host) == before and served_release(host) == before
    # The rollback found it running: the same start as at boot, no cold start.
    assert unit_state(host, before)["ActiveEnterTimestampMonotonic"] == started_at


def test_a_bad_wsgi_is_named_and_not_restarted_in_a_loop(project, host):
    project.configure(wsgi=f"{APP}:make_app()", health_timeout=20)
    project.set_version("1.0.3")
    started = time.monotonic()
    result = project.fab("deploy", check=False)
    took = time.monotonic() - started
    project.configure()
    assert result.returncode == 1
    release = max(host.run(f"ls {ROOT}/releases").stdout.split())
    line = result.stderr.strip().splitlines()[0]
    assert line.startswith(f"fabdeploy: {project.host.host_string.split(',')[0]}: release {release} cannot start:"
                           f" Failed to find attribute 'make_app' in '{APP}'"), result.stderr
    # systemd did not restart it again and again: at most once before the check saw it gone.
    assert int(unit_state(host, release).get("NRestarts", "0")) <= 1
    assert unit_state(host, release)["ActiveState"] in ("inactive", "failed")
    print(f"a bad wsgi was refused in {took:.1f}s (health_timeout 20)")


def test_the_apps_log_rotates_and_fab_logs_keeps_working(project, host):
    release = current(host)
    assert "Booting worker" in host.run(f"journalctl -u {APP}@{release}.service --no-pager").stdout
    before = project.fab("logs", "--lines", "5").stdout
    host.run(f"logrotate -f /etc/logrotate.d/fabdeploy-{APP}")
    assert host.run(f"ls {ROOT}/shared/log").stdout.split().count("app.log.1") == 1
    host.run(f"systemctl reload {APP}@{release}.service")  # the workers restart: new lines, same file
    deadline = time.monotonic() + 20
    while "Booting worker" not in host.run(f"cat {ROOT}/shared/log/app.log").stdout:
        assert time.monotonic() < deadline, "nothing more was written to app.log after the rotation"
        time.sleep(0.2)
    after = project.fab("logs", "--lines", "50").stdout
    assert after != before and "Booting worker" in after
    assert re.search(r"^==> .*app\.log$", after, re.M)
