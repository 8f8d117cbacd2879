"""Fast tests of issue 14's deciding parts: the env file, secrets' sources, the data phases, PostgreSQL's steps."""
import base64
import hashlib
import hmac
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from fabdeploy import appenv, database, onhost, plan, servers
from fabdeploy import phases as ph
from fabdeploy.errors import DeployError
from fabdeploy.layout import Layout
from fabdeploy.model import Bind, HostFacts
from fabdeploy.ops import Facts, Migrate
from fabdeploy.settings import SecretSource, resolve

EXAMPLE = Path(__file__).resolve().parent.parent / "example"
ROOT = "/srv/guestbook"
AWKWARD = {"QUOTE": "it's \"quoted\"", "DOLLAR": "$HOME `id` $(id)", "LINES": "one\ntwo # not a comment\n",
           "EMPTY": "", "SPACES": "  a  b  "}


def settings(**given):
    return resolve(given, EXAMPLE)


def target(s=None, release="R2", **facts) -> ph.Target:
    host = SimpleNamespace(name="deploy@web1", dry_run=False)
    data = {"root": ROOT, "user": "deploy", "uid": 1000, **facts}
    return ph.Target(host, s or settings(), release=release, facts=HostFacts.parse(data), layout=Layout(ROOT))


# -- the env file ----------------------------------------------------------------------

def test_the_env_file_gives_sh_and_the_agent_the_very_same_values(tmp_path):
    """What the serve script sources is what the agent reads (for DATABASE_URL), byte for byte."""
    path = tmp_path / "env"
    path.write_text(appenv.render(AWKWARD))
    shell = subprocess.run(["sh", "-c", f"{appenv.loader(str(path))} && env -0"], capture_output=True,
                           env={"PATH": os.environ["PATH"]}, check=True).stdout
    sourced = dict(item.split("=", 1) for item in shell.decode().split("\0") if "=" in item)
    assert {k: sourced[k] for k in AWKWARD} == AWKWARD
    namespace = {"__name__": "agent_under_test"}
    exec(compile(onhost.program("agent"), "agent", "exec"), namespace)
    assert namespace["release_env"](str(path)) == AWKWARD
    assert namespace["release_env"](str(tmp_path / "missing")) == {}


def test_a_release_without_an_env_file_still_starts_and_runs_commands():
    """Releases from before env files: the loader is a no-op, not an error."""
    done = subprocess.run(["sh", "-c", f"{appenv.loader('/nonexistent/env')} && echo ran"], capture_output=True,
                          text=True)
    assert done.stdout == "ran\n"


def test_the_serve_script_and_every_flask_command_load_the_release_env_before_port_is_unset():
    layout = Layout(ROOT)
    script = servers.serve_script(settings(), layout, "R1", Bind.unix("/s.sock"))
    loads = appenv.loader(f"{ROOT}/releases/R1/env")
    assert script.index(loads) < script.index("unset PORT") < script.rindex("exec ")
    command = plan.flask(settings(), layout, "R1", ("db", "upgrade"))
    assert command.startswith(f"cd {ROOT}/releases/R1 && {loads} && unset PORT && ")


def test_the_env_file_is_written_secret_and_shown_with_each_secret_as_placeholder():
    t = target(settings(env={"MODE": "prod"}))
    t.app_env = appenv.AppEnv({"MODE": "prod"}, {"API_KEY": "s3cret-value"})
    (write,) = ph.write_env(t)
    assert (write.path, write.mode, write.secret) == (f"{ROOT}/releases/R2/env", 0o600, True)
    assert "s3cret-value" in write.text
    shown = "\n".join(write.describe())
    assert "export API_KEY=<secret>" in shown and "export MODE=prod" in shown and "s3cret-value" not in shown
    assert "s3cret-value" not in repr(t.app_env) and "s3cret-value" not in repr(write)


def test_a_changed_environment_is_a_new_deploy_of_the_same_wheel():
    env = appenv.AppEnv({"MODE": "prod"}, {"API_KEY": "one"})
    wheel = SimpleNamespace(sha256="w1")
    deployed = {"current": "R1", "releases": [{"name": "R1", "state": "ready", "meta": {"sha256": "w1"}}]}
    for facts, app_env, unchanged in (({**deployed, "env_sha256": env.sha256}, env, True),
                                      ({**deployed, "env_sha256": env.sha256}, appenv.AppEnv({"MODE": "prod"},
                                                                                              {"API_KEY": "two"}), False),
                                      ({**deployed, "env_sha256": None}, appenv.AppEnv(), True),
                                      ({**deployed, "env_sha256": None}, env, False)):
        t = target(**facts)
        t.wheel, t.app_env = wheel, app_env
        ph.check_unchanged(t)
        assert t.unchanged is unchanged


