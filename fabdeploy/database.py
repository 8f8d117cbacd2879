"""What a deploy does with the app's data, and what provision sets up on a database host. No I/O here.

With a migrate_command, every deploy runs it after install and before the
release starts, under the lock: first a backup of the databases into
shared/backups/<release> (backup), then the command (migrate), then a look
at whether it moved the schema (schema). A restore puts a backup back,
keeping the databases as they were as another backup first.

On a host whose `hosts` entry has `role: database`, provision installs
PostgreSQL and makes the app's role (with DATABASE_URL's password) and
database, reachable with a password from `provision.database_clients`.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import re
from shlex import quote

from . import plan
from .appenv import DatabaseUrl
from .errors import DeployError
from .layout import Layout
from .ops import Backup, Migrate, Op, Restore, Schema, Sh
from .provisioning import Step, checked
from .settings import Settings

PG_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")  # goes unquoted into SQL and shell: so only these
PRINTABLE = re.compile(r"^[\x21-\x7e]+$")


# -- deploying: backup, migrate, restore -------------------------------------------------

def backup(settings: Settings, layout: Layout, release: str, current: str | None) -> Backup:
    """The databases as the live release leaves them, before `release` migrates them."""
    folder = layout.backup(release)
    return Backup(layout.instance, layout.env_file(release), folder, keep=settings.keep_releases,
                  protect=(current,) if current else (), key="backup", what=f"backing up the database to {folder}",
                  hint="nothing was migrated: the live release keeps serving")


def migrate(settings: Settings, layout: Layout, release: str) -> list[Op]:
    """migrate_command with the release's code and environment; then whether the schema moved.

    It is not cut short by Ctrl-C: a migration stopped half way leaves a
    schema neither release knows, so the deploy stops after it instead.
    """
    words = settings.migrate_command
    folder = layout.backup(release)
    return [Migrate(plan.flask(settings, layout, release, words), backup=folder, interruptible=False,
                    what=f"flask {' '.join(words)}"),
            Schema(layout.instance, layout.env_file(release), folder, key="schema",
                   what="comparing the schema with the one before the migration")]


def restore(layout: Layout, name: str, release: str, save: str) -> Restore:
    """Backup `name` back into the databases `release` uses; they are kept as backup `save` first."""
    return Restore(layout.backup(name), layout.instance, layout.env_file(release), layout.backup(save),
                   key="restore", what=f"restoring the database from backup {name}")


# -- provision: PostgreSQL on a database host -----------------------------------------------

def checked_url(url: DatabaseUrl | None, host: str) -> DatabaseUrl:
    """DATABASE_URL, fit for provision to make its role and database from (names plain, port set)."""
    hint = "set secrets.DATABASE_URL to postgresql://USER:PASSWORD@HOST/NAME"
    if url is None:
        raise DeployError("a database host needs DATABASE_URL to be a PostgreSQL URL", host, hint=hint)
    for part, value in (("user", url.user), ("database name", url.name)):
        if not PG_NAME.match(value):
            raise DeployError(f"DATABASE_URL's {part} must be lower-case letters, digits and _ "
                              f"(at most 63), not {value!r}", host, hint=hint)
    if not url.password or not PRINTABLE.match(url.password):
        # Never shown: only that it is missing or has characters provision cannot hash alike.
        raise DeployError("DATABASE_URL's password must be printable ASCII without spaces", host, hint=hint)
    if not 0 < url.port < 65536:
        raise DeployError("DATABASE_URL's port is not a port", host, hint=hint)
    return url


def scram_verifier(user: str, password: str, iterations: int = 4096) -> str:
    """PostgreSQL's SCRAM-SHA-256 verifier for the password: the server never sees the password.

    The salt comes from the password and the user (an HMAC), so the same
    password gives the same verifier: a second provision changes nothing.
    """
    salt = hmac.new(password.encode(), b"fabdeploy salt for " + user.encode(), "sha256").digest()[:16]
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()
    b64 = lambda raw: base64.b64encode(raw).decode()  # noqa: E731
    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(hashlib.sha256(client_key).digest())}:{b64(server_key)}"


def hba_lines(settings: Settings, url: DatabaseUrl) -> str:
    """pg_hba.conf lines: the app's role, to its database, from the clients, with a password (SCRAM)."""
    return "".join(f"host {url.name} {url.user} {client} scram-sha-256\n"
                   for client in settings.provision.database_clients)


