"""Issue 14 on a provisioned host: migrations with a backup first, one that fails, and restores.

One Debian 12 nspawn host set up by provision alone, and the ledger app
(tests/projects/ledger) on SQLite in its instance folder, with its settings
and a secret from its environment. Tests run in file order and build on each
other's state: 1.0.0 creates the table, 2.0.0 adds a column, 3.0.0's
migration fails under load, `rollback --restore-db --yes` puts back the
database from before 2.0.0's migration, and a plain rollback across a
migration says so in one line.
"""
import hashlib
import json
import os
import re
import secrets
import urllib.parse
import urllib.request

import pytest

from harness.fleet import module_fleet
from harness.ledger import Ledger
from load import assert_no_failed_request, under_load

pytestmark = [
    pytest.mark.nspawn,
    pytest.mark.skipif(os.geteuid() != 0, reason="systemd-nspawn hosts need root"),
]

APP = "ledger"
ROOT = f"/srv/{APP}"
DATABASE = f"{ROOT}/shared/instance/ledger.sqlite"
TOKEN_VARIABLE = "LEDGER_TEST_TOKEN"
TOKEN = "tok-" + secrets.token_hex(16)


fleet = module_fleet(1, "migrations")


@pytest.fixture(scope="module")
def host(fleet):
    return fleet.hosts[0]


@pytest.fixture(scope="module")
def ledger(fleet, tmp_path_factory):
    """The ledger on SQLite, its token a secret from this machine's environment; provisioned."""
    project = Ledger(tmp_path_factory.mktemp("project") / APP, fleet,
                     env={"DATABASE_URL": f"sqlite:///{DATABASE}", "LEDGER_GREETING": "Hello"},
                     secrets={"LEDGER_TOKEN": {"env": TOKEN_VARIABLE}})
    fleet.provision(project)
    return project


def fab(project, *args, check=True):
    return project.fab(*args, check=check, env={TOKEN_VARIABLE: TOKEN})


def opener():
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


def about(host) -> dict:
    with opener().open(host.url("/about"), timeout=10) as response:
        return json.loads(response.read())


def entries(host) -> list[dict]:
    with opener().open(host.url("/entries"), timeout=10) as response:
        return json.loads(response.read())


def add_entry(host, name: str) -> None:
    data = urllib.parse.urlencode({"name": name}).encode()
    opener().open(host.url("/entries"), data=data, timeout=10).read()


def current(host) -> str:
    return host.run(f"readlink {ROOT}/current").stdout.strip().rsplit("/", 1)[-1]


def columns(host, path: str) -> list[str]:
    """The entry table's columns in a SQLite file on the host, read by the sqlite3 CLI."""
    out = host.run(f"sqlite3 {path} 'PRAGMA table_info(entry)'").stdout
    return [line.split("|")[1] for line in out.splitlines()]


def names(host, path: str) -> list[str]:
    return host.run(f"sqlite3 {path} 'SELECT name FROM entry ORDER BY id'").stdout.split()


def notes(output: str, host) -> list[str]:
    """The lines fab printed for the host that are not phase lines."""
    mark = f"[{host.host_string}] "
    return [line[len(mark):] for line in output.splitlines()
            if line.startswith(mark) and not re.match(r"^\w+ +\d+\.\d+s$", line[len(mark):])]


def test_1_0_0_creates_its_table_with_its_migration(ledger, host):
    """A first deploy: env and the secret reach the app; `flask db upgrade` made the table."""
    result = fab(ledger, "deploy")
    seen = about(host)
    assert (seen["version"], seen["columns"], seen["entries"]) == ("1.0.0", ["id", "name"], 0)
    assert seen["token_sha256"] == hashlib.sha256(TOKEN.encode()).hexdigest() and seen["greeting"] == "Hello"
    assert notes(result.stdout, host) == ["flask db upgrade made the schema (there was no database before it)"]
    # The env file is the deploy user's alone; its serve script, run by root's unit, reads it.
    release = current(host)
    assert host.run(f"stat -c %U:%a {ROOT}/releases/{release}/env").stdout == "deploy:600\n"
    assert "EnvironmentFile" not in host.run(f"cat /etc/systemd/system/{APP}@.service").stdout
    add_entry(host, "ada")


def test_2_0_0_adds_a_column_and_1_0_0s_data_survives(ledger, host):
    """Migration 0002 adds entry.note; the backup before it holds the database as 1.0.0 left it."""
    ledger.add_migration("0002_note")
    ledger.set_version("2.0.0")
    result = fab(ledger, "deploy")
    release = current(host)
    assert about(host)["columns"] == ["id", "name", "note"]
    assert entries(host) == [{"id": 1, "name": "ada", "note": ""}]
    assert notes(result.stdout, host) == [f"flask db upgrade changed the schema; backup {release} holds the "
                                          "database from before it"]
    backup = f"{ROOT}/shared/backups/{release}/ledger.sqlite"
    assert columns(host, backup) == ["id", "name"] and names(host, backup) == ["ada"]
    assert host.run(f"stat -c %U:%a {backup} {ROOT}/shared/backups/{release}").stdout == "deploy:600\ndeploy:700\n"
    listing = fab(ledger, "db-backups").stdout
    assert re.search(rf"^\*\s+{release}\s+\S+\s+[\d.]+ KB\s+ledger.sqlite\s+moved$", listing, re.M), listing
    add_entry(host, "grace")  # written after the migration: a restore of the backup before it loses it


