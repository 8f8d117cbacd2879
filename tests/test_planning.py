"""Fast tests of the parts that decide: settings, layout, commands, templates."""
import datetime as dt
import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from fabdeploy import plan, render
from fabdeploy.errors import DeployError
from fabdeploy.layout import Layout, Release, previous_release, release_name, releases_to_remove
from fabdeploy.settings import resolve

EXAMPLE = Path(__file__).resolve().parent.parent / "example"


def settings(**given):
    return resolve(given, EXAMPLE)


# -- settings ---------------------------------------------------------------

def test_defaults_derive_from_pyproject():
    s = settings()
    assert s.app == "guestbook"
    assert s["wsgi"] == "guestbook:create_app()"
    assert s["deploy_to"] == "/srv/guestbook"
    assert s.nginx["site_path"] == "/etc/nginx/sites-enabled/guestbook.conf"
    assert s["keep_releases"] == 5 and s["init_command"] == "init-db" and s["health_path"] == "/"


def test_partial_nested_settings_keep_the_other_defaults():
    s = settings(nginx={"listen": 8080})
    assert s.nginx["listen"] == 8080
    assert s.nginx["test_command"] == "sudo nginx -t"
    assert s.nginx["reload_command"] == "sudo systemctl reload nginx"


@pytest.mark.parametrize("given, named, suggestion", [
    ({"keep_release": 3}, "fabdeploy.keep_release", "keep_releases"),
    ({"nginx": {"lisen": 81}}, "fabdeploy.nginx.lisen", "nginx.listen"),
    ({"flavour": 1}, "fabdeploy.flavour", None),
])
def test_unknown_key_is_named(given, named, suggestion):
    with pytest.raises(DeployError) as err:
        settings(**given)
    assert named in str(err.value)
    if suggestion:
        assert f"did you mean '{suggestion}'" in str(err.value)


def test_missing_pyproject_is_one_clear_error(tmp_path):
    with pytest.raises(DeployError, match="no pyproject.toml"):
        resolve({}, tmp_path)
    (tmp_path / "pyproject.toml").write_text("[project\nname=")
    with pytest.raises(DeployError, match="does not parse"):
        resolve({}, tmp_path)


def test_relative_deploy_to_is_refused():
    with pytest.raises(DeployError, match="deploy_to"):
        settings(deploy_to="srv/app")


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


def rel(name, state="ready"):
    return Release(name, state, {})


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


# -- commands ---------------------------------------------------------------

def test_every_path_is_quoted():
    layout = Layout("/srv/my app")
    command = plan.unlock(layout)
    assert command == "rm -rf '/srv/my app/.fabdeploy/lock'"
    assert plan.switch_current(layout, "R1") == (
        "if [ -f '/srv/my app/releases/R1/RELEASE.json.pending' ]; then "
        "mv -f '/srv/my app/releases/R1/RELEASE.json.pending' '/srv/my app/releases/R1/RELEASE.json'; fi"
        " && ln -sfn releases/R1 '/srv/my app/.current.tmp' && mv -Tf '/srv/my app/.current.tmp' "
        "'/srv/my app/current'")


def test_agent_runs_from_a_command_line(tmp_path):
    """The packed agent is valid Python that reads facts of an empty root."""
    words = shlex.split(plan.agent(sys.executable, "facts", "--root", str(tmp_path / "app")))
    facts = json.loads(subprocess.run(words, capture_output=True, text=True, check=True).stdout)
    assert facts["root_exists"] is False and facts["releases"] == [] and facts["lock"] is None


def test_the_agent_knows_where_the_current_release_listens(tmp_path):
    """Whatever the server: the next release takes the other port, and the proxy a backup."""
    root = tmp_path / "app"
    (root / "releases" / "R1").mkdir(parents=True)
    (root / "current").symlink_to("releases/R1")
    (root / "releases" / "R1" / "BIND").write_text("127.0.0.1:8000\n")
    words = shlex.split(plan.agent(sys.executable, "facts", "--root", str(root)))
    facts = json.loads(subprocess.run(words, capture_output=True, text=True, check=True).stdout)
    assert facts["current_bind"] == "127.0.0.1:8000"


def test_health_probe_targets_the_release_socket_and_watches_its_process():
    s = settings()
    command = plan.health(s, Layout("/srv/guestbook"), "R1", "unix:/srv/guestbook/shared/run/R1.sock",
                          "pidfile", 5)
    assert "--unix /srv/guestbook/shared/run/R1.sock" in command
    assert "--pid-file /srv/guestbook/shared/run/R1.pid" in command


