"""Issue 14 on a loopback host: env and secrets reach the app and its migration, and nothing else.

The ledger app (tests/projects/ledger) reads DATABASE_URL and LEDGER_GREETING
(env, in fabric.yaml) and the secret LEDGER_TOKEN (from the local environment)
from its release's environment, and `flask db upgrade` creates its tables. The
secret's value must reach the app's own processes and appear in no command
line, no other process's environment, no --echo or -d output, no dry run, no
log and no audit line; a missing one must stop a deploy before it connects.
"""
import hashlib
import json
import os
import secrets
import stat
import subprocess
import urllib.request

import pytest

from harness.ledger import Ledger
from harness.listener import CountingListener
from harness.project import FAB
from test_secrets import ProcessSpy, logging_login_shell, proc_owner, read_proc, uid_of

pytestmark = pytest.mark.host
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: /proc of another user, usermod")

TOKEN_VARIABLE = "FABDEPLOY_TEST_LEDGER_TOKEN"   # where the secret comes from, on this machine
DATABASE = "sqlite:///ledger.sqlite"              # Flask-SQLAlchemy: relative to the instance folder
SETTINGS = {"env": {"DATABASE_URL": DATABASE, "LEDGER_GREETING": "Hello from the ledger"},
            "secrets": {"LEDGER_TOKEN": {"env": TOKEN_VARIABLE}}}


@pytest.fixture
def token():
    return "tok-" + secrets.token_hex(16)


@pytest.fixture
def ledger(tmp_path, host):
    """The ledger for the loopback host; the host is wiped after."""
    project = Ledger(tmp_path / "ledger", host, **SETTINGS)
    yield project
    host.run_as_user("for p in ~/srv/ledger/shared/run/*.pid; do [ -f \"$p\" ] && "
                     "kill \"$(cat \"$p\")\"; done; rm -rf ~/srv/ledger", check=False)
    (host.site_dir / "ledger.conf").unlink(missing_ok=True)


