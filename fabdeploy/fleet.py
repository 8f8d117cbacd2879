"""Deploy and roll back across hosts: prepare all, then switch all, or none.

Each host runs its phases in its own thread (at most `parallel` at once).
No host switches until every host is prepared; the switch then goes in
batches, and if a host of a batch fails to switch, the hosts of that batch
that did switch go back to their previous release (still warm) before the
deploy ends. Batches before it stay switched, and the output says so.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable

from . import hooks
from . import phases as ph
from .errors import DeployError
from .ops import Phase
from .phases import Step, Target

# A seam for tests that kill or interrupt a deploy at a given moment: the host
# waits before this phase (e.g. FABDEPLOY_PAUSE_BEFORE=route) until Ctrl-C.
PAUSE_BEFORE = os.environ.get("FABDEPLOY_PAUSE_BEFORE")


class Printer:
    """One line per host per phase (not with -q), the outcome, and each phase's time for --json."""

    def __init__(self, quiet: bool = False, json_out: bool = False, out=None):
        self.quiet = quiet or json_out
        self.json_out = json_out
        self.out = out or sys.stdout
        self._lock = threading.Lock()
        self.started = time.monotonic()
        self.timings: dict[str, dict[str, float]] = {}

    def line(self, text: str, always: bool = False) -> None:
        """A phase line (not with -q), or an outcome (`always`; not with --json)."""
        if (always and not self.json_out) or not self.quiet:
            with self._lock:
                print(text, file=self.out, flush=True)

    def phase(self, t: Target, name: str, seconds: float) -> None:
        with self._lock:
            self.timings.setdefault(t.host.name, {})[name] = round(seconds, 3)
        self.line(f"[{t.host.name}] {name:<16} {seconds:6.2f}s")

    def result(self, action: str, targets: list[Target], errors: dict, error: DeployError | None) -> dict:
        """What happened, for --json: per host, where it ended and each phase's seconds."""
        hosts = [{"host": t.host.name, "release": t.release or None, "switched": t.switched,
                  "current": t.current, "unchanged": t.unchanged,
                  "error": errors[t].line() if t in errors else None,
                  "phases": self.timings.get(t.host.name, {})} for t in targets]
        return {"action": action, "ok": error is None, "error": error.line() if error else None,
                "release": targets[0].release if targets else None, "hosts": hosts,
                "seconds": round(time.monotonic() - self.started, 3)}


class Runner:
    """Work on every host in threads, at most `parallel` at once; Ctrl-C stops them all.

    Ctrl-C sets `cancelled` and tells every host's agent to stop; each host
    then ends at its next phase, and the failure path runs everywhere.
    """

    def __init__(self, parallel: int = 10):
        self.parallel = max(1, int(parallel))
        self.cancelled = threading.Event()
        self.errors: dict[Target, DeployError] = {}  # the last error of each host, by identity

    def each(self, targets: list[Target], work: Callable[[Target], None]) -> dict[Target, DeployError]:
        """Run work on every target; return {target: DeployError} for those that failed."""
        failures = {}

        def guarded(t: Target) -> None:
            try:
                work(t)
            except DeployError as exc:
                failures[t] = self.errors[t] = exc.on(t.host.name)

        if not targets:
            return failures
        pool = ThreadPoolExecutor(max_workers=min(self.parallel, len(targets)))
        try:
            for future in [pool.submit(guarded, t) for t in targets]:
                future.result()
        except BaseException:
            self.cancelled.set()
            for t in targets:
                t.host.cancel()
            raise
        finally:
            pool.shutdown(wait=True)
        return failures


def run_steps(t: Target, steps: Iterable[Step], printer: Printer) -> None:
    """One host through declared steps: local ones here, consecutive remote ones in one request.

    Each remote phase is planned when its turn comes, so it sees what the
    phases before it decided; the agent then runs the request's phases in
    order and reports each as it ends.
    """
    batch: list[tuple[Step, list]] = []
    for step in steps:
        if t.cancelled.is_set():
            raise DeployError(f"interrupted before {step.name}")
        if step.name == PAUSE_BEFORE:
            send(t, batch, printer)
            pause(t, step.name, printer)
        if not step.when(t):
            continue
        if step.remote:
            batch.append((step, list(step.fn(t))))
            continue
        send(t, batch, printer)
        started = time.monotonic()
        try:
            step.fn(t)
        finally:
            if step.printed:
                printer.phase(t, step.name, time.monotonic() - started)
    send(t, batch, printer)


