"""Issue 3: a release that fails its health checks never replaces the one that serves.

Three broken variants of the example app, each deployed over a good 1.0.0:
one that cannot be imported, one whose health path answers 500, and one that
is healthy on its own socket but answers 500 once nginx is in front of it
(the last one three times: caught by nginx's preview before the switch, the
same with a reload that takes effect late, and over TCP, where there is no
preview, caught after the switch and switched back). Each deploy must fail loudly with the app's own error, leave
the host as it was (current, the version served, no lock), mark the release
FAILED so that nothing picks it again, and say so in the audit log.

A reload of nginx is over only when no new connection can meet the
configuration from before it (nginx lets its old workers accept for about
100 ms after the new ones start): shown against nginx's plain reload.
"""
import hashlib
import http.client
import json
import re
import shlex
import time
import urllib.parse
from pathlib import Path

import pytest

from fabric import Connection

from fabdeploy.ops import Phase, Reload
from fabdeploy.remote import Host
from fabdeploy.settings import resolve
from harness.local_host import free_port_pair
from load import served_version

pytestmark = pytest.mark.host

APP = "guestbook"
EXAMPLE = Path(__file__).resolve().parent.parent / "example"
AUDIT_FIELDS = {"event", "who", "when", "release", "sha256"}
# A traceback frame of fabdeploy itself, or of the fab CLI around it. ".fabdeploy/"
# (the state directory) does not match: it is preceded by a dot, not a slash.
OWN_FRAME = re.compile(r'File "[^"]*/(fabdeploy|invoke|fabric)/')


# -- reading the host ---------------------------------------------------------

def current_of(project) -> str:
    return (project.deploy_to / "current").readlink().name


def release_dir(project, name: str):
    return project.deploy_to / "releases" / name


def newest_release(project) -> str:
    return max(p.name for p in (project.deploy_to / "releases").iterdir())


def wheel_sha256(project, name: str) -> str:
    """The sha256 of the wheel that was uploaded into a release."""
    (wheel,) = release_dir(project, name).glob("*.whl")
    return hashlib.sha256(wheel.read_bytes()).hexdigest()


