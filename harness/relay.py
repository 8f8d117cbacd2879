"""A delaying TCP relay on loopback: distance for tests and the benchmark (no netem here).

    with Relay(host.ssh_port, delay_ms=25) as relay:   # 50 ms round trip
        trust_relay(host, relay)                         # known_hosts for [127.0.0.1]:<relay.port>
        ... connect to relay.host_string(host) ...
        relay.round_trips()

Every byte is held `delay_ms` one way (`return_delay_ms` the other way, by
default the same), in order, with TCP_NODELAY on both sides; bandwidth is
not limited. A connection reaches the target only one round trip after it
was accepted (plus the one-way trip of the handshake's last ACK), as a real
TCP handshake would make it, so time at distance comes out as it would
over a real link. The relay acknowledges at once: an endpoint without
TCP_NODELAY loses nothing to Nagle's algorithm here, where over a real link
it could lose a round trip.

Turns: a new turn of a connection begins when data from the client arrives
after an answer to its current turn was forwarded to it (its first data is
turn 1). An answer is server data that left the server after the turn's
data reached it (see Link). The client sending more without an answer in
between (pipelining) is the same turn. The TCP handshake is one more round
trip that no data shows: `round_trips()` is connections + turns. It is an
upper bound on the round trips a client waited for: a message sent on
receipt of data (a window adjust, say) counts though nobody waited for its
answer. With no delay at all the relay cannot tell a pipelined message
from an answered one, and counts may vary from run to run; from a delay of
a millisecond on, an SSH session counts the same every time.

The relay runs its own asyncio loop in a thread; stop() (or leaving the
`with`) closes every socket and ends the thread.
"""
from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from harness.local_host import free_port

CHUNK = 1 << 16
QUEUED_CHUNKS = 256  # per direction: past 16 MB in flight the relay stops reading (backpressure)


@dataclass
class Counts:
    """What one connection did since the last reset."""

    turns: int = 0
    sent: int = 0  # client -> server bytes
    received: int = 0  # server -> client bytes
    connected: bool = True  # False: accepted before the reset, so its handshake is not counted


class Link:
    """One relayed connection: its counts, and which turn the data on the way belongs to.

    Server data answers the latest turn that had reached the server when it
    left there; only an answer to the client's current turn, once forwarded,
    lets the client's next data begin a new turn. So a server message sent
    before the client's last one arrived (the SSH banner and KEXINIT sent one
    after the other, say) starts no turn of its own, however the two
    messages and the client's reply interleave in the relay.
    """

    def __init__(self):
        self.counts = Counts()
        self.turn = 0  # the client's current turn; never reset, unlike counts
        self.seen = 0  # the latest turn whose data was forwarded to the server
        self.answered = False  # an answer to the current turn was forwarded to the client
        self.writers: list[asyncio.StreamWriter] = []

    def from_client(self, size: int) -> int:
        """Client data arrived: count it, return its turn."""
        if size and (self.answered or not self.counts.turns):
            self.turn += 1
            self.counts.turns += 1
            self.answered = False
        self.counts.sent += size
        return self.turn

    def to_server(self, turn: int) -> None:
        self.seen = max(self.seen, turn)

    def from_server(self, size: int) -> int:
        """Server data arrived: count it, return the turn it may answer."""
        self.counts.received += size
        return self.seen

    def to_client(self, turn: int) -> None:
        if turn == self.turn:
            self.answered = True


