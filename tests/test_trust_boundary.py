"""A stolen deploy key is not root: the attacks that worked, tried again on provisioned hosts.

Two Debian 12 nspawn hosts, set up by `fab -H root@host provision` alone.
Every attack runs as the deploy user, over SSH, with provision's sudo rule
and nothing more, and must fail; then the host must still serve. The first
host also carries a second app, first deployed by the same user, then by
a user of its own, and the two must not reach each other. The second host
starts with a deploy user who has broader sudo rights, as many images do.
"""
import json
import os
import re
import shlex
import shutil
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from harness.fleet import module_fleet
from harness.listener import CountingListener
from harness.project import EXAMPLE, FAB, Project

pytestmark = [
    pytest.mark.nspawn,
    pytest.mark.skipif(os.geteuid() != 0, reason="systemd-nspawn hosts need root"),
]

APP, OTHER = "guestbook", "notes"
ROOT = f"/srv/{APP}"
HELPER = "/usr/local/lib/fabdeploy/helper"


fleet = module_fleet(2, "trust")


@pytest.fixture(scope="module")
def host(fleet):
    return fleet.hosts[0]


def project_for(fleet, host, path, app, **settings) -> Project:
    """The example app as `app` on one host, named guestbook.test or notes.test on port 80."""
    project = Project(path / app, fleet, app=app)
    project.host = SingleHost(fleet, host)
    base = {"wsgi": "guestbook:create_app()", "proxy": {"server_name": f"{app}.test"}}
    for key, value in settings.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    project.configure(**base)
    return project


class SingleHost:
    """The fleet's settings, aimed at one of its hosts."""

    def __init__(self, fleet, host, user="deploy"):
        self.fleet, self.host, self.user = fleet, host, user

    @property
    def host_string(self):
        return f"{self.user}@{self.host.address}"

    def fabric_yaml(self, app):
        return self.fleet.fabric_yaml(app)


@pytest.fixture(scope="module")
def app(fleet, host, tmp_path_factory):
    """guestbook, provisioned and deployed on host1."""
    project = project_for(fleet, host, tmp_path_factory.mktemp("app"), APP)
    fleet.provision(project, hosts=[host])
    project.fab("deploy")
    return project


def as_deploy(fleet, host, command, user="deploy"):
    """A command over SSH as the deploy user: the attacker's key, and provision's rights."""
    result = fleet.ssh(f"{user}@{host.address}", command)
    assert result.returncode != 255, result.stderr  # ssh itself failed: nothing was tried
    return result


def page(host, name, path="/") -> tuple[int, str]:
    """GET through nginx on port 80 with a Host header; status and body."""
    request = urllib.request.Request(host.url(path), headers={"Host": name})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def is_root_now(fleet, host) -> bool:
    """Did an attack leave deploy with root? sudo -n id, as the attacker would check."""
    return as_deploy(fleet, host, "sudo -n id -u 2>/dev/null").stdout.strip() == "0"


# -- the three escalations through the nginx site ---------------------------------

SUDOERS_LOG = ("log_format x escape=none 'deploy ALL=(ALL:ALL) NOPASSWD: ALL';\n"
               "server { listen 127.0.0.1:8099; access_log /etc/sudoers.d/zz x; return 204; }\n")


def test_a_site_with_a_sudoers_access_log_gets_nowhere(fleet, host, app):
    """Attack 1: an access_log that writes a sudo rule, installed, tested and reloaded as root."""
    attempt = (f"printf '%s' {shlex.quote(SUDOERS_LOG)} > {ROOT}/.fabdeploy/site.conf.new;"
               f" sudo -n install -m 0644 {ROOT}/.fabdeploy/site.conf.new /etc/nginx/sites-enabled/{APP}.conf;"
               f" sudo -n nginx -t; sudo -n systemctl reload nginx;"
               f" sudo -n {HELPER} {APP} route-tcp 8099;"
               " python3 -c 'import urllib.request; urllib.request.urlopen(\"http://127.0.0.1:8099/\")'; true")
    as_deploy(fleet, host, attempt)
    assert host.run("test -e /etc/sudoers.d/zz", check=False).returncode != 0
    assert not is_root_now(fleet, host)
    assert page(host, f"{APP}.test")[0] == 200


EVIL_SO = r"""
#include <stdio.h>
__attribute__((constructor)) static void grab(void) {
    FILE *f = fopen("/etc/escalated", "w"); if (f) { fputs("loaded as root\n", f); fclose(f); }
}
"""


