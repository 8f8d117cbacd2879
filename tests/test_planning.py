"""Fast tests of the parts that decide, as tables: settings and facts in, operations and files out."""
import dataclasses
import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import pytest

from fabdeploy import onhost, plan, render, servers
from fabdeploy import phases as ph
from fabdeploy.errors import DeployError
from fabdeploy.layout import Layout, previous_release, release_name, releases_to_remove
from fabdeploy.model import Bind, HostFacts, Release, ReleaseState
from fabdeploy.ops import Facts, Health, Helper, Link, Rename, Sh, Site, Write
from fabdeploy.settings import resolve

EXAMPLE = Path(__file__).resolve().parent.parent / "example"
ROOT = "/srv/guestbook"


def settings(**given):
    return resolve(given, EXAMPLE)


# -- settings ---------------------------------------------------------------

def test_defaults_derive_from_pyproject():
    s = settings()
    assert (s.app, s.wsgi, s.deploy_to) == ("guestbook", "guestbook:create_app()", ROOT)
    assert s.proxy.site_path == "/etc/nginx/sites-enabled/guestbook.conf"
    assert (s.keep_releases, s.init_command, s.health_path) == (5, ("init-db",), "/")
    assert (s.server.kind, s.server.workers, s.server.worker_class) == ("gunicorn", 2, "sync")
    assert s.proxy.listen[0].nginx == "80" and s.proxy.server_name == ("_",)
    assert s.group == "fd-guestbook" and s.warnings == ()


def test_partial_nested_settings_keep_the_other_defaults():
    s = settings(proxy={"listen": 8080})
    assert s.proxy.listen[0].port == 8080
    assert s.proxy.test_command == "nginx -t" and s.proxy.kind == "nginx"


@pytest.mark.parametrize("given, named, suggestion", [
    ({"keep_release": 3}, "fabdeploy.keep_release", "keep_releases"),
    ({"proxy": {"lisen": 81}}, "fabdeploy.proxy.lisen", "proxy.listen"),
    ({"server": {"wokers": 3}}, "fabdeploy.server.wokers", "server.workers"),
    ({"flavour": 1}, "fabdeploy.flavour", None),
])
def test_unknown_key_is_named(given, named, suggestion):
    with pytest.raises(DeployError) as err:
        settings(**given)
    assert named in str(err.value)
    if suggestion:
        assert f"did you mean '{suggestion}'" in str(err.value)


@pytest.mark.parametrize("old, new, read", [
    ({"gunicorn": {"workers": 4}}, "'gunicorn.workers' is now 'server.workers'", lambda s: s.server.workers == 4),
    ({"server": "waitress"}, "'server: waitress' is now 'server.kind'", lambda s: s.server.kind == "waitress"),
    ({"proxy": "apache", "apache": {"listen": 8081}}, "'apache.listen' is now 'proxy.listen'",
     lambda s: s.proxy.kind == "apache" and s.proxy.listen[0].port == 8081),
    ({"nginx": {"server_name": "a.example"}}, "'nginx.server_name' is now 'proxy.server_name'",
     lambda s: s.proxy.server_name == ("a.example",)),
    ({"asgi": True}, "'asgi' is now 'server.asgi'", lambda s: s.server.worker_class == "uvicorn"),
    ({"proxy": "none", "direct": {"bind": "0.0.0.0:9000"}}, "'direct.bind' is now 'server.public_bind'",
     lambda s: s.server.public_bind.port == 9000),
    ({"gunicorn": {"group": "nginx"}}, "'gunicorn.group' is no longer used", lambda s: s.group == "fd-guestbook"),
])
def test_old_setting_names_still_work_and_name_their_new_key(old, new, read):
    s = settings(**old)
    assert any(new in line for line in s.warnings), s.warnings
    assert read(s)


def test_missing_pyproject_is_one_clear_error(tmp_path):
    with pytest.raises(DeployError, match="pyproject.toml"):
        resolve({}, tmp_path)
    (tmp_path / "pyproject.toml").write_text("[project\nname=")
    with pytest.raises(DeployError, match="does not parse"):
        resolve({}, tmp_path)