def send(t: Target, batch: list, printer: Printer, interruptible: bool = True) -> None:
    """The batch's phases as one request; then each phase's `done`, in order."""
    if not batch:
        return
    steps = {step.name: step for step, _ in batch}
    request = [Phase(step.name, tuple(ops), interruptible=not step.steady) for step, ops in batch]
    batch.clear()

    def ended(name: str, seconds: float) -> None:
        step = steps.get(name)
        if step and step.printed and step.shown is None:
            printer.phase(t, name, seconds)

    timings: dict[str, float] = {}

    def noted(name: str, seconds: float) -> None:
        timings[name] = seconds
        ended(name, seconds)

    reply = t.host.execute(request, on_phase=noted, interruptible=interruptible)
    for phase in request:
        step = steps[phase.name]
        if not reply.ok and phase.name == reply.phase:
            break
        if step.done:
            step.done(t, reply.results)
        if step.printed and step.shown is not None and step.shown(t):
            printer.phase(t, phase.name, timings.get(phase.name, 0.0))
    if not reply.ok:
        if reply.stopped or reply.index < 0:
            error = DeployError("interrupted" if t.cancelled.is_set() else
                                f"stopped before {reply.phase}: {reply.error.get('message')}", t.host.name)
        else:
            failed = next(p for p in request if p.name == reply.phase)
            error = ph.explain(t, failed.ops[reply.index], reply.error)
        error.phase = reply.phase
        raise error


def run_ops(t: Target, name: str, ops: list, printer: Printer | None = None,
            interruptible: bool = True) -> dict:
    """A few ops as one request, with no line of their own (the failure paths, status, ...)."""
    if not ops:
        return {}
    reply = t.host.execute([Phase(name, tuple(ops))], interruptible=interruptible)
    if not reply.ok:
        raise ph.explain(t, ops[reply.index] if reply.index >= 0 else ops[0], reply.error)
    return reply.results


def pause(t: Target, name: str, printer: Printer) -> None:
    printer.line(f"[{t.host.name}] paused before {name}", always=True)
    # Wait on the stop button, not in sleep(): Ctrl-C must end a pause like a phase.
    if t.cancelled.wait(600):
        raise DeployError(f"interrupted before {name}")


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

def prepare(t: Target, printer: Printer, steps=ph.PREPARE, through: bool = False) -> None:
    """A host ready to switch; `through`: and switched, with nobody to wait for in between."""
    run_steps(t, steps, printer)
    if t.repaired:
        printer.line(f"[{t.host.name}] repaired: {t.repaired}", always=True)
    if ph.timer_warning(t):
        printer.line(f"[{t.host.name}] {ph.timer_warning(t)}", always=True)
    if steps is ph.PREPARE and not t.unchanged:
        try:
            if through:
                all_the_way(t, printer)
            else:
                run_steps(t, ph.installing(t), printer)
        finally:
            say_notes(t, printer)


def alone(targets: list[Target]) -> bool:
    """One host, its own database, no local hook between preparing and switching: nobody to
    wait for, so a deploy goes in one request."""
    if len(targets) != 1:
        return False
    settings = targets[0].settings
    return not settings.shared_database and not any(
        hooks.local_at(settings, point) for point in ("before_switch", "after_switch"))


def all_the_way(t: Target, printer: Printer) -> None:
    """One host: install, switch and clean up in one request, a round trip each saved.

    With one host the barrier between preparing and switching waits for
    nobody. The phases before the switch stop if the client is gone; the
    switch and what follows run to their end, as they would on their own.
    """
    try:
        run_steps(t, ph.installing(t) + ph.GO_LIVE + ph.AFTER_SWITCH + ph.FINISH, printer)
    except DeployError as exc:
        if exc.phase in {step.name for step in ph.GO_LIVE}:
            recover(t, printer)
        raise


def abandon(t: Target, reason: str) -> None:
    """A release that will not go live: stop it, mark it, say so in the log."""
    if t.locked and t.wheel and t.release and not t.switched and not t.unchanged:
        try:
            run_ops(t, "abandon", ph.abandon(t, reason), interruptible=False)
        except DeployError:
            pass  # the lock is still released; the next deploy cleans up


