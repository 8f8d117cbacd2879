"""Issue 3: no request fails while a deploy or a rollback switches releases.

Each test deploys to the real throwaway host while `load.Load` keeps 8
keep-alive connections busy through nginx, and reads the version that
served every request from /about. Not one request may fail: no error
status, no refused connection, and no request dropped on a keep-alive
connection (what an nginx reload does; a switch renames shared/run/live.sock
instead, and test_switch_keeps_idle_keepalive_connections_open pins that).
A release that fails only behind nginx is refused before the switch, by a
check through nginx's preview, so under load it costs nobody a request.
"""
import http.client

import pytest

import load
from load import flips, served_version, version_of

pytestmark = pytest.mark.host

THREADS = 8
WARM_UP = 200        # successful requests before the switch starts
AFTER = 1.0          # seconds of load after the deploy or rollback returns
MAX_REQUESTS = 60_000
MAX_SECONDS = 120


def current_of(project) -> str:
    return (project.deploy_to / "current").readlink().name


def under_load(host, action):
    return load.under_load(host.url, action, THREADS, WARM_UP, AFTER, MAX_REQUESTS, MAX_SECONDS)


def assert_each_thread_flipped_once(result, old: str, new: str, ended: float) -> None:
    """Every connection saw old, then new, and never old again."""
    for n in range(THREADS):
        versions = result.versions(n)
        assert versions[0] == old and versions[-1] == new, f"thread {n}: {versions[0]} .. {versions[-1]}"
        assert flips(versions) == 1, f"thread {n} flipped {flips(versions)} times: {result.summary()}"
        # The load went on after the switch: each thread's last answers came after it.
        assert result.per_thread[n][-1].start > ended, f"thread {n} stopped before the switch ended"


def break_at_import(project) -> None:
    """The app's package raises while gunicorn imports it."""
    app = project.path / "guestbook" / "__init__.py"
    app.write_text(app.read_text() + '\nraise RuntimeError("boom at import")\n')


def break_behind_nginx(project) -> None:
    """Every path answers 500 once nginx adds X-Forwarded-For; healthy on the bare socket."""
    app = project.path / "guestbook" / "__init__.py"
    routes = '    @app.get("/")\n'
    text = app.read_text()
    assert text.count(routes) == 1
    app.write_text(text.replace(routes, '    @app.before_request\n'
                                        '    def broken_behind_nginx():\n'
                                        '        if request.headers.get("X-Forwarded-For"):\n'
                                        '            return "broken behind nginx\\n", 500\n\n' + routes))


def test_deploy_under_load_drops_nothing_and_flips_once(project, host):
    project.fab("deploy")
    project.set_version("1.1.0")

    result, _, window = under_load(host, lambda: project.fab("deploy"))

    load.assert_no_failed_request(result)
    assert_each_thread_flipped_once(result, "1.0.0", "1.1.0", window[1])
    counts = result.version_counts()
    assert counts.get("1.0.0", 0) >= WARM_UP and counts.get("1.1.0", 0) >= THREADS, result.summary()
    print(result.summary())


def test_release_that_cannot_start_never_takes_traffic_under_load(project, host):
    project.fab("deploy")
    good = current_of(project)
    project.configure(health_timeout=5)  # bounds how long the gate waits for the dead release
    break_at_import(project)
    project.set_version("1.1.0")

    result, deploy, _ = under_load(host, lambda: project.fab("deploy", check=False))

    assert deploy.returncode != 0, deploy.stdout
    assert not result.failures, result.summary()
    assert result.version_counts() == {"1.0.0": result.total}, result.summary()
    assert all(flips(result.versions(n)) == 0 for n in range(THREADS))
    assert current_of(project) == good
    print(result.summary())


def test_rollback_under_load_drops_nothing_and_flips_once(project, host):
    project.fab("deploy")
    first = current_of(project)
    project.set_version("2.0.0")
    project.fab("deploy")
    assert served_version(host.url) == "2.0.0"

    result, _, window = under_load(host, lambda: project.fab("rollback"))

    load.assert_no_failed_request(result)
    assert_each_thread_flipped_once(result, "2.0.0", "1.0.0", window[1])
    assert current_of(project) == first
    print(result.summary())


def test_release_failing_only_behind_nginx_costs_users_nothing(project, host):
    """Caught through nginx's preview before the switch, it never answers a real visitor."""
    project.fab("deploy")
    break_behind_nginx(project)
    project.set_version("1.1.0")

    result, deploy, window = under_load(host, lambda: project.fab("deploy", check=False))

    assert deploy.returncode != 0, deploy.stdout
    print(result.summary(3))
    load.assert_no_failed_request(result)


def test_switch_keeps_idle_keepalive_connections_open(project, host):
    """A keep-alive connection opened before a deploy still works after it, on the new release."""
    project.fab("deploy")
    conn = http.client.HTTPConnection("127.0.0.1", host.http_port, timeout=10)
    try:
        conn.request("GET", "/about")
        before = conn.getresponse()
        assert version_of(before.read()) == "1.0.0"
        assert not before.will_close, "nginx should keep the connection alive"
        project.set_version("1.1.0")
        project.fab("deploy")
        # The same connection, idle through the whole deploy.
        conn.request("GET", "/about")
        after = conn.getresponse()
        assert (after.status, version_of(after.read())) == (200, "1.1.0")
    finally:
        conn.close()
