"""The user's hooks: commands at named points of a deploy or a rollback, here or on each host.

Deciding: which hooks a point has, the variables they get, and a remote
hook's op (run by the host's agent, as the deploy user, in the release's
environment). Doing, for local hooks only: `run_local` runs them here.

The points, in the order a deploy meets them:
  before_build    here only, before the wheel is built
  before_switch   every host prepared and its release started, none switched
  after_switch    every host switched, the old release still warm
  after_deploy    cleanup done, the lock still held
  after_rollback  a rollback switched every host
  failed          a deploy or rollback failed, after it put back what it could
A failing before_* hook stops the deploy and nothing changes; an after_*
or failed hook that fails makes the deploy fail, but undoes nothing. Every
hook runs under the deploy lock (but before_build: no host is reached yet).
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from shlex import quote

from . import plan
from .errors import DeployError
from .layout import Layout
from .ops import Sh
from .settings import Hook, Settings

HINTS = {
    "before_build": "nothing was built or changed",
    "before_switch": "nothing was switched: the old release keeps serving",
    "after_switch": "the release is live: nothing was undone",
    "after_deploy": "the release is live: nothing was undone",
    "after_rollback": "the rollback is done: nothing was undone",
    "failed": "the deploy had failed already",
}


def at(settings: Settings, point: str, where: str | None = None) -> list[Hook]:
    return [h for h in settings.hooks if h.point == point and where in (None, h.where)]


def local_at(settings: Settings, point: str) -> bool:
    """A local hook at this point: the deploy must come back here between the phases around it."""
    return bool(at(settings, point, "local"))


def remote_at(settings: Settings, point: str) -> bool:
    return bool(at(settings, point, "remote"))


def variables(point: str, release: str, hosts, previous, stage: str | None, **extra: str) -> dict[str, str]:
    """What every hook gets: the point, the release, all hosts, the release before, the stage."""
    previous = previous if isinstance(previous, str) or previous is None else ",".join(previous)
    return {"FABDEPLOY_HOOK": point, "FABDEPLOY_RELEASE": release or "", "FABDEPLOY_HOSTS": ",".join(hosts),
            "FABDEPLOY_PREVIOUS": previous or "", "FABDEPLOY_STAGE": stage or "",
            **{f"FABDEPLOY_{k.upper()}": v for k, v in extra.items()}}


def remote_ops(settings: Settings, layout: Layout, release: str | None, point: str, env: dict) -> list[Sh]:
    """A point's remote hooks, each in the release's environment (in deploy_to without a release)."""
    ops = []
    for hook in at(settings, point, "remote"):
        command = (plan.in_env(settings, layout, release, hook.command) if release
                   else f"cd {quote(layout.root)} && {hook.command}")
        ops.append(Sh(command, env=env, what=f"{point} hook {hook.command!r}", hint=HINTS[point]))
    return ops


def run_local(settings: Settings, point: str, env: dict, dry_run: bool = False, quiet_stdout: bool = False,
              say=print) -> float:
    """A point's local hooks, here, one after another, in the fabfile's directory; their seconds.

    They share our terminal (a hook may ask a question); with --json their
    output goes to stderr, so stdout stays the result.
    """
    started = time.monotonic()
    for hook in at(settings, point, "local"):
        if dry_run:
            say(f"[local] would run ({point}): {hook.command}")
            continue
        try:
            proc = subprocess.run(hook.command, shell=True, cwd=settings.base_dir or None,
                                  env={**os.environ, **env}, stdout=sys.stderr if quiet_stdout else None)
        except OSError as exc:
            raise DeployError(f"{point} hook {hook.command!r} could not start: {exc}", "local",
                              hint=HINTS[point]) from None
        if proc.returncode:
            raise DeployError(f"{point} hook {hook.command!r} failed (exit {proc.returncode})", "local",
                              hint=HINTS[point])
    return time.monotonic() - started