def go_live(t: Target, printer: Printer) -> None:
    """Move traffic to the started release, checked through the proxy, and make it current."""
    try:
        run_steps(t, ph.GO_LIVE, printer)
    except DeployError:
        recover(t, printer)
        raise


def recover(t: Target, printer: Printer) -> None:
    """After a failed switch: where the proxy already moved, the old release gets it back."""
    if not t.switched and t.settings.proxy.enabled and not t.checked:
        # Verified after the link moved (Apache, TCP): the old release takes the traffic again.
        back = ph.switch_back(t)
        run_ops(t, "switch back", back, interruptible=False)
        if back:
            printer.line(f"[{t.host.name}] switched back to {t.current}: the new release failed "
                         f"through {t.settings.proxy.kind}", always=True)
    elif not t.switched and t.settings.proxy.kind == "none" and t.current:
        run_ops(t, "restart", ph.restart_old_publicly(t), interruptible=False)


def back_all_the_way(t: Target, printer: Printer) -> None:
    """One host's rollback: the old release started, checked and switched to, unlocked: one request."""
    try:
        run_steps(t, ph.ROLLBACK_START + ph.GO_LIVE + ph.UNLOCK, printer)
    except DeployError as exc:
        if exc.phase in {step.name for step in ph.GO_LIVE}:
            recover(t, printer)
        raise


def revert(t: Target, printer: Printer, why: str) -> None:
    """A host that switched in a deploy that failed elsewhere: back to its previous release."""
    old, new = t.old, t.release
    if not old:
        return
    back = ph.Target(t.host, t.settings, release=old, facts=t.facts, layout=t.layout, locked=t.locked,
                     action="switch back", bind=t.facts.release(old).bind if t.facts.release(old) else None)
    ops = ph.switch_back_to(back, new) + [ph.plan.mark_failed(t.layout, new, f"{ph.now()} {why}")]
    run_ops(t, "switch back", ops, interruptible=False)
    t.switched = False
    t.facts = ph.dataclasses.replace(t.facts, current=old)
    printer.line(f"[{t.host.name}] switched back to {old}: {why}", always=True)


def deploy(targets: list[Target], runner: Runner, printer: Printer, batch: int = 0) -> None:
    started = time.monotonic()
    live: list[Target] = []
    meet(targets)
    solo = alone(targets)
    try:
        failures = runner.each(targets, lambda t: prepare(t, printer, through=solo))
        same = [t for t in targets if t.unchanged]
        if not failures and 0 < len(same) < len(targets):
            # After a partial rollout: one release name on every host, so those
            # already serving this wheel take it again under the new name.
            for t in same:
                t.unchanged = False
            failures = runner.each(same, lambda t: (ph.fetch_wheelhouse(t), run_steps(t, ph.installing(t), printer)))
        if not failures:
            failures = migrate_first([t for t in targets if not t.unchanged], runner, printer)
        for t in targets:
            if t.unchanged:
                printer.line(f"[{t.host.name}] {t.wheel.filename} is already current "
                             f"({t.current}); nothing to do (--force deploys it again)", always=True)
        if failures:
            culprits = ", ".join(f.host for f in failures.values())
            runner.each(targets, lambda t: abandon(t, f"preparing failed on {culprits}"))
            local = [f for f in failures.values() if f.host == "local"]
            raise local[0] if local else summary("deploy", failures, len(targets))
        live = [t for t in targets if not t.unchanged]
        if live and hooks.local_at(live[0].settings, "before_switch"):
            try:
                local_hooks("before_switch", live, printer)
            except DeployError:
                runner.each(live, lambda t: abandon(t, "the before_switch hook failed"))
                raise
        groups = [] if solo else batches(live, batch)
        for number, group in enumerate(groups):
            failures = runner.each(group, lambda t: go_live(t, printer))
            if failures:
                culprits = ", ".join(f.host for f in failures.values())
                runner.each([t for t in group if t.switched],
                            lambda t: revert(t, printer, f"switching failed on {culprits}"))
                runner.each([t for t in live if not t.switched], lambda t: abandon(t, "switching failed"))
                if number:
                    kept = ", ".join(t.host.name for g in groups[:number] for t in g)
                    printer.line(f"the batches before stay on the new release: {kept}", always=True)
                raise summary("switch", failures, len(group))
        if live and not solo:
            after(live, "after_switch", ph.AFTER_SWITCH, runner, printer)
            failures = runner.each(live, lambda t: run_steps(t, ph.FINISH, printer))
            hooked = {t: f for t, f in failures.items() if f.what.startswith("after_deploy hook")}
            if hooked:  # (a failed cleanup is only left for the next deploy: the release is live)
                raise summary("after_deploy", hooked, len(live))
        if live:
            local_hooks("after_deploy", live, printer)
    except KeyboardInterrupt:
        runner.each([t for t in targets if not t.switched], lambda t: abandon(t, "interrupted"))
        error = DeployError("interrupted", hint="hosts that had not switched keep the old release")
        failed_hooks(targets, runner, printer, error)
        raise error from None
    except DeployError as error:
        failed_hooks(targets, runner, printer, error)
        raise
    finally:
        runner.each(targets, ph.release_lock)
    hosts = ", ".join(t.host.name for t in live)
    took = f"{time.monotonic() - started:.1f}s"
    if live and targets[0].host.dry_run:
        printer.line(f"dry run: would deploy {live[0].release} to {hosts}; nothing was changed", always=True)
    elif live and not printer.json_out:
        printer.line(f"deployed {live[0].release} to {hosts} in {took}", always=True)