# Every key whose value reaches a shell, a unit or the proxy's site, and values that
# would inject into one of them: each is refused at load, naming its key.
BAD_VALUES = [
    ("app", {"app": "gb$(id>/tmp/x)"}),
    ("app", {"app": "Guestbook"}),
    ("app", {"app": "g b"}),
    ("deploy_to", {"deploy_to": "~/x$(id>/tmp/x)"}),
    ("deploy_to", {"deploy_to": "srv/app"}),
    ("deploy_to", {"deploy_to": "/srv/../etc"}),
    ("deploy_to", {"deploy_to": "/srv/app;rm -rf /"}),
    ("provision.user", {"provision": {"user": "d$(id)"}}),
    ("provision.user", {"provision": {"user": "root user"}}),
    ("proxy.server_name", {"proxy": {"server_name": "_; location /fs/ { alias /; autoindex on; } #"}}),
    ("proxy.server_name", {"proxy": {"server_name": "example.com\nlisten 81"}}),
    ("proxy.server_name", {"proxy": {"server_name": ["ok.example", "bad name"]}}),
    ("proxy.listen", {"proxy": {"listen": "80; include /etc/shadow"}}),
    ("proxy.listen", {"proxy": {"listen": "[::1]:80 default_server"}}),
    ("proxy.listen", {"proxy": {"listen": 70000}}),
    ("health_path", {"health_path": "/ HTTP/1.1\r\nHost: evil"}),
    ("health_path", {"health_path": "no-slash"}),
    ("health_path", {"health_path": "/a b"}),
    ("python", {"python": "python3; id"}),
    ("server.bind", {"server": {"bind": "0.0.0.0:8000"}}),
    ("server.bind", {"server": {"bind": "127.0.0.1:80;id"}}),
    ("server.public_bind", {"server": {"public_bind": "$(id):80"}}),
    ("server.workers", {"server": {"workers": "2; id"}}),
    ("server.timeout", {"server": {"timeout": -1}}),
    ("server.threads", {"server": {"kind": "mod_wsgi", "threads": 0}}),
    ("server.threads", {"server": {"kind": "mod_wsgi", "threads": "4; id"}}),
    ("server.threads", {"server": {"kind": "gunicorn", "threads": 4}}),  # mod_wsgi's only
    ("keep_releases", {"keep_releases": 1}),
    ("init_command", {"init_command": "init-db\nid"}),
    ("packages", {"packages": ["flask; id"]}),
    ("provision.packages", {"provision": {"packages": ["nginx && id"]}}),
    ("proxy.site_path", {"proxy": {"site_path": "/etc/nginx/$(id).conf"}}),
    ("proxy.pid_file", {"proxy": {"pid_file": "relative.pid"}}),
    # issue 14: the app's environment, its secrets' sources, migrations, one database for a fleet
    ("env.PORT", {"env": {"PORT": "8000"}}),
    ("env.bad name", {"env": {"bad name": "x"}}),
    ("env.FABDEPLOY_X", {"env": {"FABDEPLOY_X": "x"}}),
    ("env.DEBUG", {"env": {"DEBUG": True}}),
    ("env.LIST", {"env": {"LIST": [1, 2]}}),
    ("env", {"env": ["A=1"]}),
    ("secrets.TOKEN", {"secrets": {"TOKEN": "the-value-itself"}}),
    ("secrets.TOKEN", {"secrets": {"TOKEN": {"env": "A", "file": "b"}}}),
    ("secrets.TOKEN", {"secrets": {"TOKEN": {"vault": "x"}}}),
    ("secrets.TOKEN.env", {"secrets": {"TOKEN": {"env": "A B"}}}),
    ("secrets.TOKEN.command", {"secrets": {"TOKEN": {"command": "pass show\nid"}}}),
    ("secrets.TOKEN.file", {"secrets": {"TOKEN": {"file": ""}}}),
    ("secrets.A", {"env": {"A": "1"}, "secrets": {"A": {"env": "B"}}}),
    ("migrate_command", {"migrate_command": "db upgrade\nid"}),
    ("database", {"database": "remote"}),
    ("database", {"database": "local", "hosts": [{"host": "deploy@web1", "primary": True}]}),
    ("provision.database_clients", {"provision": {"database_clients": ["10.0.0.0/33"]}}),
    ("provision.database_clients", {"provision": {"database_clients": ["all; host all all 0/0 trust"]}}),
    ("hosts[deploy@web1].role", {"hosts": [{"host": "deploy@web1", "role": "cache"}]}),
    ("hosts[db1].primary", {"hosts": [{"host": "db1", "role": "database", "primary": True}]}),
    ("hosts[deploy@web2].primary", {"hosts": [{"host": "deploy@web1", "primary": True},
                                              {"host": "deploy@web2", "primary": True}]}),
    # issue 15 (more in tests/test_procs_planning.py)
    ("hooks.after_deploy[0].local", {"hooks": {"after_deploy": {"local": "a\nb"}}}),
    ("processes.worker", {"processes": {"worker": "celery worker; id"}}),
    ("processes.W", {"processes": {"W": "celery worker"}}),
    ("timers.t.on_calendar", {"timers": {"t": {"command": "x", "on_calendar": "daily\nExecStart=/bin/sh"}}}),
    ("version_from", {"version_from": "svn"}),
]


