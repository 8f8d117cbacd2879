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


# -- mod_wsgi: mod_wsgi-express runs an Apache of the release's own ------------------------------

# What systemd and the pid file manager send, made graceful. TERM: Apache stops gracefully on
# WINCH (its TERM cuts the requests in flight). HUP (reload): each mod_wsgi daemon process
# finishes its requests and exits on INT, and Apache starts a new one on the socket it keeps
# open meanwhile; Apache's own graceful restart remakes that socket, and a request that
# finds it missing is answered 503. A stop before Apache runs (during the import) ends here.
SIGNALS = """stop() { stopping=1; if [ -n "$server" ]; then kill -WINCH "$server"; else exit 0; fi; }
trap stop TERM INT
trap '[ -n "$server" ] && pkill -INT -P "$server" -f "^[(]wsgi:"' HUP"""
FREE_PORT = 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
RELAY = "/lib/systemd/systemd-socket-proxyd"


def wsgi_script(settings: Settings, release: str) -> str:
    """The release's app.wsgi: the `application` mod_wsgi serves, from fabdeploy.wsgi."""
    spec, called = factory(settings.wsgi)
    module, _, attr = spec.partition(":")
    found = f"getattr(import_module({module!r}), {(attr or 'application')!r})"
    return (f"# Written by fabdeploy: the WSGI application mod_wsgi serves for release {release}.\n"
            f"from importlib import import_module\n\n"
            f"application = {found}{'()' if called else ''}\n")


def mod_wsgi_express(settings: Settings, layout: Layout, release: str, host: str, port: str) -> str:
    """mod_wsgi-express in the foreground: its own server root, logging to the app's log."""
    venv, server = layout.venv(release), settings.server
    threads = f" --threads {server.threads}" if server.threads else ""
    return (f"{quote(venv + '/bin/python')} {quote(venv + '/bin/mod_wsgi-express')} start-server"
            f" {quote(layout.wsgi_script(release))} --server-root {quote(layout.server_root(release))}"
            f" --host {quote(host)} --port {port} --processes {server.workers}{threads}"
            f" --request-timeout {server.timeout} --graceful-timeout {server.graceful_timeout}"
            f" --shutdown-timeout {server.graceful_timeout}"
            f" --log-to-terminal --error-log-format {quote('[%t] [%l] %M')}"
            # A release's code never changes; a rollback rewrites app.wsgi, unchanged, and a
            # reload is fabdeploy's to ask for (HUP), so a changed mtime reloads nothing.
            " --disable-reloading --lang C.UTF-8 --locale C.UTF-8")


def mod_wsgi_body(settings: Settings, layout: Layout, release: str, bind: Bind) -> str:
    """Import the app, start Apache (and, for a unix socket, its relay), pass signals on, wait.

    Apache listens on TCP only. For a unix socket it takes a free loopback port, and
    systemd's socket proxy relays the release's socket to it: the release is then reached
    as every other is, through the live link, and the proxy in front switches without a reload.
    """
    python = quote(layout.venv(release) + "/bin/python")
    # mod_wsgi answers 500 for an app that cannot be imported, and keeps running: import it
    # first, so that such a release never starts, as with the other servers.
    lines = [SIGNALS, f"{python} {quote(layout.wsgi_script(release))} || exit 1"]
    if bind.is_unix:
        lines += relayed(settings, layout, release, bind.path)
    else:
        lines += [f"{mod_wsgi_express(settings, layout, release, bind.host, str(bind.port))} &", "server=$!",
                  'while kill -0 "$server" 2>/dev/null; do wait -n "$server"; done']
    # Named: a bare wait would also wait for the tee the output goes through under systemd.
    lines += ['kill -WINCH "$server" 2>/dev/null; wait "$server"',
              "# 0 when asked to stop; 1 when Apache (or its relay) died, for systemd to restart it.",
              '[ -n "$stopping" ]']
    return "\n".join(lines) + "\n"


def relayed(settings: Settings, layout: Layout, release: str, socket: str) -> list[str]:
    """Apache on a free loopback port, and systemd's socket proxy from `socket` to it."""
    python, sock = quote(layout.venv(release) + "/bin/python"), quote(socket)
    express = mod_wsgi_express(settings, layout, release, "127.0.0.1", '"$port"')
    return ["command -v systemd-socket-activate >/dev/null || { echo 'fabdeploy: mod_wsgi on a unix socket"
            " needs systemd-socket-activate and systemd-socket-proxyd (systemd); else set server.bind'; exit 1; }",
            f"port=$({python} -c {quote(FREE_PORT)}) || exit 1",
            f"{express} &", "server=$!", f"rm -f {sock}",
            f'systemd-socket-activate --listen={sock} {RELAY} --connections-max=1024 "127.0.0.1:$port" &',
            "relay=$!",
            "# The relay makes its socket 0644: the proxy's user, in the app's group, must write to it.",
            f'until [ -S {sock} ] || ! kill -0 "$relay" 2>/dev/null; do sleep 0.05; done',
            f"chmod 0660 {sock}",
            'while kill -0 "$server" 2>/dev/null && kill -0 "$relay" 2>/dev/null; do wait -n "$server" "$relay"; done',
            'kill "$relay" 2>/dev/null; wait "$relay"']


def start_marker(release: str) -> str:
    """The line each start of a release writes to the shared log first."""
    return f"== fabdeploy: release {release} starting =="


def serve_script(settings: Settings, layout: Layout, release: str, bind: Bind) -> str:
    """The release's `serve`: its output to the app's log (and the journal), $PORT unset, the server."""
    log = quote(layout.app_log)
    body = (mod_wsgi_body(settings, layout, release, bind) if settings.server.kind == "mod_wsgi"
            else f"exec {serve_command(settings, layout, release, bind)}\n")
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
            f"{body}")
