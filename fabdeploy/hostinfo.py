"""The tasks that look after one host at a time: status, releases, unlock, logs, rotate-secret, provision."""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
from shlex import quote

from . import database, plan, processes, provisioning, render, secret
from . import phases as ph
from .errors import DeployError
from .fleet import Printer, run_ops, run_steps
from .layout import HELPER, SystemPaths
from .model import Bind
from .ops import Helper, Phase, Read, Tail, Write
from .phases import Target


def ops_phase(name: str, ops: list) -> Phase:
    return Phase(name, tuple(ops))


def read(t: Target) -> None:
    """Connect, and the host's facts in the first request."""
    ph.connect(t)
    t.learn(run_ops(t, "facts", [plan.facts(t.settings)])["facts"])
    ph.remember(t, t.raw_facts)


# -- releases and the lock ----------------------------------------------------------

def release_table(t: Target) -> str:
    rows = [("", "RELEASE", "STATE", "VERSION", "COMMIT", "DEPLOYED AT", "BY")]
    for rel in t.releases:
        mark = "*" if rel.name == t.current else ""
        rows.append((mark, rel.name, rel.state.value, rel.meta.get("version", "-"), commit(rel.meta),
                     rel.meta.get("deployed_at", "-"), rel.meta.get("deployed_by", "-")))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip() for row in rows)


def commit(meta: dict) -> str:
    """abc1234, abc1234-dirty (the tree had changes), or - (not built from git)."""
    if not meta.get("commit"):
        return "-"
    return meta["commit"][:7] + ("-dirty" if meta.get("dirty") else "")


def remove_lock(t: Target) -> str:
    lock = t.facts.lock
    if not lock:
        return f"{t.host.name}: not locked"
    run_ops(t, "unlock", [plan.unlock(t.layout), ph.audit_op(t, "unlock", lock=lock.as_dict())])
    return (f"{t.host.name}: removed the lock held by {lock.who} ({lock.what or '?'}, {lock.age:.0f}s old)")


# -- rotate-secret ----------------------------------------------------------------------

def rotate(t: Target) -> None:
    """A new SECRET_KEY, the old one kept as a fallback so sessions survive; running releases reload."""
    printer = Printer(quiet=True)
    run_steps(t, (ph.CONNECT, ph.LOCK), printer)
    try:
        text = run_ops(t, "read", [Read(t.layout.config_py, key="config", what="reading config.py")])["config"]
        if text is None:
            raise DeployError("there is no config.py to rotate yet", t.host.name, hint="deploy first")
        try:
            rotated = secret.rotate(text, t.secret_key)
        except (ValueError, SyntaxError) as exc:
            # Say what is wrong with the file, but never echo its contents.
            raise DeployError(f"cannot rotate {t.layout.config_py}: {type(exc).__name__}", t.host.name,
                              hint="fix config.py by hand") from None
        write = Write(t.layout.config_py, rotated, mode=0o600, secret=True, what=f"writing {t.layout.config_py}")
        # Audited as soon as the key is in: even if a reload fails after, it was rotated.
        ops = [write, ph.audit_op(t, "rotate-secret"), plan.reload_servers(t.settings, t.layout, t.manager)]
        if t.current and t.settings.proxy.enabled:
            bind = t.facts.current_bind or Bind.unix(t.layout.live_socket)
            ops.append(plan.health_via_proxy(t.settings, render.stamp(t.settings, bind), 10))
        run_ops(t, "rotate", ops, interruptible=False)
    finally:
        ph.release_lock(t)


# -- status and logs ----------------------------------------------------------------------

def age(iso: str | None) -> str:
    """How long ago an ISO time was, in words a person reads at a glance."""
    if not iso:
        return "-"
    seconds = (dt.datetime.now(dt.timezone.utc) - dt.datetime.fromisoformat(iso)).total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return f"{int(seconds)}s ago"


