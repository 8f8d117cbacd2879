"""Issue 18's pure parts as tables: mod_wsgi's files and build, Apache's provisioning decisions."""
import subprocess
from pathlib import Path

import pytest

from fabdeploy import phases as ph
from fabdeploy import plan, provisioning, render, servers, wheelhouse
from fabdeploy.errors import DeployError
from fabdeploy.layout import Layout
from fabdeploy.model import Bind, HostFacts
from fabdeploy.ops import Sh, Trash
from fabdeploy.settings import resolve

EXAMPLE = Path(__file__).resolve().parent.parent / "example"
ROOT = "/srv/guestbook"
LAYOUT = Layout(ROOT)
SOCKET = Bind.unix(f"{ROOT}/shared/run/R1.sock")


def settings(**given):
    return resolve(given, EXAMPLE)


def mod_wsgi(**server):
    return settings(server={"kind": "mod_wsgi", **server})


# -- the release's files ---------------------------------------------------------------------

@pytest.mark.parametrize("wsgi, line", [
    ("guestbook:create_app()", "application = getattr(import_module('guestbook'), 'create_app')()"),
    ("wsgi:app", "application = getattr(import_module('wsgi'), 'app')"),
    ("hello.web", "application = getattr(import_module('hello.web'), 'application')"),
])
def test_app_wsgi_names_the_application_from_fabdeploy_wsgi(wsgi, line):
    text = servers.wsgi_script(settings(wsgi=wsgi, server={"kind": "mod_wsgi"}), "R1")
    assert line in text.splitlines()
    compile(text, "app.wsgi", "exec")


def bash_syntax_ok(script: str) -> bool:
    return subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_over_a_unix_socket_apache_gets_a_free_port_and_systemds_relay_the_socket():
    script = servers.serve_script(mod_wsgi(workers=3, threads=8), LAYOUT, "R1", SOCKET)
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash" and bash_syntax_ok(script)
    # The app is imported before anything listens: a release that cannot import never starts.
    check = lines.index(f"{ROOT}/releases/R1/venv/bin/python {ROOT}/releases/R1/app.wsgi || exit 1")
    express = next(n for n, line in enumerate(lines) if "mod_wsgi-express start-server" in line)
    assert check < express
    for needle in (f"--server-root {ROOT}/shared/run/R1.apache", '--host 127.0.0.1 --port "$port"',
                   "--processes 3 --threads 8", "--log-to-terminal", "--request-timeout 30",
                   "--shutdown-timeout 20", "--disable-reloading"):
        assert needle in lines[express], (needle, lines[express])
    relay = next(line for line in lines if line.startswith("systemd-socket-activate"))
    assert relay.startswith(f"systemd-socket-activate --listen={SOCKET.path} /lib/systemd/systemd-socket-proxyd")
    assert relay.endswith('"127.0.0.1:$port" &')
    assert f"chmod 0660 {SOCKET.path}" in lines
    # systemd's TERM and HUP become Apache's graceful stop and the daemons' graceful restart.
    assert "trap stop TERM INT" in lines and 'kill -WINCH "$server"' in script
    assert 'pkill -INT -P "$server" -f "^[(]wsgi:"' in script


def test_on_a_tcp_bind_apache_listens_there_itself():
    script = servers.serve_script(mod_wsgi(), LAYOUT, "R1", Bind.tcp("127.0.0.1", 8001))
    assert "--host 127.0.0.1 --port 8001 --processes 2 " in script and bash_syntax_ok(script)
    assert "--threads" not in script  # mod_wsgi-express's own default, 5 per process
    assert "systemd-socket-activate" not in script and "port=$(" not in script


