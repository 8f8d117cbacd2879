"""Fault injection for the lock and interruption tests: background fab runs, kills, drops."""
from __future__ import annotations

import json
import os
import pwd
import re
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

from harness.project import FAB

from fabdeploy.settings import DEFAULTS

# Settings under which the venv (ensurepip, ~3 s) and install (pip from the index, ~2 s)
# phases last long enough to kill fab inside them; the defaults take a fraction of a second.
SLOW_INSTALL = {k: v for k, v in {"installer": "pip", "wheelhouse": False}.items() if k in DEFAULTS}
RELEASE = re.compile(r"^\*?\s*(\d{8}-\d{6}-\d{3})\s+(\w+)", re.M)


class KnownBug(AssertionError):
    """A failed check that a strict xfail(raises=...) names: any other failure still fails."""


class PartialIsRollbackTarget(KnownBug):
    """A release killed before the switch is left 'ready': rollback may pick it."""


class FullDiskNotNamed(KnownBug):
    """A deploy that ran out of disk does not say so."""


class LostConnectionNotNamed(KnownBug):
    """A dropped SSH connection is reported as a failed command."""


class PauseIgnoresInterrupt(KnownBug):
    """Ctrl-C while fab sits in FABDEPLOY_PAUSE_BEFORE does not end fab."""


# -- the project and what the host shows of it ---------------------------------

def wipe(host) -> None:
    """Stop every deployed gunicorn (by its pid file) and remove ~/srv, as conftest does."""
    host.run_as_user("for p in ~/srv/guestbook/shared/run/*.pid; do [ -f \"$p\" ] && "
                     "kill \"$(cat \"$p\")\"; done; rm -rf ~/srv", check=False)


def get(url: str) -> tuple[str, str]:
    """The page's text, and the release that served it (the app's /about says)."""
    with urllib.request.urlopen(url, timeout=10) as response:
        page = response.read().decode()
    with urllib.request.urlopen(url.rstrip("/") + "/about", timeout=10) as response:
        return page, json.loads(response.read())["release"]


def version_served(host) -> str:
    """The version in the app's greeting, as a visitor gets it through nginx."""
    return re.search(r" (\d+\.\d+\.\d+): ", get(host.url)[0]).group(1)


def release_served(host) -> str:
    """The release that answers visitors: the app greets, and nginx names its release."""
    text, release = get(host.url)
    assert text.startswith("Hello from the guestbook"), text
    return release


def current_of(project) -> str:
    """The release `current` points at."""
    return (project.deploy_to / "current").readlink().name


def release_names(project) -> set[str]:
    """The release directories on the host, whatever their state."""
    releases = project.deploy_to / "releases"
    return {p.name for p in releases.iterdir()} if releases.is_dir() else set()


def lock_dir(project) -> Path:
    """Where the deploy lock lives while it is held."""
    return project.deploy_to / ".fabdeploy" / "lock"


def lock_info(project) -> dict:
    """Who holds the lock, since when, for what (info.json)."""
    return json.loads((lock_dir(project) / "info.json").read_text())


def states(project) -> dict[str, str]:
    """Release name -> state, as `fab releases` shows them."""
    return dict(RELEASE.findall(project.fab("releases").stdout))


def audit_events(project) -> list[dict]:
    """The host's audit log, oldest first."""
    log = project.deploy_to / ".fabdeploy" / "audit.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()]


def one_line(stderr: str) -> str:
    """fab's error output, which must be exactly one line."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    return lines[0]


def refuses_rollback_to(project, release: str) -> None:
    """`fab rollback --release` must refuse a release that never went live."""
    result = project.fab("rollback", "--release", release, check=False)
    assert result.returncode != 0, result.stdout
    assert f"release {release} is not a good release" in result.stderr, result.stderr


# -- waiting and watching -------------------------------------------------------

def wait_until(predicate, timeout: float, what: str, interval: float = 0.005):
    """Poll until predicate() is truthy and return it; fail naming `what` on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def new_release(project, known: set[str], timeout: float = 60) -> str:
    """The release directory that appears beside `known`."""
    fresh = wait_until(lambda: release_names(project) - known, timeout, "a new release directory")
    assert len(fresh) == 1, fresh
    return fresh.pop()