# -- templates --------------------------------------------------------------

def test_nginx_site_keeps_the_old_release_as_backup_only_during_a_switch():
    s = settings(nginx={"listen": 8080, "server_name": "example.com"})
    site = render.nginx_site(s, "R2", "unix:/new.sock", "unix:/old.sock")
    assert "server unix:/new.sock max_fails=0;" in site
    assert "server unix:/old.sock backup max_fails=0;" in site
    assert "listen 8080;" in site and "server_name example.com;" in site
    assert "backup" not in render.nginx_site(s, "R2", "unix:/new.sock", None).split("upstream")[-1].split("}")[0]


def test_gunicorn_conf_binds_explicitly_and_is_valid_python():
    s = settings()
    conf = render.gunicorn_conf(s, Layout("/srv/guestbook"), "R1", "unix:/x.sock")
    values = {}
    exec(conf, values)
    assert values["bind"] == ["unix:/x.sock"]
    assert values["umask"] == 0o117  # a 0660 socket
    assert values["wsgi_app"] == "guestbook:create_app()"
    assert values["worker_class"] == "sync"
    assert values["control_socket_disable"] is True


def test_systemd_unit_runs_as_the_deploy_user_hardened():
    unit = render.systemd_unit(settings(), Layout("/srv/guestbook"), "deploy")
    for line in ("User=deploy", "NoNewPrivileges=yes", "PrivateTmp=yes", "ProtectSystem=strict",
                 "UnsetEnvironment=PORT", "WantedBy=multi-user.target",
                 "ExecStart=/srv/guestbook/releases/%i/serve"):
        assert line in unit


# -- hosts and stages -------------------------------------------------------

def test_hosts_carry_their_own_settings():
    s = settings(hosts=["deploy@web1", {"host": "deploy@web2:2222", "nginx": {"listen": 8081}}])
    assert [e.spec for e in s.hosts] == ["deploy@web1", "deploy@web2:2222"]
    assert s.for_host("deploy", "web1", 22).nginx["listen"] == 80
    web2 = s.for_host("deploy", "web2", 2222)
    assert web2.nginx["listen"] == 8081
    assert web2.nginx["test_command"] == "sudo nginx -t"  # the rest keep their defaults


def test_a_misspelt_per_host_key_is_named():
    with pytest.raises(DeployError, match=r"hosts\[web2\]\.nginx\.lisen"):
        settings(hosts=[{"host": "web2", "nginx": {"lisen": 1}}])


def test_stages_choose_hosts_and_settings():
    given = {"keep_releases": 3, "stages": {
        "staging": {"hosts": ["deploy@stage1"], "health_path": "/ping"},
        "production": {"hosts": ["deploy@web1", "deploy@web2"]}}}
    staging = resolve(given, EXAMPLE, "staging")
    assert [e.spec for e in staging.hosts] == ["deploy@stage1"]
    assert staging["health_path"] == "/ping" and staging["keep_releases"] == 3
    assert len(resolve(given, EXAMPLE, "production").hosts) == 2
    with pytest.raises(DeployError, match="did you mean 'staging'"):
        resolve(given, EXAMPLE, "stagin")


# -- wheelhouse -------------------------------------------------------------

def test_platform_tags_cover_every_glibc_the_server_accepts():
    from fabdeploy.wheelhouse import Platform, platform_of
    tags = platform_of({"python": "3.11", "machine": "x86_64", "glibc": "2.36"}).platform_tags()
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
    ({"gunicorn": {"worker_class": "gevent"}}, ["gunicorn", "gevent", "packaging"]),
    ({"gunicorn": {"worker_class": "eventlet"}}, ["gunicorn<26", "eventlet"]),
    ({"asgi": True}, ["gunicorn", "uvicorn-worker"]),
    ({"server": "waitress", "packages": ["psycopg"]}, ["waitress", "psycopg"]),
    ({"server": "uwsgi"}, ["pyuwsgi"]),
])
def test_each_server_installs_what_it_needs(given, wanted):
    from fabdeploy import servers
    assert servers.packages(settings(**given)) == wanted


