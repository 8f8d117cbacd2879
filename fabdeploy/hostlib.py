"""Runs on the server, stdlib only: what the agent and the root helper share.

Each of them is sent (or installed) as one file with this one's text in
front of its own (see onhost.py), so neither imports anything on the host.
"""
import os
import subprocess
import time

STALE_PROXY = 91  # a reload after which nginx's old workers still take connections


class Failed(Exception):
    """A step that failed on the host: what it said, for the client to word."""

    def __init__(self, message, exit=1, stdout="", stderr="", **extra):
        super().__init__(message)
        self.info = dict(message=message, exit=exit, stdout=stdout[-20000:], stderr=stderr[-20000:],
                         **extra)


def read_pid(path):
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def stat_fields(pid):
    """/proc/PID/stat after the command's name (state, ppid, ...); None if there is no such process."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def accepting_worker(pid, master):
    """True while `pid` is a worker of nginx's `master` that still takes new connections.

    An nginx worker told to quit renames itself "worker process is shutting
    down" and, in the same step, closes its listening sockets.
    """
    fields = stat_fields(pid)
    if not fields or int(fields[1]) != master:
        return False
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return f.read().replace(b"\0", b" ").strip() == b"nginx: worker process"
    except OSError:
        return False


def run_shell(command):
    proc = subprocess.run(command, shell=True, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if proc.returncode:
        raise Failed("exit %d" % proc.returncode, proc.returncode, proc.stdout, proc.stderr)
    return proc.stdout


def reload_nginx(command, pid_file, timeout=10):
    """Run nginx's reload command; return once its old workers take no more connections.

    nginx's master starts the new workers first and tells the old ones to
    quit about 100 ms later: meanwhile both accept connections, so a new
    connection may still meet the old configuration after one has met the
    new. The reload is done only when every worker from before it has
    stopped accepting. (Without nginx's pid file there is nothing to wait for.)
    """
    master = read_pid(pid_file) if pid_file else None
    old = set()
    if master:
        old = set(int(n) for n in os.listdir("/proc") if n.isdigit() and accepting_worker(int(n), master))
    run_shell(command)
    deadline = time.monotonic() + timeout
    while True:
        old = set(pid for pid in old if accepting_worker(pid, master))
        if not old:
            return
        if time.monotonic() > deadline:
            raise Failed("its workers from before the reload still take connections after %gs" % timeout,
                         STALE_PROXY, stale=True)
        time.sleep(0.01)
