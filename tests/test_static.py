"""Static files from nginx, site extensions and the access log, on a provisioned Debian 12 host.

The example app's package carries static/ (style.css, a fingerprinted file, a
gzipped copy). nginx serves them from the release `current` points at, then
from the release it replaced, then asks the app; each request is in root's
access log with the upstream that answered it ("-" for nginx itself).
"""
import gzip
import hashlib
import http.client
import os
import shlex

import pytest

from harness.fleet import module_fleet
from harness.project import Project

pytestmark = [
    pytest.mark.nspawn,
    pytest.mark.skipif(os.geteuid() != 0, reason="systemd-nspawn hosts need root"),
]

APP = "guestbook"
ROOT = f"/srv/{APP}"
SITE = f"/etc/nginx/sites-enabled/{APP}.conf"
FINGERPRINTED = "app.3f2a1b9c.css"
BODY = 15 * 1024 * 1024  # a 15 MB upload: over nginx's default limit of 1 MB


fleet = module_fleet(1, "static")


@pytest.fixture(scope="module")
def host(fleet):
    return fleet.hosts[0]


def static_dir(project):
    return project.path / "guestbook" / "static"


def release_files(project, version: str, files: dict[str, str]) -> None:
    """A new version whose static/ holds exactly these files (and style.css's gzipped twin)."""
    folder = static_dir(project)
    for old in folder.iterdir():
        old.unlink()
    for name, text in files.items():
        (folder / name).write_text(text)
    if "style.css" in files:
        (folder / "style.css.gz").write_bytes(gzip.compress(files["style.css"].encode(), mtime=0))
    project.set_version(version)


@pytest.fixture(scope="module")
def project(fleet, host, tmp_path_factory):
    """Release A (1.0.0): style.css, old.css and a fingerprinted file; provisioned, then deployed."""
    project = Project(tmp_path_factory.mktemp("project") / APP, fleet, app=APP)
    release_files(project, "1.0.0", {"style.css": "body { color: black }\n" * 40, "old.css": "/* A */\n",
                                     FINGERPRINTED: "/* fingerprinted */\n"})
    fleet.provision(project)
    project.fab("deploy")
    return project


