"""A throwaway SSH host on loopback: a real sshd, a proxy (nginx or Apache httpd), and a deploy user.

The proxy runs as the deploy user with a prefix of its own in the workdir, so
that user can test and reload it without sudo, as fabdeploy does on a server.
As root the deploy user is a new ``fdt-<hex>`` account, deleted on stop. As
non-root it is the current user, and stop kills only what this harness started
plus PIDs in ``*.pid`` files under ``~/srv`` written since start. The workdir
must be traversable by the deploy user: use a 0755 directory under /tmp
(pytest's tmp_path sits below a 0700 directory). All state lives in
``<workdir>/state.json``, so another process can stop the host:

    python -m harness.local_host start DIR [--proxy apache]   # daemons outlive the command
    python -m harness.local_host stop DIR
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import pwd
import random
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import time

SSHD, NGINX, RUNUSER = "/usr/sbin/sshd", "/usr/sbin/nginx", "/usr/sbin/runuser"
APACHE, APACHE_MODULES = "/usr/sbin/apache2", "/usr/lib/apache2/modules"
# What fabdeploy's Apache site needs, and what httpd needs to run at all (Debian
# builds mod_unixd in: see `apache2 -l`; a LoadModule of it would fail).
APACHE_LOAD = ("mpm_event", "authz_core", "proxy", "proxy_http", "proxy_balancer",
               "slotmem_shm", "lbmethod_byrequests", "headers")
PACKAGES = {SSHD: "openssh-server", NGINX: "nginx", APACHE: "apache2"}
USER_PATH = "/usr/local/bin:/usr/bin:/bin"  # about what sshd gives a non-root session
SAFE_PATH = re.compile(r"^[\w./@+:-]+$")  # paths go unquoted into sshd_config and the proxy's config
TEMP_PATHS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


class Nginx:
    """nginx with a prefix of its own in the workdir, run by the deploy user."""

    name = "nginx"
    program = NGINX

    def __init__(self, directory: pathlib.Path):
        self.dir = directory
        self.site_dir = directory / "sites"
        self.pid_file = directory / "nginx.pid"
        self.conf = directory / "nginx.conf"

    def argv(self, *extra: str) -> list[str]:
        return [NGINX, "-p", f"{self.dir}/", "-c", str(self.conf), *extra]

    def start_argv(self) -> list[str]:
        return self.argv()  # `daemon on`: the master forks and writes its pid file

    def config(self, http_port: int) -> str:
        """No server block and no `user` directive: sites bring their own listen."""
        d = self.dir
        temp = "".join(f"    {kind}_temp_path {d}/tmp/{kind};\n" for kind in TEMP_PATHS)
        return (f"daemon on;\nworker_processes 1;\npid {self.pid_file};\nerror_log {d}/error.log;\n"
                f"events {{ worker_connections 256; }}\n"
                f"http {{\n    include /etc/nginx/mime.types;\n    access_log {d}/access.log;\n"
                f"{temp}    include {self.site_dir}/*.conf;\n}}\n")

    def settings(self, http_port: int, app: str) -> dict:
        """fabdeploy's `proxy` block for this instance."""
        return {"proxy": {"listen": http_port,
                          "site_path": str(self.site_dir / f"{app}.conf"),
                          "test_command": shlex.join(self.argv("-t")),
                          "reload_command": shlex.join(self.argv("-s", "reload")),
                          "pid_file": str(self.pid_file)}}