# -- reading secrets where you deploy ---------------------------------------------------------

def test_each_source_is_read_once_and_a_missing_one_is_named(tmp_path, monkeypatch):
    (tmp_path / "token").write_text("from-a-file\n")
    monkeypatch.setenv("FDT_TOKEN", "from-the-environment")
    s = settings(project_dir=str(EXAMPLE), secrets={
        "A": {"env": "FDT_TOKEN"}, "B": {"file": str(tmp_path / "token")},
        "C": {"command": f"echo x >> {tmp_path}/runs; printf 'from-a-command\\n'"},
        "D": {"command": f"echo x >> {tmp_path}/runs; printf 'from-a-command\\n'"}})
    resolver = appenv.Resolver()
    env = resolver.app_env(s)
    resolver.app_env(s)
    assert env.secrets == {"A": "from-the-environment", "B": "from-a-file", "C": "from-a-command",
                           "D": "from-a-command"}
    assert (tmp_path / "runs").read_text() == "x\n"  # one command, run once for the whole invocation
    for source, message in ((SecretSource("env", "FDT_UNSET"), "the local environment variable FDT_UNSET is not set"),
                            (SecretSource("file", str(tmp_path / "no")), "cannot read the local file"),
                            (SecretSource("command", "exit 3"), "its local command exited 3"),
                            (SecretSource("command", "true"), "is empty")):
        with pytest.raises(DeployError) as err:
            appenv.read_secret("TOKEN", source, tmp_path)
        assert err.value.line().startswith("secret TOKEN ") and message in err.value.line(), err.value.line()


def test_fab_config_never_shows_a_value(monkeypatch):
    monkeypatch.setenv("FDT_TOKEN", "the-value")
    lines = appenv.config_lines(settings(env={"MODE": "prod"}, secrets={"TOKEN": {"env": "FDT_TOKEN"}}))
    assert "the-value" not in "\n".join(lines)
    assert any("TOKEN" in line and "FDT_TOKEN (set)" in line for line in lines), lines


# -- the data phases ------------------------------------------------------------------------------

def names(steps) -> list[str]:
    return [step.name for step in steps]


def test_a_host_with_its_own_database_migrates_in_its_install_request_a_shared_one_does_not():
    local, shared = target(settings()), target(settings(database="shared"))
    assert names(ph.installing(local)) == ["upload", "venv", "install", "secret", "env", "init", "backup", "migrate",
                                           "configure", "start", "before_switch"]
    assert names(ph.installing(shared)) == ["upload", "venv", "install", "secret", "env"]
    assert names(ph.MIGRATE) == ["init", "backup", "migrate"] and names(ph.START) == ["configure", "start", "before_switch"]


def test_the_primary_is_the_marked_host_else_the_first():
    s = settings(hosts=["deploy@web1", {"host": "deploy@web2", "primary": True}])
    web1, web2 = target(s.for_host("deploy", "web1", None)), target(s.for_host("deploy", "web2", None))
    assert ph.primary_of([web1, web2]) is web2 and ph.database_hosts([web1, web2]) == [web2]
    a, b = target(settings(database="shared")), target(settings(database="shared"))
    assert ph.primary_of([a, b]) is a and ph.database_hosts([a, b]) == [a]
    c, d = target(), target()
    assert ph.database_hosts([c, d]) == [c, d]


def test_init_runs_once_for_a_fleet_that_shares_a_database():
    s = settings(database="shared")
    done, fresh = target(s, initialized=True), target(s)
    ph.share_initialized([fresh, done])
    assert fresh.facts.initialized and ph.initialise(fresh) == []


def test_backup_then_migrate_with_the_release_env_uninterruptible():
    t = target(settings(migrate_command="db upgrade", keep_releases=4), current="R1")
    (backup,) = ph.backup(t)
    assert (backup.folder, backup.keep, backup.protect) == (f"{ROOT}/shared/backups/R2", 4, ("R1",))
    assert backup.env_file == f"{ROOT}/releases/R2/env" and backup.instance == f"{ROOT}/shared/instance"
    migrate, schema = ph.migrate(t)
    assert isinstance(migrate, Migrate) and not migrate.interruptible and migrate.what == "flask db upgrade"
    assert migrate.cmd.endswith("/bin/flask --app 'guestbook:create_app()' db upgrade")
    assert appenv.loader(f"{ROOT}/releases/R2/env") in migrate.cmd
    assert schema.folder == backup.folder