@pytest.mark.parametrize("key, given", BAD_VALUES, ids=[f"{k}-{i}" for i, (k, _) in enumerate(BAD_VALUES)])
def test_a_bad_value_is_refused_at_load_naming_its_key(key, given):
    with pytest.raises(DeployError) as err:
        settings(**given)
    assert err.value.line().startswith(f"setting 'fabdeploy.{key}"), err.value.line()
    assert "\n" not in str(err.value)
    assert "the-value-itself" not in str(err.value)  # a secret written into fabric.yaml is not echoed


@pytest.mark.parametrize("given, read", [
    ({"proxy": {"server_name": "*.example.com www.example.com"}},
     lambda s: s.proxy.server_name == ("*.example.com", "www.example.com")),
    ({"proxy": {"listen": ["80", "[::]:8080", "10.0.0.1:81"]}},
     lambda s: [l.nginx for l in s.proxy.listen] == ["80", "[::]:8080", "10.0.0.1:81"]),
    ({"deploy_to": "~/apps/guestbook/"}, lambda s: s.deploy_to == "~/apps/guestbook"),
    ({"health_path": "/healthz?full=1"}, lambda s: s.health_path == "/healthz?full=1"),
    ({"init_command": "db upgrade --directory 'my migrations'"},
     lambda s: s.init_command == ("db", "upgrade", "--directory", "my migrations")),
    # issue 14
    ({"env": {"WORKERS": 3, "RATIO": 0.5, "NOTE": "it's $HOME\n# not a comment"}},
     lambda s: s.env == {"WORKERS": "3", "RATIO": "0.5", "NOTE": "it's $HOME\n# not a comment"}),
    ({"secrets": {"A": {"env": "PROD_A"}, "B": {"file": "secrets/b"}, "C": {"command": "pass show c"}}},
     lambda s: [(n, v.kind, v.value) for n, v in s.secrets.items()]
     == [("A", "env", "PROD_A"), ("B", "file", "secrets/b"), ("C", "command", "pass show c")]),
    ({"migrate_command": "db upgrade"}, lambda s: s.migrate_command == ("db", "upgrade") and not s.shared_database),
    ({"database": "shared"}, lambda s: s.shared_database),
    ({"hosts": ["deploy@web1", {"host": "deploy@web2", "primary": True}, {"host": "db1", "role": "database"}]},
     lambda s: s.shared_database and s.for_host("deploy", "web2", None).primary
     and s.for_host("root", "db1", None).role == "database" and s.for_host("deploy", "web1", None).role == "app"),
    ({"provision": {"database_clients": ["10.1.2.3/16", "samenet", "fd00::/8"]}},
     lambda s: s.provision.database_clients == ("10.1.0.0/16", "samenet", "fd00::/8")),
    ({"server": {"kind": "mod_wsgi", "threads": 8}}, lambda s: (s.server.kind, s.server.threads) == ("mod_wsgi", 8)),
    ({"server": {"kind": "mod_wsgi"}}, lambda s: s.server.threads is None),
    # provision installs what building mod_wsgi on the server takes, unless told otherwise
    ({"server": {"kind": "mod_wsgi"}, "proxy": {"kind": "apache"}},
     lambda s: s.provision.packages == ("apache2", "python3", "python3-venv", "sudo", "apache2-bin",
                                        "apache2-dev", "gcc", "python3-dev", "media-types", "procps")),
    ({"server": {"kind": "mod_wsgi"}, "provision": {"packages": ["nginx"]}},
     lambda s: s.provision.packages == ("nginx",)),
])
def test_good_values_are_kept(given, read):
    assert read(settings(**given))


# -- layout -----------------------------------------------------------------