def test_a_shared_library_of_deploys_is_never_loaded_by_roots_nginx(fleet, host, app):
    """Attack 2: ssl_certificate_key engine:<lib>, which makes `nginx -t` load it as root.

    The deploy user builds the library and names it from every place it can
    write; then root itself runs nginx -t and provision (which tests nginx):
    none of them may load it.
    """
    evil = f"{ROOT}/evil.so"
    snippet = f"server {{ listen 127.0.0.1:8098; ssl_certificate_key engine:{evil}:k; }}\n"
    build = (f"printf '%s' {shlex.quote(EVIL_SO)} > /tmp/evil.c && gcc -shared -fPIC -o {evil} /tmp/evil.c"
             f" && printf '%s' {shlex.quote(snippet)} | tee {ROOT}/.fabdeploy/site.conf.new"
             f" {ROOT}/shared/run/site.conf {ROOT}/.fabdeploy/preview.map >/dev/null")
    assert as_deploy(fleet, host, build).returncode == 0
    as_deploy(fleet, host, f"sudo -n nginx -t; sudo -n {HELPER} {APP} route-tcp 8098; true")
    host.run("nginx -t", check=False)
    fleet.provision(app, hosts=[host])
    assert host.run("test -e /etc/escalated", check=False).returncode != 0, "root loaded deploy's library"
    assert page(host, f"{APP}.test")[0] == 200


def test_a_link_to_a_root_file_is_never_copied_where_deploy_can_read_it(fleet, host, app):
    """Attack 3: site.conf.new as a symlink to /etc/shadow, which `sudo install` followed."""
    shadow_line = host.run("head -1 /etc/shadow").stdout.strip()
    links = (f"ln -sfn /etc/shadow {ROOT}/.fabdeploy/site.conf.new;"
             f" ln -sfn /etc/shadow {ROOT}/.fabdeploy/site.conf.prev;"
             f" sudo -n install -m 0644 {ROOT}/.fabdeploy/site.conf.new /etc/nginx/sites-enabled/{APP}.conf; true")
    as_deploy(fleet, host, links)
    app.set_version("1.0.1")
    app.fab("deploy")  # a deploy and a provision with the links in place copy nothing through them
    fleet.provision(app, hosts=[host])
    readable = as_deploy(fleet, host, f"grep -rlF {shlex.quote(shadow_line)} /etc/nginx /etc/fabdeploy {ROOT}"
                                      " 2>/dev/null; true").stdout
    assert readable.strip() == "", f"deploy can read a copy of /etc/shadow: {readable}"
    assert page(host, f"{APP}.test")[1].startswith("Hello from the guestbook 1.0.1")


# -- everything root parses is root's ----------------------------------------------------

def writable_by(host, user, path) -> bool:
    return host.run(f"runuser -u {user} -- test -w {shlex.quote(path)}", check=False).returncode == 0


def ancestors(path: str) -> list[str]:
    parts, found = path.rstrip("/").split("/"), []
    for n in range(len(parts), 0, -1):
        found.append("/".join(parts[:n]) or "/")
    return found


def test_nothing_root_parses_or_runs_is_writable_by_the_deploy_user(fleet, host, app):
    """nginx's whole configuration, the app's units, every sudoers file, the helper and its record."""
    nginx = re.findall(r"^# configuration file (\S+):$", host.run("nginx -T 2>/dev/null").stdout, re.M)
    assert f"/etc/nginx/sites-enabled/{APP}.conf" in nginx and f"/etc/fabdeploy/apps/{APP}.preview" in nginx
    release = host.run(f"readlink {ROOT}/current").stdout.strip().rsplit("/", 1)[-1]
    units = re.findall(r"^# (/\S+)$", host.run(f"systemctl cat {APP}@{release}.service").stdout, re.M)
    sudoers = ["/etc/sudoers"] + host.run("ls -d /etc/sudoers.d/*").stdout.split()
    files = nginx + units + sudoers + [HELPER, f"/etc/fabdeploy/apps/{APP}.json", "/etc/fabdeploy"]
    for path in files:
        for place in ancestors(path):
            assert not writable_by(host, "deploy", place), f"deploy may write {place} (above {path})"
    # For the one sudo rule provision grants, sudo -l lists nothing else.
    rules = re.findall(r"^\s+(\(.*)$", host.run("sudo -l -U deploy").stdout, re.M)
    assert [" ".join(r.split()) for r in rules] == [f"(root) NOPASSWD: {HELPER} {APP} *"]