def get(host, path, headers=None, method="GET", body=None):
    """One request to nginx on port 80: status, headers (lower-case names), body."""
    conn = http.client.HTTPConnection(host.address, 80, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def nginx_workers(host) -> set[str]:
    """nginx's worker PIDs: a reload would replace them."""
    return set(host.run("cat /proc/$(cat /run/nginx.pid)/task/*/children").stdout.split())


def current(host) -> str:
    return host.run(f"readlink {ROOT}/current").stdout.strip().rsplit("/", 1)[-1]


def test_nginx_serves_the_packages_static_files_with_cache_headers(project, host):
    status, headers, body = get(host, "/static/style.css")
    assert status == 200 and body == (static_dir(project) / "style.css").read_bytes()
    assert headers["cache-control"] == "no-cache" and headers["etag"]
    assert get(host, "/static/style.css", {"If-None-Match": headers["etag"]})[0] == 304
    status, headers, _ = get(host, f"/static/{FINGERPRINTED}")
    assert status == 200 and headers["cache-control"] == "max-age=315360000"
    status, headers, body = get(host, "/static/style.css", {"Accept-Encoding": "gzip"})
    assert headers.get("content-encoding") == "gzip" and body == (static_dir(project) / "style.css.gz").read_bytes()


def test_the_access_log_says_nginx_answered_and_only_root_reads_it(project, fleet, host):
    get(host, "/static/style.css?from=test")
    get(host, "/about?from=test")
    log = project.fab("logs", "--access", "--lines", "20").stdout
    static_line = next(line for line in log.splitlines() if '"GET /static/style.css?from=test ' in line)
    app_line = next(line for line in log.splitlines() if '"GET /about?from=test ' in line)
    assert static_line.endswith(" upstream=-"), static_line  # nginx answered: gunicorn never saw it
    assert app_line.endswith(f" upstream=unix:{ROOT}/shared/run/live.sock"), app_line
    direct = fleet.ssh(host.host_string, f"cat /var/log/nginx/{APP}.access.log")
    assert direct.returncode != 0 and "Permission denied" in direct.stderr
    refused = fleet.ssh(host.host_string, f"sudo -n /usr/local/lib/fabdeploy/helper {APP} access-log '1 -F /etc/shadow'")
    assert refused.returncode == 2 and "not a line count" in refused.stderr, refused


def test_assets_follow_current_with_no_reload_and_the_old_release_keeps_its_own(project, host):
    """From A (old.css); B removes old.css and adds new.css; C removes new.css; then back to B."""
    a, workers = current(host), nginx_workers(host)
    release_files(project, "1.1.0", {"style.css": "/* B */\n", "new.css": "/* B's */\n"})
    project.fab("deploy")
    b = current(host)
    assert get(host, "/static/style.css")[2] == b"/* B */\n"  # the switch moved what nginx serves
    assert get(host, "/static/new.css")[2] == b"/* B's */\n"
    # A page that A rendered just before the switch still gets A's file, which B removed.
    assert get(host, "/static/old.css")[:3:2] == (200, b"/* A */\n")
    assert get(host, "/static/neither.css")[0] == 404
    assert nginx_workers(host) == workers, "nginx was reloaded"
    assert host.run(f"readlink {ROOT}/releases/{b}/previous").stdout.strip() == f"../{a}"
    release_files(project, "1.2.0", {"style.css": "/* C */\n"})
    project.fab("deploy")
    assert get(host, "/static/new.css")[:3:2] == (200, b"/* B's */\n")  # B's, for B's pages
    assert get(host, "/static/old.css")[0] == 404  # two releases back: gone
    project.fab("rollback")
    assert current(host) == b and get(host, "/static/style.css")[2] == b"/* B */\n"
    assert nginx_workers(host) == workers, "nginx was reloaded"


def test_a_link_to_a_file_the_deploy_user_may_not_read_is_not_served(project, fleet, host):
    """What nginx's workers may read and the deploy user may not (another app's deploy_to is
    like this: its group fd-<other> has www-data in it, not this app's user)."""
    host.run("install -d -m 0750 -o root -g www-data /srv/other && printf 'SECRET of another\\n' |"
             " install -m 0640 -o root -g www-data /dev/stdin /srv/other/secret.txt")
    assert host.run("runuser -u www-data -- cat /srv/other/secret.txt").stdout == "SECRET of another\n"
    static = host.run(f"readlink -f {ROOT}/current/public/static").stdout.strip()
    planted = fleet.ssh(host.host_string, f"ln -s /srv/other/secret.txt {shlex.quote(static)}/leak.css"
                                          f" && cat {shlex.quote(static)}/leak.css")
    assert planted.returncode != 0 and "Permission denied" in planted.stderr  # planted, not readable to it
    status, _, body = get(host, "/static/leak.css")
    assert b"SECRET" not in body and status != 200, (status, body)


def site_sha(host) -> str:
    return hashlib.sha256(host.run(f"cat {SITE}").stdout.encode()).hexdigest()


def test_client_max_body_size_takes_a_15_mb_post_and_survives_deploys(project, fleet, host):
    upload = b"x" * BODY
    assert get(host, "/upload", method="POST", body=upload)[0] == 413  # nginx's default: 1 MB
    project.configure(proxy={"extra": {"client_max_body_size": "20m"}})
    refused = project.fab("deploy", check=False)
    assert refused.returncode == 1 and "settings that provision installs as root changed (extra)" in refused.stderr
    fleet.provision(project)
    project.fab("deploy")
    assert get(host, "/upload", method="POST", body=upload)[:3:2] == (200, f"received {BODY} bytes\n".encode())
    project.set_version("1.3.0")
    project.fab("deploy")
    assert get(host, "/upload", method="POST", body=upload)[0] == 200
    assert "client_max_body_size 20m;" in host.run(f"cat {SITE}").stdout


@pytest.mark.parametrize("key, extra", [
    ("proxy.extra.client_max_body_size", {"client_max_body_size": "20m; access_log /etc/sudoers.d/zz x"}),
    ("proxy.extra.headers.X-Frame-Options", {"headers": {"X-Frame-Options": 'DENY"; include /etc/shadow; #'}}),
    ("proxy.extra.locations[/files/]", {"locations": {"/files/": "/etc"}}),
])
def test_an_injection_through_proxy_extra_is_refused_by_name(project, fleet, host, key, extra):
    before = site_sha(host)
    project.configure(proxy={"extra": extra})
    try:
        result = fleet.provision(project, check=False)
    finally:
        project.configure(proxy={"extra": {"client_max_body_size": "20m"}})
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith(f"fabdeploy: setting 'fabdeploy.{key}' "), result.stderr
    assert site_sha(host) == before
    assert host.run("test -e /etc/sudoers.d/zz", check=False).returncode != 0