def test_release_names_sort_by_time():
    a = release_name(dt.datetime(2026, 1, 2, 3, 4, 5, 6000, tzinfo=dt.timezone.utc))
    b = release_name(dt.datetime(2026, 1, 2, 3, 4, 5, 7000, tzinfo=dt.timezone.utc))
    c = release_name(dt.datetime(2026, 10, 1, 0, 0, 0, tzinfo=dt.timezone.utc))
    assert a == "20260102-030405-006"
    assert a < b < c


def test_instance_link_is_where_flask_looks_in_a_venv():
    layout = Layout("/srv/app")
    assert layout.instance_link("R", "guestbook") == "/srv/app/releases/R/venv/var/guestbook-instance"


def rel(name, state="ready", bind=None):
    return Release(name, ReleaseState(state), {}, Bind.parse(bind) if bind else None)


@pytest.mark.parametrize("names, current, keep, removed", [
    # plain: keep the newest `keep`
    (["1", "2", "3", "4", "5", "6"], "6", 3, ["1", "2", "3"]),
    # after a rollback current is old: it and its predecessor stay
    (["1", "2", "3", "4", "5", "6"], "2", 3, ["3", "4", "5"]),
    # nothing to remove
    (["1", "2"], "2", 5, []),
])
def test_cleanup_keeps_current_and_its_predecessor(names, current, keep, removed):
    releases = [rel(n) for n in names]
    assert releases_to_remove(releases, current, keep) == removed
    remaining = set(names) - set(removed)
    assert current in remaining and len(remaining) == min(keep, len(names))


def test_cleanup_removes_failed_and_partial_first():
    releases = [rel("1"), rel("2"), rel("3", "failed"), rel("4", "partial"), rel("5")]
    assert releases_to_remove(releases, "5", 3) == ["3", "4"]


def test_rollback_target_skips_failed_and_partial():
    releases = [rel("1"), rel("2"), rel("3", "failed"), rel("4", "partial"), rel("5")]
    assert previous_release(releases, "5").name == "2"
    assert previous_release([rel("1")], "1") is None


# -- binds and facts ---------------------------------------------------------

@pytest.mark.parametrize("text, nginx, apache, probe", [
    ("unix:/srv/a/x.sock", "unix:/srv/a/x.sock", "unix:/srv/a/x.sock|http://localhost", "unix:/srv/a/x.sock"),
    ("127.0.0.1:8000", "127.0.0.1:8000", "http://127.0.0.1:8000", "127.0.0.1:8000"),
    ("0.0.0.0:8000", "0.0.0.0:8000", "http://0.0.0.0:8000", "127.0.0.1:8000"),
    ("[::1]:8000", "[::1]:8000", "http://[::1]:8000", "[::1]:8000"),
])
def test_a_bind_has_each_consumers_spelling(text, nginx, apache, probe):
    bind = Bind.parse(text)
    assert (bind.nginx, bind.gunicorn, bind.apache, bind.probe) == (nginx, nginx, apache, probe)
    assert str(bind) == nginx


def run_agent(*ops) -> dict:
    """The agent, here, as a host runs it: one request on its stdin, its reply on stdout."""
    request = {"id": 1, "phases": [{"name": "test", "ops": [op.wire() for op in ops]}]}
    done = subprocess.run([sys.executable, "-S", "-c", onhost.program("agent").decode()],
                          input=json.dumps(request) + "\n", capture_output=True, text=True, check=True)
    return json.loads(done.stdout.splitlines()[-1])


def test_the_agent_reads_an_empty_root(tmp_path):
    """The agent is valid Python that reads the facts of a host never deployed to."""
    reply = run_agent(Facts(str(tmp_path / "app"), "guestbook", sys.executable, Layout(str(tmp_path / "app")).for_agent(), key="facts"))
    facts = HostFacts.parse(reply["results"]["facts"])
    assert (facts.root_exists, facts.releases, facts.lock, facts.current) == (False, (), None, None)


def test_the_agent_knows_where_each_release_listens(tmp_path):
    """Whatever the server: the next release takes the other port, and the proxy a backup."""
    root = tmp_path / "app"
    (root / "releases" / "R1").mkdir(parents=True)
    (root / "current").symlink_to("releases/R1")
    (root / "releases" / "R1" / "BIND").write_text("127.0.0.1:8000\n")
    (root / "releases" / "R1" / "RELEASE.json").write_text('{"version": "1.0"}')
    facts = HostFacts.parse(run_agent(Facts(str(root), "guestbook", sys.executable, Layout(str(root)).for_agent(), key="facts"))
                            ["results"]["facts"])
    assert facts.current_bind == Bind.tcp("127.0.0.1", 8000)
    assert facts.current_release == Release("R1", ReleaseState.READY, {"version": "1.0"},
                                            Bind.tcp("127.0.0.1", 8000))


