"""The Fabric tasks: deploy, rollback, releases, unlock.

`fab -H a,b deploy` calls a task once per host, one host after another.
To prepare every host before switching any, each per-host call only
collects its Connection; a `post` task, which Fabric runs once after all
of them, then drives the whole fleet. Without -H, the hosts come from the
`fabdeploy.hosts` setting.
"""
from __future__ import annotations

import datetime as dt
import functools
import json as jsonlib
import os
import signal
from pathlib import Path

from fabric import Connection
from invoke import Task, task
from invoke.exceptions import Exit

from . import fleet, plan, provisioning, render, secret
from . import phases as ph
from .build import start_build
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


def settings_of(c, stage: str | None = None) -> Settings:
    """The `fabdeploy` settings, paths relative to the fabfile's directory."""
    base = getattr(c.config, "_project_prefix", None) or os.getcwd()
    return resolve(c.config.get("fabdeploy", {}), Path(base), stage)


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


def targets_of(c, conns: list, settings: Settings, dry_run: bool = False, **fields) -> list[ph.Target]:
    """One Target per host (-H, else the configured hosts), each with its own settings."""
    if not conns:
        if not settings.hosts:
            raise DeployError("no host given",
                              hint="pass -H user@host, or set fabdeploy.hosts (or stages and --stage)")
        conns = [Connection(entry.spec, config=c.config) for entry in settings.hosts]
    targets = []
    for conn in conns:
        own = settings.for_host(conn.user, conn.host, conn.port)
        targets.append(ph.Target(Host(conn, own["known_hosts"], dry_run=dry_run), own, **fields))
    return targets


def close_all(targets: list[ph.Target]) -> None:
    for t in targets:
        t.host.close()


# -- deploy -----------------------------------------------------------------

def reported(action: str, run, targets: list[ph.Target], r: fleet.Reporter) -> None:
    """Run a fleet action; with --json, print its result whatever happens."""
    error = None
    try:
        run()
    except DeployError as exc:
        error = exc
        raise
    finally:
        close_all(targets)
        if r.json_out:
            print(jsonlib.dumps(r.result(action, targets, error), indent=2), flush=True)


def wants_json(settings: Settings, flag: bool) -> bool:
    return bool(flag or settings["output"] == "json")


@friendly
def run_deploy(c, conns, force=False, dry_run=False, batch=0, parallel=10, quiet=False, stage=None,
               json=False):
    settings = settings_of(c, stage)
    wheel = start_build(Path(settings["project_dir"]))  # while the hosts connect and lock
    targets = targets_of(c, conns, settings, dry_run, release=release_name(), building=wheel,
                         secret_key=secret.new_key())
    r = fleet.Reporter(quiet, parallel=parallel, json_out=wants_json(settings, json))
    reported("deploy", lambda: fleet.deploy(targets, r, force=force, batch=parse_batch(batch, len(targets))),
             targets, r)


def parse_batch(batch, hosts: int) -> int:
    """--batch 2 switches two hosts at a time; --batch 25% a quarter of them."""
    text = str(batch or 0).strip()
    if text.endswith("%"):
        share = float(text[:-1])
        if not 0 < share <= 100:
            raise DeployError(f"--batch {text} must be a percentage from 1% to 100%")
        return max(1, int(hosts * share / 100))
    if not text.isdigit():
        raise DeployError(f"--batch must be a host count or a percentage, not {text!r}")
    return int(text)


STAGE_HELP = "use the hosts and settings of this stage (fabdeploy.stages)"


@task(post=[finish("deploy", run_deploy)], help={
    "stage": STAGE_HELP,
    "force": "deploy even if the same wheel is already current",
    "dry-run": "print what would be done; change nothing",
    "batch": "switch this many hosts (or this percentage, e.g. 25%) at a time; default all",
    "json": "print a machine-readable result (or set fabdeploy.output: json)",
    "parallel": "work on at most this many hosts at once (default 10)",
    "quiet": "print only the outcome",
})
def deploy(c, force=False, dry_run=False, batch="0", parallel=10, quiet=False, stage=None,
           json=False):
    """Build the wheel, install it as a new release, and switch to it when healthy."""
    options = dict(force=force, dry_run=dry_run, batch=batch, parallel=parallel, quiet=quiet,
                   stage=stage, json=json)
    if not collect(c, "deploy", options):
        run_deploy(c, [], **options)