def status(t: Target) -> dict:
    """The current release, its age and version, the service, health and the lock."""
    read(t)
    current = t.facts.current_release
    meta = current.meta if current else {}
    results, health = {}, None
    if t.current:
        if t.settings.proxy.enabled:
            bind = t.facts.current_bind or Bind.unix(t.layout.live_socket)
            probe = plan.health_via_proxy(t.settings, render.stamp(t.settings, bind), 5)
        else:
            probe = plan.health_direct(t.settings, 5)
        # One request; an unhealthy answer is reported, not raised: status says what it finds.
        reply = t.host.execute([ops_phase("status", [
            plan.server_state(t.settings, t.layout, t.current, t.manager),
            *processes.state(t.settings, t.layout, t.current, t.manager),
            dataclasses.replace(probe, key="health")])], interruptible=False)
        results = reply.results
        health = results.get("health") if reply.ok else reply.error.get("message")
    service = results.get("service", {}).get("stdout", "").strip() if t.current else "none"
    lock = t.facts.lock
    return {"host": t.host.name, "current": t.current, "version": meta.get("version"),
            "commit": meta.get("commit"), "dirty": meta.get("dirty"),
            "deployed_at": meta.get("deployed_at"), "age": age(meta.get("deployed_at")),
            "manager": t.manager, "service": service or "none",
            "health": (health or "no answer") if t.current else "nothing deployed",
            "lock": lock.as_dict() if lock else None,
            "processes": dict(line.split(" ", 1) for line in
                              results.get("processes", {}).get("stdout", "").splitlines() if " " in line),
            "failed": [r.name for r in t.releases if r.state.value == "failed"]}


def status_text(info: dict) -> str:
    lock = info["lock"]
    lock_text = f"held by {lock['who']} ({lock['what']}, {lock['age']:.0f}s)" if lock else "free"
    return (f"{info['host']}\n"
            f"  current  {info['current'] or '-'} (version {info['version'] or '-'},"
            f"{f' commit {commit(info)},' if info['commit'] else ''} {info['age']})\n"
            f"  service  {info['service']} ({info['manager']})\n" +
            "".join(f"  {name:<8} {state} (process)\n" for name, state in info["processes"].items()) +
            f"  health   {info['health']}\n"
            f"  lock     {lock_text}" +
            (f"\n  failed   {', '.join(info['failed'])}" if info["failed"] else ""))


def logs(t: Target, lines: int, follow: bool, access: bool = False) -> None:
    read(t)
    if access:
        return access_log(t, lines, follow)
    print(f"==> {t.host.name}: {t.layout.app_log}", flush=True)
    if follow:
        # Streams straight through, with a pty: the ^C reaches tail, which ends, and so does fab.
        from shlex import quote
        t.host.stream(f"tail -n {lines} -F {quote(t.layout.app_log)}", pty=True)
        return
    text = run_ops(t, "logs", [Tail(t.layout.app_log, lines, key="log", what="reading the app's log")])["log"]
    if text:
        print(text, flush=True)


def access_log(t: Target, lines: int, follow: bool) -> None:
    """nginx's log of the app's requests: root's (through the helper) on a provisioned host."""
    if t.settings.proxy.kind != "nginx":
        raise DeployError(f"fab logs --access reads nginx's log (proxy.kind is {t.settings.proxy.kind})",
                          t.host.name)
    if not t.provisioned:
        raise DeployError("fab logs --access reads the log of root's site: where the deploy user runs nginx,"
                          " its own access_log is the app's", t.host.name)
    path = SystemPaths(t.settings.app).access_log
    op = Helper(t.settings.app, ("access-log", str(lines)), key="log", what="reading the access log")
    command = f"sudo -n {HELPER} {quote(t.settings.app)} access-log {lines} follow"
    print(f"==> {t.host.name}: {path}", flush=True)
    if follow:
        t.host.stream(command, pty=True)
        return
    text = run_ops(t, "logs", [op])["log"]
    if text:
        print(text.rstrip("\n"), flush=True)


# -- provision ----------------------------------------------------------------------------

