"""HTTPS in one setting, against a real ACME server, on provisioned Debian 12 hosts.

Pebble (Debian's package) runs on this machine; challtestsrv is its DNS and
maps the site's names to host1. As a user of a private ACME server would,
the project names the server (tls.directory) and the CA that vouches for its
listener (tls.ca); the host finds pebble by name, in /etc/hosts, as DNS
would. Then `fab provision` and `fab deploy` alone: certbot gets the
certificate, and clients that trust only pebble's root see the app over
HTTP/2. A second app on host1 brings a certificate of its own, from a CA
made here; host2 serves one through Apache's mod_ssl.
"""
import json
import os
import shlex
import ssl
import subprocess
import time

import pytest
from cryptography import x509

from h2load import H2Connection, H2Load, HTTPSLoad, NamedHTTPSConnection, client_context, under_loads
from harness.acme import Pebble, hosts_entry, listener_certs
from harness.fleet import Fleet
from harness.nspawn import nspawn_hosts
from harness.project import Project
from test_secrets import ProcessSpy

pytestmark = [
    pytest.mark.nspawn,
    pytest.mark.skipif(os.geteuid() != 0, reason="systemd-nspawn hosts need root"),
]

APP, OTHER = "guestbook", "notes"
SITE, WWW, OTHER_SITE = "guestbook.fabdeploy.test", "www.guestbook.fabdeploy.test", "notes.fabdeploy.test"
VALIDITY = 86400  # a day: inside certbot's 30 days before expiry, so the timer's renew renews
HELPER = "/usr/local/lib/fabdeploy/helper"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("https")


@pytest.fixture(scope="module")
def pebble(workdir):
    with Pebble(workdir / "pebble", listen="0.0.0.0", http_port=80, validity=VALIDITY) as server:
        yield server


@pytest.fixture(scope="module")
def fleet(workdir):
    with nspawn_hosts(2, workdir / "hosts") as hosts:
        yield Fleet(hosts, workdir)


@pytest.fixture(scope="module")
def host(fleet, pebble):
    """host1, with its names in pebble's DNS and pebble's in its own: DNS first."""
    host = fleet.hosts[0]
    for name in (SITE, WWW, OTHER_SITE):
        pebble.add_a(name, host.address)
    host.run(f"printf %s {shlex.quote(hosts_entry(host.gateway))} >> /etc/hosts")
    return host


@pytest.fixture(scope="module")
def root_pem(workdir, pebble):
    """Pebble's root, from its management API: the one CA the clients here trust."""
    path = workdir / "pebble-root.pem"
    path.write_text(pebble.root())
    return str(path)


class OneHost:
    """The fleet's settings, aimed at one of its hosts (each app here lives on one)."""

    def __init__(self, fleet, host):
        self.fleet, self.host_string = fleet, host.host_string

    def fabric_yaml(self, app):
        return self.fleet.fabric_yaml(app)


def project_for(fleet, host, path, app, **settings) -> Project:
    """The example app as `app`, on one host."""
    project = Project(path / app, OneHost(fleet, host), app=app)
    project.configure(wsgi="guestbook:create_app()", **settings)
    return project


@pytest.fixture(scope="module")
def app(fleet, host, pebble, workdir):
    """guestbook with tls in ACME mode: provisioned, then deployed."""
    project = project_for(fleet, host, workdir, APP, proxy={"server_name": [SITE, WWW]},
                          tls={"mode": "acme", "email": "ops@fabdeploy.test",
                               "directory": pebble.host_directory_url, "ca": str(pebble.ca_bundle)})
    project.provisioned = fleet.provision(project, hosts=[host]).stdout
    project.fab("deploy")
    return project


def tls_get(host, name, path, cafile, address=None, method="GET", body=None):
    """HTTPS/1.1 to the host, naming the site; status, headers, body and the server's certificate."""
    conn = NamedHTTPSConnection(address or host.address, name, 443, client_context(cafile, ["http/1.1"]), 10)
    try:
        conn.request(method, path, body=body)
        response = conn.getresponse()
        data = response.read()
        cert = x509.load_der_x509_certificate(conn.sock.getpeercert(binary_form=True))
        return response.status, dict(response.getheaders()), data, cert
    finally:
        conn.close()


