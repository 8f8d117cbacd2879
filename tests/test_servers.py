"""Issue 7: every offered app server behind every offered proxy, on real loopback hosts.

For each combination (server gunicorn, waitress or uwsgi, behind nginx, Apache
or no proxy; gunicorn's gevent and eventlet workers and an ASGI app behind
nginx) one test deploys the app and shows that it is served by the server
asked for, that ProxyFix sees the client as the proxy reports it, that a
redeploy under steady load serves the new code (with zero failed requests
where a proxy is in front), that a rollback serves the old code, and that a
release that cannot even be imported never takes traffic.

One throwaway host per proxy kind serves the whole module (proxy: none runs
on the nginx host, its app server on a free loopback port); each case wipes
~/srv after itself. The failed-request figures are printed: run with -rP.

With a proxy in front, not one request may fail, as issue 3 settled: a switch
renames shared/run/live.sock instead of reloading the proxy (a reload closes
keep-alive connections under requests in flight).
"""
from __future__ import annotations

import http.client
import json
import pathlib
import shutil
import signal
import time
import urllib.parse
from dataclasses import dataclass

import pytest

from harness.local_host import LocalHost, free_port, free_port_pair
from harness.project import Project, traversable_tmpdir
import load
from load import flips

pytestmark = pytest.mark.host

THREADS = 4          # each keeps one keep-alive connection busy
WARM_UP = 100        # successful requests before a deploy starts
AFTER = 0.5          # seconds of load after the deploy returns
# Bounds that always end the load; proxy: none's refused connections fail fast, hence many.
MAX_REQUESTS, MAX_SECONDS = 400_000, 90
PROGRAMS = {"gunicorn": "bin/gunicorn", "waitress": "bin/waitress-serve", "uwsgi": "bin/uwsgi"}


@dataclass(frozen=True)
class Case:
    """One offered combination of app server, worker class and proxy."""

    server: str
    proxy: str
    worker_class: str | None = None
    asgi: bool = False
    app: str = "guestbook"  # the example, or a package of PROBES

    def __str__(self) -> str:
        kind = "asgi" if self.asgi else self.worker_class
        return "-".join(filter(None, [self.server, kind, self.proxy]))

    @property
    def host_kind(self) -> str:
        """The harness host it runs on: proxy none borrows the nginx host and bypasses it."""
        return "apache" if self.proxy == "apache" else "nginx"

    def settings(self, direct_port: int) -> dict:
        """fabric.yaml overrides for this combination."""
        given: dict = {"server": {"kind": self.server}}
        if self.proxy == "none":
            given.update(proxy={"kind": "none"})
            given["server"]["public_bind"] = f"127.0.0.1:{direct_port}"
        if self.worker_class:
            given["server"]["worker_class"] = self.worker_class
        if self.app != "guestbook":
            given.update(wsgi=f"{self.app}:app", init_command="")
            given["server"]["asgi"] = self.asgi
        return given


CASES = [Case(server, proxy) for proxy in ("nginx", "apache", "none")
         for server in ("gunicorn", "waitress", "uwsgi")]
CASES += [Case("gunicorn", "nginx", worker_class="gevent"),
          Case("gunicorn", "nginx", worker_class="eventlet"),
          Case("gunicorn", "nginx", asgi=True, app="asgiprobe")]

PYPROJECT = """\
[build-system]
requires = ["setuptools>=64"]
build-backend = "setuptools.build_meta"

[project]
name = "{name}"
version = "1.0.0"
requires-python = ">=3.10"
dependencies = {dependencies}

[tool.setuptools]
packages = ["{name}"]
"""

ASGI_APP = '''\
"""A pure ASGI app: every path answers its version as JSON."""
import json
from importlib.metadata import version


async def app(scope, receive, send):
    """Lifespan events are acknowledged; every HTTP request gets the version."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    body = json.dumps({"version": version("asgiprobe"), "asgi": scope["asgi"]["version"]})
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body.encode()})
'''