def test_a_stop_or_a_crash_ends_the_script_with_the_right_status(tmp_path):
    """The signal handling of the script body, with `sleep` standing in for Apache."""
    body = servers.SIGNALS + '\nsleep 30 &\nserver=$!\nwhile kill -0 "$server" 2>/dev/null; do wait -n; done\n' \
                             'kill -WINCH "$server" 2>/dev/null; wait\n[ -n "$stopping" ]\n'
    script = tmp_path / "serve"
    script.write_text("#!/bin/bash\n" + body.replace("kill -WINCH", "kill -TERM"))
    script.chmod(0o755)
    proc = subprocess.Popen([str(script)])
    try:
        proc.wait(0.5)
    except subprocess.TimeoutExpired:
        pass
    proc.terminate()
    assert proc.wait(10) == 0  # asked to stop: a clean exit, nothing for systemd to restart
    crash = tmp_path / "crash"
    crash.write_text("#!/bin/bash\n" + body.replace("sleep 30", "sleep 0.1"))
    crash.chmod(0o755)
    assert subprocess.run([str(crash)], timeout=10).returncode == 1  # Apache died: restart it


def test_each_server_writes_its_own_file_beside_serve():
    t = ph.Target(None, mod_wsgi(), release="R2", facts=HostFacts(root=ROOT, user="deploy", uid=1000),
                  layout=LAYOUT)
    paths = [op.path for op in ph.server_files(t, "R2", SOCKET)]
    assert paths == [f"{ROOT}/releases/R2/app.wsgi", f"{ROOT}/releases/R2/serve", f"{ROOT}/releases/R2/BIND"]


def test_cleanup_takes_each_releases_apache_root_with_it():
    trash = plan.remove_releases(mod_wsgi(), LAYOUT, ["R1"], "systemd")[-1]
    assert isinstance(trash, Trash)
    assert trash.releases == (f"{ROOT}/releases/R1", f"{ROOT}/shared/run/R1.apache")


# -- the wheelhouse: shipped as an sdist, built on the server once ---------------------------

@pytest.mark.parametrize("packages, binary, source", [
    (["mod_wsgi"], [], ["mod_wsgi"]),
    (["mod-wsgi==6.1.1", "psycopg[binary]"], ["psycopg[binary]"], ["mod-wsgi==6.1.1"]),
    (["gunicorn"], ["gunicorn"], []),
])
def test_what_ships_no_wheel_is_fetched_as_an_sdist(packages, binary, source):
    assert wheelhouse.built_here(packages) == (binary, source)


def host(python="3.11", machine="x86_64", house=()):
    return HostFacts(root=ROOT, user="deploy", uid=1000, python=python, machine=machine,
                     wheelhouse=frozenset(house))


BUILT = "mod_wsgi-6.1.1-cp311-cp311-linux_x86_64.whl"


@pytest.mark.parametrize("facts, unbuilt", [
    (host(), ["mod_wsgi-6.1.1.tar.gz"]),                       # a fresh host builds it
    (host(house=[BUILT]), []),                                 # later deploys reuse it
    (host(python="3.12", house=[BUILT]), ["mod_wsgi-6.1.1.tar.gz"]),   # its Python changed
    (host(machine="aarch64", house=[BUILT]), ["mod_wsgi-6.1.1.tar.gz"]),
    (host(house=["mod_wsgi-6.1.0-cp311-cp311-linux_x86_64.whl"]), ["mod_wsgi-6.1.1.tar.gz"]),  # a new version
])
def test_the_server_builds_an_sdist_only_where_it_has_no_wheel_of_it(facts, unbuilt):
    shipped = [Path("/w/mod_wsgi-6.1.1.tar.gz"), Path("/w/setuptools-80.0.0-py3-none-any.whl")]
    assert [p.name for p in wheelhouse.unbuilt(shipped, facts)] == unbuilt


def test_the_build_uses_the_shipped_pip_offline_and_keeps_only_a_whole_wheel():
    house = f"{ROOT}/shared/wheelhouse"
    op = plan.build_wheels("python3", f"{house}/pip-26.0-py3-none-any.whl", house, [f"{house}/mod_wsgi-6.1.1.tar.gz"])
    assert isinstance(op, Sh) and op.what == "building mod_wsgi on the server (once)"
    assert f"python3 {house}/pip-26.0-py3-none-any.whl/pip wheel" in op.cmd
    assert f"--no-index --find-links {house} --no-deps --wheel-dir \"$d\"" in op.cmd
    assert op.cmd.startswith(f"d=$(mktemp -d {house}/.build-XXXXXX) && ")
    assert f'mv "$d"/*.whl {house}/' in op.cmd and 'rm -rf "$d"' in op.cmd
    assert "provision" in op.hint


