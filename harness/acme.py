"""A real ACME CA for tests: Debian's pebble, with pebble-challtestsrv as its DNS.

Versions. Debian 12 ships pebble 2.4.0 (package 2.4.0+ds1-2+b4, both programs)
and certbot 2.1.0. pebble 2.4.0's JSON config takes listenAddress,
managementListenAddress, httpPort, tlsPort, certificate, privateKey,
ocspResponderURL, externalAccountBindingRequired, externalAccountMACKeys,
domainBlocklist and certificateValidityPeriod (seconds, default 157766400,
five years): that last one gives short-lived certificates. Profiles (2.7) and
retryAfter (2.5) are newer. Go ignores unknown keys silently, so a misspelt key
changes nothing; pebble logs the validity it took ("Using certificate validity
period of N seconds").

What is set here, and why:
- PEBBLE_VA_NOSLEEP=1: no random wait (up to 4 s) before each validation.
- PEBBLE_WFE_NONCEREJECT=0: pebble rejects 5% of good nonces by default and
  certbot retries a badNonce only once, so about one certbot run in thirty
  would fail at random.
- PEBBLE_AUTHZREUSE=0: every order proves http-01 again, renewals too, as they
  do at Let's Encrypt once its 30-day authorizations have expired.
- challtestsrv answers only the names added with add_a/add_aaaa
  (-defaultIPv4 "" -defaultIPv6 ""). Its defaults answer every other name with
  127.0.0.1 and ::1; pebble asks for AAAA first and dials only the first
  address, so a default ::1 sends every validation to whatever listens on
  [::1]:httpPort of this machine. Its own challenge servers are off.
Each validation is three concurrent GETs of the challenge URL. certbot renew
sleeps up to 8 minutes when stdin is not a terminal: pass
--no-random-sleep-on-renew in tests.

Reaching systemd-nspawn hosts (harness/nspawn.py). Each host is 10.231.<i>.2 in
its own network namespace and routes only to its /30, so the one address of
this machine it can reach is its gateway 10.231.<i>.1. Hence:
- Pebble(workdir, listen="0.0.0.0", http_port=80): the ACME listener on every
  address, gateways included (pebble takes one listen address; 0.0.0.0 also
  covers the gateways of hosts started later). The management listener and
  challtestsrv stay on 127.0.0.1: only the tests talk to them.
- Every host names its gateway HOST_NAME in /etc/hosts (hosts_entry(gateway))
  and uses host_directory_url; the listener certificate carries HOST_NAME, so
  one certificate serves all hosts.
- Every host trusts ca_bundle: as /usr/local/share/ca-certificates/
  pebble-listener.crt, then update-ca-certificates. Debian's certbot reads the
  system store (python3-certifi points at /etc/ssl/certs/ca-certificates.crt),
  so certbot's timer trusts pebble too; REQUESTS_CA_BUNDLE covers only one run.
- pebble.add_a(f"{host.name}.fabdeploy.test", host.address): pebble resolves
  the site name through challtestsrv and fetches
  http://<site>:80/.well-known/acme-challenge/ from the host's nginx (or
  certbot's standalone server), from the host side of the veth.
- The image needs the packages certbot and python3-certbot-nginx (the nginx
  authenticator and installer; certbot alone has webroot and standalone).
  The hosts are offline, so both must be in harness/nspawn.py's PACKAGES.
tests/test_acme_harness.py proves all but certbot inside a host.

The listener's CA and certificate are made here (cryptography, which paramiko
already brings); the CA's key is never written. Everything lives in the
workdir; stop() ends both programs by PID and leaves the files (logs) to the
caller.
"""
from __future__ import annotations

import datetime
import ipaddress
import json
import os
import pathlib
import socket
import ssl
import subprocess
import time
import urllib.request

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from harness.local_host import _terminate, free_port

PEBBLE, CHALLTESTSRV = "/usr/bin/pebble", "/usr/bin/pebble-challtestsrv"
LOOPBACK = "127.0.0.1"
HOST_NAME = "pebble.test"  # what nspawn hosts call their gateway, to reach pebble
ENV = {"PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0", "PEBBLE_AUTHZREUSE": "0"}