HEADER_APP = '''\
"""A WSGI app behind the example's ProxyFix: it says what the app would believe."""
import json
from importlib.metadata import version

from werkzeug.middleware.proxy_fix import ProxyFix
from werkzeug.wrappers import Request


def believed(environ, start_response):
    """The client address, scheme, host and root URL, as ProxyFix left them."""
    request = Request(environ)
    body = json.dumps({"version": version("headerprobe"), "remote_addr": request.remote_addr,
                       "scheme": request.scheme, "host": request.host,
                       "root_url": request.root_url}).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]


# The example app's ProxyFix: one proxy in front, trusted for every X-Forwarded-* header.
app = ProxyFix(believed, x_for=1, x_proto=1, x_host=1, x_port=1, x_prefix=1)
'''

PROBES = {"asgiprobe": (ASGI_APP, []), "headerprobe": (HEADER_APP, ["werkzeug"])}


# -- hosts and deployments ----------------------------------------------------

@pytest.fixture(scope="module")
def hosts():
    """hosts(kind) -> a LocalHost running that proxy, started on first use, one per kind."""
    started: dict[str, LocalHost] = {}

    def get(kind: str) -> LocalHost:
        if kind not in started:
            workdir = traversable_tmpdir(f"fabdeploy-{kind}-")
            try:
                started[kind] = LocalHost(workdir, proxy=kind).start()
            except BaseException:
                shutil.rmtree(workdir, ignore_errors=True)  # start() has stopped what it started
                raise
        return started[kind]

    yield get
    for host in started.values():
        host.stop()
        shutil.rmtree(host.workdir, ignore_errors=True)


@dataclass
class Deployment:
    """A project deployed by one case to one host, and where its app answers."""

    case: Case
    host: LocalHost
    project: Project
    url: str

    def current(self) -> str:
        """The name of the release `current` points at."""
        return (self.project.deploy_to / "current").readlink().name

    def releases(self) -> list[pathlib.Path]:
        """The release directories, oldest first."""
        return sorted((self.project.deploy_to / "releases").iterdir())

    def about(self, headers: dict | None = None) -> tuple[dict, dict]:
        """GET /about on a new connection: its JSON and its headers."""
        status, body, answer_headers = request(self.url, "/about", headers)
        assert status == 200, f"/about answered {status}: {body[:300]!r}"
        return json.loads(body), answer_headers


@pytest.fixture
def deployments(hosts, tmp_path):
    """deployments(case) -> a fresh project for the case; the host's ~/srv is wiped afterwards."""
    used: list[LocalHost] = []

    def make(case: Case) -> Deployment:
        host = hosts(case.host_kind)
        used.append(host)
        project = (Project(tmp_path / "guestbook", host) if case.app == "guestbook"
                   else probe_project(tmp_path, host, case.app))
        port = free_port()
        project.configure(**case.settings(port))
        url = f"http://127.0.0.1:{port}/" if case.proxy == "none" else host.url
        return Deployment(case, host, project, url)

    yield make
    for host in used:
        wipe(host)


def probe_project(tmp_path: pathlib.Path, host: LocalHost, name: str) -> Project:
    """One of the tiny PROBES packages, with the example's fabfile."""
    source, dependencies = PROBES[name]
    path = tmp_path / name
    (path / name).mkdir(parents=True)
    (path / "pyproject.toml").write_text(PYPROJECT.format(name=name, dependencies=json.dumps(dependencies)))
    (path / name / "__init__.py").write_text(source)
    (path / "fabfile.py").write_text("from fabdeploy import ns  # noqa: F401\n")
    return Project(path, host, app=name)


