"""The app servers a release can run under: what each installs, how it starts. No I/O here.

Every server is started by the release's own `serve` script, in the
foreground, writing to the app's log. The pidfile mode runs that script
in the background; systemd runs it as the unit's ExecStart. So both
managers, and every server, start and stop the same way.
"""
from __future__ import annotations

from shlex import quote

from . import appenv
from .catalog import SERVERS, WORKERS
from .layout import Layout
from .model import Bind
from .settings import Settings


def packages(settings: Settings) -> list[str]:
    """What the release's venv needs beside the app: the server, its workers, the user's extras."""
    server = settings.server
    needed = list(SERVERS[server.kind])
    if server.kind == "gunicorn":
        extras = WORKERS[server.worker_class][1]
        pins = [p for p in extras if p.startswith("gunicorn")]
        needed = pins or needed
        needed += [p for p in extras if not p.startswith("gunicorn")]
    return needed + [p for p in settings.packages if p not in needed]


def factory(wsgi: str) -> tuple[str, bool]:
    """'pkg:create_app()' -> ('pkg:create_app', True): the spec, and whether it is called."""
    return (wsgi[:-2], True) if wsgi.endswith("()") else (wsgi, False)


def serve_command(settings: Settings, layout: Layout, release: str, bind: Bind) -> str:
    """The server in the foreground, by the release venv's absolute paths."""
    venv = layout.venv(release)
    python = quote(f"{venv}/bin/python")
    server = settings.server
    if server.kind == "gunicorn":
        return f"{python} {quote(venv + '/bin/gunicorn')} -c {quote(layout.gunicorn_conf(release))}"
    if server.kind == "waitress":
        spec, called = factory(settings.wsgi)
        listen = (f"--unix-socket={quote(bind.path)} --unix-socket-perms=660" if bind.is_unix
                  else f"--listen={quote(bind.address)}")
        call = " --call" if called else ""
        # waitress (2.0+) strips X-Forwarded-* from untrusted peers, and over a unix socket
        # the proxy is one; pass them on, as gunicorn does, for the app's ProxyFix.
        return (f"{python} {quote(venv + '/bin/waitress-serve')} {listen}"
                f" --threads={4 * server.workers} --no-clear-untrusted-proxy-headers{call} {quote(spec)}")
    # uWSGI, from the pyuwsgi wheel. --lazy-apps: each worker loads the app, as gunicorn's do.
    # Its http-socket closes the connection after every answer without saying so: a client
    # or proxy that reuses it (Apache, a balancer) gets a reset. Say so, as gunicorn's sync
    # workers do.
    address = bind.path if bind.is_unix else bind.address
    return (f"{quote(venv + '/bin/uwsgi')} --master --processes {server.workers} --http-socket {quote(address)}"
            f" --add-header {quote('Connection: close')}"
            f" --chmod-socket=660 --module {quote(settings.wsgi)} --lazy-apps --need-app"
            " --die-on-term --vacuum --disable-logging")


def start_marker(release: str) -> str:
    """The line each start of a release writes to the shared log first."""
    return f"== fabdeploy: release {release} starting =="


def serve_script(settings: Settings, layout: Layout, release: str, bind: Bind) -> str:
    """The release's `serve`: its output to the app's log (and the journal), $PORT unset, the server."""
    log = quote(layout.app_log)
    return (f"#!/bin/bash\n"
            f"# Written by fabdeploy: runs release {release} of {settings.app} in the foreground.\n"
            f"# Files the app makes are its own and its group's (fd-{settings.app}): nobody else's.\n"
            f"umask 027\n"
            f"# Run by systemd, the output goes to the journal too; the log is appended to either way,\n"
            f"# so logrotate's copytruncate loses nothing of it.\n"
            f'if [ -n "$INVOCATION_ID" ]; then exec > >(exec tee -a {log}) 2>&1; else exec >> {log} 2>&1; fi\n'
            f"echo {quote(start_marker(release))}\n"
            f"cd {quote(layout.release(release))} || exit 1\n"
            f"# The environment this release runs with: env and secrets (see appenv).\n"
            f"{appenv.loader(layout.env_file(release))}\n"
            f"# gunicorn would bind 0.0.0.0:$PORT if PORT were set.\n"
            f"unset PORT\n"
            f"exec {serve_command(settings, layout, release, bind)}\n")
