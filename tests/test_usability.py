"""Issue 6: a dry run, progress and results, status/logs/releases, and clear errors.

Everything runs the real `fab` against the throwaway loopback host. Cases
covered elsewhere and not repeated here: an unknown or a changed host key
(test_deploy.py::test_untrusted_host_key_is_refused_and_host_untouched),
rollback with nothing to roll back to
(test_deploy.py::test_rollback_with_a_single_release_refuses_cleanly), and the
systemd unit in the plan, which only appears where systemd runs
(test_nspawn_hosts.py; the loopback host runs gunicorn with a pid file).
"""
from __future__ import annotations

import dataclasses
import json
import os
import pty
import re
import select
import signal
import stat
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from fabric import Connection

from fabdeploy import agent, build, hostinfo
from fabdeploy import phases as ph
from fabdeploy.errors import DeployError
from fabdeploy.model import Problem
from fabdeploy.remote import Host
from fabdeploy.settings import resolve
from harness.local_host import free_port
from harness.project import FAB

pytestmark = pytest.mark.host

# The phases every first deploy must report, in this order (others may sit between).
# Reading the host's facts is part of `lock` (README, "What a deploy does", step 3).
PHASES = ["connect", "build", "lock", "upload", "venv", "install", "start", "route", "switch",
          "cleanup"]
DETAIL = "  | "  # how an error's extra lines are indented


@pytest.fixture(scope="module", autouse=True)
def own_wheel_cache(tmp_path_factory):
    """A wheel cache of this module's own; only the dependencies' wheelhouses are shared.

    fabdeploy keeps the 20 newest wheel builds, by creation time: other suites running
    on this machine meanwhile would delete wheels our fab runs are about to upload.
    """
    shared = build.cache_dir().parent / "wheelhouses"  # fetched once, from an index we cannot reach
    shared.mkdir(parents=True, exist_ok=True)
    home = tmp_path_factory.mktemp("xdg-cache")
    (home / "fabdeploy").mkdir()
    (home / "fabdeploy" / "wheelhouses").symlink_to(shared)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("XDG_CACHE_HOME", str(home))  # every fab we start inherits it
        yield


# -- looking at the host --------------------------------------------------------

def snapshot(*roots: Path) -> dict:
    """Every path under roots: type, mode, size, mtime and link target. Equal means untouched."""
    found = {}
    for root in roots:
        for top, dirs, files in os.walk(root):
            for path in [Path(top)] + [Path(top) / n for n in dirs + files]:
                st = path.lstat()
                link = os.readlink(path) if stat.S_ISLNK(st.st_mode) else None
                size = st.st_size if stat.S_ISREG(st.st_mode) else None
                found[str(path)] = (st.st_mode, size, st.st_mtime_ns, link)
    return found


def host_state(project) -> dict:
    """The deploy user's whole home and nginx's site dir, as snapshot() sees them."""
    return snapshot(project.host.home, project.host.site_dir)


def current_of(project) -> str:
    """The release `current` points at."""
    return (project.deploy_to / "current").readlink().name


def served(host) -> str:
    """The page nginx serves: it names the app's version."""
    with urllib.request.urlopen(host.url, timeout=10) as response:
        return response.read().decode()


def lock_dir(project) -> Path:
    """Where a held deploy lock lives."""
    return project.deploy_to / ".fabdeploy" / "lock"


# -- editing the project ----------------------------------------------------------

def edit_pyproject(project, old: str, new: str) -> None:
    """Replace one exact piece of the example's pyproject.toml, which must be there."""
    path = project.path / "pyproject.toml"
    text = path.read_text()
    assert text.count(old) == 1, text
    path.write_text(text.replace(old, new))


def set_fabric(project, path: list[str], value) -> None:
    """Set a key of fabric.yaml (JSON, so YAML) outside `fabdeploy`, e.g. connect_kwargs."""
    file = project.path / "fabric.yaml"
    config = json.loads(file.read_text())
    node = config
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
    file.write_text(json.dumps(config, indent=2))


def offline_build_env(tmp_path) -> dict:
    """No package index (the machine may talk to 127.0.0.1 only) and an empty fabdeploy cache."""
    return {"PIP_NO_INDEX": "1", "XDG_CACHE_HOME": str(tmp_path / "cache")}


# -- reading fab's output -------------------------------------------------------------