def config_text(url: DatabaseUrl) -> str:
    return ("# Written by fabdeploy provision: the app hosts reach PostgreSQL over the network;\n"
            "# pg_hba.conf's fabdeploy block says who, for which database, with a password.\n"
            f"listen_addresses = '*'\nport = {url.port}\npassword_encryption = scram-sha-256\n")


def configure_script(app: str, conf_text: str, hba_text: str) -> str:
    """Root's: the cluster's conf.d file and pg_hba.conf's block for the app; a restart if either changed."""
    return f"""
import glob, os, subprocess, sys
clusters = sorted(glob.glob("/etc/postgresql/*/main"), key=lambda p: [int(x) for x in p.split("/")[3].split(".")])
if not clusters:
    sys.exit("no PostgreSQL cluster in /etc/postgresql: is postgresql installed?")
main = clusters[-1]
begin, end = "# fabdeploy {app} begin\\n", "# fabdeploy {app} end\\n"
def write(path, text):
    tmp = path + ".fabdeploy"
    with open(tmp, "w") as f:
        f.write(text)
    st = os.stat(path) if os.path.exists(path) else None
    if st:
        os.chown(tmp, st.st_uid, st.st_gid)
        os.chmod(tmp, st.st_mode & 0o777)
    os.replace(tmp, path)
changed = False
os.makedirs(main + "/conf.d", exist_ok=True)
conf = main + "/conf.d/fabdeploy-{app}.conf"
if not os.path.exists(conf) or open(conf).read() != {conf_text!r}:
    write(conf, {conf_text!r})
    changed = True
hba = main + "/pg_hba.conf"
text = open(hba).read()
if begin in text and end in text:
    head, rest = text.split(begin, 1)
    old, tail = rest.split(end, 1)
else:
    head, old, tail = text if text.endswith("\\n") else text + "\\n", None, ""
if old != {hba_text!r}:
    write(hba, head + begin + {hba_text!r} + end + tail)
    changed = True
if changed:
    subprocess.run(["systemctl", "restart", "postgresql"], check=True)
print("changed" if changed else "unchanged")
"""


def role_sql(url: DatabaseUrl, verifier: str) -> str:
    """The app's role, able to log in with the password; 'changed' unless it already was."""
    user = url.user
    return (f"SELECT CASE WHEN EXISTS (SELECT 1 FROM pg_authid WHERE rolname = '{user}' AND rolcanlogin"
            f" AND rolpassword = '{verifier}') THEN 'unchanged' ELSE 'changed' END;\n"
            f"DO $$BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{user}')"
            f" THEN CREATE ROLE {user} LOGIN; END IF; END$$;\n"
            f"ALTER ROLE {user} LOGIN PASSWORD '{verifier}';\n")


def as_postgres(command: str) -> str:
    return f"cd / && runuser -u postgres -- {command}"


def provision_steps(settings: Settings, url: DatabaseUrl) -> list[Step]:
    """PostgreSQL for the app: installed, listening for its clients, running; its role and database.

    The role's password is DATABASE_URL's, sent as a SCRAM verifier on the
    psql's stdin: never the password, never on a command line.
    """
    app, clients = settings.app, " ".join(settings.provision.database_clients)
    wait = "for i in $(seq 100); do pg_isready -q && break; sleep 0.1; done"
    role = Sh(f"{wait}; {as_postgres('psql -X -q -tA -v ON_ERROR_STOP=1 -d postgres -f -')}",
              stdin=role_sql(url, scram_verifier(url.user, url.password)), key=f"postgresql role {url.user}",
              what=f"provisioning the PostgreSQL role {url.user}", hint="is PostgreSQL running?")
    query = f"SELECT 1 FROM pg_database WHERE datname = '{url.name}'"
    exists = as_postgres(f"psql -X -tAc {quote(query)}")
    return [
        checked("packages postgresql", "dpkg-query -W -f='${Status}' postgresql | grep -q 'install ok installed'",
                "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql"),
        Step(f"postgresql listens for {clients}",
             Sh(f"python3 -c {quote(configure_script(app, config_text(url), hba_lines(settings, url)))}",
                key=f"postgresql listens for {clients}", what="provisioning PostgreSQL's configuration",
                hint="provision needs root")),
        checked("postgresql enabled and running", "systemctl is-enabled postgresql && systemctl is-active postgresql",
                "systemctl enable --now postgresql"),
        Step(f"postgresql role {url.user}", role),
        checked(f"postgresql database {url.name}", f"{wait}; {exists} | grep -qx 1",
                as_postgres(f"createdb -O {url.user} {url.name}")),
    ]