class Apache:
    """Apache httpd with a ServerRoot of its own in the workdir, run by the deploy user."""

    name = "apache"
    program = APACHE

    def __init__(self, directory: pathlib.Path):
        self.dir = directory
        self.site_dir = directory / "sites"
        self.pid_file = directory / "apache2.pid"
        self.conf = directory / "apache2.conf"

    def argv(self, *extra: str) -> list[str]:
        return [APACHE, "-f", str(self.conf), *extra]

    def start_argv(self) -> list[str]:
        return self.argv("-k", "start")  # forks; the master writes its pid file

    def config(self, http_port: int) -> str:
        """Only what fabdeploy's site needs; runtime files, mutexes and logs in the workdir."""
        d = self.dir
        modules = "".join(f"LoadModule {m}_module {APACHE_MODULES}/mod_{m}.so\n" for m in APACHE_LOAD)
        return (f"ServerRoot {d}\nServerName localhost\nPidFile {self.pid_file}\n"
                f"DefaultRuntimeDir {d}/tmp\nMutex file:{d}/tmp default\n"
                f"ErrorLog {d}/error.log\nLogLevel warn\n{modules}"
                f"StartServers 1\nListen 127.0.0.1:{http_port}\n"
                f'LogFormat "%h \\"%r\\" %>s %b %D" brief\nCustomLog {d}/access.log brief\n'
                f"IncludeOptional {self.site_dir}/*.conf\n")

    def settings(self, http_port: int, app: str) -> dict:
        """fabdeploy's `proxy` block for this instance: Apache."""
        return {"proxy": {"kind": "apache", "listen": http_port,
                          "site_path": str(self.site_dir / f"{app}.conf"),
                          "test_command": shlex.join(self.argv("-t")),
                          "reload_command": shlex.join(self.argv("-k", "graceful"))}}


PROXIES = {"nginx": Nginx, "apache": Apache}