# -- phases: facts in, operations out -------------------------------------------

class FakeHost:
    name = "deploy@web1"
    dry_run = False
    root = ROOT


def facts(**given) -> HostFacts:
    base = {"root": ROOT, "user": "deploy", "uid": 1000, "home": "/home/deploy", "root_exists": True}
    return HostFacts.parse({**base, **given})


def target(s=None, release="R2", bind=None, **fact_values) -> ph.Target:
    t = ph.Target(FakeHost(), s or settings(), release=release, facts=facts(**fact_values), layout=Layout(ROOT))
    t.bind = bind or Bind.unix(f"{ROOT}/shared/run/{release}.sock")
    return t


def kinds(ops) -> list[str]:
    return [type(op).__name__ for op in ops]


DEPLOYED = {"current": "R1", "releases": [{"name": "R1", "state": "ready", "bind": f"unix:{ROOT}/shared/run/R1.sock"}]}
REGISTERED = {"registration": {"values": {"user": "deploy"}, "path": "/etc/fabdeploy/apps/guestbook.json"}}


@pytest.mark.parametrize("case, given, fact_values, wanted", [
    # nginx the deploy user runs, over unix sockets: the site only if it changed, then
    # the preview check, then the live link.
    ("local, first", {}, {}, ["Site", "Link", "Health", "Link"]),
    ("local, same site", {}, {"site_sha256": "same"}, ["Site", "Link", "Health", "Link"]),
    # provisioned: root's site never changes with a release; only links move.
    ("provisioned", {}, {**DEPLOYED, **REGISTERED}, ["Link", "Health", "Link"]),
    # Apache: no preview; the link moves and verify follows.
    ("apache", {"proxy": {"kind": "apache"}}, {**DEPLOYED, **REGISTERED}, ["Link"]),
    # TCP on a provisioned host: root's helper switches the site's variant.
    ("tcp", {"server": {"bind": "127.0.0.1:8000"}}, {**DEPLOYED, **REGISTERED}, ["Helper"]),
])
def test_route_plans_per_proxy_and_host(case, given, fact_values, wanted):
    t = target(settings(**given), bind=Bind.tcp("127.0.0.1", 8000) if "server" in given else None, **fact_values)
    ops = ph.route(t)
    assert kinds(ops) == wanted, (case, ops)
    if wanted[-3:] == ["Link", "Health", "Link"]:
        nxt, check, live = ops[-3:]
        assert (nxt.link, nxt.target) == (f"{ROOT}/shared/run/next.sock", f"{ROOT}/shared/run/R2.sock")
        assert check.stamp == "guestbook_next" and check.preview_map
        assert (live.link, live.target) == (f"{ROOT}/shared/run/live.sock", f"{ROOT}/shared/run/R2.sock")
    assert t.checked == (wanted[-3:] == ["Link", "Health", "Link"])


def test_a_provisioned_host_checks_with_roots_preview_token():
    t = target(**DEPLOYED, **REGISTERED)
    check = ph.route(t)[1]
    assert check.preview_map == "/etc/fabdeploy/apps/guestbook.preview"
    local = ph.route(target(**DEPLOYED))[-2]
    assert local.preview_map == f"{ROOT}/.fabdeploy/preview.map"


def test_over_tcp_the_new_release_takes_the_other_port():
    s = settings(server={"bind": "127.0.0.1:8000"})
    on_first = target(s, current="R1", releases=[{"name": "R1", "state": "ready", "bind": "127.0.0.1:8000"}])
    assert ph.choose_bind(on_first, "R2") == Bind.tcp("127.0.0.1", 8001)
    on_second = target(s, current="R1", releases=[{"name": "R1", "state": "ready", "bind": "127.0.0.1:8001"}])
    assert ph.choose_bind(on_second, "R2") == Bind.tcp("127.0.0.1", 8000)


