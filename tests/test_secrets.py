"""Issue 3, secrets and exposure, checked on a real sshd + nginx + gunicorn.

The SECRET_KEY stays off command lines, environments and fab's output; config.py
is 0600 at every instant; rotate-secret keeps sessions alive; gunicorn never
listens on a public address, even with PORT set; the app never runs as root.
"""
import ast
import contextlib
import ctypes
import http.cookiejar
import ipaddress
import json
import os
import pwd
import select
import shutil
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from flask import Flask
from flask.sessions import SecureCookieSessionInterface
from itsdangerous import BadSignature

from harness.project import EXAMPLE, FAB, traversable_tmpdir
from fabdeploy import onhost, phases, session
from fabdeploy.layout import Layout
from fabdeploy.model import HostFacts
from fabdeploy.ops import Facts
from fabdeploy.errors import DeployError
from fabdeploy.settings import resolve

pytestmark = pytest.mark.host
# Reading other users' /proc entries, netlink, usermod: and as non-root the
# harness's deploy user is you, whose shell and .bashrc must not be touched.
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

PORT = 8765  # what a careless environment might hand gunicorn


# -- small helpers: the app over HTTP, the files on the host -----------------

def browser() -> urllib.request.OpenerDirector:
    """An HTTP client with its own cookie jar, like one visitor's browser."""
    return urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))


def get(url: str, opener=None) -> str:
    """GET a page, text."""
    with (opener or urllib.request.build_opener()).open(url, timeout=10) as response:
        return response.read().decode()


def sign(host, name: str, opener) -> None:
    """Sign the guestbook, which puts `name` in the session cookie."""
    data = urllib.parse.urlencode({"name": name}).encode()
    opener.open(host.url + "sign", data=data, timeout=10).read()


def session_cookie(opener) -> str:
    """The value of the Flask session cookie in this browser's jar."""
    jar = next(h.cookiejar for h in opener.handlers if isinstance(h, urllib.request.HTTPCookieProcessor))
    return next(c.value for c in jar if c.name == "session")


def signed_with(cookie: str, key: str) -> bool:
    """True if Flask, with only this SECRET_KEY, accepts the session cookie."""
    app = Flask("probe")
    app.secret_key = key
    try:
        SecureCookieSessionInterface().get_signing_serializer(app).loads(cookie)
    except BadSignature:
        return False
    return True


def config_path(project) -> Path:
    """The shared instance folder's config.py, on the host (which is this machine)."""
    return project.deploy_to / "shared" / "instance" / "config.py"


def config_values(project) -> dict:
    """SECRET_KEY and friends from config.py, read as literals, never executed."""
    tree = ast.parse(config_path(project).read_text())
    return {node.targets[0].id: ast.literal_eval(node.value) for node in tree.body
            if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)}


def current_release(project) -> str:
    """The release `current` points at."""
    return (project.deploy_to / "current").readlink().name


def fab_popen(project, *args: str) -> subprocess.Popen:
    """The real fab CLI, started in the background, as Project.fab would run it."""
    return subprocess.Popen([FAB, "-H", project.host.host_string, *args], cwd=project.path,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def finish(proc: subprocess.Popen, timeout: float = 180) -> tuple[str, str]:
    """Wait for fab, failing with its output if it failed."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"fab timed out\nstdout:\n{out}\nstderr:\n{err[-5000:]}")
    assert proc.returncode == 0, f"fab exited {proc.returncode}\nstdout:\n{out}\nstderr:\n{err[-5000:]}"
    return out, err


def uid_of(host) -> int:
    """The deploy user's uid."""
    return pwd.getpwnam(host.user).pw_uid


# -- /proc ---------------------------------------------------------------------

def read_proc(pid: str, name: str) -> bytes:
    """A /proc/<pid> file's bytes, or b"" when it cannot be read."""
    try:
        with open(f"/proc/{pid}/{name}", "rb") as f:
            return f.read()
    except OSError:  # gone already, or a kernel thread
        return b""


def pids() -> list[str]:
    """Every process id now, as /proc names them."""
    return [p for p in os.listdir("/proc") if p.isdigit()]


def proc_uids(pid: str) -> list[int]:
    """Real, effective, saved and filesystem uid of a process."""
    for line in read_proc(pid, "status").decode().splitlines():
        if line.startswith("Uid:"):
            return [int(v) for v in line.split()[1:]]
    return []


def proc_owner(pid: str) -> int | None:
    """A process's effective uid, or None if it is gone."""
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def realtime() -> None:
    """Make the calling thread SCHED_FIFO (per thread on Linux), so it wakes ahead of the deploy.

    It only ever blocks in select/recv, so it hogs nothing; best effort without CAP_SYS_NICE.
    """
    with contextlib.suppress(OSError):
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))


