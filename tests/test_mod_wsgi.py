"""server.kind mod_wsgi (issue 18) behind nginx, on a host that provision alone set up.

One Debian 12 nspawn host, fresh as a new VPS and offline, gets `fab -H root@host
provision` with server.kind mod_wsgi, which installs what building mod_wsgi takes (a
compiler, Apache's headers). The first deploy ships mod_wsgi's sdist in the wheelhouse and
builds its wheel on the host, once; every release then runs mod_wsgi-express's own Apache,
relayed to the release's unix socket, behind nginx's live link. Tests run in file order
and build on each other's state (each docstring says what it starts from).
"""
import json
import os
import re
import urllib.request

import pytest

import load
from harness.fleet import module_fleet
from harness.project import Project

pytestmark = [
    pytest.mark.nspawn,
    pytest.mark.skipif(os.geteuid() != 0, reason="systemd-nspawn hosts need root"),
]

APP = "guestbook"
ROOT = f"/srv/{APP}"
HOUSE = f"{ROOT}/shared/wheelhouse"
THREADS, WARM_UP, AFTER = 4, 100, 0.5
MAX_REQUESTS, MAX_SECONDS = 400_000, 120


host = module_fleet(1, "mod_wsgi", fixture="host")


@pytest.fixture(scope="module")
def project(host, tmp_path_factory):
    """The example app with server.kind mod_wsgi, on the host provision set up for it."""
    project = Project(tmp_path_factory.mktemp("project") / APP, host, app=APP)
    project.configure(server={"kind": "mod_wsgi"})
    project.provision_output = host.provision(project).stdout
    return project


def the(fleet):
    return fleet.hosts[0]


def about(fleet, headers=None, stamp=APP) -> dict:
    """GET /about through nginx on port 80, on a new connection: our site must answer."""
    request = urllib.request.Request(the(fleet).url("/about"), headers=headers or {})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=10) as response:
        assert response.headers["X-Fabdeploy-Site"] == stamp
        return json.loads(response.read())


def current(fleet) -> str:
    return the(fleet).run(f"readlink {ROOT}/current").stdout.strip().rsplit("/", 1)[-1]


def unit_processes(fleet, release: str) -> list[tuple[str, str, str]]:
    """(user, pid, command line) of every process in the release's unit."""
    rows = the(fleet).run("ps -e -o unit=,user=,pid=,args=").stdout.splitlines()
    unit = f"{APP}@{release}.service"
    return [tuple(row.split(None, 3)[1:]) for row in rows if row.split(None, 1)[0] == unit]


def commands(fleet, release: str) -> list[str]:
    return [command for _, _, command in unit_processes(fleet, release)]


def daemon_pids(fleet, release: str) -> set[str]:
    """The mod_wsgi daemon processes that run the app."""
    return {pid for _, pid, command in unit_processes(fleet, release) if command.startswith("(wsgi:")}


def built_wheels(fleet) -> list[str]:
    """mod_wsgi's wheels in the host's wheelhouse, with their inode: built there, never shipped."""
    return the(fleet).run(f"ls -i {HOUSE} | grep -i 'mod_wsgi-.*-cp3.*linux.*\\.whl' || true").stdout.split("\n")


def under_load(fleet, action):
    return load.under_load(the(fleet).url("/"), action, THREADS, WARM_UP, AFTER, MAX_REQUESTS, MAX_SECONDS)


def test_provision_installs_the_build_tools_and_the_first_deploy_builds_mod_wsgi_there(host, project):
    """A fresh host: provision, then the first deploy, offline."""
    packages = "packages nginx python3 python3-venv sudo apache2-bin apache2-dev gcc python3-dev media-types procps"
    assert f"] unchanged  {packages}" in project.provision_output  # the image has them all
    result = project.fab("deploy")
    release = current(host)
    assert about(host)["release"] == release and about(host)["version"] == "1.0.0"
    # Shipped as an sdist, built on the host for its Python into its wheelhouse, and kept.
    listing = the(host).run(f"ls {HOUSE}").stdout.split()
    assert any(re.fullmatch(r"mod_wsgi-[\d.]+\.tar\.gz", name) for name in listing), listing
    assert len([line for line in built_wheels(host) if line]) == 1, listing
    assert not [name for name in listing if name.startswith(".build-")]
    assert f"deployed {release}" in result.stdout


def test_the_release_runs_mod_wsgi_express_apache_not_gunicorn(host, project):
    """From 1.0.0: the unit's processes, all the deploy user's."""
    release = current(host)
    processes = unit_processes(host, release)
    assert {user for user, _, _ in processes} == {"deploy"}, processes
    running = commands(host, release)
    conf = f"-f {ROOT}/shared/run/{release}.apache/httpd.conf"
    assert any(c.startswith("apache2 (mod_wsgi-express)") and conf in c for c in running), running
    # server.workers (2) daemon processes run the app, and the socket proxy relays the release's socket.
    assert len([c for c in running if c.startswith("(wsgi:")]) == 2, running
    assert any("systemd-socket-proxyd" in c or "systemd-socket-activate" in c for c in running), running
    assert not [c for c in running if "gunicorn" in c], running
    socket = f"{ROOT}/shared/run/{release}.sock"
    assert the(host).run(f"stat -c %a:%G {socket}").stdout.strip() == f"660:fd-{APP}"
    # mod_wsgi-express's Apache listens on loopback only: nginx and sshd face the network.
    listeners = the(host).run("ss -ltnpH").stdout
    for line in listeners.splitlines():
        if "apache2" in line:
            assert line.split()[3].startswith("127.0.0.1:"), listeners
    assert "apache2.service" not in the(host).run("systemctl list-units --state=active --plain").stdout


