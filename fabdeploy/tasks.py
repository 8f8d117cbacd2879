"""The Fabric tasks: deploy, rollback, releases, unlock.

`fab -H a,b deploy` calls a task once per host, one host after another.
To prepare every host before switching any, each per-host call only
collects its Connection; a `post` task, which Fabric runs once after all
of them, then drives the whole fleet. Without -H, the hosts come from the
`fabdeploy.hosts` setting.
"""
from __future__ import annotations

import functools
import os
import signal
from pathlib import Path

from fabric import Connection
from invoke import Task, task
from invoke.exceptions import Exit

from . import fleet, secret
from . import phases as ph
from .build import build_wheel
from .errors import DeployError
from .layout import release_name
from .remote import Host
from .settings import Settings, resolve

_collected: dict[str, dict] = {}


def interrupt(signum, frame):
    raise KeyboardInterrupt


def friendly(fn):
    """Expected failures end as one clear message and exit 1, not a traceback.

    SIGTERM is treated like Ctrl-C, so the failure path unlocks the hosts.
    """
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        previous = signal.signal(signal.SIGTERM, interrupt)
        try:
            return fn(*args, **kwargs)
        except DeployError as exc:
            if os.environ.get("FABDEPLOY_DEBUG"):
                raise
            raise Exit(f"fabdeploy: {exc}", code=1) from None
        finally:
            signal.signal(signal.SIGTERM, previous)
    return wrapper


def settings_of(c) -> Settings:
    """The `fabdeploy` settings, paths relative to the fabfile's directory."""
    base = getattr(c.config, "_project_prefix", None) or os.getcwd()
    return resolve(c.config.get("fabdeploy", {}), Path(base))


def collect(c, name: str, options: dict) -> bool:
    """Under -H, keep this host's Connection for the run at the end."""
    if isinstance(c, Connection):
        entry = _collected.setdefault(name, {"conns": [], "options": options})
        entry["conns"].append(c)
        return True
    return False


def finish(name: str, action) -> Task:
    """The post task that runs `action` once over every collected host."""
    def run_collected(c):
        entry = _collected.pop(name, None)
        if entry:
            action(c, entry["conns"], **entry["options"])
    run_collected.__name__ = f"{name}_all"
    return Task(run_collected)


def hosts_of(c, conns: list, settings: Settings, dry_run: bool = False) -> list[Host]:
    if not conns:
        if not settings["hosts"]:
            raise DeployError("no host given", hint="pass -H user@host, or set fabdeploy.hosts")
        conns = [Connection(h, config=c.config) for h in settings["hosts"]]
    return [Host(conn, settings["known_hosts"], dry_run=dry_run) for conn in conns]


def close_all(hosts: list[Host]) -> None:
    for host in hosts:
        host.close()


# -- deploy -----------------------------------------------------------------

@friendly
def run_deploy(c, conns, force=False, dry_run=False, batch=0, parallel=10, quiet=False):
    settings = settings_of(c)
    hosts = hosts_of(c, conns, settings, dry_run)
    wheel = build_wheel(Path(settings["project_dir"]))
    release = release_name()
    try:
        key = secret.new_key()
        targets = [ph.Target(h, settings, release=release, wheel=wheel, secret_key=key) for h in hosts]
        fleet.deploy(targets, fleet.Reporter(quiet, parallel=parallel), force=force,
                     batch=int(batch))
    finally:
        close_all(hosts)


@task(post=[finish("deploy", run_deploy)], help={
    "force": "deploy even if the same wheel is already current",
    "dry-run": "print what would be done; change nothing",
    "batch": "switch this many hosts at a time (default: all at once)",
    "parallel": "work on at most this many hosts at once (default 10)",
    "quiet": "print only the outcome",
})
def deploy(c, force=False, dry_run=False, batch=0, parallel=10, quiet=False):
    """Build the wheel, install it as a new release, and switch to it when healthy."""
    options = dict(force=force, dry_run=dry_run, batch=batch, parallel=parallel, quiet=quiet)
    if not collect(c, "deploy", options):
        run_deploy(c, [], **options)