NETLINK_CONNECTOR, CN_IDX_PROC, CN_VAL_PROC = 11, 1, 1
PROC_CN_MCAST_LISTEN, PROC_EVENT_EXEC, NLMSG_DONE = 1, 2, 3
EVENT_AT = 16 + 20  # after nlmsghdr and cn_msg: proc_event's what, cpu, timestamp
EXEC_PID_AT = EVENT_AT + 16  # then, for an exec, the pid


def proc_connector() -> socket.socket:
    """A netlink socket on which the kernel reports every exec (root only)."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_CONNECTOR)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    sock.bind((0, CN_IDX_PROC))
    op = struct.pack("I", PROC_CN_MCAST_LISTEN)
    cn_msg = struct.pack("IIIIHH", CN_IDX_PROC, CN_VAL_PROC, 0, 0, len(op), 0) + op
    sock.send(struct.pack("IHHII", 16 + len(cn_msg), NLMSG_DONE, 0, 0, 0) + cn_msg)
    sock.settimeout(0.05)
    return sock


class ProcessSpy:
    """Collects every command line, and the deploy user's environs, while active.

    Two ways at once: the kernel's proc connector reports each exec, so even a
    command that lives a millisecond is read; a /proc sweep catches the rest.
    """

    def __init__(self, uid: int):
        self.uid = uid
        self.seen: set[bytes] = set()  # deduplicated: a deploy repeats itself a lot
        self.sweeps = self.execs = 0
        self.halt = threading.Event()
        self.threads = [threading.Thread(target=f, daemon=True) for f in (self.sweep, self.follow_execs)]

    def __enter__(self) -> "ProcessSpy":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.halt.set()
        for thread in self.threads:
            thread.join(10)

    def read(self, pid: str) -> None:
        """Keep a process's command line, and its environ if the deploy user's."""
        self.seen.add(read_proc(pid, "cmdline"))
        if proc_owner(pid) == self.uid:
            self.seen.add(read_proc(pid, "environ"))

    def sweep(self) -> None:
        while not self.halt.is_set():
            for pid in pids():
                self.read(pid)
            self.sweeps += 1

    def follow_execs(self) -> None:
        realtime()
        with proc_connector() as sock:
            while not self.halt.is_set():
                try:
                    data = sock.recv(4096)
                except OSError:  # a timeout, or ENOBUFS (events dropped): the sweep still runs
                    continue
                if struct.unpack_from("I", data, EVENT_AT)[0] == PROC_EVENT_EXEC:
                    self.execs += 1
                    self.read(str(struct.unpack_from("i", data, EXEC_PID_AT)[0]))


# -- inotify, through libc (stdlib only) --------------------------------------

IN_MODIFY, IN_ATTRIB, IN_CLOSE_WRITE, IN_MOVED_TO, IN_CREATE = 0x2, 0x4, 0x8, 0x80, 0x100
WATCHED = IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE
EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then the name
libc = ctypes.CDLL(None, use_errno=True)


def inotify_events(buf: bytes):
    """(mask, name) for each struct inotify_event in a read() buffer."""
    offset = 0
    while offset < len(buf):
        _, mask, _, length = EVENT.unpack_from(buf, offset)
        start = offset + EVENT.size
        yield mask, buf[start:start + length].rstrip(b"\0").decode()
        offset = start + length


class ModeWatcher(threading.Thread):
    """Records (inotify mask, name, mode) each time a file named *config* in a directory changes.

    The directory may not exist yet (a first deploy creates it): it is polled
    for every millisecond, then watched with inotify, and each event's file is
    lstat-ed at once, so even a mode that lasts one SFTP round trip is seen.
    """

    def __init__(self, directory: Path):
        super().__init__(daemon=True)
        self.directory = directory
        self.records: list[tuple[int, str, int | None]] = []  # mode None: gone before lstat
        self.config_before_watch = False  # a config file existed before we watched
        self.watching = threading.Event()
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.directory.is_dir():
            if self.halt.is_set():
                return
            time.sleep(0.001)
        realtime()  # to lstat a new file before the deployer's next step
        fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        assert fd >= 0, os.strerror(ctypes.get_errno())
        try:
            assert libc.inotify_add_watch(fd, bytes(self.directory), WATCHED) >= 0, \
                os.strerror(ctypes.get_errno())
            self.watching.set()
            for name in os.listdir(self.directory):
                if "config" in name:
                    self.config_before_watch = True
                    self.record(0, name)
            self.watch(fd)
        finally:
            os.close(fd)

    def watch(self, fd: int) -> None:
        while not self.halt.is_set():
            if not select.select([fd], [], [], 0.02)[0]:
                continue
            try:
                buf = os.read(fd, 65536)
            except BlockingIOError:
                continue
            for mask, name in inotify_events(buf):
                if "config" in name:
                    self.record(mask, name)

    def record(self, mask: int, name: str) -> None:
        try:
            mode = stat.S_IMODE(os.lstat(self.directory / name).st_mode)
        except FileNotFoundError:  # renamed or removed before we looked
            mode = None
        self.records.append((mask, name, mode))

    def saw_a_creation(self) -> bool:
        """A config file was born while watched: the watch covered its first instant."""
        return any(mask & IN_CREATE for mask, _, _ in self.records)

    def stop(self) -> None:
        self.halt.set()
        self.join(10)


@contextlib.contextmanager
def watching_modes(directory: Path):
    """A running ModeWatcher on directory, stopped on exit."""
    watcher = ModeWatcher(directory)
    watcher.start()
    try:
        yield watcher
    finally:
        watcher.stop()


# -- listening sockets -----------------------------------------------------------

def decode_address(hex_addr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address as /proc/net/tcp{,6} prints it: 32-bit words in host (little-endian) order."""
    raw = bytes.fromhex(hex_addr)
    return ipaddress.ip_address(b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4)))


