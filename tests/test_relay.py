"""The delaying relay (harness/relay.py): distance, intact bytes, exact turn counts, a clean stop.

Timings here are lower bounds only (a relay cannot beat its own delay); the
counts are exact.
"""
import os
import socket
import socketserver
import threading
import time
from contextlib import contextmanager

import paramiko
import pytest
from fabric import Connection

from harness.relay import Relay, trust_relay

DELAY_MS = 10  # one way: a 20 ms round trip keeps each reply well apart from the next request


class Echo(socketserver.BaseRequestHandler):
    """Sends back whatever arrives, until the client half-closes."""

    def handle(self):
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while data := self.request.recv(1 << 16):
            self.request.sendall(data)


class GreetingEcho(Echo):
    """Greets in two messages a little apart, as an SSH server sends its banner and KEXINIT."""

    def handle(self):
        self.request.sendall(b"hello ")
        time.sleep(0.005)
        self.request.sendall(b"there\n")
        super().handle()


@contextmanager
def echo_server(handler=Echo):
    """A threaded echo server on loopback; yields its port, shut down and closed after."""
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def connect(relay: Relay) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", relay.port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def receive(sock: socket.socket, size: int) -> bytes:
    chunks, got = [], 0
    while got < size:
        chunk = sock.recv(min(1 << 16, size - got))
        assert chunk, f"EOF after {got} of {size} bytes"
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def exchange(sock: socket.socket, message: bytes) -> bytes:
    sock.sendall(message)
    return receive(sock, len(message))


def relay_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("relay-")]


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_sequential_exchanges_take_at_least_a_round_trip_each():
    exchanges = 5
    with echo_server() as port, Relay(port, delay_ms=25) as relay:
        assert relay.rtt_ms == 50
        started = time.monotonic()
        with connect(relay) as sock:
            for n in range(exchanges):
                assert exchange(sock, b"ping %d\n" % n) == b"ping %d\n" % n
        elapsed = time.monotonic() - started
    # The handshake's round trip, then one per exchange.
    assert elapsed >= (exchanges + 1) * 0.050, elapsed


def test_each_direction_has_its_own_delay():
    with echo_server() as port, Relay(port, delay_ms=40, return_delay_ms=0) as relay:
        assert relay.rtt_ms == 40
        with connect(relay) as sock:
            exchange(sock, b"warm up\n")  # the handshake's wait is behind us
            started = time.monotonic()
            exchange(sock, b"ping\n")
            assert time.monotonic() - started >= 0.040


def test_megabytes_both_ways_arrive_whole_and_in_order():
    size = 5 * 1024 * 1024
    payload = os.urandom(size)
    with echo_server() as port, Relay(port, delay_ms=5) as relay:
        with connect(relay) as sock:
            received: list[bytes] = []
            reader = threading.Thread(target=lambda: received.append(receive(sock, size)))
            reader.start()  # read while writing: the echo would otherwise stall on a full window
            sock.sendall(payload)
            reader.join(timeout=60)
            assert received and received[0] == payload
        (link,) = relay.connections()
        assert (link.sent, link.received) == (size, size)


def test_request_response_exchanges_count_one_turn_each():
    with echo_server() as port, Relay(port, delay_ms=DELAY_MS) as relay:
        with connect(relay) as sock:
            for n in range(7):
                exchange(sock, b"request %d\n" % n)
        (link,) = relay.connections()
        assert link.turns == 7 and link.connected
        assert (relay.connected, relay.turns, relay.round_trips()) == (1, 7, 8)


def test_a_pipelined_burst_is_one_turn_and_the_next_request_another():
    burst = b"".join(b"request %d\n" % n for n in range(50))
    with echo_server() as port, Relay(port, delay_ms=DELAY_MS) as relay:
        with connect(relay) as sock:
            for n in range(50):  # fifty sends without waiting for any answer
                sock.sendall(b"request %d\n" % n)
            assert receive(sock, len(burst)) == burst
            assert relay.turns == 1
            exchange(sock, b"one more\n")
            assert relay.turns == 2