class LocalHost:
    """A throwaway SSH host on loopback: a real sshd, nginx or Apache, and a deploy user."""

    host = "127.0.0.1"
    user = property(lambda self: self._state.get("user"))
    home = property(lambda self: pathlib.Path(self._state["home"]) if "home" in self._state else None)
    ssh_port = property(lambda self: self._state.get("ssh_port"))
    http_port = property(lambda self: self._state.get("http_port"))
    host_string = property(lambda self: f"{self.user}@{self.host}:{self.ssh_port}")
    url = property(lambda self: f"http://{self.host}:{self.http_port}/")

    def __init__(self, workdir: pathlib.Path, proxy: str = "nginx"):
        self.workdir = pathlib.Path(workdir).absolute()
        if not SAFE_PATH.match(str(self.workdir)):
            raise ValueError(f"workdir must be a plain path: {str(self.workdir)!r}")
        if proxy not in PROXIES:
            raise ValueError(f"proxy must be one of {', '.join(PROXIES)}, not {proxy!r}")
        self.ssh_dir = self.workdir / "ssh"
        self._use_proxy(proxy)
        self.key_file = self.ssh_dir / "id_ed25519"
        self.known_hosts = self.ssh_dir / "known_hosts"
        self.state_file = self.workdir / "state.json"
        self._state: dict = {}

    @classmethod
    def load(cls, workdir: pathlib.Path) -> "LocalHost":
        """Rebuild a host from its state.json, e.g. to stop it from another process."""
        state = cls(workdir)._read_state()
        host = cls(workdir, proxy=state.get("proxy", "nginx"))
        host._state = state
        return host

    def _use_proxy(self, name: str) -> None:
        """Set the proxy this host runs, with its directories."""
        self.proxy = PROXIES[name](self.workdir / name)
        self.nginx_dir = self.proxy.dir  # the proxy's prefix, whichever it is (an older name)
        self.site_dir = self.proxy.site_dir

    @property
    def proxy_pid_key(self) -> str:
        """state.json's key for the proxy's master PID: nginx_pid or apache_pid."""
        return f"{self.proxy.name}_pid"

    def start(self) -> "LocalHost":
        """Start sshd and the proxy; on failure undo whatever was done, then re-raise."""
        if self._state.get("running"):
            return self
        if self._read_state().get("running"):
            raise RuntimeError(f"{self.workdir} holds a running host: LocalHost.load() it, or stop it")
        try:
            _ensure_packages([SSHD, self.proxy.program])
            _make_dirs(self.workdir)
            self._state = {"running": True, "started_at": time.time(), "proxy": self.proxy.name}
            self._create_user()
            self._state["ssh_port"], self._state["http_port"] = _free_ports(2)
            self._write_ssh_files()
            self._start_sshd()
            self._write_proxy_files()
            self._start_proxy()
            self._wait_for_ssh()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Kill everything the host started, by PID, and delete the user it created."""
        self._state = self._state or self._read_state()
        if not self._state:
            return
        # What state.json says ran wins: LocalHost(dir).stop() is a safety net for any host.
        self._use_proxy(self._state.get("proxy", self.proxy.name))
        self._stop_daemon(_read_pid(self.proxy.pid_file) or self._state.get(self.proxy_pid_key))
        self._stop_daemon(self._state.get("sshd_pid"))
        if self._state.get("created_user"):
            self._remove_user()
        else:
            self._kill_deployed_pidfiles()
        self._state["running"] = False  # PIDs stay, for the record; a second stop re-checks them
        self._save()

    def __enter__(self) -> "LocalHost":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def settings(self, app: str) -> dict:
        """fabdeploy settings (the `fabdeploy:` key of fabric.yaml) that make a deploy work on this host."""
        return {"deploy_to": f"~/srv/{app}",
                "known_hosts": str(self.known_hosts),
                "server": {"manager": "pidfile"},
                **self.proxy.settings(self.http_port, app)}

    def fabric_yaml(self, app: str) -> dict:
        """A whole fabric.yaml that deploys `app` to this host."""
        return {"connect_kwargs": {"key_filename": str(self.key_file)}, "fabdeploy": self.settings(app)}

    def run_as_user(self, command: str, check=True) -> subprocess.CompletedProcess:
        """Run a shell command on the host as `user`, text output captured."""
        return subprocess.run(self._as_user(["sh", "-c", command]), env=self._user_env(), cwd=self.home,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, check=check)

    def ssh_argv(self, command: str, known_hosts: pathlib.Path | None = None) -> list[str]:
        """An ssh command line that runs `command` as `user`, host key checked strictly."""
        return ["ssh", "-F", "/dev/null", "-i", str(self.key_file), "-o", "IdentitiesOnly=yes",
                "-o", f"UserKnownHostsFile={known_hosts or self.known_hosts}",
                "-o", "GlobalKnownHostsFile=/dev/null", "-o", "StrictHostKeyChecking=yes",
                "-o", "BatchMode=yes", "-o", "ConnectTimeout=5",
                "-p", str(self.ssh_port), f"{self.user}@{self.host}", command]

    # -- start steps

    def _create_user(self) -> None:
        """As root add a fresh fdt-<hex> user; otherwise adopt the current user."""
        if os.geteuid() == 0:
            name = f"fdt-{secrets.token_hex(3)}"
            self._state.update(user=name, created_user=True)
            self._save()  # record the name first, so that a failed start still deletes it
            # "*", not useradd's locked "!": sshd with UsePAM no refuses locked accounts.
            _run(["useradd", "-m", "-s", "/bin/bash", "-p", "*", name])
            entry = pwd.getpwnam(name)
        else:
            entry = pwd.getpwuid(os.getuid())
            self._state.update(user=entry.pw_name, created_user=False)
        self._state.update(uid=entry.pw_uid, gid=entry.pw_gid, home=entry.pw_dir)
        self._save()

    def _write_ssh_files(self) -> None:
        """Host key, client key, known_hosts, authorized_keys and sshd_config."""
        shutil.rmtree(self.ssh_dir, ignore_errors=True)
        self.ssh_dir.mkdir(mode=0o700)
        host_key = self.ssh_dir / "ssh_host_ed25519_key"
        for key in (host_key, self.key_file):
            _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "fdt", "-f", str(key)])
        key_type, key_b64 = host_key.with_suffix(".pub").read_text().split()[:2]
        self.known_hosts.write_text(f"[{self.host}]:{self.ssh_port} {key_type} {key_b64}\n")
        as_root = self._state["created_user"]
        # As root StrictModes can stay on: the key goes into ~user/.ssh, owned by the user.
        # Non-root it lives in the workdir, and StrictModes rejects world-writable /tmp.
        keys = self.home / ".ssh/authorized_keys" if as_root else self.ssh_dir / "authorized_keys"
        self._install_for_user(keys, self.key_file.with_suffix(".pub").read_text())
        (self.ssh_dir / "sshd_config").write_text(f"""\