def assert_clear_error(result, says: str, hint: str | None, host: str | None = None) -> list[str]:
    """Non-zero exit, one `fabdeploy:` line saying what and what to do, no traceback.

    hint None: any hint, in parentheses at the end. Returns the detail lines after the line.
    """
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    # The app's own traceback may be shown as detail; fabdeploy's never is.
    ours = [line for line in output.splitlines() if not line.startswith(DETAIL)]
    assert not any("Traceback" in line for line in ours), output
    lines = result.stderr.splitlines()
    errors = [i for i, line in enumerate(lines) if line.startswith("fabdeploy:")]
    assert len(errors) == 1, output
    assert not any(line.startswith("fabdeploy:") for line in result.stdout.splitlines()), output
    line = lines[errors[0]]
    if host:
        assert line.startswith(f"fabdeploy: {host}: "), line
    assert says in line, line
    assert (f"({hint}" in line) if hint else re.search(r" \(.+\)$", line), line
    detail = []
    for extra in lines[errors[0] + 1:]:
        if not extra.startswith(DETAIL):
            break
        detail.append(extra[len(DETAIL):])
    return detail


def phase_lines(stdout: str, host_string: str) -> list[tuple[str, float]]:
    """(phase, seconds) for each `[host] phase  1.23s` line; any other line but the last fails."""
    pattern = re.compile(rf"^\[{re.escape(host_string)}\] (\w[\w ]*?)\s+(\d+\.\d\d)s$")
    *body, _summary = stdout.splitlines()
    found = []
    for line in body:
        match = pattern.match(line)
        assert match, f"not a phase line: {line!r}\n{stdout}"
        found.append((match.group(1), float(match.group(2))))
    return found


def in_order(wanted: list[str], seen: list[str]) -> bool:
    """True if `wanted` appears in `seen` in this order."""
    rest = iter(seen)
    return all(name in rest for name in wanted)


def status_fields(stdout: str) -> dict:
    """`fab status` as {label: value}: current, service, health, lock (and failed)."""
    return dict(re.match(r"^  (\w+)\s+(.*)$", line).groups()
                for line in stdout.splitlines()[1:])