class Relay:
    """Forwards 127.0.0.1:<port> to target_host:target_port, each direction delayed."""

    listen_host = "127.0.0.1"

    def __init__(self, target_port: int, delay_ms: float = 0.0, return_delay_ms: float | None = None,
                 target_host: str = "127.0.0.1"):
        self.target = (target_host, target_port)
        self.up = delay_ms / 1000  # client -> server, seconds
        self.down = (delay_ms if return_delay_ms is None else return_delay_ms) / 1000
        self.port: int | None = None
        self._lock = threading.Lock()
        self._counts: list[Counts] = []
        self._links: dict[Link, None] = {}  # open ones, in the order accepted
        self._tasks: set[asyncio.Task] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None

    @property
    def rtt_ms(self) -> float:
        return (self.up + self.down) * 1000

    def host_string(self, host) -> str:
        """`user@127.0.0.1:<relay port>` for a LocalHost (or anything with a .user)."""
        return f"{host.user}@{self.listen_host}:{self.port}"

    # -- starting and stopping

    def start(self) -> "Relay":
        """Listen on a free loopback port, in a thread of its own; return once listening."""
        if self._thread:
            return self
        self.port = free_port()
        ready = threading.Event()
        failure: list[BaseException] = []
        self._loop = asyncio.new_event_loop()

        def serve() -> None:
            asyncio.set_event_loop(self._loop)
            try:
                self._server = self._loop.run_until_complete(
                    asyncio.start_server(self._accept, self.listen_host, self.port))
            except BaseException as exc:  # handed to start()'s caller
                failure.append(exc)
                ready.set()
                return
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=serve, name=f"relay-{self.port}", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            self._loop.close()
            self._thread = self._loop = None
            raise failure[0]
        return self

    def stop(self) -> None:
        """Close the listener and every connection, end the loop and its thread."""
        if not self._thread:
            return
        if self._server:
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()
        self._thread = self._loop = self._server = None

    async def _shutdown(self) -> None:
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()  # from 3.12 on, this waits for the connections too
        await asyncio.sleep(0)  # the closed transports' last callbacks close their sockets

    def __enter__(self) -> "Relay":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- counting

    def reset(self) -> None:
        """Start counting afresh: connections accepted, turns and bytes from now on."""
        with self._lock:
            self._counts = []
            for link in self._links:  # open connections go on counting, handshake not again
                link.counts = Counts(connected=False)
                self._counts.append(link.counts)

    def wait_idle(self, timeout: float = 10) -> bool:
        """Wait until no connection is open (a closed client's link ends a delay later)."""
        deadline = time.monotonic() + timeout
        while self._links and time.monotonic() < deadline:
            time.sleep(0.005)
        return not self._links

    def connections(self) -> list[Counts]:
        """Each connection's counts since the last reset (copies), in the order accepted."""
        with self._lock:
            return [Counts(**vars(c)) for c in self._counts]

    @property
    def connected(self) -> int:
        """Connections accepted (TCP handshakes) since the last reset."""
        return sum(c.connected for c in self.connections())

    @property
    def turns(self) -> int:
        return sum(c.turns for c in self.connections())

    @property
    def sent(self) -> int:
        return sum(c.sent for c in self.connections())

    @property
    def received(self) -> int:
        return sum(c.received for c in self.connections())

    def round_trips(self) -> int:
        """Connections (the TCP handshake) + turns, since the last reset."""
        return self.connected + self.turns

    # -- relaying

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        link = Link()
        with self._lock:
            self._links[link] = None
            self._counts.append(link.counts)
        try:
            await self._relay(link, client_reader, client_writer)
        except OSError:
            pass  # a reset or refused connection ends this link only
        except asyncio.CancelledError:
            pass  # stop(): ending quietly, as asyncio's streams log a handler that ends cancelled
        finally:
            for writer in link.writers:
                writer.close()
            with self._lock:
                self._links.pop(link, None)
            self._tasks.discard(task)

    async def _relay(self, link: Link, client_reader, client_writer) -> None:
        """Both directions until both have ended; the target is reached one handshake later."""
        loop = asyncio.get_running_loop()
        link.writers.append(client_writer)
        nodelay(client_writer)
        accepted = loop.time()
        up, down = asyncio.Queue(QUEUED_CHUNKS), asyncio.Queue(QUEUED_CHUNKS)
        tasks = [asyncio.ensure_future(self._read(client_reader, client_writer, up, self.up, link, client=True))]
        try:
            # SYN out, SYN-ACK back, ACK out: only then does the server accept.
            await asyncio.sleep(max(0.0, accepted + 2 * self.up + self.down - loop.time()))
            server_reader, server_writer = await asyncio.open_connection(*self.target)
            link.writers.append(server_writer)
            nodelay(server_writer)
            tasks += [asyncio.ensure_future(self._read(server_reader, server_writer, down, self.down, link,
                                                        client=False)),
                      asyncio.ensure_future(self._write(up, server_writer, link, client=False)),
                      asyncio.ensure_future(self._write(down, client_writer, link, client=True))]
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _read(self, reader, writer, queue: asyncio.Queue, delay: float, link: Link, client: bool) -> None:
        """Read one direction, stamping each chunk with when it may go on and its turn; None for EOF."""
        loop = asyncio.get_running_loop()
        while True:
            data = await reader.read(CHUNK)
            quick_ack(writer)
            with self._lock:
                turn = link.from_client(len(data)) if client else link.from_server(len(data))
            await queue.put((loop.time() + delay, data or None, turn))
            if not data:
                return

    async def _write(self, queue: asyncio.Queue, writer: asyncio.StreamWriter, link: Link, client: bool) -> None:
        """Forward one direction's chunks at their time, in order; pass EOF on as a half-close."""
        loop = asyncio.get_running_loop()
        while True:
            due, data, turn = await queue.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if data is None:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            with self._lock:
                link.to_client(turn) if client else link.to_server(turn)
            await writer.drain()


def nodelay(writer: asyncio.StreamWriter) -> None:
    """Send small writes at once: Nagle's wait would add to the delay being simulated."""
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    quick_ack(writer)


def quick_ack(writer: asyncio.StreamWriter) -> None:
    """Acknowledge at once (Linux forgets this, so again after every read).

    An endpoint without TCP_NODELAY (paramiko, sshd outside a pty) holds a
    small write until its last one is acknowledged; a delayed ACK from the
    relay would hold it up to 40 ms: time the relay added, not distance (a
    Fabric connect and one command took 80 ms longer at a 20 ms RTT).
    """
    with contextlib.suppress(OSError, AttributeError):
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)


def relay_known_hosts_line(host, port: int) -> str:
    """The known_hosts line that trusts `host`'s key at [127.0.0.1]:<port> (e.g. a relay's)."""
    own = f"[{host.host}]:{host.ssh_port} "
    line = next(line for line in host.known_hosts.read_text().splitlines() if line.startswith(own))
    return f"[{host.host}]:{port} {line[len(own):]}\n"


def trust_relay(host, relay: Relay, known_hosts: Path | None = None) -> Path:
    """Add the relay's address, with `host`'s key, to known_hosts (by default the host's own)."""
    path = Path(known_hosts or host.known_hosts)
    line = relay_known_hosts_line(host, relay.port)
    text = path.read_text() if path.exists() else ""
    if line not in text:
        path.write_text(text + line)
    return path