def tcp_listeners() -> list[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int, int]]:
    """(address, port, socket inode) of every TCP socket in LISTEN state."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":  # TCP_LISTEN
                continue
            addr, port = fields[1].split(":")
            found.append((decode_address(addr), int(port, 16), int(fields[9])))
    return found


def socket_holders() -> dict[int, set[str]]:
    """{socket inode: pids holding it}, from the /proc/<pid>/fd links."""
    holders: dict[int, set[str]] = {}
    for pid in pids():
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                holders.setdefault(int(link[8:-1]), set()).add(pid)
    return holders


def listeners_of(uid: int) -> list[tuple[str, int, str]]:
    """(address, port, pid) of every TCP listener held by a process of uid."""
    holders = socket_holders()
    return [(str(addr), port, pid) for addr, port, inode in tcp_listeners()
            for pid in holders.get(inode, ()) if proc_owner(pid) == uid]


def app_processes(project, release: str) -> list[str]:
    """PIDs of the release's gunicorn, master and workers, found by their command line."""
    release_dir = f"{project.deploy_to}/releases/{release}/".encode()
    proc_name = f"guestbook-{release}".encode()  # the title, if setproctitle is ever installed
    return [pid for pid in pids()
            if (cmd := read_proc(pid, "cmdline")) and b"gunicorn" in cmd
            and (release_dir in cmd or proc_name in cmd)]


@contextlib.contextmanager
def port_in_ssh_env(host, port: int):
    """`export PORT=...` at the very top of the deploy user's ~/.bashrc, restored after.

    bash sources ~/.bashrc for commands sshd runs; Debian's returns early when
    not interactive, so the line must come first.
    """
    bashrc = host.home / ".bashrc"
    original = bashrc.read_bytes() if bashrc.exists() else None
    bashrc.write_bytes(f"export PORT={port}\n".encode() + (original or b""))
    os.chown(bashrc, uid_of(host), pwd.getpwnam(host.user).pw_gid)
    try:
        yield
    finally:
        if original is None:
            bashrc.unlink()
        else:
            bashrc.write_bytes(original)