ListenAddress {self.host}
Port {self.ssh_port}
HostKey {host_key}
PidFile {self.ssh_dir}/sshd.pid
AuthorizedKeysFile {keys}
StrictModes {"yes" if as_root else "no"}
AllowUsers {self.user}
AuthenticationMethods publickey
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
PermitRootLogin no
X11Forwarding no
PrintMotd no
Subsystem sftp internal-sftp
""")

    def _install_for_user(self, path: pathlib.Path, text: str) -> None:
        """Write a 0600 file (in a 0700 directory) owned by the deploy user."""
        path.parent.mkdir(mode=0o700, exist_ok=True)
        path.write_text(text)
        path.chmod(0o600)
        for p in (path.parent, path):
            os.chown(p, self._state["uid"], self._state["gid"])

    def _start_sshd(self) -> None:
        """Start sshd in its own session, logging to a file, so it can outlive this process."""
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation dir
        with open(self.ssh_dir / "sshd.log", "ab") as log:
            proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.ssh_dir / "sshd_config")],
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    start_new_session=True)
        self._state["sshd_pid"] = proc.pid
        self._save()

    def _write_proxy_files(self) -> None:
        """The proxy's prefix, owned by the user: its config, a tmp dir and the site dir."""
        shutil.rmtree(self.proxy.dir, ignore_errors=True)
        d = self.proxy.dir
        for sub in (d, d / "tmp", self.site_dir):
            sub.mkdir(mode=0o755)
        self.proxy.conf.write_text(self.proxy.config(self.http_port))
        for path in (d, d / "tmp", self.site_dir, self.proxy.conf):
            os.chown(path, self._state["uid"], self._state["gid"])
        if self.run_as_user(f"test -w {shlex.quote(str(self.site_dir))}", check=False).returncode:
            raise RuntimeError(f"{self.user} cannot reach {self.site_dir}: use a workdir whose "
                               "parents others can traverse, e.g. a 0755 directory under /tmp")

    def _start_proxy(self) -> None:
        """Start the proxy as the user (it daemonises) and record its master PID from its pid file."""
        d = self.proxy.dir
        with open(d / "start.log", "wb") as log:  # a file, not a pipe: no hang
            code = subprocess.run(self._as_user(self.proxy.start_argv()), env=self._user_env(),
                                  cwd=self.home, stdin=subprocess.DEVNULL, stdout=log,
                                  stderr=log).returncode
        deadline = time.monotonic() + 5
        while code == 0 and not _read_pid(self.proxy.pid_file) and time.monotonic() < deadline:
            time.sleep(0.02)  # the daemonised master writes its pid file just after the fork
        self._state[self.proxy_pid_key] = _read_pid(self.proxy.pid_file)
        self._save()
        if not self._state[self.proxy_pid_key]:
            raise RuntimeError(f"{self.proxy.name} did not start:\n" + _tail(d / "start.log")
                               + _tail(d / "error.log"))

    def _wait_for_ssh(self, timeout: float = 15) -> None:
        """Return once a real, strictly host-key-checked ssh login works; else raise with sshd's log."""
        deadline, error = time.monotonic() + timeout, ""
        while time.monotonic() < deadline and _alive(self._state["sshd_pid"]):
            try:
                socket.create_connection((self.host, self.ssh_port), timeout=1).close()
            except OSError:
                time.sleep(0.05)
                continue
            result = subprocess.run(self.ssh_argv("true"), stdin=subprocess.DEVNULL,
                                    capture_output=True, text=True, timeout=10)
            if result.returncode == 0:
                return
            error = result.stderr
            time.sleep(0.2)
        raise RuntimeError(f"ssh login failed: {error}\nsshd log:\n{_tail(self.ssh_dir / 'sshd.log')}")

    # -- stop steps

    def _stop_daemon(self, pid: int | None) -> None:
        """Kill a daemon and its children, if that PID still runs something of this workdir."""
        if pid and _alive(pid) and str(self.workdir).encode() in _read(f"/proc/{pid}/cmdline"):
            _terminate([pid, *_descendants(pid)])

    def _remove_user(self) -> None:
        """Kill every process of the created user (deployed gunicorns too), then userdel -r."""
        name, uid = self._state["user"], self._state.get("uid")
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            return  # already gone: stop() was called before
        if uid is not None and entry.pw_uid != uid:
            return  # someone else's account by now
        for _ in range(3):  # again, in case a dying process forked
            _terminate([pid for pid, (_, owner) in _processes().items() if owner == entry.pw_uid])
        result = subprocess.run(["userdel", "-r", name], capture_output=True, text=True)
        if result.returncode not in (0, 12):  # 12: home not fully removed
            raise RuntimeError(f"userdel -r {name} failed: {result.stderr}")

    def _kill_deployed_pidfiles(self) -> None:
        """Non-root: kill PIDs in *.pid files under ~/srv written since start()."""
        since, srv = self._state.get("started_at", time.time()), self.home and self.home / "srv"
        if not srv or not srv.is_dir():
            return
        pids = [_read_pid(f) for f in srv.rglob("*.pid") if f.stat().st_mtime >= since]
        # Only processes started since then: the PID may have been recycled.
        _terminate([p for p in pids if p and _alive(p) and _start_time(p) >= since - 1])

    # -- small helpers

    def _as_user(self, argv: list[str]) -> list[str]:
        return [RUNUSER, "-u", self.user, "--", *argv] if self._state.get("created_user") else argv

    def _user_env(self) -> dict:
        """About what an SSH session gets: root's PATH and HOME must not leak in."""
        return {"PATH": USER_PATH, "HOME": str(self.home), "USER": self.user,
                "LOGNAME": self.user, "SHELL": "/bin/sh", "LANG": "C.UTF-8"}

    def _read_state(self) -> dict:
        return json.loads(self.state_file.read_text()) if self.state_file.exists() else {}

    def _save(self) -> None:
        """Write state.json atomically, adding the derived values a demo script wants."""
        if not self.workdir.is_dir():
            return
        derived = {"workdir": str(self.workdir), "key_file": str(self.key_file),
                   "known_hosts": str(self.known_hosts), "site_dir": str(self.site_dir),
                   "host_string": self.host_string, "url": self.url}
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({**self._state, **derived}, indent=2) + "\n")
        tmp.replace(self.state_file)