# -- rollback ---------------------------------------------------------------

@friendly
def run_rollback(c, conns, release=None, parallel=10, quiet=False, stage=None, json=False):
    settings = settings_of(c, stage)
    targets = targets_of(c, conns, settings)
    r = fleet.Reporter(quiet, parallel=parallel, json_out=wants_json(settings, json))
    reported("rollback", lambda: fleet.rollback(targets, r, release=release), targets, r)


@task(post=[finish("rollback", run_rollback)], help={
    "stage": STAGE_HELP,
    "release": "the release to return to (default: the one before current)",
    "json": "print a machine-readable result (or set fabdeploy.output: json)",
    "parallel": "work on at most this many hosts at once (default 10)",
    "quiet": "print only the outcome",
})
def rollback(c, release=None, parallel=10, quiet=False, stage=None, json=False):
    """Switch back to the previous release, or to --release NAME."""
    options = dict(release=release, parallel=parallel, quiet=quiet, stage=stage, json=json)
    if not collect(c, "rollback", options):
        run_rollback(c, [], **options)


# -- the small tasks: one host after another ---------------------------------

def each_host(c, conns, work, stage=None) -> None:
    """Connect to each host, read its facts, and run work(target) there."""
    targets = targets_of(c, conns, settings_of(c, stage))
    try:
        for t in targets:
            ph.connect(t)
            ph.read_facts(t)
            work(t)
    finally:
        close_all(targets)


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


def on_each_host(work):
    """A task body that runs work on each host, in turn."""
    return friendly(lambda c, conns, stage=None: each_host(c, conns, work, stage))


@task(post=[finish("releases", on_each_host(show_releases))], help={"stage": STAGE_HELP})
def releases(c, stage=None):
    """List the releases on each host: the current one marked, failed ones flagged."""
    if not collect(c, "releases", {"stage": stage}):
        on_each_host(show_releases)(c, [], stage)


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


@task(post=[finish("unlock", on_each_host(remove_lock))], help={"stage": STAGE_HELP})
def unlock(c, stage=None):
    """Remove a deploy lock left behind, e.g. by a deploy that was killed."""
    if not collect(c, "unlock", {"stage": stage}):
        on_each_host(remove_lock)(c, [], stage)


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


@friendly
def run_rotate(c, conns, stage=None):
    each_host(c, conns, rotate_on(secret.new_key()), stage)


@task(name="rotate-secret", post=[finish("rotate-secret", run_rotate)], help={"stage": STAGE_HELP})
def rotate_secret(c, stage=None):
    """Replace SECRET_KEY; the old key stays a fallback, so sessions survive."""
    if not collect(c, "rotate-secret", {"stage": stage}):
        run_rotate(c, [], stage)


# -- provision --------------------------------------------------------------

def provision_host(t: ph.Target) -> None:
    """Run each provisioning step that is not done yet; say what changed."""
    uid = t.run("id -u", "reading the user", query=True).stdout.strip()
    sudo = "" if uid == "0" else "sudo -n "
    user = t.settings["provision"]["user"]
    key = provisioning.public_key(t.settings, t.host.conn.connect_kwargs.get("key_filename"))
    changed = 0
    for step in provisioning.steps(t.settings, user, key):
        result = t.run(step.command(sudo), f"provisioning {step.name}",
                       hint="provision needs root, or passwordless sudo")
        state = result.stdout.strip().splitlines()[-1] if result else "would check"
        changed += state == "changed"
        print(f"[{t.host.name}] {state:<10} {step.name}", flush=True)
    print(f"[{t.host.name}] " + (f"{changed} step(s) changed" if changed else "nothing to change"))


@friendly
def run_provision(c, conns, stage=None, dry_run=False):
    targets = targets_of(c, conns, settings_of(c, stage), dry_run)
    try:
        for t in targets:
            ph.connect(t)
            provision_host(t)
    finally:
        close_all(targets)


@task(post=[finish("provision", run_provision)],
      help={"stage": STAGE_HELP, "dry-run": "print the steps' commands; change nothing"})