def test_a_failed_migration_names_its_cause_the_live_release_and_the_backup():
    t = target(settings(migrate_command="db upgrade"))
    t.backup_taken = {"name": "R2", "folder": f"{ROOT}/shared/backups/R2", "files": ["app.sqlite"], "note": ""}
    migrate = ph.migrate(t)[0]
    error = ph.explain(t, migrate, {"message": "exit 1", "stdout": "", "stderr":
                                    "INFO  [alembic] Running upgrade 1 -> 2\nERROR [flask_migrate] Error: no such "
                                    "column: entry.note\n"})
    assert error.line() == ("deploy@web1: flask db upgrade failed: no such column: entry.note (the live release "
                            f"keeps serving; the database before it is backup R2 in {ROOT}/shared/backups/R2 "
                            "(fab db-backups))")
    assert "Running upgrade 1 -> 2" in error.detail
    t.backup_taken = {"name": "R2", "folder": "x", "files": [], "note": "pg_dump is not installed on this host"}
    assert "backup R2 holds no database (pg_dump is not installed" in ph.explain(t, migrate, {"stderr": "x"}).line()


def rollback_target(backups, current="R3", old="R2") -> ph.Target:
    t = target(release=old, current=current, backups=backups)
    return t


def test_restore_needs_the_backup_of_the_release_being_left():
    t = rollback_target([{"name": "R3", "files": ["app.sqlite"], "moved": True}])
    ph.check_restorable([t])
    assert "backup R3" in ph.restore_question([t])
    for backups, why in (([], "there is none"), ([{"name": "R3", "files": [], "note": "no pg_dump"}], "no pg_dump")):
        with pytest.raises(DeployError, match=why):
            ph.check_restorable([rollback_target(backups)])


def test_a_plain_rollback_across_a_schema_change_says_so_once():
    moved = rollback_target([{"name": "R3", "files": ["a"], "moved": True}])
    moved.old = "R3"
    assert ph.schema_note([moved]).startswith("the database keeps the schema release R3's migration made: "
                                              "fab db-restore --backup R3 puts back")
    same = rollback_target([{"name": "R3", "files": ["a"], "moved": False}])
    same.old = "R3"
    assert ph.schema_note([same]) is None



# -- the agent's backups, for real, on SQLite ---------------------------------------------------

def run_agent(*ops) -> dict:
    """The agent as a host runs it: one request on its stdin, its reply on stdout."""
    request = {"id": 1, "phases": [{"name": "test", "ops": [op.wire() for op in ops]}]}
    done = subprocess.run([sys.executable, "-S", "-c", onhost.program("agent").decode()],
                          input=json.dumps(request) + "\n", capture_output=True, text=True, check=True)
    return json.loads(done.stdout.splitlines()[-1])


def sql(path, *statements) -> list:
    con = sqlite3.connect(path)
    try:
        rows = [con.execute(s).fetchall() for s in statements]
        con.commit()
        return rows[-1]
    finally:
        con.close()


