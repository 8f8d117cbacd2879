"""A bounded HTTP load generator for zero-downtime tests. Stdlib only.

Several threads each keep one keep-alive connection to the server and send
GETs in a loop until told to stop, or until a total request count or a
duration is reached, whichever comes first: the load always ends by itself.
Every request is recorded, so a test can say exactly which request failed,
when, on which thread, and which version of the app served each one.

    with Load("http://127.0.0.1:8080/", path="/about") as load:
        load.wait_for_successes(200)
        ...  # deploy
    result = load.result()
    assert not result.failures
"""
from __future__ import annotations

import http.client
import json
import re
import threading
import time
import urllib.parse
from dataclasses import dataclass, field

# "/" answers "<greeting> <version>: <n> entries".
INDEX_VERSION = re.compile(r" (\S+): \d+ entries\s*$")
# What http.client raises when the server closed the connection before answering.
DROPPED_CONNECTION = ("RemoteDisconnected", "ConnectionResetError", "BrokenPipeError",
                      "ConnectionAbortedError")


@dataclass(frozen=True)
class Sample:
    """One request: who sent it, when, and what came back."""

    thread: int
    start: float          # seconds since the load started
    end: float
    status: int | None    # None when the request raised
    error: str | None     # the exception, as "Type: text"
    version: str | None   # the app version in the body, when it could be read
    reused: int           # requests sent on this connection before this one
    phase: str = ""       # where a request that raised failed: send, response or body

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    @property
    def dropped_keepalive(self) -> bool:
        """Sent on a reused connection that the server closed without answering.

        HTTP lets a server close an idle keep-alive connection at any time, so
        a request can cross the close; clients (browsers, curl) then resend it
        on a new connection (RFC 9112, section 9.3.1). Kept apart from other
        failures so a test can say what it tolerates, and how often.
        """
        # Once the status line arrived the server did answer: a failure after it is real.
        return (self.status is None and self.reused > 0 and self.phase in ("send", "response")
                and self.error.split(":")[0] in DROPPED_CONNECTION)

    def describe(self) -> str:
        """One line for an assertion message."""
        outcome = f"{self.error} (in {self.phase})" if self.error else f"HTTP {self.status}"
        return (f"thread {self.thread} t={self.start:.3f}-{self.end:.3f}s "
                f"conn-reuse={self.reused}: {outcome}")


@dataclass
class Result:
    """What a whole load run saw."""

    samples: list[Sample]
    duration: float
    stop_reason: str                      # "asked", "max_requests" or "max_seconds"
    per_thread: dict[int, list[Sample]] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return len(self.samples)

    @property
    def failures(self) -> list[Sample]:
        return [s for s in self.samples if not s.ok]

    @property
    def successes(self) -> int:
        return self.total - len(self.failures)

    @property
    def dropped_keepalive(self) -> list[Sample]:
        """Failures that were a keep-alive connection closed under a request."""
        return [s for s in self.failures if s.dropped_keepalive]

    @property
    def hard_failures(self) -> list[Sample]:
        """Failures no client would retry by itself: error statuses, fresh connections failing."""
        return [s for s in self.failures if not s.dropped_keepalive]

    def versions(self, thread: int) -> list[str | None]:
        """The versions one thread's successful requests saw, in order."""
        return [s.version for s in self.per_thread[thread] if s.ok]

    def version_counts(self) -> dict[str | None, int]:
        counts: dict[str | None, int] = {}
        for s in self.samples:
            if s.ok:
                counts[s.version] = counts.get(s.version, 0) + 1
        return counts

    def summary(self, samples: int = 10) -> str:
        """A short report: totals, versions, and the first few failures."""
        lines = [f"{self.total} requests in {self.duration:.1f}s ({self.stop_reason}), "
                 f"{len(self.failures)} failed ({len(self.dropped_keepalive)} dropped keep-alive), "
                 f"versions {self.version_counts()}"]
        lines += ["  " + s.describe() for s in self.failures[:samples]]
        return "\n".join(lines)


def flips(sequence: list) -> int:
    """How many times consecutive items differ."""
    return sum(1 for a, b in zip(sequence, sequence[1:]) if a != b)


def version_of(body: bytes) -> str | None:
    """The app version in an /about (JSON) or / (text) answer."""
    text = body.decode(errors="replace")
    try:
        return str(json.loads(text)["version"])
    except (ValueError, KeyError, TypeError):
        match = INDEX_VERSION.search(text)
        return match.group(1) if match else None