# -- Apache in provision -------------------------------------------------------------------------

def root_facts(listeners=(), **web) -> provisioning.RootFacts:
    return provisioning.RootFacts(user_exists=False, home="", sudo_rules=(), groups=(), sudoers_files={},
                                  main_sudoers_lines=(), ipv6=True, systemd=True,
                                  listeners=tuple(listeners), web=web)


def server(sites, enabled=True, active=True):
    return {"enabled": enabled, "active": active, "sites": list(sites)}


STOCK_NGINX = server(["default"])
STOCK_APACHE = server(["000-default.conf"], enabled=False, active=False)
APACHE = {"proxy": {"kind": "apache"}}


@pytest.mark.parametrize("given, facts, steps", [
    # The image's nginx: enabled on port 80 with its stock site only: stopped and disabled.
    (APACHE, root_facts([(80, "nginx")], nginx=STOCK_NGINX, apache2=STOCK_APACHE),
     ["nginx stopped and disabled (it served only its stock site)"]),
    # Enabled but stopped: it would take the port at the next boot.
    (APACHE, root_facts([], nginx=server(["default"], active=False)),
     ["nginx stopped and disabled (it served only its stock site)"]),
    # Nothing in the way: nothing to do.
    (APACHE, root_facts([(80, "apache2")], nginx=server([], enabled=False, active=False), apache2=STOCK_APACHE),
     []),
    # The app's own old nginx site goes first, and then nginx serves nobody's.
    (APACHE, root_facts([(80, "nginx")], nginx=server(["default", "guestbook.conf"])),
     ["nginx's site for guestbook removed", "nginx stopped and disabled (it served only its stock site)"]),
    # Another site on a port the proxy does not use: left alone.
    ({"proxy": {"kind": "apache", "listen": 8080}}, root_facts([(80, "nginx")], nginx=server(["shop.conf"])), []),
    # nginx in front, an Apache that is installed but off: left alone.
    ({}, root_facts([(80, "nginx")], nginx=STOCK_NGINX, apache2=STOCK_APACHE), []),
    # nginx in front, an Ubuntu-style Apache holding port 80 with its stock site.
    ({}, root_facts([(80, "apache2")], nginx=server([], active=False), apache2=server(["000-default.conf"])),
     ["apache2 stopped and disabled (it served only its stock site)"]),
])
def test_another_web_server_serving_only_its_stock_site_makes_way(given, facts, steps):
    assert [step.name for step in provisioning.other_web_server(settings(**given), facts)] == steps


@pytest.mark.parametrize("facts, message", [
    (root_facts([(80, "nginx")], nginx=server(["default", "shop.conf"])),
     "port 80 is taken by nginx, which serves other sites (shop.conf)"),
    (root_facts([(80, "caddy")]), "port 80 is taken by caddy"),
])
def test_a_port_held_by_someone_elses_site_is_refused_by_name(facts, message):
    with pytest.raises(DeployError) as err:
        provisioning.other_web_server(settings(**APACHE), facts)
    assert err.value.what == message


def test_ss_output_says_who_holds_which_port():
    ss = ('LISTEN 0 511 0.0.0.0:80 0.0.0.0:* users:(("nginx",pid=9,fd=5),("nginx",pid=8,fd=5))\n'
          'LISTEN 0 511 [::]:80 [::]:* users:(("nginx",pid=9,fd=6))\n'
          'LISTEN 0 128 *:22 *:* users:(("sshd",pid=1,fd=3))\n')
    assert provisioning.listeners(ss) == [(22, "sshd"), (80, "nginx")]


