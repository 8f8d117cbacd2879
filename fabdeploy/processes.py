"""A release's other processes (workers) and its timers: scripts, names, checks. No I/O here.

Each process of `processes:` runs beside the release's server, from a script
of the release (`releases/<r>/bin/<name>`), in the release's environment
(plan.environment), writing `shared/log/<name>.log`. It goes with its
release: it starts when the release starts, is checked as still running
before the switch, keeps running while the release is current, and stops
when another release becomes current (so only one release's workers ever
take jobs after a switch) or when its release is abandoned or removed.

Under systemd each is a unit of its own, `<app>.<name>@<release>.service`,
from root's template (provision renders it with the web unit's hardening);
root's helper starts, enables and stops them together with the release's
web unit. Without systemd each runs detached, its pid in
`shared/run/procs/<release>/<name>.pid`, and the pidfile commands of plan.py
take them along. A timer's script runs its flask command once; systemd's
`<app>.<name>.timer` runs current's (timers need systemd).
"""
from __future__ import annotations

import posixpath
from shlex import quote

from . import plan
from .layout import Layout
from .ops import Mkdir, Op, Query, Running, Write
from .settings import Settings, Timer

SETTLE = 2.0  # seconds a started process must keep running to count as started (a crash on import shows by then)


# -- names ---------------------------------------------------------------------------------

def template(app: str, name: str) -> str:
    """The process's systemd template: a dot, which no app name has, keeps it apart from <app>@."""
    return f"{app}.{name}@.service"


def unit(app: str, name: str, release: str) -> str:
    return f"{app}.{name}@{release}.service"


def timer_units(app: str, name: str) -> tuple[str, str]:
    """A timer's .timer and the .service it starts."""
    return f"{app}.{name}.timer", f"{app}.{name}.service"


def marker(release: str, name: str) -> str:
    """The line each start writes to the process's log first."""
    return f"== fabdeploy: release {release} {name} starting =="


# -- the release's scripts ---------------------------------------------------------------------

def script(settings: Settings, layout: Layout, release: str, name: str, command: str, what: str) -> str:
    """A script of the release: its output to the log, its environment, then `exec command`."""
    lines = plan.environment(settings, layout, release)
    return (f"#!/bin/sh\n"
            f"# Written by fabdeploy: {what} {name} of {settings.app}, release {release}.\n"
            f"umask 027\n"
            f"exec >> {quote(layout.process_log(name))} 2>&1\n"
            f"echo {quote(marker(release, name))}\n"
            f"set -e\n" + "".join(f"{line}\n" for line in lines) +
            f"exec {command}\n")


def timer_command(settings: Settings, layout: Layout, release: str, timer: Timer) -> str:
    return plan.flask_words(settings, layout, release, timer.command).removeprefix("exec ")


def files(settings: Settings, layout: Layout, release: str) -> list[Op]:
    """bin/<name> for each process and timer: written with the release's other files."""
    if not settings.processes and not settings.timers:
        return []
    folder = posixpath.dirname(layout.script(release, "x"))
    ops: list[Op] = [Mkdir(folder, what=f"creating {folder}")]
    for name, command in settings.processes.items():
        ops.append(Write(layout.script(release, name),
                         script(settings, layout, release, name, command, "process"),
                         mode=0o755, what=f"writing {layout.script(release, name)}"))
    for timer in settings.timers:
        ops.append(Write(layout.script(release, timer.name),
                         script(settings, layout, release, timer.name,
                                timer_command(settings, layout, release, timer), "timer"),
                         mode=0o755, what=f"writing {layout.script(release, timer.name)}"))
    return ops


# -- checked as running -------------------------------------------------------------------------------

def check(settings: Settings, layout: Layout, release: str, manager: str) -> list[Op]:
    """After the release's start: each process still runs SETTLE seconds on (not crashed, not restarting)."""
    if not settings.processes:
        return []
    checks = []
    for name in settings.processes:
        where = ({"unit": unit(settings.app, name, release)} if manager == "systemd"
                 else {"pid_file": layout.process_pid(release, name)})
        checks.append({"name": name, **where, "log": layout.process_log(name), "marker": marker(release, name)})
    return [Running(tuple(checks), SETTLE, what=f"release {release}'s processes",
                    hint="the old release keeps serving; fix the process's command (its log is above)")]


def timer_warning(settings: Settings, manager: str) -> str | None:
    """Timers are systemd's: a host without it runs none of them, and the deploy says so."""
    if not settings.timers or manager == "systemd":
        return None
    names = ", ".join(t.name for t in settings.timers)
    return f"timers need systemd: {names} will not run on this host (provision a systemd host)"


def state(settings: Settings, layout: Layout, release: str, manager: str) -> list[Op]:
    """For status: `<name> <state>` per process of the release (systemd's word, or the pid file's)."""
    if not settings.processes:
        return []
    lines = []
    for name in settings.processes:
        if manager == "systemd":
            lines.append(f"echo {quote(name)} \"$(systemctl is-active {quote(unit(settings.app, name, release))})\"")
        else:
            pid = quote(layout.process_pid(release, name))
            lines.append(f'if [ -f {pid} ] && kill -0 "$(cat {pid})" 2>/dev/null; then echo {quote(name)} active;'
                         f" else echo {quote(name)} inactive; fi")
    return [Query("; ".join(lines), key="processes", what="reading the processes' states")]
