"""Deploy and roll back across hosts: prepare all, then switch all.

Each host runs its phases in its own thread (at most `parallel` at once).
No host switches until every host is prepared; the switch then goes in
batches, and stops at the first batch that fails.
"""
from __future__ import annotations

import os
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
    """One line per host per phase, a summary at the end, and the stop button.

    Ctrl-C sets `cancelled`; every host then stops at its next phase, and the
    failure path (stop the new release, mark it, unlock), which is not made
    of phases, runs everywhere.
    """

    def __init__(self, quiet: bool = False, out=None, parallel: int = 10, json_out: bool = False):
        self.quiet = quiet or json_out
        self.json_out = json_out
        self.out = out or sys.stdout
        self.parallel = max(1, int(parallel))
        self.cancelled = threading.Event()
        self._lock = threading.Lock()
        self.started = time.monotonic()
        self.timings: dict[str, dict[str, float]] = {}
        # A test hook: stop before this phase, so a test can kill us there.
        self.pause_before = os.environ.get("FABDEPLOY_PAUSE_BEFORE")

    def line(self, text: str, always: bool = False) -> None:
        """A phase line (not with -q), or an outcome (`always`; not with --json)."""
        if (always and not self.json_out) or not self.quiet:
            with self._lock:
                print(text, file=self.out, flush=True)

    def step(self, t: Target, name: str, fn: Callable, *args):
        if self.cancelled.is_set():
            raise DeployError(f"interrupted before {name}")
        if name == self.pause_before:
            self.line(f"[{t.host.name}] paused before {name}", always=True)
            # Wait on the stop button, not in sleep(): Ctrl-C must end a pause like a phase.
            if self.cancelled.wait(600):
                raise DeployError(f"interrupted before {name}")
        started = time.monotonic()
        outcome = None  # a phase that fails has its line too
        try:
            outcome = fn(t, *args)
            return outcome
        finally:
            took = time.monotonic() - started
            if outcome is not ph.DEFERRED:  # a phase that did nothing has no line
                with self._lock:
                    self.timings.setdefault(t.host.name, {})[name] = round(took, 3)
                self.line(f"[{t.host.name}] {name:<16} {took:6.2f}s")

    def result(self, action: str, targets: list[Target], error: DeployError | None) -> dict:
        """What happened, for --json: per host, the outcome and each phase's seconds."""
        failed = {}
        if error is not None:
            for line in [error.line(), *(error.detail or "").splitlines()]:
                for t in targets:
                    if t.host.name in line:
                        failed.setdefault(t.host.name, line.strip(" |"))
        hosts = [{"host": t.host.name, "release": t.release or None, "switched": t.switched,
                  "unchanged": t.unchanged, "error": failed.get(t.host.name),
                  "phases": self.timings.get(t.host.name, {})} for t in targets]
        return {"action": action, "ok": error is None, "error": error.line() if error else None,
                "release": targets[0].release if targets else None, "hosts": hosts,
                "seconds": round(time.monotonic() - self.started, 3)}

    def each(self, targets: list[Target], work: Callable[[Target], None]) -> dict:
        """Run work on every target in threads; return {target: DeployError} for failures."""
        failures = {}

        def guarded(t: Target) -> None:
            try:
                work(t)
            except DeployError as exc:
                failures[t] = exc.on(t.host.name)

        if not targets:
            return failures
        pool = ThreadPoolExecutor(max_workers=min(self.parallel, len(targets)))
        try:
            for future in [pool.submit(guarded, t) for t in targets]:
                future.result()
        except BaseException:
            self.cancelled.set()
            raise
        finally:
            pool.shutdown(wait=True)
        return failures


def summary(action: str, failures: dict, total: int) -> DeployError:
    """One host's error as it is; several hosts' errors collected under one line."""
    if total == 1:
        return next(iter(failures.values()))
    return DeployError(f"{action} failed on {len(failures)} of {total} hosts",
                       detail="\n".join(str(exc) for exc in failures.values()))


def batches(targets: list[Target], batch: int) -> list[list[Target]]:
    size = batch if batch and batch > 0 else max(1, len(targets))
    return [targets[i:i + size] for i in range(0, len(targets), size)]


# -- deploy -----------------------------------------------------------------

def prepare(t: Target, r: Reporter, force: bool) -> None:
    # The wheel builds locally meanwhile. A host deployed to before is locked in that
    # time; a fresh one is laid out only once the wheel exists, so that a failed
    # build leaves it untouched.
    r.step(t, "connect", ph.connect)
    r.step(t, "lock", ph.take_lock, "deploy", True)
    r.step(t, "build", ph.await_wheel, r.cancelled)
    if not t.locked:
        r.step(t, "lock", ph.take_lock, "deploy")
    ph.check_unchanged(t, force)
    if not t.unchanged:
        install_release(t, r)


def install_release(t: Target, r: Reporter) -> None:
    """The new release on the host, started on its own socket, and healthy."""
    r.step(t, "upload", ph.upload)
    r.step(t, "venv", ph.create_venv)
    r.step(t, "install", ph.install)
    r.step(t, "secret", ph.write_secret)
    r.step(t, "init", ph.initialise)
    r.step(t, "configure", ph.configure_server)
    r.step(t, "start", ph.start_release)


