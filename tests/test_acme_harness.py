"""The ACME harness: a real certbot gets and renews certificates from a real pebble, on loopback."""
import os
import pathlib
import shlex
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading

import pytest
from cryptography import x509

from harness.acme import Pebble, hosts_entry, install_missing
from harness.local_host import free_port
from harness.nspawn import nspawn_hosts

SITE = "site.fabdeploy.test"  # challtestsrv maps it to 127.0.0.1, where certbot's standalone listens
VALIDITY = 86400  # one day: well inside certbot's 30 days before expiry, so every `renew` is due
CERTBOT = "/usr/bin/certbot"


@pytest.fixture(scope="module")
def pebble():
    install_missing({CERTBOT: "certbot"})
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="fdt-acme-"))
    with Pebble(workdir, http_port=free_port(), tls_port=free_port(), validity=VALIDITY) as server:
        server.add_a(SITE, "127.0.0.1")
        yield server
    shutil.rmtree(workdir)


def certbot(pebble, state: pathlib.Path, *args: str, check=True) -> subprocess.CompletedProcess:
    """Run certbot with all its state under `state`, trusting pebble's listener CA only."""
    argv = [CERTBOT, *args, "--non-interactive", "--config-dir", f"{state}/config",
            "--work-dir", f"{state}/work", "--logs-dir", f"{state}/logs"]
    env = {**os.environ, "REQUESTS_CA_BUNDLE": str(pebble.ca_bundle)}
    result = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            timeout=60)
    if check:
        assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    return result


def certonly(pebble, state: pathlib.Path, name: str = SITE, check=True) -> subprocess.CompletedProcess:
    """Get a certificate for name over http-01, certbot answering on pebble's httpPort."""
    return certbot(pebble, state, "certonly", "--standalone", "--http-01-address", "127.0.0.1",
                   "--http-01-port", str(pebble.http_port), "-d", name, "--server", pebble.directory_url,
                   "--agree-tos", "--register-unsafely-without-email", check=check)


def live_cert(state: pathlib.Path, name: str = SITE) -> x509.Certificate:
    return x509.load_pem_x509_certificate((state / f"config/live/{name}/cert.pem").read_bytes())


def validations(pebble) -> int:
    """How many challenges pebble has validated so far (each with three concurrent fetches)."""
    return (pebble.workdir / "pebble.log").read_text().count("set VALID by completed challenge")


def handshake(live: pathlib.Path, cafile: pathlib.Path) -> dict:
    """Serve live's chain on loopback; connect as a client that trusts only cafile; its view of the cert."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(live / "fullchain.pem", live / "privkey.pem")
    client = ssl.create_default_context(cafile=str(cafile))  # no system roots with a cafile

    def serve_once(listener: socket.socket) -> None:
        conn, _ = listener.accept()
        try:
            server.wrap_socket(conn, server_side=True).close()
        except OSError:
            conn.close()  # the client refused our chain: its side of the test says so

    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(10)
        thread = threading.Thread(target=serve_once, args=(listener,))
        thread.start()
        try:
            with socket.create_connection(listener.getsockname(), timeout=10) as raw, \
                    client.wrap_socket(raw, server_hostname=SITE) as tls:
                return tls.getpeercert()
        finally:
            thread.join()


def test_certbot_gets_a_certificate_that_chains_to_pebbles_root(pebble, tmp_path):
    before = validations(pebble)
    certonly(pebble, tmp_path)
    assert validations(pebble) == before + 1  # a real http-01 check, not a reused authorization
    live = tmp_path / f"config/live/{SITE}"
    root = tmp_path / "root.pem"
    root.write_text(pebble.root())
    seen = handshake(live, root)
    assert ("DNS", SITE) in seen["subjectAltName"]
    chain = x509.load_pem_x509_certificates((live / "chain.pem").read_bytes())
    assert chain == [x509.load_pem_x509_certificate(pebble.intermediate().encode())]
    cert = live_cert(tmp_path)
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).total_seconds() == VALIDITY - 1
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(live, pebble.ca_bundle)  # pebble's listener CA must not vouch for what pebble issues


def test_renewals_give_new_serials(pebble, tmp_path):
    certonly(pebble, tmp_path)
    first = live_cert(tmp_path).serial_number
    before = validations(pebble)
    # A one-day certificate is due: a plain renew, as certbot's timer runs it, replaces it.
    certbot(pebble, tmp_path, "renew", "--no-random-sleep-on-renew")
    second = live_cert(tmp_path).serial_number
    certbot(pebble, tmp_path, "renew", "--force-renewal", "--no-random-sleep-on-renew")
    third = live_cert(tmp_path).serial_number
    assert len({first, second, third}) == 3
    assert validations(pebble) == before + 2  # each renewal proved control over http-01 again


def test_pebble_validates_only_names_challtestsrv_knows(pebble, tmp_path):
    result = certonly(pebble, tmp_path, name="unknown.fabdeploy.test", check=False)
    assert result.returncode != 0
    assert "could not resolve URL \"http://unknown.fabdeploy.test:" in result.stdout + result.stderr
    assert not (tmp_path / "config/live/unknown.fabdeploy.test").exists()


def test_stop_ends_both_programs_even_from_a_fresh_object(tmp_path):
    server = Pebble(tmp_path / "pebble", http_port=free_port(), tls_port=free_port()).start()
    pids = [proc.pid for proc in server.procs]
    assert len(pids) == 2 and all(map(running, pids))
    Pebble(tmp_path / "pebble").stop()  # as a later run would, after this one was killed
    assert not any(map(running, pids))
    server.stop()  # and a second stop is harmless
    with pytest.raises(OSError):
        server.root()


@pytest.mark.nspawn
@pytest.mark.skipif(os.geteuid() != 0, reason="systemd-nspawn hosts need root")
def test_an_nspawn_host_and_pebble_reach_each_other(tmp_path):
    """The recipe in harness/acme.py's docstring, both ways, with certbot still outside the image.

    The host fetches the directory by name through its gateway, trusting the listener
    CA through its system store (as certbot's timer would); pebble validates http-01
    at the host's nginx on port 80, where a certbot on this machine put the challenge.
    """
    install_missing({CERTBOT: "certbot"})
    with nspawn_hosts(1, tmp_path / "hosts") as [host], \
            Pebble(tmp_path / "pebble", listen="0.0.0.0", http_port=80) as server:
        site = f"{host.name}.fabdeploy.test"
        server.add_a(site, host.address)
        host.run(f"printf %s {shlex.quote(hosts_entry(host.gateway))} >> /etc/hosts")
        (host.root / "usr/local/share/ca-certificates/pebble-listener.crt").write_bytes(
            server.ca_bundle.read_bytes())
        host.run("update-ca-certificates")
        fetch = f"import urllib.request; print(urllib.request.urlopen({server.host_directory_url!r}).read())"
        assert "newOrder" in host.run(f"python3 -c {shlex.quote(fetch)}").stdout
        certbot(server, tmp_path / "certbot", "certonly", "--webroot", "-w", str(host.root / "var/www/html"),
                "-d", site, "--server", server.directory_url, "--agree-tos",
                "--register-unsafely-without-email")
        log = host.run("cat /var/log/nginx/access.log").stdout
        assert f"{host.gateway} - - " in log and "Pebble-VA" in log  # pebble fetched the challenge


def running(pid: int) -> bool:
    """Alive and not a zombie (the test's own children stay zombies until reaped)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False