def wipe(host: LocalHost) -> None:
    """Stop every app server the case left (by the PIDs in its pid files); remove ~/srv and the sites."""
    pids = [int(text) for text in (p.read_text().strip() for p in host.home.glob("srv/*/shared/run/*.pid"))
            if text.isdigit()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in filter(alive, pids):
            host.run_as_user(f"kill -{sig.name[3:]} {pid}", check=False)
        deadline = time.monotonic() + 10
        while any(map(alive, pids)) and time.monotonic() < deadline:
            time.sleep(0.05)
    host.run_as_user("rm -rf ~/srv")
    # The next case may deploy another app to the same port: only its site may answer there.
    proxy = host.settings("x")["proxy"]
    host.run_as_user(f"rm -f {host.site_dir}/*.conf && {proxy['reload_command']}")


def alive(pid: int) -> bool:
    """Running and not a zombie (an orphan's zombie waits for a lazy init)."""
    try:
        fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return False
    return fields[0] != "Z"


# -- looking at a deployment ------------------------------------------------------

def request(url: str, path: str, headers: dict | None = None) -> tuple[int, bytes, dict]:
    """One GET on a new connection: status, body, headers."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read(), dict(response.getheaders())
    finally:
        conn.close()


def running_program(d: Deployment) -> str:
    """The script the current release's server runs (argv 0 or 1), by its pid file."""
    pid = (d.project.deploy_to / "shared" / "run" / f"{d.current()}.pid").read_text().strip()
    argv = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    found = [tail for tail in PROGRAMS.values() if any(arg.endswith(tail) for arg in argv[:2])]
    return found[0] if found else " ".join(argv)


def log_of(d: Deployment) -> str:
    """The app's log, which every release's server writes to."""
    return (d.project.deploy_to / "shared" / "log" / "app.log").read_text(errors="replace")


def assert_serves(d: Deployment, version: str) -> None:
    """`version` answers, from the current release, through the proxy when there is one."""
    info, headers = d.about()
    assert info["version"] == version, info
    if d.case.proxy != "none":
        assert headers.get("X-Fabdeploy-Site"), headers  # our site answered
    else:
        assert "X-Fabdeploy-Site" not in headers, "proxy none must bypass the proxy"
    if "release" in info:  # the example app names the release its venv belongs to
        assert info["release"] == d.current(), info


def assert_the_asked_for_server_runs(d: Deployment) -> None:
    """The current release runs the server, worker class and ASGI mode the case asked for."""
    assert running_program(d) == PROGRAMS[d.case.server]
    worker = "uvicorn_worker.UvicornWorker" if d.case.asgi else d.case.worker_class
    if worker:
        assert f"Using worker: {worker}" in log_of(d)
    if d.case.asgi:
        assert d.about()[0]["asgi"] == "3.0"


def assert_proxy_fix(d: Deployment) -> None:
    """ProxyFix (x_for=1, x_proto=1) sees the client and scheme the proxy reports."""
    plain, _ = d.about()
    assert (plain["remote_addr"], plain["scheme"]) == ("127.0.0.1", "http"), plain
    forged, _ = d.about({"X-Forwarded-For": "6.6.6.6", "X-Forwarded-Proto": "https"})
    seen = (forged["remote_addr"], forged["scheme"])
    if d.case.proxy == "none":
        # Whoever reaches server.public_bind is trusted as the one proxy: a balancer's headers count.
        assert seen == ("6.6.6.6", "https"), forged
    else:
        # The proxy appends the peer it saw ("6.6.6.6, 127.0.0.1") and ProxyFix takes that
        # last entry; the scheme is the proxy's own, not the client's claim.
        assert seen == ("127.0.0.1", "http"), forged


# -- load -----------------------------------------------------------------------------

def under_load(d: Deployment, action):
    return load.under_load(d.url, action, THREADS, WARM_UP, AFTER, MAX_REQUESTS, MAX_SECONDS)


def report(what: str, d: Deployment, result, window) -> None:
    """The figures for the README: failures, and how long requests kept failing."""
    failed = result.failures
    span = f"{failed[-1].end - failed[0].start:.2f}s" if failed else "0s"
    print(f"{what} {d.case}: {len(failed)} failed of {result.total} "
          f"({len(result.dropped_keepalive)} dropped keep-alive, {len(result.hard_failures)} hard), "
          f"failing for {span}; deploy took {window[1] - window[0]:.1f}s\n{result.summary(5)}")


def assert_cold_switch_gap_only(result, window) -> None:
    """proxy: none: requests fail only while the deploy switches, and serve again after."""
    began, ended = window
    for sample in result.failures:
        assert began <= sample.start <= ended, "a failure outside the deploy:\n" + result.summary()
    for n in range(THREADS):
        assert result.per_thread[n][-1].ok, f"thread {n} did not recover:\n" + result.summary()


def assert_each_thread_moved_once(result, old: str, new: str) -> None:
    """Every connection saw old, then new, and never old again."""
    for n in range(THREADS):
        versions = result.versions(n)
        assert versions[0] == old and versions[-1] == new, f"thread {n}: {versions[0]} .. {versions[-1]}"
        assert flips(versions) == 1, f"thread {n} flipped {flips(versions)} times: {result.summary()}"


# -- the tests ------------------------------------------------------------------------

def change_code(d: Deployment, version: str) -> None:
    """A new version; the example app also greets differently."""
    if d.case.asgi:
        d.project.set_version(version)
    else:
        d.project.set_version(version, greeting=f"Greetings from {version}")


def break_at_import(d: Deployment) -> None:
    """Make the app's package raise when it is imported."""
    package = d.project.path / d.project.app / "__init__.py"
    package.write_text(package.read_text() + '\nraise RuntimeError("boom at import")\n')


@pytest.mark.parametrize("case", CASES, ids=str)
def test_serves_redeploys_rolls_back_and_refuses_a_broken_release(case, deployments):
    """The whole life of a release under one combination; see the module docstring."""
    d = deployments(case)
    d.project.fab("deploy")
    first = d.current()
    assert_serves(d, "1.0.0")
    assert_the_asked_for_server_runs(d)
    if not case.asgi:
        assert_proxy_fix(d)

    # A redeploy of changed code, under steady load.
    change_code(d, "1.1.0")
    result, _, window = under_load(d, lambda: d.project.fab("deploy"))
    report("redeploy", d, result, window)
    assert d.current() != first
    assert_serves(d, "1.1.0")
    if case.proxy == "none":
        assert_cold_switch_gap_only(result, window)
    else:
        load.assert_no_failed_request(result)
    assert_each_thread_moved_once(result, "1.0.0", "1.1.0")

    d.project.fab("rollback")
    assert d.current() == first
    assert_serves(d, "1.0.0")

    # A release that cannot be imported: refused, marked, and never serves a request.
    break_at_import(d)
    change_code(d, "1.2.0")
    result, broken, window = under_load(d, lambda: d.project.fab("deploy", check=False))
    report("broken deploy", d, result, window)
    assert broken.returncode != 0, broken.stdout
    newest = d.releases()[-1]
    # Every server's headline names the app's own error (issue 16), not "unhealthy".
    assert f"release {newest.name} cannot start: RuntimeError: boom at import" in broken.stderr, broken.stderr
    assert newest.name not in (first, d.current()) and (newest / "FAILED").exists()
    assert d.current() == first
    assert_serves(d, "1.0.0")
    assert not result.failures, result.summary()
    assert result.version_counts() == {"1.0.0": result.total}, result.summary()


@pytest.mark.parametrize("proxy", ["nginx", "apache"])
def test_a_client_cannot_forge_what_proxyfix_trusts(proxy, deployments):
    """Every X-Forwarded-* header ProxyFix trusts is the proxy's, whatever the client sends."""
    d = deployments(Case("gunicorn", proxy, app="headerprobe"))
    d.project.fab("deploy")
    forged = {"X-Forwarded-For": "6.6.6.6", "X-Forwarded-Proto": "https",
              "X-Forwarded-Host": "evil.example", "X-Forwarded-Port": "4443",
              "X-Forwarded-Prefix": "/evil"}
    status, body, _ = request(d.url, "/", forged)
    assert status == 200, body
    origin = f"127.0.0.1:{d.host.http_port}"
    assert json.loads(body) == {"version": "1.0.0", "remote_addr": "127.0.0.1", "scheme": "http",
                                "host": origin, "root_url": f"http://{origin}/"}


def test_a_waitress_release_on_a_tcp_bind_takes_the_other_port(deployments):
    """gunicorn.bind 127.0.0.1:PORT (any server): a redeploy starts on the port current lacks.

    The next deploy learns the current release's bind from its serve script; had it
    not (it once read only gunicorn.conf.py), the new waitress would fail to bind,
    the health check would be answered by the old one, and 1.0.0 would go on serving.
    """
    d = deployments(Case("waitress", "nginx"))
    port = free_port_pair()
    d.project.configure(server={"kind": "waitress", "bind": f"127.0.0.1:{port}"})
    d.project.fab("deploy")
    change_code(d, "1.1.0")
    d.project.fab("deploy")
    assert_serves(d, "1.1.0")
    assert f"--listen=127.0.0.1:{port + 1}" in (d.project.deploy_to / "current" / "serve").read_text()
