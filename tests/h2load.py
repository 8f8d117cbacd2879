"""Bounded HTTPS load: HTTP/2 (on the `h2` library) as browsers speak it, and HTTP/1.1 over TLS.

H2Load mirrors tests/load.py's Load: threads, each with one connection (TLS,
ALPN h2) and one request at a time on it, until told to stop or a bound is
reached; every request is recorded as a load.Sample.

The one thing HTTP/2 lets a client know that HTTP/1.1 does not: when a
server closes a connection gracefully (nginx's old workers after a reload),
it first sends GOAWAY with the last stream it processed, and a stream above
that was not processed at all, so the client may send it again on a new
connection (RFC 9113, section 6.8), as browsers do. Only such a request is
sent again, once, and each time is counted in `refused`. Anything else is
recorded as it happened: a reset or closed connection under a stream the
server did not refuse, an error status, a timeout, are failures.

HTTPSLoad is load.Load over TLS, with the same rule as Load: a request
dropped on a reused keep-alive connection is a failure, whoever closed it.
"""
from __future__ import annotations

import http.client
import socket
import ssl
import time
from dataclasses import dataclass

import h2.config
import h2.connection
import h2.events
import h2.exceptions
from h2.connection import ConnectionInputs, ConnectionState

from load import Load, Sample, version_of


def client_context(cafile: str, alpn: list[str]) -> ssl.SSLContext:
    """A client that trusts only cafile's roots and checks the name."""
    context = ssl.create_default_context(cafile=cafile)
    context.set_alpn_protocols(alpn)
    return context


class Refused(Exception):
    """The server's GOAWAY says it never processed this stream: it may be sent again."""


@dataclass(frozen=True)
class Refusal:
    thread: int
    at: float
    stream: int
    last_stream: int


class GracefulClose(h2.connection.H2ConnectionStateMachine):
    """h2's connection state machine, which also takes in the frames that follow a GOAWAY.

    h2 treats a received GOAWAY as the end of everything (python-hyper/h2 issue
    1181), but RFC 9113 section 6.8 lets the streams up to the last one it
    names complete, and nginx's graceful shutdown does just that: GOAWAY
    naming the stream in flight, then that stream's response. The client sends
    no new stream on such a connection either way.
    """

    _transitions = {
        **h2.connection.H2ConnectionStateMachine._transitions,
        **{(ConnectionState.CLOSED, received): (None, ConnectionState.CLOSED) for received in (
            ConnectionInputs.RECV_HEADERS, ConnectionInputs.RECV_DATA, ConnectionInputs.RECV_WINDOW_UPDATE,
            ConnectionInputs.RECV_PING, ConnectionInputs.RECV_RST_STREAM, ConnectionInputs.RECV_SETTINGS)},
    }