# -- one database for the fleet (issue 14) ------------------------------------

def say_notes(t: Target, printer: Printer) -> None:
    for note in t.notes:
        printer.line(f"[{t.host.name}] {note}", always=True)
    t.notes.clear()


def migrate_first(targets: list[Target], runner: Runner, printer: Printer) -> dict:
    """One database for the fleet: every host is installed; the primary alone runs init and
    migrate, then every host configures and starts its release, on the migrated schema."""
    if not targets or not any(t.settings.shared_database for t in targets):
        return {}
    primary = ph.primary_of(targets)
    ph.share_initialized(targets)
    try:
        failures = runner.each([primary], lambda t: run_steps(t, ph.MIGRATE, printer))
    finally:
        say_notes(primary, printer)
    return failures or runner.each(targets, lambda t: run_steps(t, ph.START, printer))


# -- rollback ---------------------------------------------------------------

def remembered_rollback(t: Target, printer: Printer) -> bool:
    """One host, known from before: lock, check, start, switch and unlock in the first request.

    The plan is made from the facts last seen of the host (memo); the agent
    checks them after taking the lock (GUARD), and if the host moved on, the
    rollback is planned again from what it now is. False: nothing remembered.
    """
    wanted = t.release
    if t.host.dry_run or not ph.recall(t):
        return False
    try:
        ph.pick_target(t)
    except DeployError:
        return False  # nothing to go back to, as remembered: let the host itself say
    if ph.half_switched(t):
        return False
    try:
        run_steps(t, (ph.CONNECT, ph.LOCK, ph.GUARD) + ph.ROLLBACK_START + ph.GO_LIVE + ph.UNLOCK, printer)
    except DeployError as exc:
        if exc.phase != "guard":
            if exc.phase in {step.name for step in ph.GO_LIVE}:
                recover(t, printer)
            raise
        t.release = wanted  # the host moved on since: plan again from what it is (the lock is ours)
        prepare(t, printer, ph.ROLLBACK_PREPARE[2:])
        back_all_the_way(t, printer)
    return True


def rollback(targets: list[Target], runner: Runner, printer: Printer, restore=None) -> None:
    """Every host back to its previous release; with `restore` (which asks), the database too."""
    # One host, no restore, no after_rollback hook: in one request, from what was last seen.
    solo = len(targets) == 1 and restore is None and not hooks.at(targets[0].settings, "after_rollback")
    meet(targets)
    try:
        if solo and remembered_rollback(targets[0], printer):
            failures = {}
        else:
            failures = roll_back(targets, runner, printer, solo, restore)
        if failures:
            raise summary("rollback", failures, len(targets) if len(failures) > 1 else 1)
        after(targets, "after_rollback", ph.AFTER_ROLLBACK, runner, printer)
        if not printer.json_out:
            printer.line(f"rolled back to {targets[0].release} on "
                         + ", ".join(t.host.name for t in targets), always=True)
        if restore is not None:
            restore_database(targets, runner, printer)
        elif ph.schema_note(targets):
            printer.line(ph.schema_note(targets), always=True)
    except KeyboardInterrupt:
        error = DeployError("interrupted", hint="hosts that had not switched keep their release")
        failed_hooks(targets, runner, printer, error)
        raise error from None
    except DeployError as error:
        failed_hooks(targets, runner, printer, error)
        raise
    finally:
        runner.each([t for t in targets if t.started and not t.switched],
                    lambda t: run_ops(t, "stop", ph.stop_release(t, t.release), interruptible=False))
        runner.each(targets, ph.release_lock)