@contextlib.contextmanager
def logging_login_shell(host):
    """Make the deploy user's login shell log each command sshd hands it, then run bash.

    sshd runs every command of a session as `<shell> -c <command>`, so the log
    holds every remote command line, however short-lived its process.
    """
    user = pwd.getpwnam(host.user)
    directory = traversable_tmpdir("fabdeploy-shell-")
    log, shell = directory / "commands.log", directory / "logging-shell"
    log.touch(0o600)
    os.chown(log, user.pw_uid, user.pw_gid)
    shell.write_text(f'#!/bin/sh\nprintf \'%s\\0\' "$@" >> {log}\nexec /bin/bash "$@"\n')
    shell.chmod(0o755)
    subprocess.run(["usermod", "-s", str(shell), host.user], check=True, capture_output=True)
    try:
        yield log
    finally:
        subprocess.run(["usermod", "-s", user.pw_shell, host.user], check=True, capture_output=True)
        shutil.rmtree(directory, ignore_errors=True)


# -- 1. never on a command line, in an environment, or in fab's output ----------

@needs_root
def test_secret_never_on_a_command_line_in_an_environment_or_in_fab_output(project, host):
    """A first deploy with --echo -d, watched by exec events, /proc sweeps and a logging shell."""
    with logging_login_shell(host) as shell_log, ProcessSpy(uid_of(host)) as spy:
        out, err = finish(fab_popen(project, "--echo", "-d", "deploy"))
        commands = shell_log.read_bytes()
    key = config_values(project)["SECRET_KEY"]
    assert len(key) >= 32

    # The spy and the shell log really watched the deploy: the shell was handed the agent
    # (every other step travels inside its channel), the spy saw the release's gunicorn.
    release_dir = f"{project.deploy_to}/releases/{current_release(project)}".encode()
    assert session.DIGEST.encode() in commands and b"python3 -S -c" in commands, \
        "the login shell logged no deploy"
    assert any(release_dir in seen and b"gunicorn" in seen for seen in spy.seen), \
        f"never saw the release's gunicorn ({spy.sweeps} sweeps, {spy.execs} execs)"
    assert any(b"SSH_CONNECTION=" in seen for seen in spy.seen), "no deploy-user environ was read"
    # --echo shows each step (the secret's file as "secret: not shown"), and -d logs
    # the SSH traffic: the agent's channel included.
    assert "shared/instance/config.py (mode 600, secret: not shown)" in out, "--echo showed no steps"
    assert "paramiko.transport" in err and "[chan 0]" in err, "-d logged no SSH debug lines"

    assert key.encode() not in commands, "SECRET_KEY in a command sent over SSH"
    leaks = [seen[:200] for seen in spy.seen if key.encode() in seen]
    assert not leaks, f"SECRET_KEY seen in /proc: {leaks}"
    assert key not in out, "SECRET_KEY in fab's stdout"
    assert key not in err, "SECRET_KEY in fab's stderr (debug logs)"


# -- 2. 0600 at every instant ---------------------------------------------------

def assert_all_0600(records: list[tuple[int, str, int | None]]) -> None:
    """Every mode seen was 0600 (None: the file was gone before it could be seen)."""
    bad = [(hex(mask), name, oct(mode)) for mask, name, mode in records if mode not in (0o600, None)]
    assert not bad, f"a config file was not 0600: {bad}"


def test_config_is_0600_at_every_instant(project, host):
    """inotify on shared/instance: each config file's mode, the moment it appears or changes."""
    instance = project.deploy_to / "shared" / "instance"
    with watching_modes(instance) as watcher:
        project.fab("deploy")
    assert watcher.watching.is_set() and not watcher.config_before_watch
    assert watcher.saw_a_creation(), watcher.records
    assert any(name == "config.py" and mode for _, name, mode in watcher.records), watcher.records
    assert_all_0600(watcher.records)

    with watching_modes(instance) as watcher:
        assert watcher.watching.wait(5)
        project.fab("rotate-secret")
    assert watcher.saw_a_creation(), f"the rotation's write was not observed: {watcher.records}"
    assert_all_0600(watcher.records)


# -- 3. rotate-secret -------------------------------------------------------------