@pytest.mark.parametrize("given, message", [
    ({"server": "bjoern"}, "server must be one of"),
    ({"server": "waitress", "asgi": True}, "asgi: true runs under gunicorn"),
    ({"gunicorn": {"worker_class": "tornadoo"}}, "worker_class must be one of"),
])
def test_impossible_server_choices_are_refused(given, message):
    with pytest.raises(DeployError, match=message):
        settings(**given)


def test_serve_scripts_log_unset_port_and_bind_the_release_socket():
    from fabdeploy import servers
    layout = Layout("/srv/guestbook")
    for server, needle in (("gunicorn", "/bin/gunicorn -c /srv/guestbook/releases/R1/gunicorn.conf.py"),
                           ("waitress", "--unix-socket=/s.sock --unix-socket-perms=660 --threads=8 "
                                        "--no-clear-untrusted-proxy-headers --call "
                                        "guestbook:create_app"),
                           # uWSGI says that it closes the connection, so no proxy reuses it.
                           ("uwsgi", "--http-socket /s.sock --add-header 'Connection: close' "
                                     "--chmod-socket=660 --module 'guestbook:create_app()'")):
        script = servers.serve_script(settings(server=server), layout, "R1", "unix:/s.sock")
        assert "exec >> /srv/guestbook/shared/log/app.log 2>&1" in script
        assert "unset PORT" in script and needle in script, script
    tcp = servers.serve_script(settings(server="waitress"), layout, "R1", "127.0.0.1:8000")
    assert "--listen=127.0.0.1:8000" in tcp


def test_the_apps_own_error_is_picked_from_the_servers_log():
    from fabdeploy.phases import app_error
    log = ("Traceback (most recent call last):\n  File \"app.py\", line 3\n"
           "RuntimeError: boom at import\n[INFO] Worker exiting\n"
           "Traceback (most recent call last):\n  File \"arbiter.py\"\n"
           "gunicorn.errors.HaltServer: <HaltServer 'Worker failed to boot.' 3>\n\n"
           "During handling of the above exception, another exception occurred:\n\n"
           "Traceback (most recent call last):\nSystemExit: 1\n")
    assert app_error(log).endswith("RuntimeError: boom at import")
    assert app_error("no traceback here\n") == "no traceback here"


def test_nginx_site_routes_only_the_preview_token_to_the_release_being_checked():
    s = settings(nginx={"listen": 8080, "server_name": "example.com"})
    live = "unix:/srv/guestbook/shared/run/live.sock"
    site = render.nginx_site(s, "R2", live, live, Layout("/srv/guestbook"))
    assert "server unix:/srv/guestbook/shared/run/next.sock max_fails=0;" in site
    # The token's map is the server's own file: the site names it, never the token.
    # A glob matching just that file: one that matches nothing is no error to nginx.
    assert "include /srv/guestbook/.fabdeploy/preview[.]map;" in site
    assert "map $http_x_fabdeploy_preview $fabdeploy_guestbook_pick {" in site
    assert 'default "";' in site
    assert "proxy_pass http://fabdeploy_guestbook$fabdeploy_guestbook_pick;" in site
    # Visitors see the plain stamp; a preview answer says _next, so a check cannot
    # mistake an old configuration (one without the map) for the preview.
    assert "add_header X-Fabdeploy-Site guestbook$fabdeploy_guestbook_pick always;" in site
    # Without a layout (Apache, TCP binds) there is no preview.
    plain = render.nginx_site(s, "R2", live, live)
    assert "next.sock" not in plain and "proxy_pass http://fabdeploy_guestbook;" in plain


def test_preview_then_switch_moves_the_live_link_only_after_the_check():
    s = settings()
    layout = Layout("/srv/guestbook")
    command = plan.preview_then_switch(s, layout, "/srv/guestbook/shared/run/R2.sock", "guestbook_next", 10)
    nxt, check, live = command.split(" && ", 2)[0], command.split(" && ")[2], command.split(" && ")[-1]
    assert nxt.startswith("ln -sfn /srv/guestbook/shared/run/R2.sock /srv/guestbook/shared/run/next.sock.tmp")
    assert "--preview-map /srv/guestbook/.fabdeploy/preview.map" in check and "--stamp guestbook_next" in check
    assert live == "mv -Tf /srv/guestbook/shared/run/live.sock.tmp /srv/guestbook/shared/run/live.sock"
    assert command.index("next.sock") < command.index("--preview-map") < command.index("live.sock")