def roll_back(targets: list[Target], runner: Runner, printer: Printer, solo: bool, restore=None) -> dict:
    """Every host to the same earlier release: prepared on each, then switched on each."""
    failures = runner.each(targets, lambda t: prepare(t, printer, ph.ROLLBACK_PREPARE))
    names = {t.release for t in targets}
    if not failures and len(names) > 1:
        failures = {targets[0]: DeployError(
            "hosts disagree on the previous release: " + ", ".join(sorted(names)),
            hint="name one with --release")}
    if not failures and restore is not None:
        ph.check_restorable(targets)
        if not restore(ph.restore_question(targets)):
            raise DeployError("not confirmed: nothing was rolled back or restored")
    if not failures and solo:
        failures = runner.each(targets, lambda t: back_all_the_way(t, printer))
    elif not failures:
        failures = runner.each(targets, lambda t: run_steps(t, ph.ROLLBACK_START, printer))
        if not failures:
            failures = runner.each(targets, lambda t: go_live(t, printer))
    return failures


def restore_database(targets: list[Target], runner: Runner, printer: Printer) -> None:
    """After the switch (the old release already serves, checked): the database it migrated from."""
    hosts = ph.database_hosts(targets)
    failures = runner.each(hosts, lambda t: run_steps(t, ph.RESTORE, printer))
    for t in hosts:
        say_notes(t, printer)
    if failures:
        error = summary("restoring the database", failures, len(hosts))
        error.hint = f"rolled back to {targets[0].release}, which serves on the database as it is; see fab db-backups"
        raise error
# -- hooks (issue 15): remote ones are steps of each host; local ones run here, once ---------

def meet(targets: list[Target]) -> None:
    """Each host knows every host of the invocation: the hooks' FABDEPLOY_HOSTS."""
    names = tuple(t.host.name for t in targets)
    for t in targets:
        t.peers = names


def local_hooks(point: str, targets: list[Target], printer: Printer, **extra: str) -> None:
    """A point's local hooks, once for the whole fleet, with a line of their own."""
    first = targets[0]
    if not hooks.local_at(first.settings, point):
        return
    previous = sorted({t.old if t.switched else t.current for t in targets} - {None})
    env = hooks.variables(point, first.release, first.peers, previous, first.settings.stage, **extra)
    seconds = hooks.run_local(first.settings, point, env, dry_run=first.host.dry_run,
                              quiet_stdout=printer.json_out, say=lambda text: printer.line(text, always=True))
    printer.line(f"[local] {point:<16} {seconds:6.2f}s")


def after(targets: list[Target], point: str, steps, runner: Runner, printer: Printer) -> None:
    """after_switch, after_rollback: on every host, then here; a failure fails the deploy."""
    failures = runner.each(targets, lambda t: run_steps(t, steps, printer))
    if failures:
        raise summary(point, failures, len(targets))
    local_hooks(point, targets, printer)


def before_build(targets: list[Target], printer: Printer) -> None:
    """The local before_build hooks, before the wheel is built; `failed` hooks if one fails."""
    meet(targets)
    try:
        local_hooks("before_build", targets, printer)
    except DeployError as error:
        failed_hooks(targets, Runner(), printer, error)
        raise


def failed_hooks(targets: list[Target], runner: Runner, printer: Printer, error: DeployError) -> None:
    """After a failure, the `failed` hooks: on each host still locked, then here, with
    FABDEPLOY_ERROR. Their own failure is said, never raised over the first."""
    if not targets or not hooks.at(targets[0].settings, "failed"):
        return
    line = error.line()
    steps = (Step("failed", lambda t: ph.remote_hooks(t, "failed", error=line),
                  when=lambda t: t.locked and ph.hooked(t, "failed")),)
    quiet = Runner(runner.parallel)  # keeps the deploy's own errors (--json) as they are
    problems = list(quiet.each(targets, lambda t: run_steps(t, steps, printer)).values())
    try:
        local_hooks("failed", targets, printer, error=line)
    except DeployError as exc:
        problems.append(exc)
    for problem in problems:
        printer.line(f"fabdeploy: {problem.line()}", always=True)