def rotate(project) -> str:
    """fab rotate-secret with echo and debug on; returns all it printed and sent over SSH."""
    with logging_login_shell(project.host) as shell_log:
        out, err = finish(fab_popen(project, "--echo", "-d", "rotate-secret"))
        commands = shell_log.read_bytes().decode(errors="replace")
    assert session.DIGEST in commands, "the login shell logged no rotation"
    assert "kill -HUP" in out, "--echo showed no reload of the releases"
    return out + err + commands


def wait_signed_with(host, opener, name: str, key: str, timeout: float = 10) -> None:
    """Sign in until the new cookie is signed with `key`: HUP-ed workers take a moment."""
    deadline = time.monotonic() + timeout
    while True:
        sign(host, name, opener)
        if signed_with(session_cookie(opener), key):
            return
        assert time.monotonic() < deadline, "the app never signed with the new key"
        time.sleep(0.2)


@needs_root
def test_rotate_secret_keeps_old_sessions_alive(project, host):
    """Two rotations: new keys, old ones as fallbacks, sessions alive, nothing printed."""
    project.fab("deploy")
    ada = browser()
    sign(host, "ada", ada)
    k1 = config_values(project)["SECRET_KEY"]
    assert signed_with(session_cookie(ada), k1)

    printed = rotate(project)
    values = config_values(project)
    k2 = values["SECRET_KEY"]
    assert k2 != k1 and len(k2) >= 32
    assert values["SECRET_KEY_FALLBACKS"] == [k1]
    assert get(host.url + "whoami", ada) == "ada\n"  # signed with k1, accepted as a fallback
    grace = browser()
    wait_signed_with(host, grace, "grace", k2)
    assert get(host.url + "whoami", grace) == "grace\n"

    printed += rotate(project)
    values = config_values(project)
    k3 = values["SECRET_KEY"]
    assert k3 not in (k1, k2)
    assert values["SECRET_KEY_FALLBACKS"] == [k2, k1]  # newest first
    assert get(host.url + "whoami", ada) == "ada\n"
    assert get(host.url + "whoami", grace) == "grace\n"
    wait_signed_with(host, browser(), "hopper", k3)

    assert stat.S_IMODE(config_path(project).stat().st_mode) == 0o600
    for key in (k1, k2, k3):
        assert key not in printed, "a SECRET_KEY in rotate-secret's output or commands"
    audit = (project.deploy_to / ".fabdeploy" / "audit.jsonl").read_text()
    events = [json.loads(line)["event"] for line in audit.splitlines()]
    assert events.count("rotate-secret") == 2, events
    for key in (k1, k2, k3):
        assert key not in audit, "a SECRET_KEY is in the audit log"


# -- 4. gunicorn binds a 0660 unix socket, never a public address ------------------

def test_listener_parser_finds_a_known_socket():
    """The /proc/net parser is right, so finding no public listener below means something."""
    assert str(decode_address("00000000")) == "0.0.0.0"
    assert str(decode_address("0100007F")) == "127.0.0.1"
    assert str(decode_address("0" * 32)) == "::"
    assert str(decode_address("00000000000000000000000001000000")) == "::1"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        probe.listen()
        port = probe.getsockname()[1]
        assert ("127.0.0.1", port, str(os.getpid())) in listeners_of(os.getuid())


def unix_listeners() -> dict[str, int]:
    """{path: socket inode} of every listening unix socket, from /proc/net/unix."""
    found = {}
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) == 8 and int(fields[3], 16) & 0x10000:  # __SO_ACCEPTCON: listening
            found[fields[7]] = int(fields[6])
    return found


def is_nginx(pid: str) -> bool:
    """The harness runs nginx as the deploy user; it is the public face, not the app."""
    try:
        return os.readlink(f"/proc/{pid}/exe") == "/usr/sbin/nginx"
    except OSError:
        return False


def assert_app_not_exposed(project, host) -> None:
    """gunicorn listens on its release's unix socket; nothing of the user on a wildcard address."""
    release = current_release(project)
    sock = str(project.deploy_to / "shared" / "run" / f"{release}.sock")
    inode = unix_listeners().get(sock)
    assert inode, f"nothing listens on {sock}"
    found = app_processes(project, release)
    assert found, "gunicorn is not running"
    assert set(found) & socket_holders().get(inode, set()), "the socket is not gunicorn's"
    listening = [entry for entry in listeners_of(uid_of(host)) if not is_nginx(entry[2])]
    public = [entry for entry in listening if entry[0] in ("0.0.0.0", "::")]
    assert not public, f"the deploy user listens on a wildcard address: {public}"