def test_server_messages_sent_before_a_request_arrived_answer_nothing():
    """The client replies to the first half of a greeting while the second is on its way."""
    with echo_server(GreetingEcho) as port, Relay(port, delay_ms=DELAY_MS) as relay:
        with connect(relay) as sock:
            assert receive(sock, 6) == b"hello "
            sock.sendall(b"x")  # turn 1, while "there" is still in the relay
            assert receive(sock, 6) == b"there\n"
            sock.sendall(b"y")  # still turn 1: "there" left the server before x arrived
            assert receive(sock, 2) == b"xy"
            exchange(sock, b"z")  # the echo answered turn 1: a new turn
        assert relay.turns == 2


def test_counts_are_per_connection_and_reset_starts_afresh():
    with echo_server() as port, Relay(port, delay_ms=DELAY_MS) as relay:
        with connect(relay) as first, connect(relay) as second:
            exchange(first, b"a\n")
            exchange(second, b"b\n")
            exchange(second, b"c\n")
            assert [(c.turns, c.sent, c.received) for c in relay.connections()] == [(1, 2, 2), (2, 4, 4)]
            assert (relay.connected, relay.round_trips()) == (2, 5)
            relay.reset()
            assert (relay.connected, relay.turns, relay.sent, relay.received) == (0, 0, 0, 0)
            exchange(second, b"d\n")  # an open connection counts on, its handshake not again
            assert [(c.connected, c.turns) for c in relay.connections()] == [(False, 0), (False, 1)]
            assert relay.round_trips() == 1
        with connect(relay) as third:
            exchange(third, b"e\n")
        assert relay.round_trips() == 1 + 2


def test_stop_closes_listener_connections_and_thread():
    fds = open_fds()
    with echo_server() as port:
        relay = Relay(port, delay_ms=DELAY_MS).start()
        with connect(relay) as sock:
            exchange(sock, b"hello\n")
            relay.stop()
            sock.settimeout(5)
            assert sock.recv(10) == b""  # the relay closed its end
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", relay.port), timeout=5).close()
        relay.stop()  # a second stop is harmless
    assert relay_threads() == []
    assert open_fds() <= fds  # every socket of the relay (and of its loop) is closed


def test_an_unreachable_target_ends_that_connection_only():
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        dead_port = unused.getsockname()[1]  # bound, never listening: refused
        with Relay(dead_port) as relay:
            with connect(relay) as sock:
                sock.settimeout(5)
                assert sock.recv(10) == b""
            with connect(relay) as sock:  # the relay still accepts
                sock.settimeout(5)
                assert sock.recv(10) == b""


def ssh_true_through(relay: Relay, host) -> None:
    """A Fabric connect, strict host key check against known_hosts, and run("true")."""
    conn = Connection(relay.host_string(host), connect_kwargs={"key_filename": str(host.key_file)})
    conn.client.load_host_keys(str(host.known_hosts))
    conn.client.set_missing_host_key_policy(paramiko.RejectPolicy())
    try:
        assert conn.run("true", hide=True, in_stream=False).ok
    finally:
        conn.close()


@pytest.mark.host
def test_ssh_connect_and_one_command_take_a_plausible_count_of_round_trips(host):
    """The turns of paramiko's connect (key exchange, auth) plus one exec, through the relay.

    Not the same count every time: a fresh-clone CI rehearsal saw (1, 7, 8) and then
    (1, 6, 7). Whether two messages sent close together by the two sides fall into one
    turn or two depends on timing. The counter itself is exact, as the scripted
    exchanges above show. test_round_trips asserts budgets, never equality, for that reason.
    """
    with Relay(host.ssh_port, delay_ms=DELAY_MS) as relay:
        trust_relay(host, relay)
        counts = []
        for _ in range(2):
            assert relay.wait_idle()
            relay.reset()
            ssh_true_through(relay, host)
            (link,) = relay.connections()
            counts.append((relay.connected, link.turns, relay.round_trips()))
        print(f"\nFabric connect + run('true') through the relay: (connections, turns, round trips) = {counts}")
        for connected, _, round_trips in counts:
            assert connected == 1, counts
            # Banners, key exchange, service request, auth, channel open, exec, exit and close:
            # no fewer than 5 round trips can carry that, and a client waiting for 25 would be absurd.
            assert 5 <= round_trips <= 25, counts


@pytest.mark.host
def test_a_relay_unknown_to_known_hosts_is_refused(host):
    """Without trust_relay the relay's address has no known key: a strict client refuses it."""
    with Relay(host.ssh_port) as relay:
        with pytest.raises(paramiko.SSHException):
            ssh_true_through(relay, host)