def go_live(t: Target, r: Reporter, event: str) -> None:
    """Move traffic to the started release, checked through the proxy, and make it current."""
    old = t.current
    if t.wheel is not None:
        # Only now is the release complete: one killed earlier is never a rollback target.
        ph.record_release(t)
    if t.settings["proxy"] == "none":
        r.step(t, "cold switch", ph.cold_switch, old)
    elif not r.step(t, "route", ph.route_traffic, t.release, t.bind, t.facts.get("current_bind")):
        # No preview (Apache, TCP binds): the check comes after the switch.
        verify_or_switch_back(t, r, old)
    r.step(t, "switch", ph.publish, old, event)


def verify_or_switch_back(t: Target, r: Reporter, old: str | None) -> None:
    """The release through the proxy, as visitors now get it; if it fails, the old one again."""
    try:
        r.step(t, "verify", ph.verify_through_proxy)
    except DeployError:
        old_bind = t.facts.get("current_bind")
        if old_bind:
            ph.route_traffic(t, old, old_bind, None, check=False)
            r.line(f"[{t.host.name}] switched back to {old}: the new release failed through "
                   f"{t.settings['proxy']}",
                   always=True)
        else:
            ph.restore_site(t)  # a first deploy: leave the proxy as it was
        raise


def abandon(t: Target, reason: str) -> None:
    """A release that will not go live: stop it, mark it, say so in the log."""
    if t.locked and t.wheel and t.release and not t.switched and not t.unchanged:
        ph.mark_failed(t, reason)
        ph.audit(t, "failed", reason=reason)


def deploy(targets: list[Target], r: Reporter, force: bool = False, batch: int = 0) -> None:
    started = time.monotonic()
    live: list[Target] = []
    try:
        failures = r.each(targets, lambda t: prepare(t, r, force))
        same = [t for t in targets if t.unchanged]
        if not failures and 0 < len(same) < len(targets):
            # After a partial rollout: one release name on every host, so those
            # already serving this wheel take it again under the new name.
            for t in same:
                t.unchanged = False
            failures = r.each(same, lambda t: install_release(t, r))
        for t in targets:
            if t.unchanged:
                r.line(f"[{t.host.name}] {t.wheel.filename} is already current "
                       f"({t.current}); nothing to do (--force deploys it again)", always=True)
        if failures:
            culprits = ", ".join(f.host for f in failures.values())
            r.each(targets, lambda t: abandon(t, f"preparing failed on {culprits}"))
            local = [f for f in failures.values() if f.host == "local"]
            raise local[0] if local else summary("deploy", failures, len(targets))
        live = [t for t in targets if not t.unchanged]
        for group in batches(live, batch):
            failures = r.each(group, lambda t: go_live(t, r, "deploy"))
            if failures:
                r.each([t for t in live if not t.switched],
                               lambda t: abandon(t, "switching failed"))
                raise summary("switch", failures, len(group))
        r.each(live, lambda t: r.step(t, "cleanup", ph.cleanup))
    except KeyboardInterrupt:
        r.each([t for t in targets if not t.switched], lambda t: abandon(t, "interrupted"))
        raise DeployError("interrupted", hint="hosts that had not switched keep the old release") from None
    finally:
        r.each(targets, ph.release_lock)
    hosts = ", ".join(t.host.name for t in live)
    took = f"{time.monotonic() - started:.1f}s"
    if live and targets[0].host.dry_run:
        r.line(f"dry run: would deploy {live[0].release} to {hosts}; nothing was changed", always=True)
    elif live and not r.json_out:
        r.line(f"deployed {live[0].release} to {hosts} in {took}", always=True)


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
    r.step(t, "lock", ph.take_lock, "rollback")
    t.release = pick_target(t, wanted)
    r.step(t, "configure", ph.configure_server)
    r.step(t, "start", ph.start_release)


def rollback(targets: list[Target], r: Reporter, release: str | None = None) -> None:
    try:
        failures = r.each(targets, lambda t: prepare_rollback(t, r, release))
        names = {t.release for t in targets}
        if not failures and len(names) > 1:
            failures = {targets[0]: DeployError(
                "hosts disagree on the previous release: " + ", ".join(sorted(names)),
                hint="name one with --release")}
        if not failures:
            failures = r.each(targets, lambda t: go_live(t, r, "rollback"))
        if failures:
            raise summary("rollback", failures, len(targets) if len(failures) > 1 else 1)
        if not r.json_out:
            r.line(f"rolled back to {targets[0].release} on "
                   + ", ".join(t.host.name for t in targets), always=True)
    except KeyboardInterrupt:
        raise DeployError("interrupted", hint="hosts that had not switched keep their release") from None
    finally:
        r.each([t for t in targets if t.started and not t.switched],
                       lambda t: ph.stop_release(t, t.release))
        r.each(targets, ph.release_lock)
