"""Issue 14 on four provisioned hosts: three app hosts and one PostgreSQL for all of them.

The fourth host's `hosts` entry has `role: database`: provision installs
nothing there but PostgreSQL for the app (Debian's postgresql, a real server),
its role with DATABASE_URL's password and its database, reachable from the
test hosts' network. The app hosts reach it through the test machine
(harness.nspawn.route_between). host2 is marked primary: it alone migrates,
once per deploy, after every host is installed. Tests run in file order and
build on each other's state.
"""
import json
import os
import re
import secrets
import shlex
import urllib.parse
import urllib.request

import pytest

from harness.fleet import Fleet
from harness.ledger import Ledger
from harness.nspawn import nspawn_hosts, route_between

pytestmark = [
    pytest.mark.nspawn,
    pytest.mark.skipif(os.geteuid() != 0, reason="systemd-nspawn hosts need root"),
]

APP = "ledger"
ROOT = f"/srv/{APP}"
URL_VARIABLE = "LEDGER_TEST_DATABASE_URL"
PASSWORD = "pw-" + secrets.token_hex(12)
PHASE = re.compile(r"^\[(\S+)\] (\w+) +\d+\.\d+s$", re.M)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """Four booted hosts that reach each other: host1 to host3 for the app, host4 its database."""
    workdir = tmp_path_factory.mktemp("shared-database")
    with nspawn_hosts(4, workdir) as booted:
        route_between(booted)
        yield Fleet(booted, workdir)


@pytest.fixture(scope="module")
def web(fleet):
    return fleet.hosts[:3]


@pytest.fixture(scope="module")
def db(fleet):
    return fleet.hosts[3]


@pytest.fixture(scope="module")
def ledger(fleet, web, db, tmp_path_factory):
    """The ledger for the three app hosts, host2 primary; DATABASE_URL a secret from here. Provisioned."""
    first, second, third = web
    project = Ledger(tmp_path_factory.mktemp("project") / APP, fleet,
                     secrets={"DATABASE_URL": {"env": URL_VARIABLE}},
                     hosts=[first.host_string, {"host": second.host_string, "primary": True}, third.host_string,
                            {"host": db.address, "role": "database"}],
                     provision={"database_clients": ["10.231.0.0/16"]})
    project.url = f"postgresql+psycopg://ledger:{PASSWORD}@{db.address}/ledger"
    project.provision_output = fab(project, "--echo", "provision", hosts=fleet.root_string).stdout
    return project


def fab(project, *args, check=True, hosts=""):
    return project.fab(*args, check=check, hosts=hosts, env={URL_VARIABLE: project.url})


def psql(db, query: str) -> str:
    return db.run(f"cd / && runuser -u postgres -- psql -X -tA -d ledger -c {shlex.quote(query)}").stdout.strip()


def runs(db) -> int:
    """How many times the ledger's migrations ran against the database (its env.py counts them)."""
    return int(psql(db, "SELECT COUNT(*) FROM migration_runs"))


def opener():
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


def get_json(host, path):
    with opener().open(host.url(path), timeout=10) as response:
        return json.loads(response.read())


def current(host) -> str:
    return host.run(f"readlink {ROOT}/current").stdout.strip().rsplit("/", 1)[-1]


def phases_of(output: str, host) -> list[str]:
    return [phase for name, phase in PHASE.findall(output) if name == host.host_string]


def test_provision_sets_up_postgresql_on_the_database_host(ledger, db):
    """The database host: PostgreSQL running, the role with the password, the database, the clients."""
    out = ledger.provision_output
    mark = f"[root@{db.address}]"
    for step in ("postgresql listens for 10.231.0.0/16", "postgresql enabled and running", "postgresql role ledger",
                 "postgresql database ledger"):
        assert f"{mark} changed    {step}" in out, out
    assert PASSWORD not in out and "SCRAM-SHA-256$" not in out, "the password (or its verifier) was shown"
    assert db.run("systemctl is-active postgresql").stdout == "active\n"
    assert psql(db, "SELECT rolpassword LIKE 'SCRAM-SHA-256$4096:%' FROM pg_authid WHERE rolname = 'ledger'") == "t"
    assert psql(db, "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'ledger'") == "ledger"
    # Nothing of an app host there: no deploy user, no site.
    assert db.run("id deploy", check=False).returncode != 0
    again = fab(ledger, "provision", hosts=f"root@{db.address}").stdout
    assert again.strip().splitlines()[-1] == f"{mark} nothing to change", again


