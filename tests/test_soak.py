"""Issue 16's soak: many operations in a fixed pseudo-random order, under load, and nothing leaks.

One provisioned Debian 12 nspawn host, provision's rules only. The work:
code-change deploys, no-change deploys, a release that fails its health
check, a release that fails only behind nginx, rollbacks, rotate-secret,
and reboots. Load runs the whole time except while the host reboots (it
is down then; the load stops before and starts again after). 0 failed
requests. After the soak the processes, units, sockets, open files,
inodes and disk of the app are within a fixed bound of their values after
the first deploy; the figures are printed.

CI runs FABDEPLOY_SOAK_OPS (20 by default, with one reboot); `./dev soak`
runs 100 with two, and docs/benchmarks.md keeps that run's figures.
"""
import os
import random
import re
import time

import pytest

from harness.fleet import module_fleet
from harness.project import Project
from load import Load, assert_no_failed_request

pytestmark = [
    pytest.mark.nspawn,
    pytest.mark.skipif(os.geteuid() != 0, reason="systemd-nspawn hosts need root"),
]

APP = "guestbook"
ROOT = f"/srv/{APP}"
OPS = int(os.environ.get("FABDEPLOY_SOAK_OPS", "20"))
WORK = ["code", "code", "same", "unhealthy", "behind nginx", "rollback", "rotate"]
INDEX = "    def index():\n"