@pytest.mark.parametrize("manager, first", [("systemd", Helper), ("pidfile", Sh)])
def test_start_then_check_the_release_on_its_own_socket(manager, first):
    t = target(settings(server={"manager": manager}))
    start, check = ph.start(t)
    assert isinstance(start, first) and isinstance(check, Health)
    assert check.target == f"unix:{ROOT}/shared/run/R2.sock"
    if manager == "systemd":
        assert start.argv == ("start", "R2") and check.unit == "guestbook@R2.service"
    else:
        assert check.pid_file == f"{ROOT}/shared/run/R2.pid"
    assert check.log == f"{ROOT}/shared/log/app.log" and check.marker == servers.start_marker("R2")


def test_switch_renames_the_release_record_with_current_and_keeps_the_old_release_warm():
    t = target(settings(server={"manager": "systemd"}), **DEPLOYED, **REGISTERED)
    ops = ph.switch(t)
    assert kinds(ops) == ["Rename", "Link", "Helper", "Helper", "Audit"]
    record, current, enable, keep, audit = ops
    assert (record.source, record.dest) == (f"{ROOT}/releases/R2/RELEASE.json.pending",
                                            f"{ROOT}/releases/R2/RELEASE.json")
    assert (current.link, current.target) == (f"{ROOT}/current", "releases/R2")
    assert enable.argv == ("enable", "R2") and keep.argv == ("keep", "R2", "R1")
    assert audit.app == "guestbook" and audit.path is None  # root's log, through the helper


def test_every_path_is_quoted():
    rename = Rename("/srv/my app/a", "/srv/my app/b")
    assert rename.wire()["cmd"] == "if [ -f '/srv/my app/a' ]; then mv -f '/srv/my app/a' '/srv/my app/b'; fi"
    layout = Layout("/srv/my app")
    assert plan.link_instance(settings(), layout, "R1") == (
        "mkdir -p '/srv/my app/releases/R1/venv/var'"
        " && ln -sfn '/srv/my app/shared/instance' '/srv/my app/releases/R1/venv/var/guestbook-instance'")


def test_a_secret_is_never_shown():
    op = Write("/srv/x/config.py", "SECRET_KEY = 'abc'", mode=0o600, secret=True)
    assert "abc" not in " ".join(op.describe())
    sh = Sh("run", env={"API_KEY": "s3cret", "MODE": "prod"}, secret_env=frozenset({"API_KEY"}))
    assert sh.describe() == ["would run: API_KEY=<secret> MODE=prod run"]


# -- templates --------------------------------------------------------------

def shape(**given):
    return render.SiteShape(release="R2", **given)


def test_nginx_site_keeps_the_old_release_as_backup_only_during_a_switch():
    s = settings(proxy={"listen": 8080, "server_name": "example.com"})
    site = render.nginx_site(s, shape(active=Bind.parse("unix:/new.sock"), backup=Bind.parse("unix:/old.sock")))
    assert "server unix:/new.sock max_fails=0;" in site
    assert "server unix:/old.sock backup max_fails=0;" in site
    assert "listen 8080;" in site and "server_name example.com;" in site
    alone = render.nginx_site(s, shape(active=Bind.parse("unix:/new.sock")))
    assert "backup" not in alone.split("upstream")[-1].split("}")[0]


def test_nginx_listens_on_ipv6_too_where_the_host_has_it():
    s = settings()
    assert "listen [::]:80;" in render.nginx_site(s, shape(active=Bind.parse("unix:/x"), ipv6=True))
    assert "[::]" not in render.nginx_site(s, shape(active=Bind.parse("unix:/x"), ipv6=False))
    on_one = settings(proxy={"listen": "10.0.0.1:80"})
    assert "[::]" not in render.nginx_site(on_one, shape(active=Bind.parse("unix:/x"), ipv6=True))


def test_gunicorn_conf_binds_explicitly_and_is_valid_python():
    conf = render.gunicorn_conf(settings(), Layout(ROOT), "R1", Bind.parse("unix:/x.sock"))
    values = {}
    exec(conf, values)
    assert values["bind"] == ["unix:/x.sock"]
    assert values["umask"] == 0o117  # a 0660 socket
    assert values["wsgi_app"] == "guestbook:create_app()"
    assert values["worker_class"] == "sync"
    assert values["control_socket_disable"] is True


def test_the_unit_runs_as_the_deploy_user_in_the_apps_own_group_hardened():
    unit = render.systemd_unit(settings(), ROOT, "deploy")
    for line in ("User=deploy", "Group=fd-guestbook", "UMask=0027", "NoNewPrivileges=yes", "PrivateTmp=yes",
                 "ProtectSystem=strict", "UnsetEnvironment=PORT", "WantedBy=multi-user.target",
                 "ExecStart=/srv/guestbook/releases/%i/serve"):
        assert line in unit
    # root never opens a file in deploy_to for the unit: no EnvironmentFile, no append: output
    assert "EnvironmentFile" not in unit and "append:" not in unit and "www-data" not in unit