def cmdlines() -> dict[int, str]:
    """Every live process's command line, NULs as spaces."""
    found = {}
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            found[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
    return found


def installing(project, release: str) -> bool:
    """True while an installer fills the release's venv, i.e. fab is inside `install`."""
    python = f"{project.deploy_to}/releases/{release}/venv/bin/python"
    return any(python in line and " install " in line for line in cmdlines().values())


def proc_stat(pid: int) -> tuple[str, int] | None:
    """(command name, parent pid) from /proc/<pid>/stat, or None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rpartition(")")[2].split()
    return text[text.index("(") + 1:text.rindex(")")], int(fields[1])


def sshd_session_pids(host) -> list[int]:
    """The sshd processes serving connections: every sshd below the listener, not it."""
    master = json.loads((host.workdir / "state.json").read_text())["sshd_pid"]
    procs = {pid: st for pid in (int(p) for p in os.listdir("/proc") if p.isdigit())
             if (st := proc_stat(pid))}
    found, todo = [], [master]
    while todo:
        parent = todo.pop()
        children = [pid for pid, (_, ppid) in procs.items() if ppid == parent]
        todo += children
        # The user's commands (pip, ...) stay: a cut network leaves them running too.
        found += [pid for pid in children if procs[pid][0] == "sshd"]
    return found


def alive(pid: int) -> bool:
    """True while pid runs and is not a zombie."""
    st = Path(f"/proc/{pid}/stat")
    try:
        return st.read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


# -- a fab run in the background -------------------------------------------------

class FabRun:
    """`fab -H host <args>` in the background, its stdout read line by line as it comes."""

    def __init__(self, project, *args: str, pause_before: str | None = None):
        env = {k: v for k, v in os.environ.items() if k != "FABDEPLOY_PAUSE_BEFORE"}
        env["PYTHONUNBUFFERED"] = "1"  # each phase line arrives when it is printed
        if pause_before:
            env["FABDEPLOY_PAUSE_BEFORE"] = pause_before
        self.proc = subprocess.Popen([FAB, "-H", project.host.host_string, *args],
                                     cwd=project.path, env=env, text=True,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        self.pid = self.proc.pid
        self._out: list[str] = []
        self._err: list[str] = []
        self._changed = threading.Condition()
        self._readers = [threading.Thread(target=self._read, args=(stream, sink), daemon=True)
                         for stream, sink in ((self.proc.stdout, self._out),
                                              (self.proc.stderr, self._err))]
        for reader in self._readers:
            reader.start()

    def _read(self, stream, sink: list[str]) -> None:
        """Collect a stream's lines as they arrive, waking wait_for()."""
        for line in stream:
            with self._changed:
                sink.append(line)
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def stdout(self) -> str:
        """Everything fab printed on stdout so far."""
        with self._changed:
            return "".join(self._out)

    @property
    def stderr(self) -> str:
        """Everything fab printed on stderr so far."""
        with self._changed:
            return "".join(self._err)

    def printed(self, pattern: str) -> bool:
        """True if a stdout line so far matches `pattern`."""
        return re.search(pattern, self.stdout, re.M) is not None

    def wait_for(self, pattern: str, timeout: float = 120) -> None:
        """Block until stdout has a line matching `pattern`; fail if fab ends first."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not re.search(pattern, "".join(self._out), re.M):
                if self.proc.poll() is not None and not self._readers[0].is_alive():
                    raise AssertionError(f"fab exited {self.proc.returncode} before {pattern!r}:\n"
                                         f"{''.join(self._out)}{''.join(self._err)}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"no {pattern!r} after {timeout}s:\n{''.join(self._out)}")
                self._changed.wait(0.1)

    def send(self, sig: int) -> None:
        """Signal the fab process itself, by its PID."""
        os.kill(self.pid, sig)

    def wait(self, timeout: float = 120) -> int:
        """fab's exit status, once it has exited and all its output is read."""
        code = self.proc.wait(timeout)
        for reader in self._readers:
            reader.join(5)
        return code

    def __enter__(self) -> "FabRun":
        return self

    def __exit__(self, *exc) -> None:
        # Never leave a paused or hung fab behind: this PID is the one we started.
        if self.proc.poll() is None:
            self.send(signal.SIGKILL)
        self.wait(30)


def last_phase(stdout: str) -> str:
    """The phase fab was in when it stopped: its line is printed even when it fails."""
    return re.findall(r"^\[[^\]]+\] (\S+(?: old)?)\s+\d+\.\d+s$", stdout, re.M)[-1]


def phase_done(phase: str) -> str:
    """The pattern of the line fab prints when a phase has finished."""
    return rf"^\[[^\]]+\] {re.escape(phase)}\s+\d+\.\d+s$"


# -- a small filesystem that is nearly full -------------------------------------

def mount_tmpfs(path: Path, size: str, user: str) -> None:
    """A tmpfs of `size` at path, owned by `user` as the directory it covers would be."""
    entry = pwd.getpwnam(user)
    path.mkdir()
    os.chown(path, entry.pw_uid, entry.pw_gid)
    options = f"size={size},uid={entry.pw_uid},gid={entry.pw_gid},mode=0755"
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)


def fill(path: Path, leave: int) -> Path:
    """A ballast file that leaves `leave` bytes free on path's filesystem."""
    fs = os.statvfs(path)
    ballast = path / "ballast"
    with open(ballast, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, fs.f_bavail * fs.f_frsize - leave)
    return ballast


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged user may still write on path's filesystem."""
    fs = os.statvfs(path)
    return fs.f_bavail * fs.f_frsize


def unmount(path: Path, run_dir: Path) -> None:
    """Stop the gunicorns living on the mount (by pid file), then unmount it, lazily if busy."""
    pids = []
    for pid_file in run_dir.glob("*.pid") if run_dir.is_dir() else []:
        text = pid_file.read_text().strip()
        if text.isdigit() and alive(int(text)):
            pids.append(int(text))
            os.kill(int(text), signal.SIGTERM)
    try:
        wait_until(lambda: not any(map(alive, pids)), 15, "gunicorn to exit", interval=0.05)
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(path)], check=True)