def audit_log(project) -> list[dict]:
    """Every line of the audit log, each of which must be one JSON object."""
    text = (project.deploy_to / ".fabdeploy" / "audit.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines()]


def release_row(project, name: str) -> str:
    """The line `fab releases` prints for one release."""
    table = project.fab("releases").stdout.splitlines()
    return next(line for line in table if name in line)


# -- checks shared by the tests -------------------------------------------------

def assert_audited(project, event: str, release: str, lines: int) -> None:
    """The log has `lines` events, the last `event` for `release` with its wheel's sha256."""
    entries = audit_log(project)
    assert len(entries) == lines, entries
    for entry in entries:
        assert AUDIT_FIELDS <= entry.keys(), entry
    last = entries[-1]
    assert (last["event"], last["release"]) == (event, release), entries
    assert last["sha256"] == wheel_sha256(project, release)
    assert last["who"] and last["when"]


def deploy_good(project, host) -> str:
    """Deploy the example as it is (1.0.0): the release a broken one must not replace."""
    project.fab("deploy")
    good = current_of(project)
    assert served_version(host.url) == "1.0.0"
    assert_audited(project, "deploy", good, lines=1)
    return good


def deploy_broken(project):
    """Deploy the edited project as 1.1.0; it must fail, without a traceback of our own."""
    project.set_version("1.1.0")
    result = project.fab("deploy", check=False)
    assert result.returncode != 0, result.stdout
    frames = [line for line in result.stderr.splitlines() if OWN_FRAME.search(line)]
    assert not frames, result.stderr
    return result


def assert_host_unchanged(project, host, good: str) -> str:
    """The good release still serves, untouched; the new one is marked FAILED. Returns its name."""
    assert current_of(project) == good
    assert served_version(host.url) == "1.0.0"
    assert served_version(host.url, "/") == "1.0.0"
    assert not (project.deploy_to / ".fabdeploy" / "lock").exists()
    failed = newest_release(project)
    assert failed != good
    assert (release_dir(project, failed) / "FAILED").is_file()
    assert_audited(project, "failed", failed, lines=2)
    row = release_row(project, failed)
    assert "failed" in row.split() and not row.startswith("*"), row
    return failed


def assert_never_a_rollback_target(project, good: str, failed: str) -> None:
    """With one good release, rollback refuses, and refuses the failed one by name."""
    result = project.fab("rollback", check=False)
    assert result.returncode != 0
    assert "nothing to roll back to" in result.stderr
    named = project.fab("rollback", "--release", failed, check=False)
    assert named.returncode != 0
    assert failed in named.stderr and "not a good release" in named.stderr
    assert current_of(project) == good
    assert not (project.deploy_to / ".fabdeploy" / "lock").exists()


# -- making broken apps ------------------------------------------------------------

INDEX = "    def index():\n"


def edit_app(project, old: str, new: str) -> None:
    """Replace one exact piece of the app's code, which must be there."""
    app = project.path / APP / "__init__.py"
    text = app.read_text()
    assert text.count(old) == 1, f"{old!r} is not in the app once"
    app.write_text(text.replace(old, new))


def break_at_import(project) -> None:
    """The app's package raises while gunicorn imports it."""
    app = project.path / APP / "__init__.py"
    app.write_text(app.read_text() + '\nraise RuntimeError("boom at import")\n')


def break_health_path(project) -> None:
    """The app imports and serves, but its health path (/) answers 500."""
    edit_app(project, INDEX, INDEX + '        return "broken\\n", 500\n')


def break_behind_nginx(project) -> None:
    """Healthy on its own socket (no proxy headers); 500 once nginx adds X-Forwarded-For."""
    edit_app(project, INDEX, INDEX + '        if request.headers.get("X-Forwarded-For"):\n'
                                     '            return "broken behind nginx\\n", 500\n')


# -- the tests ---------------------------------------------------------------------

def test_app_that_fails_to_import_is_refused_with_its_own_error(project, host):
    good = deploy_good(project, host)
    break_at_import(project)

    result = deploy_broken(project)

    assert "RuntimeError: boom at import" in result.stderr
    failed = assert_host_unchanged(project, host, good)
    assert_never_a_rollback_target(project, good, failed)


def test_app_whose_health_path_answers_500_is_refused(project, host):
    good = deploy_good(project, host)
    project.configure(health_timeout=5)  # 500 is an answer: the check waits all of it
    break_health_path(project)

    result = deploy_broken(project)

    failed = newest_release(project)
    assert f"release {failed} is unhealthy" in result.stderr
    assert "500" in result.stderr
    assert_host_unchanged(project, host, good)
    assert_never_a_rollback_target(project, good, failed)


def test_app_failing_only_behind_nginx_is_refused_before_the_switch(project, host):
    good = deploy_good(project, host)
    break_behind_nginx(project)

    result = deploy_broken(project)

    failed = newest_release(project)
    assert (f"release {failed} failed its check through nginx before the switch: "
            "the release answered 500") in result.stderr
    assert "nothing was switched" in result.stderr
    # It was caught through nginx's preview: the live link never moved, so there was
    # nothing to switch back.
    assert "switched back" not in result.stdout + result.stderr
    assert_host_unchanged(project, host, good)


def test_over_tcp_an_app_failing_only_behind_nginx_is_switched_back(project, host):
    """gunicorn.bind on TCP: the site names the release, so there is no preview; the check
    after the switch catches it and switches back."""
    project.configure(gunicorn={"bind": f"127.0.0.1:{free_port_pair()}"})
    good = deploy_good(project, host)
    break_behind_nginx(project)

    result = deploy_broken(project)

    assert "health check through nginx failed" in result.stderr
    assert f"switched back to {good}" in result.stdout + result.stderr
    assert_host_unchanged(project, host, good)


class SlowReload:
    """A reload command that returns at once and reloads nginx `delay` seconds later.

    `nginx -s reload` and Debian's `systemctl reload nginx` only signal the
    master: both return before the new config serves (about 80 ms here, more
    on a busy server). A longer delay makes that race certain instead of rare.
    """

    def __init__(self, project, host, delay: float):
        self.log = project.deploy_to.parent / "slow-reloads.log"  # under ~/srv: the teardown removes it
        log = shlex.quote(str(self.log))
        reload = host.settings(APP)["proxy"]["reload_command"]
        later = f"sleep {delay}; {reload}; echo done >> {log}"
        # Counted before it returns; a brace group, so `&` backgrounds only the
        # delayed part and not the whole && chain fabdeploy puts before it.
        command = f"{{ echo asked >> {log}; sh -c {shlex.quote(later)} </dev/null >/dev/null 2>&1 & }}"
        project.configure(proxy={"reload_command": command})

    @property
    def asked(self) -> int:
        return self._counts()["asked"]

    def settle(self, timeout: float = 15) -> None:
        """Wait until every reload asked for has happened."""
        deadline = time.monotonic() + timeout
        while (counts := self._counts())["asked"] != counts["done"]:
            assert time.monotonic() < deadline, f"reloads still pending: {counts}"
            time.sleep(0.05)

    def _counts(self) -> dict:
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        return {"asked": lines.count("asked"), "done": lines.count("done")}


def load_stale_site(host, text: str) -> None:
    """Make nginx serve `text` with 200 for every request on the host's port, from memory only.

    As a site left from before (or a wiped deploy) would: its file is gone
    again, but nginx answers with it until the next reload. It would fool any
    check that took a 200 on that port for the new release.
    """
    site = write_site(host, text)
    fabdeploy_reload(host)
    site.unlink()
    assert fresh_answers(host.url, 5) == [text] * 5


def fabdeploy_reload(host) -> None:
    """nginx reloaded as a deploy reloads it: the host's agent runs the reload and waits it out."""
    proxy = resolve(host.settings(APP), EXAMPLE).proxy
    conn = Connection(host.host_string, connect_kwargs={"key_filename": str(host.key_file)})
    target = Host(conn, str(host.known_hosts))
    try:
        target.connect()
        reply = target.execute([Phase("reload", (Reload(proxy.reload_command, proxy.pid_file),))])
    finally:
        target.close()
    assert reply.ok, reply.error


def write_site(host, text: str):
    """A site file that answers every request on the host's port with 200 and `text`."""
    site = host.site_dir / f"{APP}.conf"
    site.write_text(f'server {{ listen {host.http_port}; location / {{ return 200 "{text}"; }} }}\n')
    return site


def fresh_answers(url: str, count: int) -> list[str]:
    """The bodies of `count` GETs of /, each on a new connection."""
    parts = urllib.parse.urlsplit(url)
    bodies = []
    for _ in range(count):
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=5)
        try:
            conn.request("GET", "/")
            bodies.append(conn.getresponse().read().decode())
        finally:
            conn.close()
    return bodies