def plan(count: int) -> list[str]:
    """The operations in a fixed order: seeded, so every run does the same; reboots at fixed points."""
    ops = random.Random(16).choices(WORK, k=count)
    reboots = 2 if count >= 60 else 1
    for n in range(1, reboots + 1):
        ops[count * n // (reboots + 1)] = "reboot"
    return ["code"] + ops


def figures(host) -> dict:
    """What the app holds on the host now."""
    def number(command):
        return int(host.run(command).stdout.split()[0])
    return {
        "processes": number("ps -u deploy -o pid= | wc -l"),
        "units": number(f"systemctl list-units --plain --no-legend '{APP}@*.service' | wc -l"),
        "failed units": number(f"systemctl list-units --all --plain --no-legend --state=failed '{APP}@*' | wc -l"),
        "sockets": number(f"ls {ROOT}/shared/run | grep -cE '^[0-9-]+[.]sock$' || true"),
        "open files": number("for p in $(pgrep -u deploy); do ls /proc/$p/fd 2>/dev/null; done | wc -l"),
        "inodes": number(f"du --inodes -s {ROOT}"),
        "disk KiB": number(f"du -sk {ROOT}"),
        "a release's inodes": number(f"du --inodes -s {ROOT}/releases/$(readlink {ROOT}/current | cut -d/ -f2)"),
        "a release's KiB": number(f"du -sk {ROOT}/releases/$(readlink {ROOT}/current | cut -d/ -f2)"),
    }


def bounds(first: dict, keep: int) -> dict:
    """How much is allowed after the soak: two releases running (current and its standby),
    `keep` kept on disk, and some slack for logs and a trash being emptied."""
    inodes, size = first["a release's inodes"], first["a release's KiB"]
    return {"processes": 2 * first["processes"] + 2, "units": 2, "failed units": 0, "sockets": 2,
            "open files": 2 * first["open files"] + 20,
            "inodes": first["inodes"] + (keep - 1) * inodes + 500,
            "disk KiB": first["disk KiB"] + (keep - 1) * size + 10 * 1024,
            "a release's inodes": 2 * inodes, "a release's KiB": 2 * size}


def settle(host, timeout: float = 40) -> None:
    """Let releases that were told to stop finish their requests (graceful_timeout), then count."""
    deadline = time.monotonic() + timeout
    while host.run(f"systemctl list-units --plain --no-legend --state=deactivating '{APP}@*' | wc -l"
                   ).stdout.strip() != "0" and time.monotonic() < deadline:
        time.sleep(0.5)


def edit(project, old: str, new: str) -> None:
    app = project.path / APP / "__init__.py"
    text = app.read_text()
    assert text.count(old) == 1
    app.write_text(text.replace(old, new))


fleet = module_fleet(1, "soak")


def served_version(host) -> str:
    import json
    import urllib.request
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(host.url("/about"), timeout=10) as response:
        return json.loads(response.read())["version"]


def reboot(host) -> None:
    host.run("systemctl reboot --no-block")
    assert host.proc.wait(60) == 133, host.log_tail()
    host.kill_leader()
    host.remove_nspawn_state()
    host.boot()
    host.wait_for_ssh(60)
    deadline = time.monotonic() + 60
    while True:
        try:
            served_version(host)
            return
        except OSError:
            assert time.monotonic() < deadline, "the app did not come back after the reboot"
            time.sleep(0.25)


def test_a_soak_of_deploys_rollbacks_rotations_and_reboots_fails_no_request_and_leaks_nothing(fleet, tmp_path):
    host = fleet.hosts[0]
    project = Project(tmp_path / APP, fleet, app=APP)
    fleet.provision(project)
    original = (project.path / APP / "__init__.py").read_text()
    results, first, version, done = [], None, 0, []
    load = None
    try:
        for n, op in enumerate(plan(OPS)):
            if op == "reboot":
                results.append(load.result())
                reboot(host)
                load = None
            if load is None and first is not None:
                load = Load(host.url("/"), threads=2, max_requests=10_000_000, max_seconds=3600)
                load.start()
                load.wait_for_successes(20)
            if op == "code":
                version += 1
                project.set_version(f"1.{version}.0")
                project.fab("deploy")
                assert served_version(host) == f"1.{version}.0"
            elif op == "same":
                # Nothing new since a deploy that went live: "already current". After a rollback
                # or a refused release, the tree's wheel is not current: it deploys again.
                out = project.fab("deploy").stdout
                assert ("is already current" in out) == (done[-1:] in (["code"], ["same"])), out
                assert served_version(host) == f"1.{version}.0"
            elif op in ("unhealthy", "behind nginx"):
                before = served_version(host)
                version += 1
                project.set_version(f"1.{version}.0")
                edit(project, INDEX, INDEX + ('        return "broken\\n", 500\n' if op == "unhealthy" else
                                              '        if request.headers.get("X-Forwarded-For"):\n'
                                              '            return "broken behind nginx\\n", 500\n'))
                project.configure(health_timeout=3)
                result = project.fab("deploy", check=False)
                (project.path / APP / "__init__.py").write_text(original)
                project.configure()
                assert result.returncode == 1 and served_version(host) == before, result.stderr
            elif op == "rollback":
                result = project.fab("rollback", check=False)
                assert result.returncode == 0 or "nothing to roll back to" in result.stderr, result.stderr
            elif op == "rotate":
                project.fab("rotate-secret")
            done.append(op)
            if first is None:
                first = figures(host)
    finally:
        if load is not None:
            results.append(load.result())
        (project.path / APP / "__init__.py").write_text(original)
    settle(host)
    after = figures(host)
    limit = bounds(first, keep=5)
    kinds = dict.fromkeys(WORK + ["reboot"])
    print(f"\nsoak: {len(done)} operations ({', '.join(f'{w} {done.count(w)}' for w in kinds)}),"
          f" {sum(r.total for r in results)} requests in {len(results)} stretches of load")
    for key in first:
        print(f"  {key:<18} after the first deploy {first[key]:>8}   after the soak {after[key]:>8}"
              f"   bound {limit[key]:>8}")
    for result in results:
        assert_no_failed_request(result)
    over = {key: (after[key], limit[key]) for key in limit if after[key] > limit[key]}
    assert over == {}, f"past the bound after the soak: {over}"
    assert done.count("reboot") >= 1 and len(done) == OPS + 1
    assert not re.search("failed", host.run(f"systemctl is-failed '{APP}@*' || true").stdout)