def test_proxyfix_sees_the_client_as_nginx_reports_it(host, project):
    """From 1.0.0: the test machine asks, once plainly and once with forged headers."""
    gateway = the(host).gateway
    assert (about(host)["remote_addr"], about(host)["scheme"]) == (gateway, "http")
    forged = about(host, {"X-Forwarded-For": "6.6.6.6", "X-Forwarded-Proto": "https"})
    # nginx appends the peer it saw, which ProxyFix (x_for=1) takes; the scheme is nginx's own.
    assert (forged["remote_addr"], forged["scheme"]) == (gateway, "http"), forged


def test_a_redeploy_under_load_moves_every_connection_once_and_fails_no_request(host, project):
    """From 1.0.0: 1.1.0 under steady keep-alive load; mod_wsgi is not built again."""
    before = built_wheels(host)
    first = current(host)
    project.set_version("1.1.0", greeting="Greetings from 1.1.0")
    result, _, window = under_load(host, lambda: project.fab("deploy"))
    print(f"redeploy: {len(result.failures)} failed of {result.total}; deploy took "
          f"{window[1] - window[0]:.1f}s\n{result.summary(5)}")
    load.assert_no_failed_request(result)
    for n in range(THREADS):
        versions = result.versions(n)
        assert versions[0] == "1.0.0" and versions[-1] == "1.1.0", versions
        assert load.flips(versions) == 1, result.summary()
    assert current(host) != first and about(host)["version"] == "1.1.0"
    assert built_wheels(host) == before  # the same file: reused, not rebuilt
    # The release before keeps running as the warm standby.
    assert the(host).run(f"systemctl is-active {APP}@{first}.service").stdout.strip() == "active"


def test_a_reload_under_load_rereads_the_app_and_fails_no_request(host, project):
    """From 1.1.0: rotate-secret HUPs the unit; Apache restarts its daemons gracefully."""
    release = current(host)
    before = daemon_pids(host, release)
    result, _, _ = under_load(host, lambda: project.fab("rotate-secret"))
    print(f"reload: {len(result.failures)} failed of {result.total}\n{result.summary(5)}")
    load.assert_no_failed_request(result)
    after = daemon_pids(host, release)
    assert len(after) == 2 and not after & before, (before, after)  # new daemons read the new key


def test_a_release_that_cannot_import_is_refused_and_never_serves(host, project):
    """From 1.1.0: 1.2.0 raises at import; the load sees 1.1.0 only."""
    before = current(host)
    package = project.path / APP / "__init__.py"
    good = package.read_text()
    package.write_text(good + '\nraise RuntimeError("boom at import")\n')
    project.set_version("1.2.0")
    try:
        result, broken, _ = under_load(host, lambda: project.fab("deploy", check=False))
    finally:
        package.write_text(good)
    assert broken.returncode != 0
    newest = the(host).run(f"ls {ROOT}/releases").stdout.split()[-1]
    assert f"release {newest} cannot start: RuntimeError: boom at import" in broken.stderr, broken.stderr
    assert the(host).run(f"test -f {ROOT}/releases/{newest}/FAILED", check=False).returncode == 0
    assert current(host) == before
    assert not result.failures and result.version_counts() == {"1.1.0": result.total}, result.summary()
    # It never got as far as Apache: no server root was made for it.
    assert the(host).run(f"test -e {ROOT}/shared/run/{newest}.apache", check=False).returncode != 0


def test_rollback_goes_back_to_the_warm_release(host, project):
    """From 1.1.0 (1.0.0 warm): rollback, then the served version and release."""
    project.fab("rollback")
    info = about(host)
    assert info["version"] == "1.0.0" and info["release"] == current(host)
    running = commands(host, current(host))
    assert any(c.startswith("apache2 (mod_wsgi-express)") for c in running), running


def test_cleanup_takes_the_server_roots_with_their_releases(host, project):
    """From 1.0.0 current: deploys beyond keep_releases remove old releases and their Apache's root."""
    project.configure(server={"kind": "mod_wsgi"}, keep_releases=2)
    for version in ("1.3.0", "1.4.0"):
        project.set_version(version)
        project.fab("deploy")
    kept = set(the(host).run(f"ls {ROOT}/releases").stdout.split())
    roots = the(host).run(f"cd {ROOT}/shared/run && ls -d *.apache").stdout.split()
    assert {r[: -len(".apache")] for r in roots} <= kept, (roots, kept)
    assert about(host)["version"] == "1.4.0"


def test_on_a_tcp_bind_apache_listens_there_and_every_deploy_serves_its_own_code(host, project):
    """From 1.4.0 over the relay: server.bind 127.0.0.1:8300, provisioned again, three deploys.

    The releases take 8300 and 8301 in turn, so from the third deploy on the new release's
    port is the warm standby's, which makes way for it.
    """
    project.configure(server={"kind": "mod_wsgi", "bind": "127.0.0.1:8300"}, keep_releases=3)
    host.provision(project)
    for version, port in (("1.5.0", 8300), ("1.6.0", 8301), ("1.7.0", 8300)):
        project.set_version(version)
        project.fab("deploy")
        info = about(host, stamp=f"{APP}@{port}")
        assert (info["version"], info["release"]) == (version, current(host))
        running = commands(host, current(host))
        assert any(c.startswith("apache2 (mod_wsgi-express)") for c in running), running
        assert not any("systemd-socket" in c for c in running), running
    # The current release and its warm standby, each an Apache on its own port.
    held = the(host).run("ss -ltnpH '( sport = :8300 or sport = :8301 )'").stdout.splitlines()
    assert sorted(line.split()[3] for line in held if '"apache2"' in line) == ["127.0.0.1:8300", "127.0.0.1:8301"]