def pebble_config(listen: str, port: int, management_port: int, http_port: int, tls_port: int,
                  cert: pathlib.Path, key: pathlib.Path, validity: int | None) -> dict:
    """pebble's JSON config: where it listens, and where it validates challenges."""
    config = {"listenAddress": f"{listen}:{port}",
              "managementListenAddress": f"{LOOPBACK}:{management_port}",
              "certificate": str(cert), "privateKey": str(key),
              "httpPort": http_port, "tlsPort": tls_port}
    if validity:
        config["certificateValidityPeriod"] = validity
    return {"pebble": config}


def challtestsrv_argv(dns_port: int, management_port: int) -> list[str]:
    """A mock DNS on loopback that answers only the names it is told; nothing else."""
    return [CHALLTESTSRV, "-dns01", f"{LOOPBACK}:{dns_port}",
            "-management", f"{LOOPBACK}:{management_port}",
            "-defaultIPv4", "", "-defaultIPv6", "",
            "-http01", "", "-https01", "", "-tlsalpn01", ""]


def hosts_entry(gateway: str) -> str:
    """The /etc/hosts line by which a test host finds pebble at its gateway."""
    return f"{gateway}\t{HOST_NAME}\n"


def listener_certs(names: list[str], addresses: list[str], days: int = 7) -> tuple[bytes, bytes, bytes]:
    """A throwaway CA and a leaf it signed for names and addresses: (ca_pem, cert_pem, key_pem)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fabdeploy test pebble listener CA")])
    ca = (_certificate(ca_name, ca_name, ca_key.public_key(), ca_key, now, days)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                         critical=True)
          .sign(ca_key, hashes.SHA256()))
    sans = [x509.DNSName(n) for n in names] + [x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]
    leaf_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    leaf = (_certificate(leaf_name, ca_name, key.public_key(), ca_key, now, days)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .sign(ca_key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    pem = serialization.Encoding.PEM
    return ca.public_bytes(pem), leaf.public_bytes(pem), key_pem


def _certificate(subject, issuer, public_key, issuer_key, now, days) -> x509.CertificateBuilder:
    """The fields every certificate here shares, key identifiers included (strict verifiers want them)."""
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
            .public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                           critical=False))


class Pebble:
    """pebble and pebble-challtestsrv, started for one test run and stopped by PID."""

    def __init__(self, workdir: pathlib.Path, *, listen: str = LOOPBACK, http_port: int = 80,
                 tls_port: int = 443, validity: int | None = None):
        self.workdir = pathlib.Path(workdir).absolute()
        self.listen, self.http_port, self.tls_port, self.validity = listen, http_port, tls_port, validity
        self.ca_bundle = self.workdir / "listener-ca.pem"  # what clients trust to reach pebble itself
        self.cert, self.key = self.workdir / "listener.pem", self.workdir / "listener.key"
        self.config = self.workdir / "pebble.json"
        self.pid_file = self.workdir / "pids"  # so that Pebble(workdir).stop() ends a lost run too
        self.port = self.management_port = self.dns_port = self.challtestsrv_port = 0
        self.procs: list[subprocess.Popen] = []

    directory_url = property(lambda self: f"https://{LOOPBACK}:{self.port}/dir")
    host_directory_url = property(lambda self: f"https://{HOST_NAME}:{self.port}/dir")
    dns_server = property(lambda self: f"{LOOPBACK}:{self.dns_port}")

    def start(self) -> "Pebble":
        """Make the listener certificate, start both programs, return once they answer."""
        if self.pid_file.exists():
            raise RuntimeError(f"{self.workdir} holds a running pebble: stop it, or use a fresh workdir")
        try:
            install_missing({PEBBLE: "pebble", CHALLTESTSRV: "pebble"})
            self.workdir.mkdir(parents=True, exist_ok=True)
            self.port, self.management_port, self.challtestsrv_port = (free_port() for _ in range(3))
            self.dns_port = _free_udp_port()
            self._write_files()
            self._spawn("challtestsrv", challtestsrv_argv(self.dns_port, self.challtestsrv_port))
            self._spawn("pebble", [PEBBLE, "-config", str(self.config), "-dnsserver", self.dns_server])
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """SIGTERM both programs by PID, SIGKILL what is left after 5 s; safe twice."""
        pids = self.pid_file.read_text().split() if self.pid_file.exists() else []
        # Only processes running in this workdir: a PID from a lost run may be recycled.
        _terminate([int(pid) for pid in pids if _cwd(int(pid)) == self.workdir.resolve()])
        self.pid_file.unlink(missing_ok=True)
        self.procs = []

    def __enter__(self) -> "Pebble":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def root(self, index: int = 0) -> str:
        """PEM of the root pebble issues under (new on every start), from its management API."""
        return self._management(f"/roots/{index}")

    def intermediate(self, index: int = 0) -> str:
        """PEM of the intermediate that signs pebble's certificates."""
        return self._management(f"/intermediates/{index}")

    def add_a(self, name: str, *addresses: str) -> None:
        """Make challtestsrv answer A queries for name with addresses."""
        self._challtestsrv("/add-a", {"host": name, "addresses": list(addresses)})

    def add_aaaa(self, name: str, *addresses: str) -> None:
        """Make challtestsrv answer AAAA queries for name with addresses."""
        self._challtestsrv("/add-aaaa", {"host": name, "addresses": list(addresses)})

    # -- start steps

    def _write_files(self) -> None:
        addresses = [LOOPBACK] + ([self.listen] if self.listen not in (LOOPBACK, "0.0.0.0") else [])
        ca, cert, key = listener_certs(["localhost", HOST_NAME], addresses)
        self.ca_bundle.write_bytes(ca)
        self.cert.write_bytes(cert)
        self.key.touch(mode=0o600)
        self.key.write_bytes(key)
        config = pebble_config(self.listen, self.port, self.management_port, self.http_port,
                               self.tls_port, self.cert, self.key, self.validity)
        self.config.write_text(json.dumps(config, indent=2) + "\n")

    def _spawn(self, name: str, argv: list[str]) -> None:
        with open(self.workdir / f"{name}.log", "wb") as log:
            self.procs.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                               stderr=subprocess.STDOUT, cwd=self.workdir,
                                               env={**os.environ, **ENV}))
        with open(self.pid_file, "a") as pids:
            pids.write(f"{self.procs[-1].pid}\n")

    def _wait_until_ready(self, timeout: float = 15) -> None:
        """Poll the ACME directory and challtestsrv until both answer; raise with the logs if not."""
        deadline = time.monotonic() + timeout
        while True:
            dead = [p for p in self.procs if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"pebble did not start:\n{self._logs()}")
            try:
                self._get(self.directory_url)
                self._challtestsrv("/clear-a", {"host": HOST_NAME})  # harmless, proves it answers
                return
            except OSError:
                time.sleep(0.05)

    # -- talking to the two programs

    def _management(self, path: str) -> str:
        return self._get(f"https://{LOOPBACK}:{self.management_port}{path}")

    def _get(self, url: str) -> str:
        context = ssl.create_default_context(cafile=str(self.ca_bundle))
        with urllib.request.urlopen(url, context=context, timeout=5) as response:
            return response.read().decode()

    def _challtestsrv(self, path: str, body: dict) -> None:
        request = urllib.request.Request(f"http://{LOOPBACK}:{self.challtestsrv_port}{path}",
                                         data=json.dumps(body).encode(), method="POST")
        with urllib.request.urlopen(request, timeout=5) as response:
            response.read()

    def _logs(self) -> str:
        return "".join(f"--- {log.name}\n{log.read_text(errors='replace')[-2000:]}"
                       for log in sorted(self.workdir.glob("*.log")))


def install_missing(packages: dict[str, str]) -> None:
    """apt-get install the packages ({program path: package}) whose programs are missing (root only)."""
    missing = sorted({pkg for path, pkg in packages.items() if not os.path.exists(path)})
    if not missing:
        return
    if os.geteuid() != 0:
        raise RuntimeError(f"missing packages, run: apt-get install {' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", *missing]):
        result = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr}")


def _cwd(pid: int) -> pathlib.Path | None:
    try:
        return pathlib.Path(os.readlink(f"/proc/{pid}/cwd"))
    except OSError:
        return None


def _free_udp_port() -> int:
    """A free TCP port (see free_port) that is free for UDP on loopback too: DNS uses both."""
    while True:
        port = free_port()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.bind((LOOPBACK, port))
            except OSError:
                continue
        return port
