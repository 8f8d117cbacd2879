"""The client's side of a host's agent: one SSH channel, one process, JSON lines.

`Session.start` opens a channel and runs a small bootstrap with the
server's Python. The bootstrap runs the agent from a copy cached on the
server by hash; only when there is none does it ask for the source, which
then travels over the channel (compressed), never on a command line. The
first request goes out with the exec itself, so it costs no round trip of
its own: connecting and reading the host's facts take about one round
trip beyond SSH's handshake.
"""
from __future__ import annotations

import json
import threading
import zlib
from dataclasses import dataclass, field
from shlex import quote
from typing import Callable

import paramiko

from . import onhost

SOURCE = onhost.program("agent")
DIGEST = onhost.digest("agent")

# Run by `python3 -S -c`: the agent from its cached copy, else from the channel.
# The first request is already on its way: it is kept for the agent in either case.
BOOTSTRAP = r"""import os,sys,hashlib,zlib
h=sys.argv[1];b=b""
p=os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),"fabdeploy","agent-"+h+".py")
def more():
 global b
 d=os.read(0,65536)
 if not d:sys.exit(3)
 b+=d
try:
 s=open(p,"rb").read()
 if hashlib.sha256(s).hexdigest()[:16]!=h:raise OSError
except OSError:
 os.write(1,b'{"need": "agent"}\n')
 while b.count(b"\n")<2:more()
 r,n,b=b.split(b"\n",2);n=int(n)
 while len(b)<n:more()
 s=zlib.decompress(b[:n]);b=r+b"\n"+b[n:]
 try:
  if sys.argv[2:]:raise OSError  # a dry run: nothing written, not even this cache
  os.makedirs(os.path.dirname(p),0o700,exist_ok=True);t="%s.%d"%(p,os.getpid())
  with open(t,"wb") as f:f.write(s)
  os.replace(t,p)
 except OSError:
  p="<fabdeploy-agent>"
g={"__name__":"fabdeploy_agent"}
exec(compile(s,p,"exec"),g)
sys.exit(g["serve"](b,p))"""


class ChannelLost(Exception):
    """The channel (or the whole connection) closed before the agent answered."""


@dataclass
class Reply:
    """What the agent answered to one request."""

    ok: bool
    results: dict = field(default_factory=dict)
    phase: str | None = None
    index: int = -1
    error: dict = field(default_factory=dict)
    stopped: bool = False

    @classmethod
    def parse(cls, message: dict) -> "Reply":
        return cls(ok=message["ok"], results=message.get("results") or {}, phase=message.get("phase"),
                   index=message.get("index", -1), error=message.get("error") or {},
                   stopped=bool(message.get("stopped")))


def command(python: str, sudo: bool = False, read_only: bool = False) -> str:
    """The command line that starts the agent: small, and the same on every call."""
    prefix = "sudo -n " if sudo else ""
    return f"{prefix}{quote(python)} -S -c {quote(BOOTSTRAP)} {DIGEST}{' ro' if read_only else ''}"


def exec_pipelined(channel, line: str, first: bytes) -> None:
    """Channel.exec_command, but with `first` sent before the server's answer to the exec.

    paramiko waits for that answer (a round trip) before anything can be
    sent; sshd keeps bytes that arrive meanwhile for the command's stdin,
    as OpenSSH's own client relies on. Same messages, in the same order.
    """
    message = paramiko.Message()
    message.add_byte(paramiko.common.cMSG_CHANNEL_REQUEST)
    message.add_int(channel.remote_chanid)
    message.add_string("exec")
    message.add_boolean(True)
    message.add_string(line)
    channel._event_pending()
    channel.transport._send_user_message(message)
    channel.sendall(first)
    channel._wait_for_event()