# -- rollback ---------------------------------------------------------------

@friendly
def run_rollback(c, conns, release=None, parallel=10, quiet=False):
    settings = settings_of(c)
    hosts = hosts_of(c, conns, settings)
    try:
        targets = [ph.Target(h, settings) for h in hosts]
        fleet.rollback(targets, fleet.Reporter(quiet, parallel=parallel), release=release)
    finally:
        close_all(hosts)


@task(post=[finish("rollback", run_rollback)], help={
    "release": "the release to return to (default: the one before current)",
    "parallel": "work on at most this many hosts at once (default 10)",
    "quiet": "print only the outcome",
})
def rollback(c, release=None, parallel=10, quiet=False):
    """Switch back to the previous release, or to --release NAME."""
    options = dict(release=release, parallel=parallel, quiet=quiet)
    if not collect(c, "rollback", options):
        run_rollback(c, [], **options)


# -- the small tasks: one host after another ---------------------------------

def each_host(c, conns, work) -> None:
    """Connect to each host, read its facts, and run work(target) there."""
    settings = settings_of(c)
    hosts = hosts_of(c, conns, settings)
    try:
        for host in hosts:
            t = ph.Target(host, settings)
            ph.connect(t)
            ph.read_facts(t)
            work(t)
    finally:
        close_all(hosts)


def release_table(t: ph.Target) -> str:
    rows = [("", "RELEASE", "STATE", "VERSION", "DEPLOYED AT", "BY")]
    for rel in t.releases:
        mark = "*" if rel.name == t.current else ""
        rows.append((mark, rel.name, rel.state, rel.meta.get("version", "-"),
                     rel.meta.get("deployed_at", "-"), rel.meta.get("deployed_by", "-")))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip()
                     for row in rows)


def show_releases(t: ph.Target) -> None:
    print(f"{t.host.name} ({t.layout.root}), * = current")
    print(release_table(t) if t.releases else "  no releases yet")


@task(post=[finish("releases", friendly(lambda c, conns: each_host(c, conns, show_releases)))])
def releases(c):
    """List the releases on each host: the current one marked, failed ones flagged."""
    if not collect(c, "releases", {}):
        friendly(each_host)(c, [], show_releases)


def remove_lock(t: ph.Target) -> None:
    lock = t.facts.get("lock")
    if not lock:
        print(f"{t.host.name}: not locked")
        return
    t.locked = True
    ph.release_lock(t)
    ph.audit(t, "unlock", lock=lock)
    print(f"{t.host.name}: removed the lock held by {lock.get('who', 'someone')}"
          f" ({lock.get('what', '?')}, {lock.get('age', 0):.0f}s old)")


@task(post=[finish("unlock", friendly(lambda c, conns: each_host(c, conns, remove_lock)))])
def unlock(c):
    """Remove a deploy lock left behind, e.g. by a deploy that was killed."""
    if not collect(c, "unlock", {}):
        friendly(each_host)(c, [], remove_lock)


def rotate_on(key: str):
    def rotate(t: ph.Target) -> None:
        t.secret_key = key
        ph.take_lock(t, "rotate-secret")
        try:
            ph.rotate_secret(t)
            ph.reload_releases(t)
            ph.verify_through_proxy(t)
            ph.audit(t, "rotate-secret")
        finally:
            ph.release_lock(t)
        print(f"{t.host.name}: new SECRET_KEY in place; the old one stays in SECRET_KEY_FALLBACKS")
    return rotate


def run_rotate(c, conns):
    each_host(c, conns, rotate_on(secret.new_key()))


@task(name="rotate-secret", post=[finish("rotate-secret", friendly(run_rotate))])
def rotate_secret(c):
    """Replace SECRET_KEY; the old key stays a fallback, so sessions survive."""
    if not collect(c, "rotate-secret", {}):
        friendly(run_rotate)(c, [])