class Load:
    """Threads sending GETs over keep-alive connections; see the module docstring."""

    def __init__(self, url: str, path: str = "/about", threads: int = 8,
                 max_requests: int = 20_000, max_seconds: float = 120,
                 request_timeout: float = 10):
        parts = urllib.parse.urlsplit(url)
        self.host, self.port = parts.hostname, parts.port or 80
        self.path = path
        self.threads = threads
        self.max_requests = max_requests
        self.max_seconds = max_seconds
        self.request_timeout = request_timeout
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._sent = 0
        self._ok = 0
        self._stop_reason = "asked"
        self._samples: dict[int, list[Sample]] = {n: [] for n in range(threads)}
        self._workers: list[threading.Thread] = []
        self._t0 = 0.0
        self._duration = 0.0

    # -- the context manager ------------------------------------------------

    def __enter__(self) -> "Load":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        self._t0 = time.monotonic()
        for n in range(self.threads):
            worker = threading.Thread(target=self._run, args=(n,), name=f"load-{n}", daemon=True)
            worker.start()
            self._workers.append(worker)

    def stop(self) -> None:
        """Ask every thread to stop and wait for it; idempotent."""
        self._stop.set()
        for worker in self._workers:
            # A request ends within request_timeout, so the join is bounded too.
            worker.join(self.request_timeout + 5)
        if not self._duration:
            self._duration = time.monotonic() - self._t0

    def now(self) -> float:
        """Seconds since the load started, on the clock samples use."""
        return time.monotonic() - self._t0

    # -- watching a running load --------------------------------------------

    @property
    def running(self) -> bool:
        return not self._stop.is_set()

    @property
    def successes(self) -> int:
        with self._lock:
            return self._ok

    def wait_for_successes(self, count: int, timeout: float = 30) -> None:
        """Block until `count` requests succeeded in total; raise if that takes too long."""
        self._wait(lambda: self.successes >= count, timeout, f"{count} successful requests")

    def _wait(self, done, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            if not self.running:
                raise AssertionError(f"the load stopped ({self._stop_reason}) before {what}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} within {timeout}s: "
                                     + self.result(final=False).summary())
            time.sleep(0.01)

    def result(self, final: bool = True) -> Result:
        """Everything recorded; with final, stop the load first."""
        if final:
            self.stop()
        per_thread = {n: list(samples) for n, samples in self._samples.items()}
        merged = sorted((s for samples in per_thread.values() for s in samples),
                        key=lambda s: s.start)
        duration = self._duration if final else self.now()
        return Result(merged, duration, self._stop_reason, per_thread)

    # -- one thread ---------------------------------------------------------

    def _claim(self) -> bool:
        """Reserve one request within the bounds; False when the load must end."""
        if self._stop.is_set():
            return False
        with self._lock:
            if self._sent >= self.max_requests:
                self._finish("max_requests")
                return False
            if self.now() >= self.max_seconds:
                self._finish("max_seconds")
                return False
            self._sent += 1
            return True

    def _finish(self, reason: str) -> None:
        """A bound was reached: stop, and remember when and why."""
        if not self._stop.is_set():
            self._stop_reason = reason
            self._duration = self.now()
            self._stop.set()

    def _run(self, n: int) -> None:
        conn, reused = None, 0
        while self._claim():
            if conn is None:
                conn, reused = self._connect(), 0
            sample, keep = self._request(n, conn, reused)
            self._samples[n].append(sample)
            if sample.ok:
                with self._lock:
                    self._ok += 1
            if keep:
                reused += 1
            else:
                conn.close()
                conn = None
        if conn is not None:
            conn.close()

    def _connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=self.request_timeout)

    def _request(self, n: int, conn: http.client.HTTPConnection, reused: int) -> tuple[Sample, bool]:
        """Send one GET; return its sample, and whether the connection may be used again."""
        start, phase = self.now(), "send"
        try:
            conn.request("GET", self.path)
            phase = "response"
            response = conn.getresponse()
            phase = "body"
            body = response.read()
        except Exception as exc:  # noqa: BLE001 -- any error is a recorded failure, never a dead thread
            # Never retried here: the next request goes on a new connection, and
            # Sample.dropped_keepalive tells a dropped keep-alive request apart.
            error = f"{type(exc).__name__}: {exc}"
            return Sample(n, start, self.now(), None, error, None, reused, phase), False
        sample = Sample(n, start, self.now(), response.status, None, version_of(body), reused)
        # The server closes after "Connection: close": reconnect for the next request.
        return sample, not response.will_close


def served_version(url: str, path: str = "/about", timeout: float = 10) -> str | None:
    """One GET on a new connection: the version that serves `path` now."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    if not 200 <= response.status < 300:
        raise AssertionError(f"GET {path} answered {response.status}: {body[:200]!r}")
    return version_of(body)


def under_load(url: str, action, threads: int, warm_up: int, after: float,
               max_requests: int, max_seconds: float):
    """Run action() while the load runs; return (load result, action's result, its window)."""
    with Load(url, path="/about", threads=threads, max_requests=max_requests,
              max_seconds=max_seconds) as load:
        load.wait_for_successes(warm_up)
        began = load.now()
        outcome = action()
        ended = load.now()
        time.sleep(after)
    result = load.result()
    # The load must have covered the whole switch, not run out before it ended.
    assert result.stop_reason == "asked", "the load ran out before the action ended: " + result.summary()
    return result, outcome, (began, ended)


def assert_no_failed_request(result) -> None:
    """Not one request failed: no error status, no refused or dropped connection."""
    assert not result.hard_failures and not result.dropped_keepalive, result.summary()