def test_logs_are_private_and_the_audit_log_is_roots(fleet, host, app):
    mode = lambda p: host.run(f"stat -c %a:%U {shlex.quote(p)}").stdout.strip()
    assert mode(f"{ROOT}/shared/log") == "750:deploy"
    assert mode(f"{ROOT}/shared/log/app.log").startswith("640:")
    assert mode(ROOT) == "750:deploy"
    audit = f"/var/log/fabdeploy/{APP}/audit.jsonl"
    assert mode(audit) == "640:root"
    entries = [json.loads(line) for line in host.run(f"cat {audit}").stdout.splitlines()]
    assert [e["event"] for e in entries][:2] == ["deploy", "deploy"], entries
    assert all(e["logged_by_uid"] == int(host.run("id -u deploy").stdout) for e in entries)
    # The deploy user may add a line through the helper, never rewrite one.
    tamper = as_deploy(fleet, host, f"echo '{{}}' > {audit}; sed -i 1d {audit}; true")
    assert tamper.returncode == 0 and len(host.run(f"cat {audit}").stdout.splitlines()) == len(entries)
    # Nobody else on the host reads the app's log or its deploy history.
    host.run("id nobody")
    assert not host.run(f"runuser -u nobody -- cat {ROOT}/shared/log/app.log", check=False).returncode == 0
    assert not host.run(f"runuser -u nobody -- cat {audit}", check=False).returncode == 0


def test_every_task_works_with_provisions_rules_only(fleet, host, app):
    """deploy and redeploy ran above; rollback, rotate-secret, status, logs, releases, unlock now."""
    before = host.run(f"readlink {ROOT}/current").stdout.strip()
    app.fab("rollback")
    assert host.run(f"readlink {ROOT}/current").stdout.strip() != before
    app.fab("rotate-secret")
    status = app.fab("status").stdout
    assert "active (systemd)" in status and "ok 200" in status, status
    assert "Booting worker" in app.fab("logs", "--lines", "200").stdout
    assert "* " in app.fab("releases").stdout
    assert "not locked" in app.fab("unlock").stdout
    app.fab("deploy")
    assert page(host, f"{APP}.test")[1].startswith("Hello from the guestbook 1.0.1")


# -- two apps on one host ---------------------------------------------------------------

def connect_as(fleet, host, user, socket_path) -> str:
    """What happens when `user` connects to a unix socket: 'connected' or the error."""
    probe = ("import socket,sys\ns=socket.socket(socket.AF_UNIX)\ntry:\n s.connect(sys.argv[1]);print('connected')\n"
             "except OSError as e:\n print(type(e).__name__)")
    return as_deploy(fleet, host, f"python3 -c {shlex.quote(probe)} {shlex.quote(socket_path)}", user).stdout.strip()


def test_two_apps_share_a_deploy_user_and_both_serve(fleet, host, app, tmp_path):
    other = project_for(fleet, host, tmp_path, OTHER)
    fleet.provision(other, hosts=[host])
    other.fab("deploy")
    assert page(host, f"{OTHER}.test")[0] == 200 and page(host, f"{APP}.test")[0] == 200
    # Provisioning the second app kept the first's rule, and each has its own group.
    rules = re.findall(r"^\s+(\(.*)$", host.run("sudo -l -U deploy").stdout, re.M)
    assert sorted(" ".join(r.split()) for r in rules) == [f"(root) NOPASSWD: {HELPER} {APP} *",
                                                          f"(root) NOPASSWD: {HELPER} {OTHER} *"]
    assert host.run(f"stat -c %G /srv/{OTHER}/shared/run/live.sock -L").stdout.strip() == f"fd-{OTHER}"
    app.set_version("1.0.2")
    app.fab("deploy")  # the first app deploys on after the second's provision
    assert page(host, f"{APP}.test")[1].startswith("Hello from the guestbook 1.0.2")
    take_down(fleet, host, other)


def take_down(fleet, host, project) -> None:
    """The app off the host, by root: its units, site, record, rule and deploy_to."""
    app = project.app
    host.run(f"systemctl stop '{app}@*.service'; rm -f /etc/systemd/system/{app}@.service"
             f" /etc/systemd/system/multi-user.target.wants/{app}@*.service"
             f" /etc/nginx/sites-enabled/{app}.conf /etc/sudoers.d/fabdeploy-{app}"
             f" /etc/fabdeploy/apps/{app}.*; rm -rf /srv/{app}; systemctl daemon-reload; systemctl reload nginx")


