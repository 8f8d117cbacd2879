"""Deploy and roll back across hosts: prepare all, then switch all.

Each host runs its phases in its own thread (at most `parallel` at once).
No host switches until every host is prepared; the switch then goes in
batches, and stops at the first batch that fails.
"""
from __future__ import annotations

import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from . import phases as ph
from .errors import DeployError
from .layout import previous_release
from .phases import Target


class Reporter:
    """One line per host per phase, and a summary at the end."""

    def __init__(self, quiet: bool = False, out=None):
        self.quiet = quiet
        self.out = out or sys.stdout
        self._lock = threading.Lock()

    def line(self, text: str, always: bool = False) -> None:
        if always or not self.quiet:
            with self._lock:
                print(text, file=self.out, flush=True)

    def step(self, t: Target, name: str, fn: Callable, *args):
        started = time.monotonic()
        try:
            return fn(t, *args)
        finally:
            self.line(f"[{t.host.name}] {name:<16} {time.monotonic() - started:6.2f}s")


def in_parallel(targets: list[Target], work: Callable[[Target], None], parallel: int) -> dict:
    """Run work on every target; return {target: DeployError} for those that failed."""
    failures = {}

    def guarded(t: Target) -> None:
        try:
            work(t)
        except DeployError as exc:
            failures[t] = exc.on(t.host.name)

    with ThreadPoolExecutor(max_workers=max(1, min(parallel, len(targets)))) as pool:
        list(pool.map(guarded, targets))
    return failures


def summary(action: str, failures: dict, total: int) -> DeployError:
    """One host's error as it is; several hosts' errors collected under one line."""
    if total == 1:
        return next(iter(failures.values()))
    return DeployError(f"{action} failed on {len(failures)} of {total} hosts",
                       detail="\n".join(str(exc) for exc in failures.values()))


def batches(targets: list[Target], batch: int) -> list[list[Target]]:
    size = batch if batch and batch > 0 else len(targets)
    return [targets[i:i + size] for i in range(0, len(targets), size)]


# -- deploy -----------------------------------------------------------------

def prepare(t: Target, r: Reporter, force: bool) -> None:
    r.step(t, "connect", ph.connect)
    r.step(t, "facts", ph.read_facts)
    ph.check_server(t)
    r.step(t, "layout", ph.lay_out)
    r.step(t, "lock", ph.take_lock, "deploy")
    ph.check_unchanged(t, force)
    if t.unchanged:
        r.line(f"[{t.host.name}] {t.wheel.filename} is already current "
               f"({t.current}); nothing to do (--force deploys it again)", always=True)
        return
    r.step(t, "upload", ph.upload)
    r.step(t, "venv", ph.create_venv)
    r.step(t, "install", ph.install)
    r.step(t, "instance", ph.link_instance)
    r.step(t, "secret", ph.write_secret)
    r.step(t, "init", ph.initialise)
    r.step(t, "configure", ph.configure_server)
    r.step(t, "check", ph.check_app)
    r.step(t, "ready", ph.mark_ready)
    r.step(t, "start", ph.start_release)


def go_live(t: Target, r: Reporter, event: str) -> None:
    """Move traffic to the started release; put it back if it fails through nginx."""
    old, old_bind = t.current, t.facts.get("current_bind")
    r.step(t, "route", ph.route_traffic, t.bind, old_bind)
    try:
        r.step(t, "verify", ph.verify_through_proxy)
    except DeployError:
        if old_bind:
            ph.route_traffic(t, old_bind, None)
            r.line(f"[{t.host.name}] switched back to {old}: the new release failed through nginx",
                   always=True)
        raise
    r.step(t, "switch", ph.switch_current, t.release)
    t.switched = True
    ph.enable_release(t, t.release)
    r.step(t, "stop old", ph.stop_release, old)
    t.facts["current"] = t.release
    ph.audit(t, event, previous=old)


def abandon(t: Target, reason: str) -> None:
    """A release that will not go live: stop it, mark it, say so in the log."""
    if t.release and t.layout and not t.switched and not t.unchanged:
        ph.mark_failed(t, reason)
        ph.audit(t, "failed", reason=reason)


def deploy(targets: list[Target], r: Reporter, force: bool = False, batch: int = 0,
           parallel: int = 10) -> None:
    started = time.monotonic()
    try:
        failures = in_parallel(targets, lambda t: prepare(t, r, force), parallel)
        if failures:
            in_parallel([t for t in targets if t.locked],
                        lambda t: abandon(t, "preparing failed on " + ", ".join(f.host for f in failures.values())),
                        parallel)
            raise summary("deploy", failures, len(targets))
        live = [t for t in targets if not t.unchanged]
        for group in batches(live, batch):
            failures = in_parallel(group, lambda t: go_live(t, r, "deploy"), parallel)
            if failures:
                pending = [t for t in live if not t.switched]
                in_parallel(pending, lambda t: abandon(t, "switching failed"), parallel)
                raise summary("switch", failures, len(group))
        in_parallel(live, lambda t: r.step(t, "cleanup", ph.cleanup), parallel)
    finally:
        in_parallel(targets, ph.release_lock, parallel)
    if targets and targets[0].release and live:
        hosts = ", ".join(t.host.name for t in live)
        r.line(f"deployed {targets[0].release} to {hosts} in {time.monotonic() - started:.1f}s",
               always=True)


# -- rollback ---------------------------------------------------------------

def pick_target(t: Target, wanted: str | None) -> str:
    good = {rel.name for rel in t.releases if rel.good}
    if wanted:
        if wanted not in good:
            raise DeployError(f"release {wanted} is not a good release on this host",
                              hint="see fab releases")
        if wanted == t.current:
            raise DeployError(f"release {wanted} is already current")
        return wanted
    before = previous_release(t.releases, t.current)
    if before is None:
        raise DeployError("nothing to roll back to: there is no earlier good release",
                          hint="deploy a fixed release instead")
    return before.name


def prepare_rollback(t: Target, r: Reporter, wanted: str | None) -> None:
    r.step(t, "connect", ph.connect)
    r.step(t, "facts", ph.read_facts)
    r.step(t, "lock", ph.take_lock, "rollback")
    t.release = pick_target(t, wanted)
    r.step(t, "configure", ph.configure_server)
    r.step(t, "start", ph.start_release)


def rollback(targets: list[Target], r: Reporter, release: str | None = None,
             parallel: int = 10) -> None:
    try:
        failures = in_parallel(targets, lambda t: prepare_rollback(t, r, release), parallel)
        names = {t.release for t in targets}
        if not failures and len(names) > 1:
            failures = {targets[0]: DeployError(
                "hosts disagree on the previous release: " + ", ".join(sorted(names)),
                hint="name one with --release")}
        if failures:
            for t in targets:
                if t.started:
                    ph.stop_release(t, t.release)
            raise summary("rollback", failures, len(targets) if len(names) < 2 else 1)
        failures = in_parallel(targets, lambda t: go_live(t, r, "rollback"), parallel)
        if failures:
            raise summary("rollback", failures, len(targets))
        r.line(f"rolled back to {targets[0].release} on "
               + ", ".join(t.host.name for t in targets), always=True)
    finally:
        in_parallel(targets, ph.release_lock, parallel)
