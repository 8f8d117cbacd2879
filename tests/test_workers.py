"""A release's other processes and commands: workers, timers, fab flask/shell/run.

The loopback host (a throwaway sshd and nginx, no systemd) runs workers with
the pidfile manager. The production host, a Debian 12 nspawn host set up by
`fab -H root@host provision` alone, runs them as systemd units, runs a timer,
and takes the remote commands with provision's sudo rule only. The app is the
example with a SQLite job queue and its worker (tests/procs_app.py).
"""
import os
import re
import shlex
import threading
import time

import pytest

from procs_app import add_jobs

WORKER = {"worker": "flask worker"}


def pids_alive(host, root) -> dict[str, bool]:
    """release -> whether its worker's pid (shared/run/procs/<release>/worker.pid) is alive."""
    out = host.run_as_user(f'for f in {root}/shared/run/procs/*/worker.pid; do [ -f "$f" ] || continue;'
                           f' r=${{f%/worker.pid}}; r=${{r##*/}}; if kill -0 "$(cat "$f")" 2>/dev/null;'
                           f' then echo "$r yes"; else echo "$r no"; fi; done').stdout
    return {line.split()[0]: line.split()[1] == "yes" for line in out.splitlines()}


def workers_running(host) -> list[str]:
    """The releases whose worker process runs on the loopback host, by its command line."""
    out = host.run_as_user("ps -eo args=").stdout
    return sorted(set(re.findall(r"/releases/([^/]+)/venv/bin/python\S* \S*flask worker", out)))