def test_two_apps_with_a_user_each_cannot_reach_each_other(fleet, host, app, tmp_path):
    other = project_for(fleet, host, tmp_path, OTHER, provision={"user": "notes"})
    other.host.user = "notes"
    fleet.provision(other, hosts=[host])
    other.fab("deploy")
    assert page(host, f"{OTHER}.test")[0] == 200 and page(host, f"{APP}.test")[0] == 200
    mine, theirs = f"/srv/{APP}", f"/srv/{OTHER}"
    for user, target in (("deploy", theirs), ("notes", mine)):
        # Not its config.py (the SECRET_KEY), not its socket, not its units.
        read = as_deploy(fleet, host, f"cat {target}/shared/instance/config.py", user)
        assert read.returncode != 0 and "Permission denied" in read.stderr, read
        assert connect_as(fleet, host, user, f"{target}/shared/run/live.sock") == "PermissionError"
        other_app = OTHER if target == theirs else APP
        release = host.run(f"readlink {target}/current").stdout.strip().rsplit("/", 1)[-1]
        stop = as_deploy(fleet, host, f"sudo -n {HELPER} {other_app} stop {release}", user)
        assert stop.returncode != 0, stop
        assert host.run(f"systemctl is-active {other_app}@{release}.service").stdout.strip() == "active"
    # Nor through a unit of its own: a release of deploy's, run by root's helper in deploy's
    # app group, tries the other app's socket.
    planted = f"{mine}/releases/20990101-000000-000"
    probe = (f"import socket, time\ns = socket.socket(socket.AF_UNIX)\ntry:\n"
             f"    s.connect('{theirs}/shared/run/live.sock')\n    r = 'connected'\n"
             f"except OSError as e:\n    r = type(e).__name__\n"
             f"open('{mine}/shared/probe', 'w').write(r)\ntime.sleep(30)\n")
    serve = f"#!/bin/sh\nexec python3 {planted}/probe.py\n"
    as_deploy(fleet, host, f"mkdir -p {planted} && printf '%s' {shlex.quote(probe)} > {planted}/probe.py"
                           f" && printf '%s' {shlex.quote(serve)} > {planted}/serve && chmod +x {planted}/serve"
                           f" && sudo -n {HELPER} {APP} start 20990101-000000-000")
    deadline = time.monotonic() + 20
    while host.run(f"test -s {mine}/shared/probe", check=False).returncode and time.monotonic() < deadline:
        time.sleep(0.2)
    assert host.run(f"cat {mine}/shared/probe").stdout == "PermissionError"
    as_deploy(fleet, host, f"sudo -n {HELPER} {APP} retire 20990101-000000-000; rm -rf {planted}")
    take_down(fleet, host, other)


# -- provision narrows for real -----------------------------------------------------------

def test_provision_refuses_a_deploy_user_with_broader_sudo_unless_told_to_replace_it(fleet, tmp_path):
    host = fleet.hosts[1]
    host.run("useradd -m -s /bin/bash deploy && usermod -aG sudo deploy"
             " && echo 'deploy ALL=(ALL) NOPASSWD: ALL' > /etc/sudoers.d/90-deploy"
             " && chmod 0440 /etc/sudoers.d/90-deploy")
    project = project_for(fleet, host, tmp_path, APP)
    refused = fleet.provision(project, hosts=[host], check=False)
    assert refused.returncode == 1
    line = refused.stderr.strip().splitlines()[-1]
    assert line.startswith(f"fabdeploy: root@{host.address}: deploy already has broader sudo rights ("), line
    assert "the sudo group" in line and "/etc/sudoers.d/90-deploy" in line and "--replace-sudo" in line
    assert host.run("test -e /etc/sudoers.d/90-deploy", check=False).returncode == 0  # nothing was changed
    fleet.provision(project, "--replace-sudo", hosts=[host])
    rules = re.findall(r"^\s+(\(.*)$", host.run("sudo -l -U deploy").stdout, re.M)
    assert [" ".join(r.split()) for r in rules] == [f"(root) NOPASSWD: {HELPER} {APP} *"]
    assert "sudo" not in host.run("id -nG deploy").stdout.split()
    project.fab("deploy")
    assert page(host, f"{APP}.test")[0] == 200


# -- settings that would inject are refused before anything connects ---------------------

INJECTIONS = [
    ("app", {"app": "gb$(id>/tmp/x)"}),
    ("deploy_to", {"deploy_to": "~/x$(id>/tmp/x)"}),
    ("provision.user", {"provision": {"user": "d$(id>/tmp/x)"}}),
    ("proxy.server_name", {"proxy": {"server_name": "_; location /fs/ { alias /; autoindex on; } #"}}),
    ("proxy.listen", {"proxy": {"listen": "80; location /fs/ { alias /; }"}}),
    ("health_path", {"health_path": "/ HTTP/1.0\r\nX: y"}),
]


@pytest.mark.parametrize("key, bad", INJECTIONS, ids=[k for k, _ in INJECTIONS])
@pytest.mark.parametrize("task", ["provision", "deploy"])
def test_an_injecting_setting_is_refused_by_name_before_anything_connects(tmp_path, key, bad, task):
    listener = CountingListener()
    try:
        project_dir = tmp_path / "app"
        shutil.copytree(EXAMPLE, project_dir)
        config = {"fabdeploy": {"known_hosts": str(tmp_path / "none"), **bad}}
        (project_dir / "fabric.yaml").write_text(json.dumps(config))
        result = subprocess.run([FAB, "-H", f"root@127.0.0.1:{listener.port}", task], cwd=project_dir,
                                capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        time.sleep(0.2)
    finally:
        listener.close()
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"fabdeploy: setting 'fabdeploy.{key}' "), result.stderr
    assert "Traceback" not in result.stderr
    assert listener.accepted == 0, "fab connected before refusing the setting"