def provision(c, stage=None, dry_run=False):
    """Prepare a fresh server (as root): nginx, python3-venv, a deploy user with narrow sudo."""
    if not collect(c, "provision", {"stage": stage, "dry_run": dry_run}):
        run_provision(c, [], stage, dry_run)


# -- status and logs --------------------------------------------------------

def age(iso: str | None) -> str:
    """How long ago an ISO time was, in words a person reads at a glance."""
    if not iso:
        return "-"
    seconds = (dt.datetime.now(dt.timezone.utc) - dt.datetime.fromisoformat(iso)).total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return f"{int(seconds)}s ago"


def host_status(t: ph.Target) -> dict:
    """The current release, its age and version, the service, health and the lock."""
    current = next((r for r in t.releases if r.name == t.current), None)
    meta = current.meta if current else {}
    service = t.run(plan.server_state(t.settings, t.layout, t.current, t.manager),
                    "reading the service state", query=True, warn=True) if t.current else None
    if t.settings["proxy"] == "none":
        probe = plan.health_direct(t.settings, t.settings["direct"]["bind"], 5)
    else:
        bind = t.facts.get("current_bind") or "unix:"
        probe = plan.health_via_proxy(t.settings, render.stamp(t.settings, t.current, bind), 5)
    health = t.run(probe, "health check", query=True, warn=True) if t.current else None
    return {"host": t.host.name, "current": t.current, "version": meta.get("version"),
            "deployed_at": meta.get("deployed_at"), "age": age(meta.get("deployed_at")),
            "manager": t.manager, "service": service.stdout.strip() if service else "none",
            "health": (health.stdout.strip() or "no answer") if health else "nothing deployed",
            "lock": t.facts.get("lock"),
            "failed": [r.name for r in t.releases if r.state == "failed"]}


def show_status(as_json: bool):
    def show(t: ph.Target) -> None:
        info = host_status(t)
        if as_json:
            print(jsonlib.dumps(info), flush=True)
            return
        lock = info["lock"]
        lock_text = (f"held by {lock.get('who')} ({lock.get('what')}, {lock.get('age', 0):.0f}s)"
                     if lock else "free")
        print(f"{info['host']}\n"
              f"  current  {info['current'] or '-'} (version {info['version'] or '-'}, {info['age']})\n"
              f"  service  {info['service']} ({info['manager']})\n"
              f"  health   {info['health']}\n"
              f"  lock     {lock_text}" +
              (f"\n  failed   {', '.join(info['failed'])}" if info["failed"] else ""), flush=True)
    return show


@friendly
def run_status(c, conns, stage=None, json=False):
    settings = settings_of(c, stage)
    each_host(c, conns, show_status(wants_json(settings, json)), stage)


@task(post=[finish("status", run_status)],
      help={"stage": STAGE_HELP, "json": "one JSON object per host"})
def status(c, stage=None, json=False):
    """Show each host's current release, its age and version, the service, health and lock."""
    if not collect(c, "status", {"stage": stage, "json": json}):
        run_status(c, [], stage, json)


@friendly
def run_logs(c, conns, stage=None, follow=False, lines=50):
    def show(t: ph.Target) -> None:
        print(f"==> {t.host.name}: {t.layout.app_log}", flush=True)
        # Streams straight through. --follow needs a pty: without one, Fabric re-raises
        # Ctrl-C (and our SIGTERM) and Invoke then waits forever for tail's output;
        # with one, the ^C reaches tail, which ends, and so does the command.
        t.host.conn.run(plan.tail_log(t.layout.app_log, int(lines), follow), in_stream=False,
                        warn=True, pty=bool(follow))
    each_host(c, conns, show, stage)


@task(post=[finish("logs", run_logs)],
      help={"stage": STAGE_HELP, "follow": "keep printing new lines (Ctrl-C stops)",
            "lines": "how many lines to show first (default 50)"})
def logs(c, stage=None, follow=False, lines=50):
    """Show the app's log (gunicorn's error log, with the app's tracebacks) on each host."""
    if not collect(c, "logs", {"stage": stage, "follow": follow, "lines": lines}):
        run_logs(c, [], stage, follow, lines)