def fab_popen(project, token: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([FAB, "-H", project.host.host_string, *args], cwd=project.path,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", TOKEN_VARIABLE: token})


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[str, str]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"fab exited {proc.returncode}\nstdout:\n{out}\nstderr:\n{err[-5000:]}"
    return out, err


def about(host) -> dict:
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(host.url + "about", timeout=10) as r:
        return json.loads(r.read())


class Spy(ProcessSpy):
    """ProcessSpy, keeping each environment with the command line of its process."""

    def __init__(self, uid: int):
        super().__init__(uid)
        self.cmdlines: set[bytes] = set()
        self.environs: set[tuple[bytes, bytes]] = set()

    def read(self, pid: str) -> None:
        cmdline = read_proc(pid, "cmdline")
        self.cmdlines.add(cmdline)
        if proc_owner(pid) == self.uid:
            self.environs.add((cmdline, read_proc(pid, "environ")))


# -- before anything connects ---------------------------------------------------------

class Nowhere:
    """Settings for a host nobody serves: fabric.yaml as Project writes it."""

    def __init__(self, port: int):
        self.host_string = f"deploy@127.0.0.1:{port}"

    def fabric_yaml(self, app):
        return {"fabdeploy": {"deploy_to": f"~/srv/{app}"}}


def test_a_missing_secret_fails_before_connecting_naming_it(tmp_path):
    """No TOKEN variable here: one line naming the secret and its source, and no connection made."""
    listener = CountingListener()
    try:
        project = Ledger(tmp_path / "ledger", Nowhere(listener.port), **SETTINGS)
        env = {k: v for k, v in os.environ.items() if k != TOKEN_VARIABLE}
        result = subprocess.run([FAB, "-H", project.host.host_string, "deploy"], cwd=project.path, env=env,
                                capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)
    finally:
        listener.close()
    assert result.returncode == 1, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"fabdeploy: secret LEDGER_TOKEN is missing: the local environment variable "
                               f"{TOKEN_VARIABLE} is not set"), lines[0]
    assert listener.accepted == 0, "fab connected before it read its secrets"


def test_fab_config_names_each_value_and_its_source_never_the_value(tmp_path, token):
    """env, and secrets from the environment, a file and a command: names and sources only."""
    secret_file = tmp_path / "mail_password"
    secret_file.write_text("mail-" + token + "\n")
    project = Ledger(tmp_path / "ledger", Nowhere(22), env=SETTINGS["env"],
                     secrets={**SETTINGS["secrets"], "MAIL_PASSWORD": {"file": str(secret_file)},
                              "API_KEY": {"command": "echo api-" + token},
                              "OTHER": {"env": "FABDEPLOY_TEST_UNSET"}})
    result = project.fab("config", hosts="", env={TOKEN_VARIABLE: token})
    out = result.stdout
    assert f"LEDGER_TOKEN     secret  the local environment variable {TOKEN_VARIABLE} (set)" in out, out
    assert f"MAIL_PASSWORD    secret  the local file {secret_file} (readable)" in out, out
    assert "API_KEY          secret  the output of the local command: echo api-" in out, out
    assert "OTHER            secret  the local environment variable FABDEPLOY_TEST_UNSET (NOT SET)" in out, out
    assert "LEDGER_GREETING  env     fabric.yaml (fabdeploy.env.LEDGER_GREETING)" in out, out
    assert "migrate_command: flask db upgrade" in out and "database: local" in out, out
    assert token not in out.replace("echo api-" + token, ""), "a secret's value in fab config"


# -- a deploy watched from every side -------------------------------------------------

@needs_root
def test_a_secret_reaches_the_app_and_its_migration_and_nothing_else(ledger, host, token):
    """A first deploy with --echo -d, watched by exec events, /proc sweeps and a logging login shell."""
    with logging_login_shell(host) as shell_log, Spy(uid_of(host)) as spy:
        out, err = finish(fab_popen(ledger, token, "--echo", "-d", "deploy"))
        commands = shell_log.read_bytes()
    release = (ledger.deploy_to / "current").readlink().name
    venv = f"{ledger.deploy_to}/releases/{release}/venv/".encode()

    # It reached the app (which needs DATABASE_URL to start), and the migration made the table.
    seen = about(host)
    assert seen["token_sha256"] == hashlib.sha256(token.encode()).hexdigest()
    assert seen["greeting"] == "Hello from the ledger" and seen["database"] == "sqlite"
    assert seen["columns"] == ["id", "name"] and seen["entries"] == 0
    env_file = ledger.deploy_to / "releases" / release / "env"
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    assert token in env_file.read_text()

    # The spy saw the secret where it belongs: the environments of the release's own processes,
    # its server and `flask db upgrade`. So the watch was real, and the rest are clean.
    holders = [cmdline for cmdline, environ in spy.environs if token.encode() in environ]
    assert any(b"gunicorn" in cmdline for cmdline in holders), f"{spy.sweeps} sweeps, {spy.execs} execs"
    assert any(b"flask" in cmdline and b"db\0upgrade" in cmdline for cmdline in holders), holders
    assert all(venv in cmdline for cmdline in holders), [c[:200] for c in holders if venv not in c]
    assert not [c[:200] for c in spy.cmdlines if token.encode() in c], "the secret on a command line"

    # --echo showed the env file with the secret as <secret>; -d logged the SSH traffic.
    assert "export LEDGER_TOKEN=<secret>" in out and "export LEDGER_GREETING='Hello from the ledger'" in out, out
    assert "db upgrade" in out and "[chan 0]" in err
    assert token not in out and token not in err, "the secret in fab's output"
    assert token.encode() not in commands, "the secret in a command sent over SSH"
    for log in (ledger.deploy_to / "shared" / "log" / "app.log", ledger.deploy_to / ".fabdeploy" / "audit.jsonl"):
        assert log.exists() and token not in log.read_text(), f"the secret in {log}"


def test_a_dry_run_shows_names_and_never_a_secret(ledger, token):
    """Nothing deployed yet: the plan writes the env file, the secret shown as <secret>."""
    out, err = finish(fab_popen(ledger, token, "deploy", "--dry-run"))
    assert "export LEDGER_TOKEN=<secret>" in out and f"export DATABASE_URL={DATABASE}" in out, out
    assert "would back up the app's databases" in out and "bin/flask --app 'ledger:create_app()' db upgrade" in out, out
    assert token not in out + err
    assert not ledger.deploy_to.exists()


def test_new_values_redeploy_the_same_code(ledger, host, token):
    """The same wheel with a new secret is a deploy, not "already current"; the same values again are not."""
    finish(fab_popen(ledger, token, "deploy"))
    first = about(host)["release"]
    changed = "tok-" + secrets.token_hex(16)
    out, _ = finish(fab_popen(ledger, changed, "deploy"))
    assert about(host)["release"] != first, out
    assert about(host)["token_sha256"] == hashlib.sha256(changed.encode()).hexdigest()
    out, _ = finish(fab_popen(ledger, changed, "deploy"))
    assert "is already current" in out, out
