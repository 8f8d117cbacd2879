"""HTTPS's root parts: what provision asks certbot and openssl, and the files it installs. No I/O on a server.

Everything here is root's, on a provisioned host, and none of it is the
deploy user's to read or write: /etc/fabdeploy/tls/<app>/ (0700) holds what
the site names, the ACME webroot is /var/lib/fabdeploy/acme/<app>, and
certbot keeps its own state in /etc/letsencrypt.

tls.mode acme: Debian's certbot, with its webroot authenticator. certbot's
nginx plugin would parse and rewrite nginx's configuration, and reload nginx
twice per challenge (a reload drops requests on keep-alive connections);
the webroot authenticator only writes the challenge into a folder that root's
site already serves, so the site stays fabdeploy's, and a renewal needs one
reload, by its deploy hook. Until the first certificate exists, the site
names a throwaway self-signed one, so nginx can serve the challenge at all.
Renewal is Debian's certbot.timer.

tls.mode manual: your chain and key, read here on the machine that runs fab,
go to the host inside the agent's request (never on a command line) as one
0600 file, which nginx and Apache both take as certificate and key.
"""
from __future__ import annotations

import json
from shlex import quote

from .layout import HELPER, SystemPaths
from .settings import Settings, fail

PEM_CERT, PEM_KEY = "-----BEGIN CERTIFICATE-----", "PRIVATE KEY-----"


def renew_hook(settings: Settings) -> str:
    """What certbot runs after each renewal: root's helper tests the proxy and reloads it."""
    return f"{HELPER} {settings.app} renewed"


def tls_dir(settings: Settings) -> str:
    return SystemPaths(settings.app).tls_dir


# -- acme -------------------------------------------------------------------------------------

def placeholder(settings: Settings) -> tuple[str, str]:
    """(check, action): a self-signed certificate until certbot's exists, so nginx can start."""
    folder = tls_dir(settings)
    cert, key = quote(f"{folder}/fullchain.pem"), quote(f"{folder}/privkey.pem")
    name = settings.proxy.server_name[0]
    return (f"[ -e {cert} ] && [ -e {key} ]",
            f"rm -f {cert} {key} && (umask 077 && openssl req -x509 -newkey ec"
            f" -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 7 -subj {quote('/CN=' + name)}"
            f" -keyout {key} -out {cert} 2>&1)")


def certbot_argv(settings: Settings) -> list[str]:
    """certonly over http-01 from the webroot, for exactly the site's names, under the app's name."""
    tls = settings.tls
    argv = ["certbot", "certonly", "--non-interactive", "--agree-tos", "--webroot",
            "--webroot-path", SystemPaths(settings.app).acme_webroot, "--cert-name", settings.app,
            "--server", tls.directory, "--deploy-hook", renew_hook(settings)]
    for name in settings.proxy.server_name:
        argv += ["-d", name]
    argv += ["--email", tls.email, "--no-eff-email"] if tls.email else ["--register-unsafely-without-email"]
    return argv


# Run by root's python3, with the app's facts as arguments: "check" exits 0 when certbot's
# lineage has exactly these names from this server and the site's files are links to it;
# "issue" makes it so (a new server needs a new certificate, so it forces one).
ACME = r"""
import json, os, re, subprocess, sys
mode, folder, live, renewal, wanted = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], json.loads(sys.argv[5])
argv = json.loads(sys.argv[6])
def lineage():
    try:
        values = dict(line.split(" = ", 1) for line in open(renewal).read().splitlines() if " = " in line)
    except OSError:
        return None
    text = subprocess.run(["openssl", "x509", "-in", live + "/cert.pem", "-noout", "-text"],
                          capture_output=True, text=True).stdout
    return values.get("server"), sorted(set(re.findall(r"DNS:([^,\s]+)", text)))
def linked():
    return all(os.path.islink(os.path.join(folder, f)) and os.readlink(os.path.join(folder, f)) == os.path.join(live, f)
               for f in ("fullchain.pem", "privkey.pem"))
now = lineage()
if mode == "check":
    sys.exit(0 if now == (wanted["server"], sorted(wanted["names"])) and linked() else 1)
if now and now[0] != wanted["server"]:
    argv.append("--force-renewal")
done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)
if done.returncode:
    sys.exit("certbot failed (%d): %s" % (done.returncode, (done.stderr or done.stdout).strip()[-3000:]))
for f in ("fullchain.pem", "privkey.pem"):
    tmp = os.path.join(folder, "." + f + ".new")
    if os.path.lexists(tmp):
        os.unlink(tmp)
    os.symlink(os.path.join(live, f), tmp)
    os.rename(tmp, os.path.join(folder, f))
"""


def acme_script(settings: Settings, mode: str) -> str:
    """The ACME step's check (mode check) or its action (mode issue), as one root command."""
    app = settings.app
    wanted = {"server": settings.tls.directory, "names": list(settings.proxy.server_name)}
    args = [mode, tls_dir(settings), f"/etc/letsencrypt/live/{app}", f"/etc/letsencrypt/renewal/{app}.conf",
            json.dumps(wanted), json.dumps(certbot_argv(settings))]
    return f"python3 -c {quote(ACME)} " + " ".join(quote(a) for a in args)


# -- manual and the CA -------------------------------------------------------------------------

def read_pem(key: str, path: str, marker: str, what: str) -> str:
    """A local PEM file that tls names; its contents never reach an error."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError as exc:
        raise fail(key, f"names {path}, which cannot be read ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise fail(key, f"names {path}, which is not a PEM file") from None
    if marker not in text:
        raise fail(key, f"names {path}, which holds no {what} in PEM form")
    return text


def bundle(settings: Settings) -> str:
    """Your certificate chain, then its key: one file, for nginx's and Apache's two directives."""
    chain = read_pem("tls.cert", settings.tls.cert, PEM_CERT, "certificate")
    key = read_pem("tls.key", settings.tls.key, PEM_KEY, "private key")
    if PEM_KEY in chain:
        raise fail("tls.cert", f"names {settings.tls.cert}, which holds a private key: give the chain "
                               "only, and the key as tls.key")
    return chain.strip() + "\n" + key.strip() + "\n"


def bundle_path(settings: Settings) -> str:
    return f"{tls_dir(settings)}/bundle.pem"


# The key must belong to the first certificate: checked on the new file before it goes in,
# so a mismatched pair never replaces a working one. (Public keys only are compared.)
PAIR_CHECK = '[ "$(openssl x509 -in {} -noout -pubkey)" = "$(openssl pkey -in {} -pubout -passin pass:)" ]'


def trusted_ca(settings: Settings) -> str:
    return read_pem("tls.ca", settings.tls.ca, PEM_CERT, "CA certificate")