@pytest.mark.parametrize("given, names", [
    (APACHE, ["Apache modules proxy proxy_http proxy_balancer lbmethod_byrequests headers slotmem_shm",
              "Apache's stock site 000-default off"]),
    # With names of its own the site answers for them: the stock site may stay for the rest.
    ({"proxy": {"kind": "apache", "server_name": "guestbook.example"}},
     ["Apache modules proxy proxy_http proxy_balancer lbmethod_byrequests headers slotmem_shm"]),
])
def test_apache_gets_its_modules_and_loses_its_stock_site_where_it_would_answer_first(given, names):
    assert [step.name for step in provisioning.apache_steps(settings(**given))] == names


def test_apaches_steps_come_before_its_site_which_may_start_it():
    s = settings(**APACHE)
    steps = provisioning.proxy_steps(s, "deploy", ROOT, root_facts([(80, "nginx")], nginx=STOCK_NGINX))
    names = [step.name for step in steps]
    site = names.index("site /etc/apache2/sites-enabled/guestbook.conf")
    assert names.index("nginx stopped and disabled (it served only its stock site)") < site
    assert names.index("Apache's stock site 000-default off") < site
    assert steps[site].op.after == "systemctl reload-or-restart apache2"
    assert names[-1] == "apache2 enabled and running"


@pytest.mark.parametrize("listen, lines", [
    (80, []),  # Debian's ports.conf listens there
    ([80, 443], []),  # and on 443 with mod_ssl
    ([80, 8080], ["Listen 8080"]),
    (["127.0.0.1:8081"], ["Listen 127.0.0.1:8081"]),
])
def test_a_provisioned_apache_site_listens_on_its_other_ports_once(listen, lines):
    s = settings(proxy={"kind": "apache", "listen": listen})
    site = render.proxy_site(s, provisioning.site_shape(s, LAYOUT, ipv6=True))
    assert [line.strip() for line in site.splitlines() if line.strip().startswith("Listen")] == lines
    if lines:  # a second app's site on the same port says it again, guarded: Apache sees one
        assert "<IfDefine !fabdeploy_listen_" in site and "Define fabdeploy_listen_" in site
    # The deploy user's own Apache (a throwaway host) lists its ports itself.
    local = render.proxy_site(s, render.SiteShape(release="R1", active=SOCKET))
    assert "Listen" not in local


# -- TCP binds: the warm standby holds the port the next release takes ---------------------------

def tcp_target(release, current, releases):
    facts = HostFacts.parse({"root": ROOT, "user": "deploy", "uid": 1000, "current": current,
                             "releases": [{"name": n, "state": "ready", "bind": b} for n, b in releases]})
    t = ph.Target(None, mod_wsgi(bind="127.0.0.1:8000", manager="systemd"), release=release, facts=facts,
                  layout=LAYOUT)
    t.bind = ph.choose_bind(t, release)
    return t


@pytest.mark.parametrize("release, current, releases, stopped", [
    # The third deploy: R1, the standby, holds 8000, which R3 takes.
    ("R3", "R2", [("R1", "127.0.0.1:8000"), ("R2", "127.0.0.1:8001")], ["R1"]),
    # The second: nothing else on 8001.
    ("R2", "R1", [("R1", "127.0.0.1:8000")], []),
    # A rollback to the standby itself: it keeps running where it is.
    ("R1", "R2", [("R1", "127.0.0.1:8000"), ("R2", "127.0.0.1:8001")], []),
    # A rollback past it: the standby makes way for the older release.
    ("R0", "R2", [("R0", "127.0.0.1:8001"), ("R1", "127.0.0.1:8000"), ("R2", "127.0.0.1:8001")], ["R1"]),
])
def test_a_release_on_tcp_first_stops_the_standby_on_its_port(release, current, releases, stopped):
    ops = ph.start(tcp_target(release, current, releases))
    assert [op.argv[1] for op in ops[:-2]] == stopped and all(op.argv[0] == "stop" for op in ops[:-2])