class Streamed:
    """A fab command running in the background, its output collected line by line."""

    def __init__(self, project, *args: str, env: dict | None = None):
        self.proc = subprocess.Popen(
            [FAB, "-H", project.host.host_string, *args], cwd=project.path,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        """Collect lines until fab closes its output."""
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for(self, text: str, timeout: float) -> str:
        """The first line containing text; fails with the output so far if none comes."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = next((line for line in self.lines if text in line), None)
                if found is not None:
                    return found
                left = deadline - time.monotonic()
                if left <= 0 or not self._reader.is_alive():
                    raise AssertionError(f"no line with {text!r} within {timeout}s:\n"
                                         + "\n".join(self.lines))
                self._changed.wait(min(left, 0.2))

    def stop(self, sig: int = signal.SIGTERM, grace: float = 5) -> int | None:
        """Send sig to our fab by its PID; its exit code, or None if it was still running after grace."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None

    def __enter__(self) -> "Streamed":
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(5)


def on_terminal(project, *args: str, stderr_tty: bool, timeout: float = 120) -> tuple[int, str, str]:
    """Run fab with stdout on a pseudo-terminal, stderr too or a pipe: (code, terminal, stderr)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([FAB, "-H", project.host.host_string, *args], cwd=project.path,
                            stdin=subprocess.DEVNULL, stdout=slave,
                            stderr=slave if stderr_tty else subprocess.PIPE,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    os.close(slave)  # else reading the master never ends
    err = proc.stderr.fileno() if proc.stderr else None
    got = {master: bytearray(), **({err: bytearray()} if proc.stderr else {})}
    reading, deadline = set(got), time.monotonic() + timeout
    try:
        while reading and time.monotonic() < deadline:
            for fd in select.select(list(reading), [], [], 1)[0]:
                try:
                    data = os.read(fd, 65536)
                except OSError:  # EIO: fab closed its end of the terminal
                    data = b""
                got[fd] += data
                if not data:
                    reading.discard(fd)
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
        if proc.stderr:
            proc.stderr.close()
    terminal = got[master].decode(errors="replace").replace("\r\n", "\n")
    piped = got[err].decode(errors="replace") if proc.stderr else ""
    return code, terminal, piped


# -- dry run ------------------------------------------------------------------------------

def plan_by_phase(out: str, host_string: str) -> dict[str, str]:
    """A dry run's output as {phase: what it would do}: the lines printed before its phase line."""
    phase_line = re.compile(rf"^\[{re.escape(host_string)}\] (\w[\w ]*?)\s+\d+\.\d\ds$")
    plan, pending = {}, []
    for line in out.splitlines():
        match = phase_line.match(line)
        if match:
            plan[match.group(1)], pending = "\n".join(pending), []
        else:
            pending.append(line)
    return plan


def has(text: str, *pattern: str) -> bool:
    """True if one line of text has all of these pieces."""
    return any(all(piece in line for piece in pattern) for line in text.splitlines())


def assert_plan_of_a_first_deploy(project, out: str, release: str) -> None:
    """Every command a first deploy runs, and every file it writes, under its phase."""
    host, root = project.host, str(project.deploy_to)
    plan = plan_by_phase(out, host.host_string)
    rel, wheel = f"{root}/releases/{release}", "guestbook-1.0.0-py3-none-any.whl"
    checks = {
        "upload": [("would upload: ", wheel, f" -> {rel}/{wheel}"),
                   ("would upload: ", "/uv-", f" -> {root}/shared/wheelhouse/uv-")],
        "venv": [("would run: ", f"{rel}/venv")],
        "install": [("would run: ", "install", f"{rel}/{wheel}", "gunicorn")],
        "secret": [(f"would write {root}/shared/instance/config.py (mode 600, secret: not shown)",)],
        "init": [("would run: ", "flask --app 'guestbook:create_app()' init-db")],
        "configure": [(f"would write {rel}/gunicorn.conf.py",),
                      (f"    bind = ['unix:{root}/shared/run/{release}.sock']",)],
        "start": [("would run: ", rel), ("would check unix:", f"{root}/shared/run/{release}.sock/",
                                                "answers 2xx")],
        "route": [("would write ", "(mode 644):"), (f"    listen {host.http_port};",),
                  ("    proxy_pass http://",),
                  ("would run: ", f"{host.nginx_dir}/nginx.conf -t"),
                  ("would run: ", f"{host.nginx_dir}/nginx.conf -s reload"),
                  # Checked through nginx's preview, and only then switched live.
                  (f"would link {root}/shared/run/next.sock -> {root}/shared/run/{release}.sock",),
                  (f"would check 127.0.0.1:{host.http_port}/ answers 2xx", "with the preview token of",
                   f"{root}/.fabdeploy/preview.map"),
                  (f"would link {root}/shared/run/live.sock -> {root}/shared/run/{release}.sock",)],
        "switch": [(f"would link {root}/current -> releases/{release}",)],
        "cleanup": [(f"would remove the lock {root}/.fabdeploy/lock",)],
    }
    for phase, pieces in checks.items():
        for piece in pieces:
            assert has(plan.get(phase, ""), *piece), f"{phase}: no {piece} in\n{plan.get(phase)}"
    route = plan["route"]
    assert route.index("would check") < route.index(f"would link {root}/shared/run/live.sock"), route


def dry_run(project) -> tuple[str, str]:
    """`fab deploy --dry-run`: its output and the release name its summary gives."""
    result = project.fab("deploy", "--dry-run")
    last = result.stdout.splitlines()[-1]
    match = re.fullmatch(rf"dry run: would deploy (\S+) to {re.escape(project.host.host_string)};"
                         r" nothing was changed", last)
    assert match, result.stdout
    return result.stdout, match.group(1)


def test_dry_run_on_a_fresh_host_prints_the_whole_plan_and_changes_nothing(project, host):
    before = host_state(project)
    out, release = dry_run(project)
    assert host_state(project) == before
    assert not project.deploy_to.exists()
    assert_plan_of_a_first_deploy(project, out, release)


def test_dry_run_plan_shows_the_lock_being_taken(project, host):
    out, _ = dry_run(project)
    lock = plan_by_phase(out, host.host_string)["lock"]
    assert f"{project.deploy_to}/.fabdeploy/lock" in lock, out


def test_dry_run_on_a_deployed_host_plans_from_its_state_and_changes_nothing(project, host):
    project.fab("deploy")
    old = current_of(project)
    wait_for_workers(project)  # a late worker's boot line is not the dry run's doing
    project.set_version("1.1.0")
    before = host_state(project)

    out, release = dry_run(project)

    assert host_state(project) == before
    assert not lock_dir(project).exists()
    assert current_of(project) == old
    assert served(host) == "Hello from the guestbook 1.0.0: 0 entries\n"
    root = project.deploy_to
    plan = plan_by_phase(out, host.host_string)
    # The plan follows the host: init and the secret are done, the dependencies are there.
    assert plan["init"] == "" and plan["secret"] == "", out
    assert has(plan["upload"], "would upload: ", f"{root}/releases/{release}/guestbook-1.1.0-py3-none-any.whl")
    assert not has(plan["upload"], f"{root}/shared/wheelhouse/"), out
    assert has(plan["configure"], f"    bind = ['unix:{root}/shared/run/{release}.sock']"), out


# -- progress and results ------------------------------------------------------------------

def test_each_phase_prints_a_line_with_its_duration_and_a_summary_ends_the_run(project, host):
    result = project.fab("deploy")
    phases = phase_lines(result.stdout, host.host_string)
    names = [name for name, _ in phases]
    assert in_order(PHASES, names), names
    assert len(names) == len(set(names)), names  # one line per phase for the one host
    summary = result.stdout.splitlines()[-1]
    match = re.fullmatch(rf"deployed (\S+) to {re.escape(host.host_string)} in (\d+\.\d)s", summary)
    assert match, summary
    assert match.group(1) == current_of(project)
    # The phases run one after another inside the total (each rounded: some slack).
    assert sum(seconds for _, seconds in phases) <= float(match.group(2)) + 0.15


def test_quiet_prints_only_the_summary_line(project, host):
    result = project.fab("deploy", "-q")
    release = current_of(project)
    assert re.fullmatch(rf"deployed {release} to {re.escape(host.host_string)} in \d+\.\ds\n",
                        result.stdout), result.stdout
    assert result.stderr == ""


def assert_phase_seconds(phases: dict, names: list[str]) -> None:
    """Each named phase has its seconds, as a number."""
    for name in names:
        assert isinstance(phases.get(name), float) and phases[name] >= 0, (name, phases)


def test_json_prints_one_document_with_each_hosts_phases(project, host):
    result = project.fab("deploy", "--json")
    doc = json.loads(result.stdout)  # the whole of stdout: one document, nothing else
    assert (doc["action"], doc["ok"], doc["error"]) == ("deploy", True, None)
    assert doc["release"] == current_of(project)
    (entry,) = doc["hosts"]
    assert entry["host"] == host.host_string
    assert (entry["release"], entry["switched"], entry["error"]) == (doc["release"], True, None)
    assert_phase_seconds(entry["phases"], PHASES)
    assert sum(entry["phases"].values()) <= doc["seconds"] + 0.01


def test_json_of_a_failed_deploy_says_which_host_failed_and_how(project, host):
    project.configure(init_command="no-such-command")
    result = project.fab("deploy", "--json", check=False)
    assert result.returncode != 0
    doc = json.loads(result.stdout)
    assert doc["ok"] is False
    assert "flask no-such-command failed" in doc["error"]
    (entry,) = doc["hosts"]
    assert entry["switched"] is False
    assert entry["error"].startswith(f"{host.host_string}: flask no-such-command failed"), entry
    assert_phase_seconds(entry["phases"], ["connect", "build", "lock", "upload", "venv", "install",
                                           "init"])
    assert "start" not in entry["phases"]
    assert_clear_error(result, "flask no-such-command failed", "fix the app's init command",
                       host.host_string)


@pytest.mark.parametrize("stderr_tty", [True, False], ids=["stderr-tty", "stderr-pipe"])
def test_upload_progress_bar_only_on_a_terminal(project, host, stderr_tty):
    # A first deploy ships uv's wheel (well over 1 MiB) into the host's wheelhouse.
    code, terminal, piped = on_terminal(project, "deploy", stderr_tty=stderr_tty)
    assert code == 0, terminal + piped
    (uv_wheel,) = (project.deploy_to / "shared" / "wheelhouse").glob("uv-*.whl")
    mib = uv_wheel.stat().st_size >> 20
    assert mib >= 1
    bar = rf"\[{re.escape(host.host_string)}\] {re.escape(uv_wheel.name)} \[(#*)(\.*)\] (\d+)/{mib} MiB"
    bars = re.findall(bar, terminal)
    if stderr_tty:
        assert ("#" * 30, "", str(mib)) in bars, terminal  # it ends full
        assert any(dots for _, dots, _ in bars), terminal  # and was drawn on the way
    else:
        assert not bars and "MiB" not in terminal + piped and "[#" not in terminal + piped
    assert terminal.rstrip().splitlines()[-1].startswith(f"deployed {current_of(project)} to ")


# -- status, logs, releases -----------------------------------------------------------------

def test_status_with_nothing_deployed_says_so_and_changes_nothing(project, host):
    before = host_state(project)
    result = project.fab("status")
    assert result.stdout.splitlines()[0] == host.host_string
    fields = status_fields(result.stdout)
    assert fields == {"current": "- (version -, -)", "service": "none (pidfile)",
                      "health": "nothing deployed", "lock": "free"}, result.stdout
    assert host_state(project) == before


def test_status_shows_release_age_version_service_health_and_lock(project, host):
    project.fab("deploy")
    release = current_of(project)
    pid = (project.deploy_to / "shared" / "run" / f"{release}.pid").read_text().strip()

    fields = status_fields(project.fab("status").stdout)

    assert re.fullmatch(rf"{release} \(version 1\.0\.0, \d+s ago\)", fields["current"]), fields
    assert fields["service"] == f"active (pid {pid}) (pidfile)"
    assert fields["health"] == "ok 200"
    assert fields["lock"] == "free"
    info = json.loads(project.fab("status", "--json").stdout)
    assert (info["host"], info["current"], info["version"]) == (host.host_string, release, "1.0.0")
    assert (info["service"], info["health"], info["lock"]) == (f"active (pid {pid})", "ok 200", None)


def test_status_names_who_holds_the_lock_of_a_running_deploy(project, host):
    # fleet's test hook: the deploy holds the lock and waits before uploading.
    with Streamed(project, "deploy", env={"FABDEPLOY_PAUSE_BEFORE": "upload"}) as running:
        running.wait_for("paused before upload", timeout=60)
        held = json.loads((lock_dir(project) / "info.json").read_text())
        fields = status_fields(project.fab("status").stdout)
        info = json.loads(project.fab("status", "--json").stdout)
        running.stop(signal.SIGKILL)  # by its PID; a killed deploy leaves its lock, as on a real host
    assert re.fullmatch(rf"held by {re.escape(held['who'])} \({re.escape(held['what'])}, \d+s\)",
                        fields["lock"]), fields
    assert held["what"].startswith("deploy ")
    assert (info["lock"]["who"], info["lock"]["what"]) == (held["who"], held["what"])
    assert fields["current"] == "- (version -, -)"


def app_log(project) -> Path:
    """The app's log on the host (README: shared/log/app.log)."""
    return project.deploy_to / "shared" / "log" / "app.log"


def log_lines(project) -> list[str]:
    """The app's log, line by line."""
    return app_log(project).read_text().splitlines()


def wait_for_workers(project, workers: int = 2, timeout: float = 15) -> None:
    """Wait until the current release has logged each worker's boot; then its log is quiet."""
    started = f"/shared/run/{current_of(project)}.sock"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = log_lines(project)
        since = max((i for i, line in enumerate(lines) if started in line), default=len(lines))
        if sum("Booting worker" in line for line in lines[since:]) >= workers:
            return
        time.sleep(0.1)
    raise AssertionError("the workers did not boot:\n" + "\n".join(log_lines(project)))


def test_logs_shows_the_apps_log_and_follow_streams_new_lines(project, host):
    project.fab("deploy")
    wait_for_workers(project)
    result = project.fab("logs", "--lines", "3")
    header, *shown = result.stdout.splitlines()
    assert header == f"==> {host.host_string}: {app_log(project)}"
    assert shown == log_lines(project)[-3:]
    assert any("Booting worker" in line for line in log_lines(project))

    with Streamed(project, "logs", "--follow", "--lines", "1") as follow:
        follow.wait_for(log_lines(project)[-1], timeout=30)
        # A new release logs its own socket: a line that did not exist when we started.
        deployed = project.fab("deploy", "--force", "-q").stdout
        release = re.match(r"deployed (\S+) ", deployed).group(1)
        line = follow.wait_for(f"Listening at: unix:{project.deploy_to}/shared/run/{release}.sock",
                               timeout=30)
        assert line in log_lines(project)
        follow.stop(grace=1)  # stopping is test_logs_follow_stops_on_ctrl_c_or_sigterm's business


FOLLOW_HANGS = ("fab logs --follow runs tail without a pty; on SIGINT/SIGTERM Fabric's Remote "
                "re-raises KeyboardInterrupt and Invoke then joins its stdout reader thread, which "
                "waits forever for the remote tail: only a second signal ends it")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_logs_follow_stops_on_ctrl_c_or_sigterm(project, host, sig):
    host.run_as_user("mkdir -p ~/srv/guestbook/shared/log && "
                     "echo fabdeploy-test-line > ~/srv/guestbook/shared/log/app.log")
    with Streamed(project, "logs", "--follow") as follow:
        follow.wait_for("fabdeploy-test-line", timeout=30)  # tail runs on the host now
        code = follow.stop(sig, grace=3)
    assert code is not None, "fab logs --follow was still running 3s after the signal"


def release_rows(stdout: str) -> dict[str, list[str]]:
    """`fab releases` as {release: [mark, state, version]}; mark is '*' or ''."""
    rows = {}
    for line in stdout.splitlines()[2:]:
        mark, rest = ("*", line[1:]) if line.startswith("*") else ("", line)
        name, state, version, *_ = rest.split()
        rows[name] = [mark, state, version]
    return rows


def test_releases_marks_the_current_one_and_the_failed_ones(project, host):
    project.fab("deploy")
    good = current_of(project)
    # A release that never gets healthy: its health path answers 404.
    project.configure(health_path="/no-such-page", health_timeout=2)
    project.set_version("1.1.0")
    assert project.fab("deploy", check=False).returncode != 0
    failed = max(p.name for p in (project.deploy_to / "releases").iterdir())
    assert failed != good

    result = project.fab("releases")

    assert result.stdout.splitlines()[0] == f"{host.host_string} ({project.deploy_to}), * = current"
    assert result.stdout.splitlines()[1].split() == ["RELEASE", "STATE", "VERSION", "COMMIT", "DEPLOYED", "AT", "BY"]
    rows = release_rows(result.stdout)
    assert rows.keys() == {good, failed}
    assert rows[good] == ["*", "ready", "1.0.0"]
    assert rows[failed][:2] == ["", "failed"]


# -- clear errors: before anything reaches the host --------------------------------------------

def test_unreachable_host_is_one_clear_error(project, host):
    before = host_state(project)
    target = f"{host.user}@127.0.0.1:{free_port()}"
    result = project.fab("deploy", hosts=target, check=False)
    assert_clear_error(result, "cannot connect", "check the host name, port and firewall", target)
    assert host_state(project) == before


def test_authentication_failure_is_one_clear_error(project, host, tmp_path):
    stranger = tmp_path / "stranger_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    set_fabric(project, ["connect_kwargs", "key_filename"], str(stranger))
    before = host_state(project)
    result = project.fab("deploy", check=False)
    assert_clear_error(result, f"authentication failed for user {host.user}",
                       "check the SSH key (-i, or connect_kwargs.key_filename)", host.host_string)
    assert host_state(project) == before


@pytest.mark.parametrize("content, says, hint", [
    (None, "has no pyproject.toml or setup.py", "run fab from your project, or set fabdeploy.project_dir"),
    ("[project\nname = 'guestbook'\n", "pyproject.toml does not parse: ", "fix pyproject.toml"),
], ids=["missing", "unparsable"])
def test_bad_pyproject_is_one_clear_error(project, host, content, says, hint):
    pyproject = project.path / "pyproject.toml"
    if content is None:
        pyproject.unlink()
    else:
        pyproject.write_text(content)
    before = host_state(project)
    result = project.fab("deploy", check=False)
    assert_clear_error(result, says, hint)
    assert host_state(project) == before


def failing_build(project, tmp_path):
    """Deploy with a data file missing (setuptools fails in build_wheel); TMPDIR our own."""
    edit_pyproject(project, '[tool.setuptools]\n',
                   '[tool.setuptools]\ndata-files = {"share" = ["no-such-file.txt"]}\n')
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    result = project.fab("deploy", check=False, env={**offline_build_env(tmp_path), "TMPDIR": str(tmp)})
    return result, tmp


def test_build_failure_shows_the_builds_last_lines(project, host, tmp_path):
    before = host_state(project)
    result, _ = failing_build(project, tmp_path)
    detail = assert_clear_error(result, "building the wheel of ", "fix the build, then deploy again",
                                "local")
    assert any("can't copy 'no-such-file.txt'" in line for line in detail), result.stderr
    assert host_state(project) == before


def test_build_failure_names_the_project(project, host, tmp_path):
    result, _ = failing_build(project, tmp_path)
    assert_clear_error(result, f"building the wheel of {project.path} failed",
                       "fix the build, then deploy again", "local")


def test_build_failure_leaves_no_temporary_files(project, host, tmp_path):
    result, tmp = failing_build(project, tmp_path)
    assert result.returncode != 0
    assert sorted(p.name for p in tmp.iterdir()) == []


def test_build_failure_of_a_bad_package_list_names_the_cause(project, host, tmp_path):
    edit_pyproject(project, 'packages = ["guestbook"', 'packages = ["missing"')
    before = host_state(project)
    result = project.fab("deploy", check=False, env=offline_build_env(tmp_path))
    detail = assert_clear_error(result, "building the wheel of ", "fix the build, then deploy again",
                                "local")
    assert any("package directory 'missing' does not exist" in line for line in detail), result.stderr
    assert host_state(project) == before


def test_misspelt_setting_is_named_with_a_suggestion(project, host):
    project.configure(keep_release=3)
    before = host_state(project)
    result = project.fab("deploy", check=False)
    assert_clear_error(result, "unknown setting 'fabdeploy.keep_release'; did you mean 'keep_releases'?",
                       "fix fabric.yaml")
    assert host_state(project) == before


def test_rollback_without_any_host_says_how_to_give_one(project, host):
    before = host_state(project)
    result = project.fab("rollback", hosts="", check=False)
    assert_clear_error(result, "no host given", "pass -H user@host, or set fabdeploy.hosts")
    assert host_state(project) == before


NO_VENV_PYTHON = """#!/bin/sh
# python3 as on Debian without python3-venv: there is no ensurepip to import.
PYTHONPATH="$HOME/no-venv/lib" exec /usr/bin/python3 "$@"
"""


def test_python_without_venv_says_to_install_python3_venv(project, host):
    fake = host.home / "no-venv" / "fakepython"
    host.run_as_user("mkdir -p ~/no-venv/lib && echo \"raise ModuleNotFoundError("
                     "'No module named ensurepip', name='ensurepip')\" > ~/no-venv/lib/ensurepip.py")
    try:
        host.run_as_user(f"cat > {fake} <<'EOF'\n{NO_VENV_PYTHON}EOF\nchmod +x {fake}")
        assert host.run_as_user(f"{fake} -c 'import ensurepip'", check=False).returncode != 0
        project.configure(python=str(fake))
        before = host_state(project)
        result = project.fab("deploy", check=False)
        assert_clear_error(result, "cannot create virtual environments",
                           "install it: sudo apt-get install python3-venv", host.host_string)
        assert host_state(project) == before
    finally:
        host.run_as_user("rm -rf ~/no-venv")


# nginx cannot honestly vanish from this machine: the agent also looks in /usr/sbin, where
# the throwaway host's own nginx lives, and hiding it takes root changes shared with others.
# So the check is tested in its two halves: the agent's finding, and the words for it.

def test_agent_finds_nginx_missing_on_path_and_in_sbin(monkeypatch):
    looked = []

    def which(name, path=None):
        """shutil.which on a server without nginx, noting where it was asked to look."""
        looked.append((name, path))
        return None if name == "nginx" else "/usr/bin/" + name
    monkeypatch.setattr(agent.shutil, "which", which)
    args = {"refuse_root": True, "needs": {"program": "nginx", "problem": "no-nginx"}}
    assert agent.problems({"uid": 1000, "venv_ok": True, "registration": None}, args) == ["no-nginx"]
    assert [path.split(":")[-2:] for name, path in looked if name == "nginx"] == [["/usr/sbin", "/sbin"]]


def test_server_without_nginx_is_refused_with_what_to_do(project, host):
    settings = resolve(json.loads((project.path / "fabric.yaml").read_text())["fabdeploy"],
                       project.path)
    conn = Connection(host.host_string, connect_kwargs={"key_filename": str(host.key_file)})
    target = ph.Target(Host(conn, str(host.known_hosts)), settings)
    try:
        hostinfo.read(target)  # the real host's facts, from the real agent
    finally:
        target.host.close()
    assert target.facts.problems == ()
    ph.check_server(target)  # passes with nginx there
    target.facts = dataclasses.replace(target.facts, problems=(Problem.NO_NGINX,))
    with pytest.raises(DeployError) as err:
        ph.check_server(target)
    assert err.value.line() == (f"{host.host_string}: nginx is not installed on the server "
                                "(install it: sudo apt-get install nginx (fab provision does))")


# -- clear errors: once the host is being changed ---------------------------------------------------

def test_init_command_failure_shows_flasks_message(project, host):
    sites = snapshot(host.site_dir)
    project.configure(init_command="no-such-command")
    result = project.fab("deploy", check=False)
    detail = assert_clear_error(result, "flask no-such-command failed",
                                "fix the app's init command, or set init_command to '' to skip it",
                                host.host_string)
    assert "Error: No such command 'no-such-command'." in detail
    assert snapshot(host.site_dir) == sites
    assert not (project.deploy_to / "current").exists() and not lock_dir(project).exists()
    (failed,) = (project.deploy_to / "releases").iterdir()
    assert (failed / "FAILED").is_file()


def test_nginx_rejecting_the_config_shows_its_message_and_the_old_release_serves(project, host):
    project.fab("deploy")
    good = current_of(project)
    site = (host.site_dir / "guestbook.conf").read_text()
    project.set_version("1.1.0")
    # A new site, which nginx must test: an unchanged one is neither tested nor reloaded.
    project.configure(proxy={"server_name": "guestbook.test"})  # merged into the host's proxy settings
    broken = host.site_dir / "broken.conf"
    broken.write_text("this is not nginx configuration;\n")
    try:
        result = project.fab("deploy", check=False)
    finally:
        broken.unlink()
    detail = assert_clear_error(result, "nginx rejected the configuration",
                                "fix nginx's configuration; nothing was switched", host.host_string)
    assert any(f'unknown directive "this" in {broken}:1' in line for line in detail), detail
    assert any("test failed" in line for line in detail), detail
    assert (host.site_dir / "guestbook.conf").read_text() == site
    assert current_of(project) == good and not lock_dir(project).exists()
    assert served(host) == "Hello from the guestbook 1.0.0: 0 entries\n"


def test_wrong_wsgi_entry_point_names_the_cause_in_the_headline(project, host):
    """The server's own reason is the headline, wherever it sits in the log (issue 16)."""
    project.fab("deploy")
    good = current_of(project)
    project.configure(wsgi="guestbook:nope()", health_timeout=10)
    project.set_version("1.1.0")
    result = project.fab("deploy", check=False)
    release = max(p.name for p in (project.deploy_to / "releases").iterdir())
    assert_clear_error(result, f"release {release} cannot start: Failed to find attribute 'nope' in "
                               "'guestbook'", "the old release keeps serving", host.host_string)
    assert current_of(project) == good and not lock_dir(project).exists()
    assert served(host).startswith("Hello from the guestbook 1.0.0:")


def test_an_init_command_that_cannot_load_the_app_blames_the_app(project, host):
    """On a first deploy init runs first: a bad wsgi is not the init command's fault."""
    project.configure(wsgi="guestbook:nope()")
    result = project.fab("deploy", check=False)
    assert_clear_error(result, "flask init-db failed: the app does not load: Failed to find attribute "
                               "'nope' in 'guestbook'", "fix the app or fabdeploy.wsgi", host.host_string)


def test_a_misspelt_fabdeploy_section_is_named_with_a_suggestion(project, host):
    config = json.loads((project.path / "fabric.yaml").read_text())
    config["fabdeply"] = config.pop("fabdeploy")
    (project.path / "fabric.yaml").write_text(json.dumps(config))
    before = host_state(project)
    result = project.fab("deploy", check=False)
    assert_clear_error(result, "fabric.yaml has a section 'fabdeply', not 'fabdeploy'",
                       "did you mean 'fabdeploy'? fix fabric.yaml")
    assert host_state(project) == before


def test_a_fabric_yaml_that_does_not_parse_is_one_line_naming_file_and_line(project, host):
    (project.path / "fabric.yaml").write_text("fabdeploy:\n  app: guestbook\n   bad: [1\n")
    result = project.fab("deploy", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"fabdeploy: {project.path / 'fabric.yaml'}:3: "), line


# -- FABDEPLOY_DEBUG --------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["setting", "unreachable"])
def test_debug_shows_the_traceback_instead(project, host, case):
    if case == "setting":
        project.configure(keep_release=3)
        hosts, what = None, "unknown setting 'fabdeploy.keep_release'"
    else:
        hosts, what = f"{host.user}@127.0.0.1:{free_port()}", "cannot connect"
    plain = project.fab("deploy", hosts=hosts, check=False)
    debug = project.fab("deploy", hosts=hosts, check=False, env={"FABDEPLOY_DEBUG": "1"})
    assert "Traceback" not in plain.stderr
    assert debug.returncode != 0
    assert "Traceback (most recent call last):" in debug.stderr
    assert re.search(rf"^fabdeploy\.errors\.DeployError: .*{re.escape(what)}", debug.stderr, re.M), \
        debug.stderr


# -- projects as the tutorials make them, and old setting names ------------------------------

def test_a_setup_py_only_project_deploys_with_its_name_from_the_backend(host, tmp_path):
    """No pyproject.toml, a name setup.py computes: the build backend says what it is (issue 16)."""
    import shutil
    from harness.project import Project
    source = Path(__file__).resolve().parent / "projects" / "setup_py"
    path = tmp_path / "hello-setup"
    shutil.copytree(source, path)
    (path / "fabfile.py").write_text("from fabdeploy import ns  # noqa: F401\n")
    project = Project(path, host, app="hello-setup")
    project.configure(wsgi="hello_setup:make_app()", init_command="")
    assert "app" not in json.loads((path / "fabric.yaml").read_text())["fabdeploy"]
    try:
        project.fab("deploy")
        with urllib.request.urlopen(host.url, timeout=10) as response:
            assert response.read() == b"hello from setup_py\n"
        assert (host.home / "srv" / "hello-setup" / "current").is_symlink()
    finally:
        host.run_as_user("for p in ~/srv/hello-setup/shared/run/*.pid; do [ -f \"$p\" ] && "
                         "kill \"$(cat \"$p\")\"; done; rm -rf ~/srv/hello-setup", check=False)
        (host.site_dir / "hello-setup.conf").unlink(missing_ok=True)


def test_old_setting_names_still_deploy_with_a_warning_naming_the_new_key(project, host):
    config = json.loads((project.path / "fabric.yaml").read_text())
    fabdeploy = config["fabdeploy"]
    fabdeploy["nginx"] = fabdeploy.pop("proxy")          # as fabric.yaml was written before
    fabdeploy["gunicorn"] = {**fabdeploy.pop("server"), "workers": 3}
    (project.path / "fabric.yaml").write_text(json.dumps(config))
    result = project.fab("deploy")
    assert "fabdeploy: warning: fabric.yaml: 'gunicorn.workers' is now 'server.workers'" in result.stderr
    assert "'nginx.listen' is now 'proxy.listen'" in result.stderr
    assert served(host).startswith("Hello from the guestbook 1.0.0")
    conf = next((project.deploy_to / "releases").iterdir()) / "gunicorn.conf.py"
    assert "workers = 3" in conf.read_text()