def test_the_agent_backs_up_notes_the_schema_restores_and_keeps_the_newest(tmp_path):
    layout = Layout(str(tmp_path))
    os.makedirs(layout.instance)
    os.makedirs(layout.release("R1"))
    live = f"{layout.instance}/app.sqlite"
    sql(live, "CREATE TABLE entry (name)", "INSERT INTO entry VALUES ('ada')")
    s = settings(migrate_command="db upgrade", keep_releases=2)
    for name in ("R1", "R2", "R3"):
        reply = run_agent(database.backup(s, layout, name, current="R1"))
        assert reply["results"]["backup"]["files"] == ["app.sqlite"], reply
    # The newest two, and always the current release's.
    assert sorted(os.listdir(layout.backups)) == ["R1", "R2", "R3"]
    run_agent(database.backup(s, layout, "R4", current="R3"))
    assert sorted(os.listdir(layout.backups)) == ["R3", "R4"]
    assert oct(os.stat(f"{layout.backup('R4')}/app.sqlite").st_mode & 0o777) == "0o600"
    # A migration moves the schema; the record of the backup before it says so, and the facts.
    sql(live, "ALTER TABLE entry ADD COLUMN note", "INSERT INTO entry VALUES ('grace', 'x')")
    reply = run_agent(database.migrate(s, layout, "R4")[1])
    assert reply["results"]["schema"] == {"moved": True}
    facts = run_agent(Facts(root=str(tmp_path), app="guestbook", python=sys.executable, paths=layout.for_agent(), key="facts"))
    facts = facts["results"]["facts"]
    assert [(b["name"], b["moved"], b["files"]) for b in facts["backups"]] == [
        ("R3", False, ["app.sqlite"]), ("R4", True, ["app.sqlite"])]
    # Back to R4's backup: the old schema and rows; the database as it was is a backup of its own.
    reply = run_agent(database.restore(layout, "R4", "R1", "R5-before-restore"))
    assert reply["results"]["restore"] == {"restored": "R4", "saved": "R5-before-restore"}
    assert sql(live, "SELECT * FROM entry") == [("ada",)]
    assert sql(f"{layout.backup('R5-before-restore')}/app.sqlite", "SELECT * FROM entry") == [("ada", None), ("grace", "x")]
    missing = run_agent(database.restore(layout, "R9", "R1", "R6-before-restore"))
    assert not missing["ok"] and missing["error"]["message"] == "there is no backup R9"

# -- PostgreSQL on a database host -------------------------------------------------------------

def test_the_scram_verifier_is_postgresqls_and_the_same_each_time():
    verifier = database.scram_verifier("ledger", "s3cret")
    assert verifier == database.scram_verifier("ledger", "s3cret") != database.scram_verifier("ledger", "other")
    method, rest = verifier.split("$", 1)
    iterations_salt, keys = rest.split("$")
    iterations, salt = iterations_salt.split(":")
    stored, server = (base64.b64decode(k) for k in keys.split(":"))
    salted = hashlib.pbkdf2_hmac("sha256", b"s3cret", base64.b64decode(salt), int(iterations))
    assert (method, iterations) == ("SCRAM-SHA-256", "4096")
    assert stored == hashlib.sha256(hmac.new(salted, b"Client Key", "sha256").digest()).digest()
    assert server == hmac.new(salted, b"Server Key", "sha256").digest()


def test_the_database_host_gets_postgresql_and_the_password_only_on_stdin():
    s = settings(provision={"database_clients": ["10.0.0.0/16", "samenet"]})
    url = appenv.DatabaseUrl.parse("postgresql+psycopg://ledger:pw-secret@10.0.0.5:5433/ledger")
    steps = database.provision_steps(s, url)
    assert [step.name for step in steps] == ["packages postgresql", "postgresql listens for 10.0.0.0/16 samenet",
                                             "postgresql enabled and running", "postgresql role ledger",
                                             "postgresql database ledger"]
    shown = json.dumps([step.op.describe() for step in steps] + [step.op.fields().get("cmd") for step in steps])
    assert "pw-secret" not in shown and "SCRAM-SHA-256$" not in shown
    role = steps[3].op
    assert database.scram_verifier("ledger", "pw-secret") in role.stdin and "pw-secret" not in role.stdin
    assert "host ledger ledger 10.0.0.0/16 scram-sha-256\\n" in steps[1].op.cmd and "port = 5433" in steps[1].op.cmd


@pytest.mark.parametrize("text, message", [
    ("sqlite:///x.db", "DATABASE_URL to be a PostgreSQL URL"),
    ("postgresql://Ledger:pw@h/ledger", "user must be lower-case"),
    ("postgresql://ledger:pw@h/led-ger", "database name must be lower-case"),
    ("postgresql://ledger@h/ledger", "password must be printable ASCII"),
    ("postgresql://ledger:p%20w@h/ledger", "password must be printable ASCII"),
])
def test_a_database_url_provision_cannot_use_is_refused_without_showing_it(text, message):
    with pytest.raises(DeployError, match=message) as err:
        database.checked_url(appenv.DatabaseUrl.parse(text), "root@db1")
    assert "pw" not in err.value.line().replace("password", "")


def test_a_deploy_to_the_database_host_is_refused_by_name():
    from fabdeploy.tasks import Invocation
    run = SimpleNamespace(settings=settings(hosts=["deploy@web1", {"host": "db1", "role": "database"}]),
                          conns=[SimpleNamespace(user="deploy", host="db1", port=22)])
    with pytest.raises(DeployError, match="db1 is the database host"):
        Invocation.targets(run)