def test_nginx_site_routes_only_the_preview_token_to_the_release_being_checked():
    s = settings(proxy={"listen": 8080, "server_name": "example.com"})
    live = Bind.parse(f"unix:{ROOT}/shared/run/live.sock")
    site = render.nginx_site(s, shape(active=live, backup=live, preview_map=f"{ROOT}/.fabdeploy/preview.map",
                                      next_socket=f"{ROOT}/shared/run/next.sock"))
    assert f"server unix:{ROOT}/shared/run/next.sock max_fails=0;" in site
    # The token's map is the server's own file: the site names it, never the token.
    # A glob matching just that file: one that matches nothing is no error to nginx.
    assert f"include {ROOT}/.fabdeploy/preview[.]map;" in site
    assert "map $http_x_fabdeploy_preview $fabdeploy_guestbook_pick {" in site
    assert 'default "";' in site
    assert "proxy_pass http://fabdeploy_guestbook$fabdeploy_guestbook_pick;" in site
    # Visitors see the plain stamp; a preview answer says _next, so a check cannot
    # mistake an old configuration (one without the map) for the preview.
    assert "add_header X-Fabdeploy-Site guestbook$fabdeploy_guestbook_pick always;" in site
    plain = render.nginx_site(s, shape(active=live, backup=live))
    assert "next.sock" not in plain and "proxy_pass http://fabdeploy_guestbook;" in plain


# -- hosts and stages -------------------------------------------------------

def test_hosts_carry_their_own_settings():
    s = settings(hosts=["deploy@web1", {"host": "deploy@web2:2222", "proxy": {"listen": 8081}}])
    assert [e.spec for e in s.hosts] == ["deploy@web1", "deploy@web2:2222"]
    assert s.for_host("deploy", "web1", 22).proxy.listen[0].port == 80
    web2 = s.for_host("deploy", "web2", 2222)
    assert web2.proxy.listen[0].port == 8081
    assert web2.proxy.test_command == "nginx -t"  # the rest keep their defaults


def test_a_host_is_matched_exactly():
    s = settings(hosts=[{"host": "deploy@web1", "keep_releases": 9}])
    assert s.for_host("deploy", "web1", 22).keep_releases == 9
    assert s.for_host("deploy", "web10", 22).keep_releases == 5
    assert s.for_host("deploy", "eb1", 22).keep_releases == 5


def test_a_misspelt_per_host_key_is_named():
    with pytest.raises(DeployError, match=r"hosts\[web2\]\.proxy\.lisen"):
        settings(hosts=[{"host": "web2", "proxy": {"lisen": 1}}])


def test_stages_choose_hosts_and_settings():
    given = {"keep_releases": 3, "stages": {
        "staging": {"hosts": ["deploy@stage1"], "health_path": "/ping"},
        "production": {"hosts": ["deploy@web1", "deploy@web2"]}}}
    staging = resolve(given, EXAMPLE, "staging")
    assert [e.spec for e in staging.hosts] == ["deploy@stage1"]
    assert staging.health_path == "/ping" and staging.keep_releases == 3
    assert len(resolve(given, EXAMPLE, "production").hosts) == 2
    with pytest.raises(DeployError, match="did you mean 'staging'"):
        resolve(given, EXAMPLE, "stagin")


# -- wheelhouse -------------------------------------------------------------

def test_platform_tags_cover_every_glibc_the_server_accepts():
    from fabdeploy.wheelhouse import Platform, platform_of
    tags = platform_of(facts(python="3.11", machine="x86_64", glibc="2.36")).platform_tags()
    assert tags[0] == "manylinux_2_36_x86_64" and "manylinux_2_5_x86_64" in tags
    assert {"manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"} <= set(tags)
    # an old server must not be offered wheels built for a newer glibc
    old = Platform("3.11", "x86_64", (2, 12)).platform_tags()
    assert "manylinux2014_x86_64" not in old and "manylinux_2_17_x86_64" not in old
    assert Platform("3.12", "aarch64", (2, 31)).pip_options()[:6] == [
        "--python-version", "3.12", "--implementation", "cp", "--abi", "cp312"]


