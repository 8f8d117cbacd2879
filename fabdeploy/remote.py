"""The thin layer that does things: run commands and write files on a host.

In a dry run it prints what it would do instead, but still runs queries
(commands that only read), so the plan reflects the host as it is.
"""
from __future__ import annotations

import contextlib
import io
import os
import posixpath
import secrets
import select
import socket
import sys
from dataclasses import dataclass
from shlex import quote

import paramiko
from paramiko.ssh_exception import NoValidConnectionsError

from .errors import DeployError, tail


FULL_KIB = 4096  # under 4 MiB free after a failure: the disk is why


def disk_full(output: str) -> bool:
    return "No space left on device" in output or "Errno 28" in output or "os error 28" in output


def failure(what: str, how: str, output: str, full: bool = False) -> str:
    """The one line for a failed step; a full disk is common and named as such."""
    if full or disk_full(output):
        return f"{what} failed: the server's disk is full (the old release keeps serving)"
    return f"{what} failed ({how})"


@dataclass
class Ran:
    """What a remote command did: its output and exit status (-1: no status came)."""

    stdout: str
    stderr: str
    exited: int

    @property
    def ok(self) -> bool:
        return self.exited == 0

    @property
    def failed(self) -> bool:
        return not self.ok


def readable(command: str) -> str:
    """A command as a person should read it: the packed agent shown by name."""
    from .plan import AGENT  # late: plan imports nothing from here, keep it that way
    return command.replace(quote(AGENT), "<fabdeploy-agent>")


class PromptAcks(socket.socket):
    """A TCP socket that acknowledges what it receives at once.

    sshd sends small packets with Nagle's algorithm on: after login, its
    answer to our first channel waits until we ACK the packet before it,
    and Linux delays that ACK by 40 ms when we have nothing to send. Asking
    for a quick ACK after each read sends it now (measured: the first
    command 45 ms sooner).
    """

    def recv(self, size, *flags):
        data = super().recv(size, *flags)
        with contextlib.suppress(OSError, AttributeError):  # TCP_QUICKACK is Linux's
            self.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        return data