class H2Connection:
    """One TLS connection speaking HTTP/2: GET a path, one stream at a time."""

    def __init__(self, address: str, port: int, name: str, context: ssl.SSLContext, timeout: float):
        raw = socket.create_connection((address, port), timeout=timeout)
        self.sock = context.wrap_socket(raw, server_hostname=name)
        if self.sock.selected_alpn_protocol() != "h2":
            self.sock.close()
            raise ConnectionError(f"ALPN chose {self.sock.selected_alpn_protocol()!r}, not h2")
        self.name = name
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.h2.state_machine = GracefulClose()
        self.h2.initiate_connection()
        self.sock.sendall(self.h2.data_to_send())
        self.going_away = False  # a GOAWAY came: no new stream on this connection

    def get(self, path: str) -> tuple[int, bytes]:
        """Status and body; raises Refused for a stream the server's GOAWAY did not process."""
        stream = self.h2.get_next_available_stream_id()
        self.h2.send_headers(stream, [(":method", "GET"), (":scheme", "https"), (":authority", self.name),
                                      (":path", path)], end_stream=True)
        self.sock.sendall(self.h2.data_to_send())
        status, body = None, b""
        while True:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionResetError(f"the server closed the connection under stream {stream}")
            for event in self.h2.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived) and event.stream_id == stream:
                    status = int(dict(event.headers)[b":status"])
                elif isinstance(event, h2.events.DataReceived) and event.stream_id == stream:
                    body += event.data
                    if not self.going_away:  # after GOAWAY h2 sends nothing; the bodies are small
                        self.h2.acknowledge_received_data(event.flow_controlled_length, stream)
                elif isinstance(event, h2.events.StreamEnded) and event.stream_id == stream:
                    self.flush()
                    return status, body
                elif isinstance(event, h2.events.StreamReset) and event.stream_id == stream:
                    raise ConnectionResetError(f"stream {stream} reset ({event.error_code!r})")
                elif isinstance(event, h2.events.ConnectionTerminated):
                    self.going_away = True
                    if event.last_stream_id is not None and stream > event.last_stream_id:
                        raise Refused(stream, event.last_stream_id)
                    # At or below the last stream: the server finishes it, so keep reading.
            self.flush()

    def flush(self) -> None:
        if self.going_away:
            return
        data = self.h2.data_to_send()
        if data:
            self.sock.sendall(data)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class H2Load(Load):
    """Load's threads and bounds, each thread on an HTTP/2 connection of its own."""

    def __init__(self, address: str, name: str, cafile: str, port: int = 443, **kwargs):
        super().__init__(f"https://{name}:{port}/", **kwargs)
        self.address, self.name = address, name
        self.context = client_context(cafile, ["h2"])
        self.refused: list[Refusal] = []

    def _run(self, n: int) -> None:
        conn, reused = None, 0
        while self._claim():
            sample, conn, reused = self._one(n, conn, reused)
            self._samples[n].append(sample)
            if sample.ok:
                with self._lock:
                    self._ok += 1
        if conn is not None:
            conn.close()

    def _one(self, n: int, conn, reused: int):
        """One request (sent again once if a GOAWAY refused it); its sample, and the connection after."""
        start = self.now()
        for attempt in (1, 2):
            phase = "connect"
            try:
                if conn is None or conn.going_away:
                    if conn is not None:
                        conn.close()
                    conn, reused = H2Connection(self.address, self.port, self.name, self.context,
                                                self.request_timeout), 0
                phase = "response"
                status, body = conn.get(self.path)
            except Refused as exc:
                with self._lock:
                    self.refused.append(Refusal(n, self.now(), *exc.args))
                conn.close()
                conn = None
                if attempt == 1:
                    continue
                return Sample(n, start, self.now(), None, "Refused: twice", None, reused, phase), None, 0
            except (OSError, h2.exceptions.H2Error, ssl.SSLError) as exc:
                if conn is not None:
                    conn.close()
                error = f"{type(exc).__name__}: {exc}"
                return Sample(n, start, self.now(), None, error, None, reused, phase), None, 0
            sample = Sample(n, start, self.now(), status, None, version_of(body), reused)
            return sample, conn, reused + 1
        raise AssertionError("unreachable")


class NamedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to an address, naming the site (SNI and Host) as a browser would."""

    def __init__(self, address: str, name: str, port: int, context: ssl.SSLContext, timeout: float):
        super().__init__(name, port, context=context, timeout=timeout)
        self.address = address

    def connect(self) -> None:
        raw = socket.create_connection((self.address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(raw, server_hostname=self.host)


class HTTPSLoad(Load):
    """load.Load over TLS and HTTP/1.1 keep-alive, with Load's own rules."""

    def __init__(self, address: str, name: str, cafile: str, port: int = 443, **kwargs):
        super().__init__(f"https://{name}:{port}/", **kwargs)
        self.address = address
        self.context = client_context(cafile, ["http/1.1"])

    def _connect(self) -> http.client.HTTPConnection:
        return NamedHTTPSConnection(self.address, self.host, self.port, self.context, self.request_timeout)


def under_loads(loads: list[Load], action, warm_up: int, after: float):
    """Run action() while every load runs; the results, in order, and the action's."""
    for load in loads:
        load.start()
    try:
        for load in loads:
            load.wait_for_successes(warm_up)
        outcome = action()
        time.sleep(after)
    finally:
        results = [load.result() for load in loads]
    for result in results:
        assert result.stop_reason == "asked", "a load ran out before the action ended: " + result.summary()
    return results, outcome