def test_a_reload_is_over_only_when_no_connection_can_meet_the_old_site(project, host):
    """After a reload, nginx's old workers accept connections for about 100 ms more.

    Its master starts the new workers and only then tells the old ones to
    quit. fabdeploy's reload returns once every old worker has stopped
    accepting; nginx's own reload command returns before the new ones even
    exist (the control, which must see the old site at least once).
    """
    plain = resolve(host.settings(APP), EXAMPLE).proxy.reload_command
    stale_after_plain = 0
    for n in range(5):
        for ours in (False, True):
            load_stale_site(host, "old")
            site = write_site(host, f"new{n}")
            fabdeploy_reload(host) if ours else host.run_as_user(plain)
            answers = fresh_answers(host.url, 40)
            if not ours:
                stale_after_plain += answers.count("old")
                settle = time.monotonic() + 10
                while "old" in fresh_answers(host.url, 20):  # before the next round starts
                    assert time.monotonic() < settle, "nginx kept its old workers"
            else:
                assert answers == [f"new{n}"] * 40, f"round {n}: {answers}"
            site.unlink()
    assert stale_after_plain > 0


def test_check_through_nginx_is_not_fooled_by_a_slow_reload(project, host):
    """The check through nginx must judge the new release, not the old config still serving.

    nginx starts with a stale site in memory that answers 200 to everything on
    the port, and the site's reload lands a second after its command returns.
    """
    load_stale_site(host, "stale")
    reloads = SlowReload(project, host, delay=1.0)
    try:
        good = deploy_good(project, host)
        # Every new connection, from the moment the deploy returns, meets the new site.
        assert [served_version(host.url) for _ in range(20)] == ["1.0.0"] * 20
        break_behind_nginx(project)
        result = deploy_broken(project)
    finally:
        reloads.settle()  # so that no delayed reload lands in a later test

    # Only the first deploy reloads (it installs the site, and its check must wait out the
    # late reload); switches rename shared/run/live.sock instead.
    assert reloads.asked == 1
    assert "failed its check through nginx before the switch" in result.stderr
    assert_host_unchanged(project, host, good)