def test_the_primary_alone_migrates_once_every_host_is_installed(ledger, web, db):
    """1.0.0 to all three: one migration run, by host2, after every host's install, before any start."""
    first, second, third = web
    result = fab(ledger, "deploy")
    assert runs(db) == 1
    assert psql(db, "SELECT host FROM migration_runs") == "host2"
    assert "migrate" in phases_of(result.stdout, second)
    for host in (first, third):
        assert "migrate" not in phases_of(result.stdout, host) and "init" not in phases_of(result.stdout, host)
    order = [(name, phase) for name, phase in PHASE.findall(result.stdout)]
    migrated = order.index((second.host_string, "migrate"))
    assert all(order.index((h.host_string, "install")) < migrated < order.index((h.host_string, "start"))
               for h in web), result.stdout
    for host in web:
        seen = get_json(host, "/about")
        assert (seen["version"], seen["database"], seen["columns"]) == ("1.0.0", "postgresql", ["id", "name"])


def test_a_row_written_through_host1_reads_back_through_host2_and_host3(ledger, web):
    first, second, third = web
    opener().open(first.url("/entries"), data=urllib.parse.urlencode({"name": "ada"}).encode(), timeout=10).read()
    for host in (second, third):
        assert get_json(host, "/entries") == [{"id": 1, "name": "ada"}]


def test_2_0_0_migrates_once_more_with_a_pg_dump_first(ledger, web, db):
    """Migration 0002 runs once, on host2, after pg_dump took the database as 1.0.0 left it."""
    ledger.add_migration("0002_note")
    ledger.set_version("2.0.0")
    fab(ledger, "deploy")
    assert runs(db) == 2
    for host in web:
        assert get_json(host, "/about")["columns"] == ["id", "name", "note"]
        assert get_json(host, "/entries") == [{"id": 1, "name": "ada", "note": ""}]
    primary = web[1]
    dump = primary.run(f"cat {ROOT}/shared/backups/{current(primary)}/postgres.sql").stdout
    assert "CREATE TABLE public.entry" in dump and "note" not in dump.split("CREATE TABLE public.entry")[1][:200]
    listing = fab(ledger, "db-backups").stdout
    assert re.search(rf"^\*\s+{current(primary)}\s.*postgres\.sql\s+moved$", listing, re.M), listing
    assert listing.count("no backups") == 2, listing  # host1 and host3 never migrate


def test_a_failing_migration_leaves_all_three_on_the_old_release(ledger, web, db):
    """0003 fails on host2: nobody started 3.0.0, everyone serves 2.0.0, the backup is named."""
    before = {h.address: current(h) for h in web}
    ledger.add_migration("0003_broken")
    ledger.set_version("3.0.0")
    result = fab(ledger, "deploy", check=False)
    ledger.remove_migration("0003_broken")
    assert result.returncode == 1
    assert runs(db) == 3  # tried once, on the primary only
    second = web[1]
    assert (f"{second.host_string}: flask db upgrade failed: ledger's migration 0003 fails on purpose"
            " (the live release keeps serving; the database before it is backup ") in result.stderr, result.stderr
    for host in web:
        assert current(host) == before[host.address]
        assert get_json(host, "/about")["version"] == "2.0.0"
        assert "start" not in phases_of(result.stdout, host), result.stdout
        newest = sorted(host.run(f"ls {ROOT}/releases").stdout.split())[-1]
        assert host.run(f"test -f {ROOT}/releases/{newest}/FAILED", check=False).returncode == 0


def test_rollback_restore_db_puts_back_the_database_from_before_2_0_0(ledger, web, db):
    """On host2 only: pg_dump's copy back in one transaction; every host on 1.0.0 and its schema."""
    opener().open(web[0].url("/entries"), data=b"name=grace", timeout=10).read()
    result = fab(ledger, "rollback", "--restore-db", "--yes")
    assert "restored the database from backup" in result.stdout, result.stdout
    for host in web:
        assert get_json(host, "/about")["version"] == "1.0.0"
        assert get_json(host, "/entries") == [{"id": 1, "name": "ada"}]
    assert psql(db, "SELECT COUNT(*) FROM information_schema.columns WHERE table_name = 'entry'") == "2"