def no_delay(sock) -> None:
    if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Host:
    """One server, reached through a Fabric Connection."""

    def __init__(self, conn, known_hosts: str, dry_run: bool = False, out=None):
        self.conn = conn
        self.known_hosts = known_hosts
        self.dry_run = dry_run
        self.out = out or sys.stdout
        port = f":{conn.port}" if conn.port and conn.port != 22 else ""
        self.name = f"{conn.user}@{conn.host}{port}"
        self.root: str | None = None  # deploy_to, once known: where to look for free space
        self._sftp = None

    # -- connecting ---------------------------------------------------------

    def connect(self) -> None:
        """Open the connection, refusing any host key known_hosts does not vouch for.

        A gateway (ProxyJump, or Fabric's `gateway`) is held to the same rule.
        """
        path = self._known_hosts_path()
        hop = self.conn
        while hop is not None and hasattr(hop, "client"):
            if os.path.exists(path):
                hop.client.load_host_keys(path)
            hop.client.set_missing_host_key_policy(paramiko.RejectPolicy())
            hop = hop.gateway if not isinstance(hop.gateway, str) else None
        if self.conn.connect_timeout is None:
            self.conn.connect_timeout = 15
        try:
            self._open()
        except paramiko.BadHostKeyException as exc:
            raise DeployError(
                f"host key changed: the server offered a {exc.key.get_name()} key that does not "
                f"match the one in {path}", self.name,
                hint="if the server was really reinstalled, remove the old entry with "
                     "ssh-keygen -R, verify the new key and add it") from None
        except paramiko.AuthenticationException:
            raise DeployError(f"authentication failed for user {self.conn.user}", self.name,
                              hint="check the SSH key (-i, or connect_kwargs.key_filename) "
                                   "and the user") from None
        except paramiko.SSHException as exc:
            if "known_hosts" in str(exc):
                # paramiko names the server it refused: this host, or a jump host on the way.
                server = str(exc).split("'")[1] if str(exc).count("'") >= 2 else "the server"
                raise DeployError(f"unknown host key: {server} is not in {path}", self.name,
                                  hint="verify its key and add it, e.g. ssh-keyscan after "
                                       "checking the fingerprint") from None
            raise DeployError(f"SSH failed: {exc}", self.name) from None
        except (NoValidConnectionsError, socket.gaierror, socket.timeout, OSError) as exc:
            raise DeployError(f"cannot connect: {exc}", self.name,
                              hint="check the host name, port and firewall") from None

    def _open(self) -> None:
        """Open the connection over a socket with Nagle's algorithm off.

        SSH sends many small packets, and with Nagle on, each command waits
        for the server's delayed ACK: 40 ms a round trip, measured on
        loopback, against 2 ms without. Through a gateway paramiko makes the
        socket, and it is set once connected. See PromptAcks for the ACKs.
        """
        kwargs = self.conn.connect_kwargs
        if self.conn.gateway or "sock" in kwargs:
            self.conn.open()
        else:
            timeout = self.conn.connect_timeout
            plain = socket.create_connection((self.conn.host, self.conn.port), timeout)
            sock = PromptAcks(plain.family, plain.type, plain.proto, fileno=plain.detach())
            sock.settimeout(timeout)
            no_delay(sock)
            self.conn.connect_kwargs = {**kwargs, "sock": sock}
            try:
                self.conn.open()
            except BaseException:
                sock.close()
                raise
            finally:
                self.conn.connect_kwargs = kwargs  # a reconnect makes a new socket
        no_delay(self.conn.transport.sock)

    def _known_hosts_path(self) -> str:
        configured = self.conn.ssh_config.get("userknownhostsfile")
        path = configured.split()[0] if configured else self.known_hosts
        return os.path.expanduser(path)

    def close(self) -> None:
        if self._sftp is not None:
            self._sftp.close()
        self.conn.close()

    # -- doing --------------------------------------------------------------

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def run(self, command: str, *, what: str = "command", query: bool = False,
            warn: bool = False, hint: str | None = None):
        """Run a command. Failures raise with the command's output, unless warn."""
        if self.dry_run and not query:
            self.say(f"[{self.name}] would run: {readable(command)}")
            return None
        if self.conn.config.run.echo:
            self.say(f"[{self.name}] {readable(command)}")
        try:
            result = self.execute(command)
        except (paramiko.SSHException, EOFError, OSError) as exc:
            raise DeployError(f"lost the connection while {what}: {exc or type(exc).__name__}",
                              self.name, hint="check the network, then deploy again") from None
        if result.exited == -1 and not self.conn.is_connected:
            # paramiko's exit status when the channel closed with the connection.
            raise DeployError(f"lost the connection while {what}", self.name,
                              hint="check the network, then deploy again")
        if result.failed and not warn:
            output = (result.stderr.strip() or result.stdout.strip())
            full = disk_full(output) or self.nearly_full()
            raise DeployError(failure(what, f"exit {result.exited}", output, full), self.name,
                              hint=None if full else hint,
                              detail=None if full else tail(output) or None)
        return result

    def execute(self, command: str) -> Ran:
        """Run a command on its own channel, no pty, no stdin, output captured.

        Fabric's runner polls its reader threads every 10 ms; a deploy runs
        a dozen commands, so this waits on the channel itself instead.
        """
        channel = self.conn.transport.open_session()
        try:
            channel.exec_command(command)
            channel.shutdown_write()
            out, err = [], []
            ready = select.poll()  # not select(): a fleet's descriptors may pass 1024
            ready.register(channel, select.POLLIN)
            while True:
                ready.poll(1000)  # wakes on output, EOF or close
                while channel.recv_ready():
                    out.append(channel.recv(1 << 16))
                while channel.recv_stderr_ready():
                    err.append(channel.recv_stderr(1 << 16))
                if (channel.eof_received or channel.closed) and not (
                        channel.recv_ready() or channel.recv_stderr_ready()):
                    break
            exited = channel.recv_exit_status()
        finally:
            channel.close()
        return Ran(b"".join(out).decode(errors="replace"), b"".join(err).decode(errors="replace"),
                   exited)

    def nearly_full(self) -> bool:
        """After a failure: has deploy_to's filesystem (almost) no space left?

        Tools do not always say so: python -m venv hides ensurepip's error,
        and sftp-server answers ENOSPC with a bare 'Failure'.
        """
        if not self.root or not self.conn.is_connected:
            return False
        try:
            df = self.execute(f"df -Pk {quote(self.root)}")
        except (paramiko.SSHException, EOFError, OSError):
            return False
        fields = df.stdout.splitlines()[-1].split() if df.ok and df.stdout.strip() else []
        return len(fields) > 3 and fields[3].isdigit() and int(fields[3]) < FULL_KIB

    def reconnect(self) -> None:
        """A fresh connection after the old one died, e.g. to release the lock."""
        self.close()
        self._sftp = None
        self.connect()

    def sftp(self):
        if self._sftp is None:
            self._sftp = self.conn.sftp()
        return self._sftp

    def mkdir(self, remote: str) -> None:
        """One directory, over SFTP: cheaper than a command."""
        if self.dry_run:
            self.say(f"[{self.name}] would create directory {remote}")
            return
        with self.transfer(f"creating {remote}"):
            self.sftp().mkdir(remote)

    def put(self, local: str, remote: str, atomic: bool = False) -> None:
        """Upload a file; atomic: under a temporary name, then renamed into place."""
        if self.dry_run:
            self.say(f"[{self.name}] would upload: {local} -> {remote}")
            return
        with self.transfer(f"uploading to {remote}"):
            target = remote
            if atomic:
                target = posixpath.join(posixpath.dirname(remote), f".{posixpath.basename(remote)}.part")
            self.sftp().put(local, target, callback=self._progress(posixpath.basename(remote)))
            if atomic:
                self.sftp().posix_rename(target, remote)

    def _progress(self, name: str):
        """A progress bar on a terminal, for uploads big enough to wait for."""
        stream = sys.stderr
        if not stream.isatty():
            return None

        def show(done: int, total: int) -> None:
            if total < 1 << 20:
                return
            width = 30
            filled = width * done // total
            end = "\n" if done >= total else ""
            stream.write(f"\r[{self.name}] {name} [{'#' * filled}{'.' * (width - filled)}]"
                         f" {done >> 20}/{total >> 20} MiB{end}")
            stream.flush()
        return show

    @contextlib.contextmanager
    def transfer(self, what: str):
        """SFTP failures as one clear line, naming a full disk as such."""
        try:
            yield
        except (paramiko.SSHException, EOFError, OSError) as exc:
            full = disk_full(str(exc)) or self.nearly_full()
            raise DeployError(failure(what, str(exc) or type(exc).__name__, str(exc), full),
                              self.name) from None

    def write(self, remote: str, text: str, mode: int = 0o644) -> None:
        """Write a file atomically: a temporary name, then a rename."""
        if self.dry_run:
            self.say(f"[{self.name}] would write {remote} (mode {mode:o}):")
            self.say("".join(f"    {line}\n" for line in text.splitlines()).rstrip("\n"))
            return
        self._write_then_rename(remote, text, mode)

    def write_secret(self, remote: str, text: str) -> None:
        """Like write, but 0600 from the instant the file exists, and never shown.

        SFTP's open creates files 0644 (paramiko sends no mode), and a chmod
        a round trip later does not take back a descriptor opened in between.
        So a shell creates the file empty under umask 077 (noclobber: never
        an existing one), and SFTP only fills it.
        """
        if self.dry_run:
            self.say(f"[{self.name}] would write {remote} (mode 600, secret: not shown)")
            return
        tmp = self._temporary(remote)
        self.run(f"umask 077 && set -C && : > {quote(tmp)}", what=f"creating {tmp}")
        self._fill_then_rename(tmp, remote, text, "w")

    def _temporary(self, remote: str) -> str:
        return posixpath.join(posixpath.dirname(remote), f".{posixpath.basename(remote)}.{secrets.token_hex(4)}")

    def _write_then_rename(self, remote: str, text: str, mode: int) -> None:
        tmp = self._temporary(remote)
        self._fill_then_rename(tmp, remote, text, "wx", mode)

    def _fill_then_rename(self, tmp: str, remote: str, text: str, how: str, mode: int | None = None):
        with self.transfer(f"writing {remote}"):
            sftp = self.sftp()
            with sftp.open(tmp, how) as f:
                if mode is not None:
                    sftp.chmod(tmp, mode)
                f.write(text.encode())
            sftp.posix_rename(tmp, remote)

    def read(self, remote: str) -> str | None:
        """A small remote file's text, or None if it does not exist."""
        buf = io.BytesIO()
        try:
            self.sftp().getfo(remote, buf)
        except FileNotFoundError:
            return None
        return buf.getvalue().decode()