def provision(t: Target, replace_sudo: bool = False) -> None:
    """Run each provisioning step that is not done yet, as root; say what changed."""
    ph.connect(t)
    user = t.settings.provision.user
    key = provisioning.public_key(t.settings, t.host.conn.connect_kwargs.get("key_filename"))
    sudo = t.host.conn.user != "root"
    facts = provisioning.RootFacts.parse(json.loads(
        root_run(t, [provisioning.root_facts(user)], sudo)["root"]["stdout"]))
    steps = provisioning.steps(t.settings, user, key, facts, replace=replace_sudo)
    changed = apply_steps(t, steps, sudo)
    if not t.host.dry_run:
        after = provisioning.RootFacts.parse(json.loads(
            root_run(t, [provisioning.root_facts(user)], sudo)["root"]["stdout"]))
        left = provisioning.broader_sudo(after)
        if left:
            raise DeployError(f"{user} still has other sudo rights ({', '.join(left)})", t.host.name,
                              hint=f"see sudo -l -U {user} on the host")
    say_changed(t, changed)


def apply_steps(t: Target, steps: list, sudo: bool) -> int:
    """Every step in one request as root, a line for each; how many changed something."""
    results = root_run(t, [step.op for step in steps], sudo)
    changed = 0
    for step in steps:
        state = result_word(results.get(step.name)) if not t.host.dry_run else "would check"
        changed += state == "changed"
        print(f"[{t.host.name}] {state:<10} {step.name}", flush=True)
    return changed


def say_changed(t: Target, changed: int) -> None:
    print(f"[{t.host.name}] " + (f"{changed} step(s) changed" if changed else "nothing to change"))


def result_word(result) -> str:
    if isinstance(result, str):
        return result
    if isinstance(result, dict):
        lines = result.get("stdout", "").strip().splitlines()
        return lines[-1] if lines else "done"
    return "done"


def root_run(t: Target, ops: list, sudo: bool) -> dict:
    """Ops as one request to an agent that runs as root (through sudo when not logged in as root)."""
    phases = [ops_phase(op.key or op.what, [op]) for op in ops]
    reply = t.host.execute(phases, interruptible=False, sudo=sudo)
    if not reply.ok:
        failed = next(p for p in phases if p.name == reply.phase)
        raise ph.explain(t, failed.ops[max(reply.index, 0)], reply.error)
    return reply.results


# -- the app's data: backups, restores, a database host (issue 14) -------------------------

def size_words(size: int) -> str:
    for unit, step in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if size >= step:
            return f"{size / step:.1f} {unit}"
    return f"{size} B"


def backup_table(t: Target) -> str:
    """The host's backups, newest last: * marks the one rollback --restore-db puts back."""
    rows = [("", "BACKUP", "TAKEN AT", "SIZE", "HOLDS", "SCHEMA AFTER")]
    for b in t.facts.backups:
        holds = ", ".join(b.files) or (f"nothing: {b.note}" if b.note else "nothing")
        rows.append(("*" if b.name == t.current else "", b.name, b.taken_at or "-", size_words(b.size), holds,
                     "moved" if b.moved else "-"))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip() for row in rows)


def lock_for_restore(t: Target, name: str) -> None:
    """Connect and lock; the backup must be on the host and hold a database."""
    run_steps(t, (ph.CONNECT, ph.LOCK), Printer(quiet=True))
    found = t.facts.backup(name)
    if found is None or not found.files:
        raise DeployError(f"there is no backup {name} holding a database on this host", t.host.name,
                          hint="see fab db-backups")
    if not t.current:
        raise DeployError("nothing is deployed here to restore a database for", t.host.name)


def restore(t: Target, name: str) -> str:
    """Backup `name` back into the databases of the current release; under the lock, audited."""
    results = run_ops(t, "restore", ph.restore_ops(t, name), interruptible=False)
    done = results.get("restore") or {}
    return (f"{t.host.name}: restored the database from backup {name};"
            f" as it was just before, it is backup {done.get('saved')}")


def provision_database(t: Target, url) -> None:
    """A host with the database role: PostgreSQL for the app, each step run only where needed."""
    ph.connect(t)
    sudo = t.host.conn.user != "root"
    steps = database.provision_steps(t.settings, database.checked_url(url, t.host.name))
    changed = apply_steps(t, steps, sudo)
    say_changed(t, changed)