@needs_root
def test_gunicorn_listens_on_its_unix_socket_only(project, host):
    """gunicorn holds its release's unix socket and no wildcard TCP listener."""
    project.fab("deploy")
    assert_app_not_exposed(project, host)
    assert get(host.url).startswith("Hello from the guestbook")


def test_gunicorn_socket_is_0660(project, host):
    """The README's promise: only the app's user and nginx's group may connect."""
    project.fab("deploy")
    mode = (project.deploy_to / "shared" / "run" / f"{current_release(project)}.sock").stat().st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o660, f"socket is {oct(stat.S_IMODE(mode))}"


@needs_root
def test_a_port_variable_in_the_ssh_environment_changes_nothing(project, host):
    """gunicorn binds 0.0.0.0:$PORT by default; a deploy with PORT exported must not."""
    with port_in_ssh_env(host, PORT):
        echoed = subprocess.run(host.ssh_argv('echo "$PORT"'), capture_output=True, text=True,
                                stdin=subprocess.DEVNULL, timeout=20)
        assert echoed.stdout.strip() == str(PORT), "PORT did not reach SSH commands"
        project.fab("deploy")
        assert_app_not_exposed(project, host)
        assert not [entry for entry in tcp_listeners() if entry[1] == PORT], f"something listens on {PORT}"
        for pid in app_processes(project, current_release(project)):
            # the serve script promises gunicorn never runs with $PORT set
            assert f"PORT={PORT}".encode() not in read_proc(pid, "environ").split(b"\0")
        assert get(host.url).startswith("Hello from the guestbook")


# -- 5. the app never runs as root --------------------------------------------------

def test_every_app_process_runs_as_the_deploy_user(project, host):
    """Master and workers: real, effective, saved and fs uid all the deploy user's, not 0."""
    project.fab("deploy")
    release = current_release(project)
    found = app_processes(project, release)
    master = (project.deploy_to / "shared" / "run" / f"{release}.pid").read_text().strip()
    assert master in found
    assert len(found) >= 3, f"expected a master and 2 workers, found {found}"
    uid = uid_of(host)
    assert uid != 0
    for pid in found:
        assert proc_uids(pid) == [uid] * 4, f"pid {pid} runs with uids {proc_uids(pid)}"


def target_with(problems: list) -> phases.Target:
    """A Target with the given host facts and no connection: check_server needs none."""
    settings = resolve({"app": "guestbook"}, EXAMPLE)
    facts = HostFacts.parse({"root": "/srv/guestbook", "user": "deploy", "uid": 1000, "problems": problems})
    return phases.Target(SimpleNamespace(name="root@web1"), settings, facts=facts)


def refusal(problems: list) -> str:
    """Why check_server refuses a host with these facts ("" if it does not)."""
    try:
        phases.check_server(target_with(problems))
    except DeployError as exc:
        return str(exc)
    return ""


def run_agent(*ops) -> dict:
    """The agent, here, as a host runs it: one request on its stdin, its reply on stdout."""
    request = {"id": 1, "phases": [{"name": "test", "ops": [op.wire() for op in ops]}]}
    done = subprocess.run([sys.executable, "-S", "-c", onhost.program("agent").decode()],
                          input=json.dumps(request) + "\n", capture_output=True, text=True, check=True)
    return json.loads(done.stdout.splitlines()[-1])


def test_deploying_as_root_is_refused():
    """The agent names a root login, and fabdeploy refuses it (on real hosts: test_production_hosts)."""
    reply = run_agent(Facts(root="/nonexistent", app="guestbook", python=sys.executable,
                            paths=Layout("/nonexistent").for_agent(), key="facts"))
    found = reply["results"]["facts"]
    assert ("root" in found["problems"]) == (os.getuid() == 0)
    assert "refusing to deploy as root" in refusal(["root"])
    # The same host as an ordinary user is not refused for being root.
    assert refusal([]) == ""