def test_3_0_0s_failing_migration_leaves_2_0_0_serving_under_load(ledger, host):
    """Migration 0003 raises: the deploy stops with its output and the backup; not one request fails."""
    before = current(host)
    ledger.add_migration("0003_broken")
    ledger.set_version("3.0.0")
    result, deployed, _ = under_load(host.url("/"), lambda: fab(ledger, "deploy", check=False),
                                     threads=4, warm_up=50, after=1.0, max_requests=200_000, max_seconds=240)
    assert_no_failed_request(result)
    assert result.version_counts() == {"2.0.0": result.successes}, result.summary()
    assert deployed.returncode == 1
    failed = sorted(host.run(f"ls {ROOT}/releases").stdout.split())[-1]
    lines = deployed.stderr.strip().splitlines()
    assert lines[0] == (f"fabdeploy: {host.host_string}: flask db upgrade failed: ledger's migration"
                        f" 0003 fails on purpose (the live release keeps serving; the database before it is backup"
                        f" {failed} in {ROOT}/shared/backups/{failed} (fab db-backups))"), deployed.stderr
    # The command's own output follows: Alembic's lines, then Flask-Migrate's error.
    assert any(line.endswith("Running upgrade 0002 -> 0003, Release 3: a migration that fails, as a real one"
                             " might halfway through a deploy.") for line in lines[1:]), deployed.stderr
    assert current(host) == before and about(host)["version"] == "2.0.0"
    assert host.run(f"test -f {ROOT}/releases/{failed}/FAILED", check=False).returncode == 0
    assert host.run(f"systemctl is-active {APP}@{failed}.service", check=False).stdout.strip() != "active"
    assert names(host, f"{ROOT}/shared/backups/{failed}/ledger.sqlite") == ["ada", "grace"]
    ledger.remove_migration("0003_broken")


def test_restore_db_without_a_terminal_or_yes_fails_before_anything(ledger, host):
    """CI has no stdin: the question cannot be asked, so nothing is done."""
    before = host.run(f"wc -l < /var/log/fabdeploy/{APP}/audit.jsonl").stdout
    result = fab(ledger, "rollback", "--restore-db", check=False)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "fabdeploy: --restore-db overwrites the database and asks first, but there is no terminal to ask on"
        " (pass --yes to go ahead without asking)"], result.stderr
    assert about(host)["version"] == "2.0.0"
    assert host.run(f"wc -l < /var/log/fabdeploy/{APP}/audit.jsonl").stdout == before


def test_rollback_restore_db_returns_schema_and_data_to_before_2_0_0s_migration(ledger, host):
    """2.0.0 back to 1.0.0, and the database from backup 2.0.0 took: no note column, no grace."""
    left = current(host)
    result = fab(ledger, "rollback", "--restore-db", "--yes")
    assert about(host)["version"] == "1.0.0"
    assert about(host)["columns"] == ["id", "name"] and entries(host) == [{"id": 1, "name": "ada"}]
    assert columns(host, DATABASE) == ["id", "name"]
    said = notes(result.stdout, host)
    assert len(said) == 1 and said[0].startswith(f"restored the database from backup {left}; as it was just "
                                                 "before, it is backup "), result.stdout
    saved = said[0].rsplit(" ", 1)[1]
    assert names(host, f"{ROOT}/shared/backups/{saved}/ledger.sqlite") == ["ada", "grace"]
    audit = [json.loads(line) for line in host.run(f"cat /var/log/fabdeploy/{APP}/audit.jsonl").stdout.splitlines()]
    assert {"event": "restore-db", "backup": left, "saved": saved}.items() <= audit[-1].items(), audit[-1]


def test_a_plain_rollback_across_a_migration_says_so_in_one_line(ledger, host):
    """2.1.0 migrates 0002 again; a plain rollback keeps its schema and says how to restore."""
    first = current(host)
    ledger.set_version("2.1.0")
    fab(ledger, "deploy")
    migrated = current(host)
    assert columns(host, DATABASE) == ["id", "name", "note"]
    result = fab(ledger, "rollback", "--release", first)
    told = [line for line in result.stdout.splitlines() if "schema" in line]
    assert told == [f"the database keeps the schema release {migrated}'s migration made: fab db-restore --backup"
                    f" {migrated} puts back the one from before it (on {host.host_string}; what was written since"
                    " is lost)"], result.stdout
    assert columns(host, DATABASE) == ["id", "name", "note"] and about(host)["version"] == "1.0.0"
    out = fab(ledger, "db-restore", "--backup", migrated, "--yes").stdout
    assert out.startswith(f"{host.host_string}: restored the database from backup {migrated};"), out
    assert columns(host, DATABASE) == ["id", "name"] and entries(host) == [{"id": 1, "name": "ada"}]