def _ensure_packages(programs: list[str]) -> None:
    """apt-get install the packages of the programs that are missing (root only)."""
    missing = [PACKAGES[path] for path in programs if not os.path.exists(path)]
    if missing and os.geteuid() != 0:
        raise RuntimeError(f"missing packages, run: apt-get install {' '.join(missing)}")
    if missing:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        _run(["apt-get", "update"], env=env)
        _run(["apt-get", "install", "-y", "--no-install-recommends", *missing], env=env)


def _make_dirs(path: pathlib.Path) -> None:
    """mkdir -p that makes (only) the directories it creates 0755."""
    created = []
    while not path.exists():
        created.append(path)
        path = path.parent
    for d in reversed(created):
        d.mkdir()
        d.chmod(0o755)  # explicit: the umask may be stricter


def _port_range() -> range:
    """Ports below Linux's ephemeral range (or above it): no outgoing connection takes one.

    A port picked for a host's nginx is not listened on until its first
    deploy; inside the ephemeral range, a client socket (or another host's
    pick) could take it meanwhile, and nginx's bind would then fail.
    """
    try:
        low, high = map(int, pathlib.Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return range(10000, low) if low - 10000 >= 4096 else range(high + 1, 65536)


_GIVEN: set[int] = set()  # every port this process handed out: never twice


def _free_ports(count: int, consecutive: bool = False) -> list[int]:
    """Distinct free ports (`consecutive`: count ports in a row), never handed out before here.

    Each is checked by binding it on all addresses, as nginx's `listen` will.
    """
    ports = _port_range()
    while True:
        start = random.choice(ports)
        picked = [start + i for i in range(count)] if consecutive else \
            [start] + random.sample(ports, count - 1)
        if len(set(picked)) < count or any(p in _GIVEN or p not in ports for p in picked):
            continue
        if all(map(_bindable, picked)):
            _GIVEN.update(picked)
            return picked


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A port nobody listens on, outside the ephemeral range, not handed out before."""
    return _free_ports(1)[0]


def free_port_pair() -> int:
    """A free port whose next one is free too (gunicorn.bind uses both)."""
    return _free_ports(2, consecutive=True)[0]


def _run(argv: list[str], **kw) -> None:
    result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, **kw)
    if result.returncode:
        raise RuntimeError(f"{shlex.join(argv)} failed ({result.returncode}): {result.stderr}")


def _read(path: str | pathlib.Path) -> bytes:
    try:
        return pathlib.Path(path).read_bytes()
    except OSError:
        return b""


def _read_pid(path: pathlib.Path) -> int | None:
    text = _read(path).strip()
    return int(text) if text.isdigit() else None


def _tail(path: pathlib.Path) -> str:
    return _read(path)[-4000:].decode(errors="replace")


def _stat(pid: int) -> list[str]:
    """/proc/<pid>/stat fields after the command name: [0] state, [1] ppid, [19] start time."""
    return _read(f"/proc/{pid}/stat").decode().rpartition(")")[2].split()


def _alive(pid: int) -> bool:
    """True if pid runs and is not a zombie; reaps it first when it is our child."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    fields = _stat(pid)
    return bool(fields) and fields[0] != "Z"


def _start_time(pid: int) -> float:
    """When pid started, as a Unix timestamp."""
    boot = int(re.search(rb"^btime (\d+)", _read("/proc/stat"), re.M).group(1))
    return boot + int(_stat(pid)[19]) / os.sysconf("SC_CLK_TCK")


def _processes() -> dict[int, tuple[int, int]]:
    """Live processes as {pid: (ppid, real uid)}, from /proc/<pid>/status."""
    found = {}
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        status = _read(f"/proc/{pid}/status").decode()
        ppid, uid = re.search(r"^PPid:\s+(\d+)", status, re.M), re.search(r"^Uid:\s+(\d+)", status, re.M)
        if ppid and uid and "\nState:\tZ" not in status:
            found[pid] = (int(ppid.group(1)), int(uid.group(1)))
    return found


def _descendants(pid: int) -> list[int]:
    procs, found, todo = _processes(), [], [pid]
    while todo:
        parent = todo.pop()
        kids = [p for p, (ppid, _) in procs.items() if ppid == parent]
        found += kids
        todo += kids
    return found


def _terminate(pids: list[int], grace: float = 5) -> None:
    """SIGTERM, wait up to `grace` seconds, then SIGKILL whatever is left."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2)):
        pids = [p for p in pids if _alive(p)]
        for pid in pids:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + wait
        while any(map(_alive, pids)) and time.monotonic() < deadline:
            time.sleep(0.05)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m harness.local_host",
                                     description="Start or stop a throwaway loopback host.")
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("dir", type=pathlib.Path)
    parser.add_argument("--proxy", choices=list(PROXIES), default="nginx", help="with start")
    args = parser.parse_args(argv)
    if args.action == "start":
        print(LocalHost(args.dir, proxy=args.proxy).start().state_file.read_text(), end="")
    else:
        LocalHost.load(args.dir).stop()


if __name__ == "__main__":
    main()