def plain_get(host, name, path, method="GET"):
    """Plain HTTP on port 80, never following a redirect."""
    import http.client
    conn = http.client.HTTPConnection(host.address, 80, timeout=10)
    try:
        conn.request(method, path, headers={"Host": name}, body=b"a=1" if method == "POST" else None)
        response = conn.getresponse()
        return response.status, response.getheader("Location"), response.read()
    finally:
        conn.close()


def served_serial(host, name, cafile) -> int:
    return tls_get(host, name, "/about", cafile)[3].serial_number


def live_serial(host, app=APP) -> int:
    pem = host.run(f"cat /etc/letsencrypt/live/{app}/cert.pem").stdout
    return x509.load_pem_x509_certificate(pem.encode()).serial_number


def names_of(cert: x509.Certificate) -> list[str]:
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName)


# -- ACME ------------------------------------------------------------------------------------

def test_a_deploy_in_acme_mode_serves_pebbles_certificate_over_http2(app, host, root_pem, pebble):
    assert f"changed    certificate for {SITE} {WWW} from {pebble.host_directory_url}" in app.provisioned
    conn = H2Connection(host.address, 443, SITE, client_context(root_pem, ["h2", "http/1.1"]), 10)
    try:
        assert conn.sock.selected_alpn_protocol() == "h2"
        cert = x509.load_der_x509_certificate(conn.sock.getpeercert(binary_form=True))
        status, body = conn.get("/about")
    finally:
        conn.close()
    assert sorted(names_of(cert)) == sorted([SITE, WWW])
    assert cert.issuer == x509.load_pem_x509_certificate(pebble.intermediate().encode()).subject
    about = json.loads(body)
    assert status == 200 and about["version"] == "1.0.0"
    # ProxyFix took nginx's X-Forwarded-Proto: the app itself sees https, and makes https URLs.
    assert about["scheme"] == "https" and about["url"] == f"https://{SITE}/about"
    # The other name is on the certificate and answers too; pebble's listener CA vouches for neither.
    assert tls_get(host, WWW, "/about", root_pem)[0] == 200
    with pytest.raises(ssl.SSLCertVerificationError):
        tls_get(host, SITE, "/about", str(pebble.ca_bundle))


def test_plain_http_redirects_and_answers_only_acmes_challenge(app, host):
    assert plain_get(host, SITE, "/about?x=1")[:2] == (301, f"https://{SITE}/about?x=1")
    assert plain_get(host, WWW, "/")[:2] == (301, f"https://{WWW}/")
    assert plain_get(host, SITE, "/sign", method="POST")[:2] == (308, f"https://{SITE}/sign")
    # The challenge folder is root's webroot: what is not there is a 404, not a redirect.
    assert plain_get(host, SITE, "/.well-known/acme-challenge/nothing")[0] == 404
    host.run("test -d /var/lib/fabdeploy/acme/guestbook && test ! -e /srv/guestbook/.well-known")


def test_the_certificate_and_key_are_roots_and_a_timer_renews_them(app, fleet, host):
    stat = lambda path: host.run(f"stat -L -c %U:%a {shlex.quote(path)}").stdout.strip()
    assert stat("/etc/fabdeploy/tls/guestbook") == "root:700"
    assert stat("/etc/fabdeploy/tls/guestbook/privkey.pem") == "root:600"
    read = fleet.ssh(f"deploy@{host.address}", "cat /etc/fabdeploy/tls/guestbook/privkey.pem"
                                                " /etc/letsencrypt/live/guestbook/privkey.pem")
    assert read.returncode != 0 and read.stdout == "" and "Permission denied" in read.stderr
    assert host.run("systemctl is-enabled certbot.timer; systemctl is-active certbot.timer").stdout.split() == [
        "enabled", "active"]
    renewal = host.run("cat /etc/letsencrypt/renewal/guestbook.conf").stdout
    assert f"renew_hook = {HELPER} guestbook renewed" in renewal
    # A second provision finds everything in place.
    again = fleet.provision(app, hosts=[host]).stdout
    assert again.strip().splitlines()[-1] == f"[root@{host.address}] nothing to change", again


def renew(host) -> float:
    """What the timer starts: Debian's certbot.service (`certbot -q renew`), to its end."""
    started = time.monotonic()
    host.run("systemctl start certbot.service")
    return time.monotonic() - started


