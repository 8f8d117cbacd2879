"""The thin layer that does things: a host's connection, and its agent.

`Host.execute` sends phases of operations to the host's agent, or, in a
dry run, prints what they would do and carries out only the ones that
read, so that the plan follows the host as it is.
"""
from __future__ import annotations

import contextlib
import os
import socket
import sys

import paramiko
from paramiko.ssh_exception import NoValidConnectionsError

from .errors import DeployError
from .ops import Facts, Lock, Phase
from .session import ChannelLost, Reply, Session


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

    def __init__(self, conn, known_hosts: str, python: str = "python3", dry_run: bool = False,
                 out=None):
        self.conn = conn
        self.known_hosts = known_hosts
        self.python = python
        self.dry_run = dry_run
        self.out = out or sys.stdout
        port = f":{conn.port}" if conn.port and conn.port != 22 else ""
        self.name = f"{conn.user}@{conn.host}{port}"
        self.root: str | None = None  # deploy_to, once known: where a full disk is looked for
        self.session: Session | None = None

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
        if self.session is not None:
            self.session.close()
            self.session = None
        self.conn.close()

    # -- doing ----------------------------------------------------------------

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def execute(self, phases: list[Phase], *, on_phase=None, on_output=None,
                interruptible: bool = True, sudo: bool = False) -> Reply:
        """Run phases of ops on the host's agent (started by the first call), in one request.

        A dry run carries out only the ops that read, and shows what the
        others would do; --echo shows what they did. Either way each phase's
        ops come just before its line, once the agent has answered (so they
        are told from the host's facts), with ~ as the host's home.
        """
        if not (self.dry_run or self.echo):
            return self._request(phases, on_phase, on_output, interruptible, sudo)
        ended: list = []
        sent = [Phase(p.name, tuple(dry(op) for op in p.ops if dry(op) is not None), p.interruptible)
                for p in phases] if self.dry_run else phases
        reply = self._request(sent, lambda name, s: ended.append((name, s)), on_output, interruptible, sudo)
        home = (reply.results.get("facts") or {}).get("home")
        shown = {p.name: p.ops for p in phases}
        for name, seconds in ended:
            for op in shown.get(name, ()):
                if op.reads_only:
                    continue
                for line in op.describe(reply.results):
                    line = line if self.dry_run else line.removeprefix("would ")
                    self.say(f"[{self.name}] {line.replace(' ~/', f' {home}/') if home else line}")
            if on_phase:
                on_phase(name, seconds)
        return reply

    def _request(self, phases, on_phase, on_output, interruptible, sudo) -> Reply:
        options = dict(on_phase=on_phase, on_output=on_output, interruptible=interruptible,
                       root=self.root, progress=self._progress())
        try:
            if self.session is None:
                self.session = Session(self.conn.transport, self.python, sudo=sudo, read_only=self.dry_run)
                return self.session.start(phases, **options)
            return self.session.call(phases, **options)
        except ChannelLost as exc:
            self.session = None
            raise DeployError(f"lost the connection while {phases[-1].name if phases else 'talking'}"
                              f" ({exc})", self.name, hint="check the network, then deploy again") from None

    def _progress(self):
        """A progress bar on a terminal, for uploads big enough to wait for."""
        stream = sys.stderr
        if not stream.isatty():
            return None

        def show(name: str, done: int, total: int) -> None:
            if total < 1 << 20:
                return
            width = 30
            filled = width * done // total
            end = "\n" if done >= total else ""
            stream.write(f"\r[{self.name}] {name} [{'#' * filled}{'.' * (width - filled)}]"
                         f" {done >> 20}/{total >> 20} MiB{end}")
            stream.flush()
        return show

    def cancel(self) -> None:
        if self.session is not None:
            self.session.cancel()

    def stream(self, command: str, pty: bool = False, stdin: bool = False) -> int:
        """A command whose output goes straight to ours (with a pty: Ctrl-C reaches it; with
        stdin, what we type reaches it too)."""
        if self.conn.config.run.echo:
            self.say(f"[{self.name}] {command}")
        result = self.conn.run(command, in_stream=None if stdin else False, warn=True, pty=pty, hide=False)
        return result.exited

    def reconnect(self) -> None:
        """A fresh connection after the old one died, e.g. to release the lock."""
        self.close()
        self.connect()

    @property
    def echo(self) -> bool:
        return bool(self.conn.config.run.echo)


def dry(op):
    """What a dry run carries out of an op: reads only (taking the lock is only looked at)."""
    if isinstance(op, Lock):
        return Facts(**{k: getattr(op, k) for k in Facts.__dataclass_fields__})
    return op if op.reads_only else None