class Session:
    """One agent on one host, for the length of one connection."""

    def __init__(self, transport, python: str, sudo: bool = False, read_only: bool = False):
        self.transport = transport
        self.python = python
        self.sudo = sudo
        self.read_only = read_only
        self.channel = None
        self._buffer = b""
        self._ids = 0
        self._send_lock = threading.Lock()

    # -- requests ---------------------------------------------------------------

    def start(self, phases: list, **options) -> Reply:
        """Start the agent with the first request on the way; its reply."""
        request, _ = self._encode(phases, options)
        try:
            if self.transport is None or not self.transport.is_active():
                raise ChannelLost("the connection is closed")
            self.channel = self.transport.open_session()
            exec_pipelined(self.channel, command(self.python, self.sudo, self.read_only), request)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise ChannelLost(str(exc) or type(exc).__name__) from None
        first = self._message()
        if first.get("need") == "agent":
            packed = zlib.compress(SOURCE, 9)
            self._send(f"{len(packed)}\n".encode() + packed)
            first = self._message()
        if not first.get("ready"):
            raise ChannelLost(f"the agent did not start: {first}")
        return self._reply(self._ids, options.get("on_phase"), options.get("on_output"))

    def call(self, phases: list, **options) -> Reply:
        """One request, and its reply; phases are reported as they finish."""
        request, uploads = self._encode(phases, options)
        self._send(request)
        progress = options.get("progress")
        for path in uploads:
            total, done = path.stat().st_size, 0
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 16), b""):
                    self._send(block)
                    done += len(block)
                    if progress:
                        progress(path.name, done, total)
        return self._reply(self._ids, options.get("on_phase"), options.get("on_output"))

    def cancel(self) -> None:
        """Ask the agent to stop the running request at its next phase (or command)."""
        if self.channel is not None and not self.channel.closed:
            try:
                self._send(b'{"control": "cancel"}\n')
            except (ChannelLost, OSError, EOFError, paramiko.SSHException):
                pass

    def close(self) -> None:
        if self.channel is not None:
            try:
                self.channel.shutdown_write()  # the agent sees the end and exits
            except (OSError, EOFError, paramiko.SSHException):
                pass
            self.channel.close()
            self.channel = None

    # -- the wire ---------------------------------------------------------------

    def _encode(self, phases: list, options: dict) -> tuple[bytes, list]:
        self._ids += 1
        request = {"id": self._ids, "phases": [p.wire() for p in phases],
                   "interruptible": options.get("interruptible", True)}
        if options.get("root"):
            request["root"] = options["root"]
        uploads = [op.upload for p in phases for op in p.ops if op.upload is not None]
        return json.dumps(request).encode() + b"\n", uploads

    def _send(self, data: bytes) -> None:
        with self._send_lock:
            try:
                self.channel.sendall(data)
            except (OSError, EOFError, paramiko.SSHException) as exc:
                raise ChannelLost(str(exc) or type(exc).__name__) from None

    def _message(self) -> dict:
        while b"\n" not in self._buffer:
            try:
                data = self.channel.recv(1 << 16)
            except (OSError, EOFError, paramiko.SSHException) as exc:
                raise ChannelLost(str(exc) or type(exc).__name__) from None
            if not data:
                detail = self._stderr()
                raise ChannelLost(detail or "the channel closed")
            self._buffer += data
        line, _, self._buffer = self._buffer.partition(b"\n")
        return json.loads(line)

    def _stderr(self) -> str:
        try:
            if self.channel.recv_stderr_ready():
                return self.channel.recv_stderr(1 << 16).decode(errors="replace").strip()
        except (OSError, EOFError, paramiko.SSHException):
            pass
        return ""

    def _reply(self, request_id: int, on_phase: Callable | None, on_output: Callable | None) -> Reply:
        while True:
            message = self._message()
            if message.get("id") != request_id:
                continue
            if "ok" in message:
                return Reply.parse(message)
            if "phase" in message and on_phase:
                on_phase(message["phase"], message["seconds"])
            if "out" in message and on_output:
                on_output(message["out"])