def test_renewals_under_https_load_fail_no_http2_request(app, host, root_pem):
    """Three renewals by the timer's own service, each under HTTP/2 and HTTP/1.1 load at once.

    A renewal reloads nginx (certbot's deploy hook, root's helper). HTTP/2 clients, as
    browsers are on this site, get nginx's GOAWAY: not one request may fail. HTTP/1.1
    keep-alive clients race the close of idle connections (README, "HTTPS in one
    setting"): those drops are counted and reported, and nothing else may fail.
    """
    report = []
    for _ in range(3):
        before = served_serial(host, SITE, root_pem)
        h2 = H2Load(host.address, SITE, root_pem, threads=4, max_requests=20000, max_seconds=60)
        h1 = HTTPSLoad(host.address, SITE, root_pem, threads=4, max_requests=20000, max_seconds=60)
        (r2, r1), took = under_loads([h2, h1], lambda: renew(host), warm_up=100, after=1.0)
        after = served_serial(host, SITE, root_pem)
        assert after != before and after == live_serial(host)  # the new certificate, served at once
        assert not r2.failures, r2.summary()
        assert not r1.hard_failures, r1.summary()
        report.append(f"renewal {took:.1f}s: HTTP/2 {r2.total} requests, {len(r2.failures)} failed, "
                      f"{len(h2.refused)} refused by GOAWAY and sent again; HTTP/1.1 {r1.total} requests, "
                      f"{len(r1.dropped_keepalive)} dropped on keep-alive")
    print("\n" + "\n".join(report))


def test_ipv6_gets_the_redirect_and_the_app_over_https(app, host, root_pem):
    v6 = f"[{host.address6}]"
    plain = subprocess.run(["curl", "-6", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{redirect_url}",
                            "-H", f"Host: {SITE}", f"http://{v6}/about"], capture_output=True, text=True)
    assert plain.stdout == f"301 https://{SITE}/about", plain.stderr
    https = subprocess.run(["curl", "-6", "-sS", "--http2", "--cacert", root_pem, "--resolve",
                            f"{SITE}:443:{host.address6}", "-w", "\n%{http_version}", f"https://{SITE}/about"],
                           capture_output=True, text=True)
    body, version = https.stdout.rsplit("\n", 1)
    assert version == "2" and json.loads(body)["remote_addr"] == host.gateway6, https.stderr
    assert json.loads(body)["scheme"] == "https"


# -- a certificate of your own ------------------------------------------------------------------

@pytest.fixture(scope="module")
def own_ca(workdir):
    """A CA made here, and a certificate it signed for notes' name: (ca file, chain file, key file, key)."""
    ca, cert, key = listener_certs([OTHER_SITE], [])
    paths = [workdir / name for name in ("own-ca.pem", "notes-chain.pem", "notes-key.pem")]
    for path, data in zip(paths, (ca, cert, key)):
        path.write_bytes(data)
    paths[2].chmod(0o600)
    return (*[str(p) for p in paths], key.decode())


def key_lines(key_pem: str) -> list[str]:
    """The key's base64 lines: any one of them seen anywhere is a leak."""
    return [line for line in key_pem.splitlines() if line and not line.startswith("-----")]


@pytest.fixture(scope="module")
def logging_root_shell(host):
    """root's login shell inside host1 logs every command sshd hands it (test_secrets' method)."""
    host.run("printf '%s\\n' '#!/bin/sh' 'printf \"%s\\0\" \"$@\" >> /root/commands.log' 'exec /bin/bash \"$@\"'"
             " > /usr/local/bin/logging-shell && chmod 0755 /usr/local/bin/logging-shell"
             " && usermod -s /usr/local/bin/logging-shell root")
    try:
        yield "/root/commands.log"
    finally:
        host.run("usermod -s /bin/bash root")


@pytest.fixture(scope="module")
def notes(fleet, host, workdir, own_ca, app, logging_root_shell):
    """notes on host1 too, with the certificate made here: provisioned with --echo -d, under watch."""
    _, chain, key, _ = own_ca
    project = project_for(fleet, host, workdir, OTHER, proxy={"server_name": OTHER_SITE},
                          tls={"mode": "manual", "cert": chain, "key": key})
    with ProcessSpy(uid=0) as spy:  # --echo and -d (debug) are fab's own: before the task
        project.provisioned = project.fab("--echo", "-d", "provision", hosts=f"root@{host.address}")
    project.seen = spy.seen
    project.commands = host.run(f"cat {logging_root_shell}").stdout
    project.fab("deploy")
    return project