def wait_for(check, timeout=20.0, step=0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(step)


@pytest.fixture
def workers_stopped(project, host):
    """The workers' pid files are not where the project fixture looks: stop them by PID after."""
    yield
    host.run_as_user(f'for f in {project.deploy_to}/shared/run/procs/*/*.pid; do [ -f "$f" ] &&'
                     ' kill "$(cat "$f")"; done; true', check=False)


def test_without_systemd_the_worker_goes_with_its_release(project, host, workers_stopped):
    """Loopback: deploy, redeploy, rollback; after each switch only current's worker runs."""
    add_jobs(project)
    project.configure(processes=WORKER, timers={"stamp": {"command": "stamp", "on_calendar": "minutely"}})
    root = project.deploy_to
    first = project.fab("deploy")
    assert "timers need systemd: stamp will not run on this host" in first.stdout, first.stdout
    one = host.run_as_user(f"readlink {root}/current").stdout.strip().rsplit("/", 1)[-1]
    assert wait_for(lambda: workers_running(host) == [one]), workers_running(host)
    assert project.fab("flask", "enqueue", "5").stdout.strip() == "enqueued 5"
    done = f"{root}/shared/instance/queue.sqlite"
    count = ("python3 -c 'import sqlite3, sys; print(sqlite3.connect(sys.argv[1]).execute("
             "\"SELECT count(*), group_concat(DISTINCT release) FROM done\").fetchone())' " + str(done))
    assert wait_for(lambda: host.run_as_user(count).stdout.strip() == f"(5, '{one}')"), host.run_as_user(count).stdout
    project.set_version("1.0.1")
    project.fab("deploy")
    two = host.run_as_user(f"readlink {root}/current").stdout.strip().rsplit("/", 1)[-1]
    assert two != one
    assert wait_for(lambda: workers_running(host) == [two]), workers_running(host)
    assert pids_alive(host, root) == {two: True}
    assert "  worker   active (process)" in project.fab("status").stdout.splitlines()
    project.fab("rollback")
    assert wait_for(lambda: workers_running(host) == [one]), workers_running(host)
    assert pids_alive(host, root) == {one: True}


# -- a provisioned systemd host -----------------------------------------------------------------

APP = "guestbook"
ROOT = f"/srv/{APP}"
TIMERS = {"stamp": {"command": "stamp", "on_calendar": "*:*:0/2"}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One Debian 12 host, set up by provision alone, with the worker and the timer deployed."""
    if os.geteuid() != 0:
        pytest.skip("systemd-nspawn hosts need root")
    from harness.fleet import Fleet
    from harness.nspawn import nspawn_hosts
    from harness.project import Project
    workdir = tmp_path_factory.mktemp("workers")
    with nspawn_hosts(1, workdir) as hosts:
        fleet = Fleet(hosts, workdir)
        project = Project(tmp_path_factory.mktemp("project") / APP, fleet, app=APP)
        add_jobs(project)
        project.configure(processes=WORKER, timers=TIMERS)
        project.provision_output = fleet.provision(project).stdout
        project.fab("deploy")
        yield fleet, hosts[0], project


def current(host) -> str:
    return host.run(f"readlink {ROOT}/current").stdout.strip().rsplit("/", 1)[-1]


def props(host, unit: str, *names: str) -> dict:
    out = host.run(f"systemctl show {shlex.quote(unit)} -p {','.join(names)}").stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def active_workers(host) -> list[str]:
    """The releases whose worker unit is active."""
    out = host.run(f"systemctl list-units --plain --no-legend --state=active '{APP}.worker@*.service'").stdout
    return sorted(line.split()[0][len(APP) + len(".worker@"):-len(".service")] for line in out.splitlines())


def sql(host, query: str) -> str:
    """The queue, as the deploy user (the instance folder is its alone)."""
    db = f"{ROOT}/shared/instance/queue.sqlite"
    return host.run(f"runuser -u deploy -- sqlite3 -cmd '.timeout 10000' {db} {shlex.quote(query)}").stdout


@pytest.mark.nspawn
def test_each_process_is_a_hardened_unit_of_its_release(server):
    fleet, host, project = server
    release = current(host)
    assert "changed    process unit /etc/systemd/system/guestbook.worker@.service" in project.provision_output
    web = props(host, f"{APP}@{release}.service", "User", "Group", "NoNewPrivileges", "PrivateTmp",
                "ProtectSystem", "ProtectHome", "ReadWritePaths", "UMask")
    worker = props(host, f"{APP}.worker@{release}.service", *web, "ActiveState", "UnitFileState")
    assert worker == {**web, "ActiveState": "active", "UnitFileState": "enabled"}
    assert web["User"] == "deploy" and web["ProtectSystem"] == "strict"
    # Root's files, all of them: the units and the timer.
    for unit in (f"{APP}.worker@.service", f"{APP}.stamp.service", f"{APP}.stamp.timer"):
        assert host.run(f"stat -c %U:%a /etc/systemd/system/{unit}").stdout == "root:644\n"
    assert props(host, f"{APP}.stamp.timer", "ActiveState")["ActiveState"] == "active"
    assert "  worker   active (process)" in project.fab("status").stdout.splitlines()


@pytest.mark.nspawn
def test_a_job_enqueued_during_a_deploy_is_done_once_and_then_only_the_new_worker_runs(server):
    fleet, host, project = server
    old = current(host)
    sql(host, "DELETE FROM jobs; DELETE FROM done;")
    stop = threading.Event()

    def enqueue():
        while not stop.is_set():
            sql(host, "INSERT INTO jobs (taken_by) VALUES (NULL);")
            time.sleep(0.05)

    feeder = threading.Thread(target=enqueue)
    feeder.start()
    try:
        project.set_version("1.0.1")
        project.fab("deploy")
        time.sleep(1)
    finally:
        stop.set()
        feeder.join()
    new = current(host)
    total = int(sql(host, "SELECT count(*) FROM jobs;"))
    assert total >= 20, total  # jobs kept coming all through the deploy
    assert wait_for(lambda: int(sql(host, "SELECT count(*) FROM done;")) >= total, timeout=60)
    rows = sql(host, "SELECT job, count(*) FROM done GROUP BY job HAVING count(*) != 1;")
    assert rows == "", f"jobs done more than once: {rows}"
    assert int(sql(host, "SELECT count(DISTINCT job) FROM done;")) == total
    # Both releases did some: the old until the switch, the new after it.
    assert sql(host, "SELECT DISTINCT release FROM done ORDER BY release;").split() == sorted([old, new])
    assert wait_for(lambda: active_workers(host) == [new], timeout=30), active_workers(host)
    assert props(host, f"{APP}.worker@{old}.service", "UnitFileState")["UnitFileState"] == "disabled"
    # The old worker stopped as asked (SIGTERM): it said so in its log, after its last job.
    assert f"worker of {old} stopped" in host.run(f"cat {ROOT}/shared/log/worker.log").stdout


@pytest.mark.nspawn
def test_the_timer_runs_its_command_in_the_current_release(server):
    """From 1.0.1 above: stamp.txt is written every 2 s by current's `flask stamp`."""
    fleet, host, project = server
    stamp = f"{ROOT}/shared/instance/stamp.txt"
    expected = f"1.0.1 {current(host)} -"
    seen = wait_for(lambda: host.run(f"cat {stamp} 2>/dev/null; true").stdout.strip() == expected, timeout=30)
    assert seen, host.run(f"cat {stamp}; journalctl -u {APP}.stamp.service -n 20 --no-pager", check=False).stdout


@pytest.mark.nspawn
def test_fab_flask_runs_in_the_current_release_with_provisions_rules_only(server):
    fleet, host, project = server
    rules = re.findall(r"^\s+(\(.*)$", host.run("sudo -l -U deploy").stdout, re.M)
    assert [" ".join(r.split()) for r in rules] == [f"(root) NOPASSWD: /usr/local/lib/fabdeploy/helper {APP} *"]
    result = project.fab("flask", "create-admin", "alice")
    assert result.stdout.strip().endswith(f"created admin alice in release {current(host)}"), result.stdout
    assert host.run(f"cat {ROOT}/shared/instance/admins.txt").stdout == "alice\n"
    failed = project.fab("flask", "no-such-command", check=False)
    assert failed.returncode == 1
    assert failed.stderr.strip().splitlines()[-1] == (f"fabdeploy: {host.host_string}: flask no-such-command"
                                                      f" exited 2 (in release {current(host)})"), failed.stderr


@pytest.mark.nspawn
def test_fab_run_runs_a_command_line_in_the_releases_environment(server):
    fleet, host, project = server
    out = project.fab("run", 'echo "$FLASK_APP|$(pwd)|${PORT-unset}" && command -v flask').stdout.split()
    release = current(host)
    assert out == [f"{APP}:create_app()|{ROOT}/releases/{release}|unset",
                   f"{ROOT}/releases/{release}/venv/bin/flask"], out


@pytest.mark.nspawn
def test_fab_shell_is_flask_shell_under_a_pty(server):
    fleet, host, project = server
    output = under_pty(project, ["shell"], ["print('app is', app.name, 6 * 7)\n", "exit()\n"])
    assert "app is guestbook 42" in output, output


def under_pty(project, args: list[str], lines: list[str], timeout: float = 60) -> str:
    """`fab ARGS` in the project with a terminal of its own; `lines` typed once it prompts."""
    import pty
    import select
    from harness.project import FAB
    pid, fd = pty.fork()
    if pid == 0:
        os.chdir(project.path)
        os.execv(FAB, [FAB, "-H", project.host.host_string, *args])
    output, typed = b"", 0
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:
                    break
                if not chunk:
                    break
                output += chunk
            if typed < len(lines) and output.count(b">>> ") > typed:
                os.write(fd, lines[typed].encode())
                typed += 1
    finally:
        os.close(fd)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, output.decode(errors="replace")
    return output.decode(errors="replace")


@pytest.mark.nspawn
def test_a_worker_that_does_not_start_stops_the_deploy_before_the_switch(server):
    """From 1.0.1: the worker's command is broken; the old release and its worker stay."""
    fleet, host, project = server
    old = current(host)
    project.configure(processes={"worker": "flask no-such-command"}, timers=TIMERS)
    project.set_version("1.0.2")
    try:
        result = project.fab("deploy", check=False)
    finally:
        project.configure(processes=WORKER, timers=TIMERS)
    assert result.returncode == 1
    line = result.stderr.strip().splitlines()
    assert line[0].startswith(f"fabdeploy: {host.host_string}: release ") and "worker is not running" in line[0], line
    assert "No such command 'no-such-command'" in result.stderr, result.stderr
    assert current(host) == old and active_workers(host) == [old]