# -- servers ----------------------------------------------------------------

@pytest.mark.parametrize("given, wanted", [
    ({}, ["gunicorn"]),
    ({"server": {"worker_class": "gevent"}}, ["gunicorn", "gevent", "packaging"]),
    ({"server": {"worker_class": "eventlet"}}, ["gunicorn<26", "eventlet"]),
    ({"server": {"asgi": True}}, ["gunicorn", "uvicorn-worker"]),
    ({"server": {"kind": "waitress"}, "packages": ["psycopg"]}, ["waitress", "psycopg"]),
    ({"server": {"kind": "uwsgi"}}, ["pyuwsgi"]),
    ({"server": {"kind": "mod_wsgi"}}, ["mod_wsgi"]),
])
def test_each_server_installs_what_it_needs(given, wanted):
    assert servers.packages(settings(**given)) == wanted


@pytest.mark.parametrize("given, message", [
    ({"server": {"kind": "bjoern"}}, "server.kind' must be one of"),
    ({"server": {"kind": "waitress", "asgi": True}}, "asgi: true runs under gunicorn"),
    ({"server": {"worker_class": "tornadoo"}}, "worker_class' must be one of"),
])
def test_impossible_server_choices_are_refused(given, message):
    with pytest.raises(DeployError, match=message):
        settings(**given)


def test_serve_scripts_log_unset_port_and_bind_the_release_socket():
    layout = Layout(ROOT)
    sock = Bind.parse("unix:/s.sock")
    for server, needle in (("gunicorn", "/bin/gunicorn -c /srv/guestbook/releases/R1/gunicorn.conf.py"),
                           ("waitress", "--unix-socket=/s.sock --unix-socket-perms=660 --threads=8 "
                                        "--no-clear-untrusted-proxy-headers --call "
                                        "guestbook:create_app"),
                           # uWSGI says that it closes the connection, so no proxy reuses it.
                           ("uwsgi", "--http-socket /s.sock --add-header 'Connection: close' "
                                     "--chmod-socket=660 --module 'guestbook:create_app()'")):
        script = servers.serve_script(settings(server={"kind": server}), layout, "R1", sock)
        assert "else exec >> /srv/guestbook/shared/log/app.log 2>&1; fi" in script and "umask 027" in script
        assert "exec tee -a /srv/guestbook/shared/log/app.log" in script  # under systemd: the journal too
        assert "unset PORT" in script and needle in script, script
    tcp = servers.serve_script(settings(server={"kind": "waitress"}), layout, "R1", Bind.parse("127.0.0.1:8000"))
    assert "--listen=127.0.0.1:8000" in tcp


def test_the_apps_own_error_is_picked_from_the_servers_log():
    log = ("Traceback (most recent call last):\n  File \"app.py\", line 3\n"
           "RuntimeError: boom at import\n[INFO] Worker exiting\n"
           "Traceback (most recent call last):\n  File \"arbiter.py\"\n"
           "gunicorn.errors.HaltServer: <HaltServer 'Worker failed to boot.' 3>\n\n"
           "During handling of the above exception, another exception occurred:\n\n"
           "Traceback (most recent call last):\nSystemExit: 1\n")
    assert ph.app_error(log).endswith("RuntimeError: boom at import")
    assert ph.app_error("no traceback here\n") == "no traceback here"


def test_a_failed_health_check_names_the_release_and_shows_the_apps_error():
    t = target()
    check = ph.start(t)[1]
    error = ph.explain(t, check, {"message": "unhealthy: 500", "unhealthy": "the release answered 500",
                                  "log": "Traceback (most recent call last):\nValueError: nope\n"})
    assert error.line() == ("deploy@web1: release R2 is unhealthy: the release answered 500 "
                            "(the old release keeps serving; see the app's error above)")
    assert error.detail.endswith("ValueError: nope")
    site = Site("/x", "text", "nginx -t", "nginx -s reload", what="routing nginx")
    rejected = ph.explain(t, site, {"rejected": True, "stderr": "nginx: [emerg] bad\n"})
    assert rejected.line().endswith("nginx rejected the configuration "
                                    "(fix nginx's configuration; nothing was switched)")
    full = ph.explain(t, dataclasses.replace(check, what="installing the wheel"), {"disk_full": True})
    assert "the server's disk is full" in full.line()
    assert isinstance(ph.route(target())[-1], Link)