def test_your_certificate_is_served_next_to_acmes(notes, host, own_ca, root_pem):
    ca, _, _, _ = own_ca
    status, _, body, cert = tls_get(host, OTHER_SITE, "/about", ca)
    assert status == 200 and json.loads(body)["scheme"] == "https"
    assert names_of(cert) == [OTHER_SITE]
    assert tls_get(host, SITE, "/about", root_pem)[0] == 200  # each name gets its own certificate
    assert plain_get(host, OTHER_SITE, "/about")[:2] == (301, f"https://{OTHER_SITE}/about")


def test_your_key_is_roots_0600_and_never_on_a_command_line_in_output_or_logs(notes, fleet, host, own_ca):
    *_, key = own_ca
    lines = key_lines(key)
    bundle = "/etc/fabdeploy/tls/notes/bundle.pem"
    assert host.run(f"stat -c %U:%G:%a {bundle}").stdout.strip() == "root:root:600"
    assert all(line in host.run(f"cat {bundle}").stdout for line in lines)  # it is the key, in place
    read = fleet.ssh(f"deploy@{host.address}", f"cat {bundle}")
    assert read.returncode != 0 and "Permission denied" in read.stderr
    # The watch saw the provision: its agent, and the step that installed the file.
    out, err = notes.provisioned.stdout, notes.provisioned.stderr
    assert f"install {bundle} (mode 600) if it differs (secret: not shown)" in out, out
    assert "paramiko.transport" in err and "[chan " in err, "-d logged no SSH debug lines"
    assert "python3 -S -c" in notes.commands, "the logging shell saw no agent start"
    assert any(b"fabdeploy" in seen or b"python3" in seen for seen in notes.seen)
    for line in lines:
        assert line not in out and line not in err, "the key in fab's output"
        assert line not in notes.commands, "the key in a command sent over SSH"
        assert not [s[:120] for s in notes.seen if line.encode() in s], "the key in /proc"
    logs = host.run("grep -rlF -e " + " -e ".join(shlex.quote(l) for l in lines) + " /var/log /tmp /srv"
                    " 2>/dev/null; journalctl --no-pager -o cat | grep -cF -e "
                    + " -e ".join(shlex.quote(l) for l in lines) + "; true").stdout.split()
    assert logs == ["0"], f"the key in a log on the host: {logs}"


# -- Apache with mod_ssl ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def apache_host(fleet):
    """host2, untouched so far: provision alone puts Apache in the place of its stock nginx,
    with the proxy modules, mod_ssl and mod_http2 (issue 18's provision, 13's tls)."""
    return fleet.hosts[1]


def test_apache_serves_your_certificate_through_mod_ssl(fleet, apache_host, workdir, own_ca):
    ca, chain, key, _ = own_ca
    project = project_for(fleet, apache_host, workdir / "apache", OTHER,
                          proxy={"kind": "apache", "server_name": OTHER_SITE},
                          tls={"mode": "manual", "cert": chain, "key": key})
    out = fleet.provision(project, hosts=[apache_host]).stdout
    assert "changed    Apache modules ssl http2" in out, out
    project.fab("deploy")
    status, _, body, cert = tls_get(apache_host, OTHER_SITE, "/about", ca)
    assert status == 200 and names_of(cert) == [OTHER_SITE]
    about = json.loads(body)
    assert about["scheme"] == "https" and about["url"] == f"https://{OTHER_SITE}/about"
    conn = H2Connection(apache_host.address, 443, OTHER_SITE, client_context(ca, ["h2"]), 10)
    try:
        assert conn.get("/about")[0] == 200
    finally:
        conn.close()
    assert plain_get(apache_host, OTHER_SITE, "/about")[:2] == (301, f"https://{OTHER_SITE}/about")
    assert plain_get(apache_host, OTHER_SITE, "/sign", method="POST")[:2] == (308, f"https://{OTHER_SITE}/sign")
    assert apache_host.run("stat -c %U:%a /etc/fabdeploy/tls/notes/bundle.pem").stdout.strip() == "root:600"
