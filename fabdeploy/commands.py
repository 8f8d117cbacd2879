"""The app's commands on a server: fab flask, fab shell, fab run, in the current release.

Each runs as the deploy user (no sudo: provision's rules are enough), in
the current release's environment (plan.in_env: its directory and venv,
FLASK_APP, the instance folder through the venv's link), over SSH with its
output straight to ours. With a terminal on our side it gets one there too,
so a command that asks (or `flask shell`) works as it would on the server.
"""
from __future__ import annotations

import sys

from . import plan
from .errors import DeployError
from .hostinfo import read
from .phases import Target


def current(t: Target) -> str:
    """The current release of the host, read in one request; none is an error."""
    read(t)
    if not t.current or t.facts.current_release is None:
        raise DeployError("nothing is deployed here yet", hint="deploy first")
    return t.current


def execute(t: Target, what: str, release: str, command: str, pty: bool) -> None:
    """`command` in the release's environment; its exit status, if not 0, as the error."""
    line = plan.in_env(t.settings, t.layout, release, command)
    code = t.host.stream(line, pty=pty, stdin=pty)
    if code:
        raise DeployError(f"{what} exited {code} (in release {release})")


def interactive() -> bool:
    return sys.stdin.isatty() and sys.stdout.isatty()


def flask(t: Target, words: list[str]) -> None:
    """flask --app <wsgi> WORDS, by the release venv's flask."""
    release = current(t)
    execute(t, " ".join(["flask", *words]), release, plan.flask_words(t.settings, t.layout, release, words),
            pty=interactive())


def shell(t: Target) -> None:
    """flask shell, under a pty: the app's context, interactively."""
    release = current(t)
    execute(t, "flask shell", release, plan.flask_words(t.settings, t.layout, release, ["shell"]), pty=True)


def run(t: Target, command: str) -> None:
    """A shell command line of the user's, in the release's environment."""
    execute(t, repr(command), current(t), command, pty=interactive())
