"""What a deploy does on a host, as operations and shell commands. No I/O here.

Every path and value in a command is quoted with shlex.quote. Nothing
secret is part of a command: secrets travel in a file's text, over the
agent's channel, and are never shown.
"""
from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass
from shlex import quote

from . import appenv, servers
from .layout import Layout, SystemPaths
from .render import NEXT
from .model import Bind, Problem
from .ops import (Audit, Compile, Facts, Guard, Health, Helper, Link, Lock, Mkdir, Op, Query, Remove,
                  Rename, Sh, Trash, Unlock, Write)
from .settings import Listen, Settings

PROXY_PROGRAMS = {  # what the agent looks for, and the problem it reports without it
    "nginx": {"program": "nginx", "problem": Problem.NO_NGINX.value},
    "apache": {"program": "apache2ctl", "problem": Problem.NO_APACHE.value},
}


# -- reading and locking ----------------------------------------------------------

def facts_args(settings: Settings) -> dict:
    proxy = settings.proxy
    return dict(root=settings.deploy_to, paths=Layout(settings.deploy_to).for_agent(),
                app=settings.app, python=settings.python,
                needs=PROXY_PROGRAMS.get(proxy.kind), refuse_root=True,
                registration=SystemPaths(settings.app).registration,
                site_path=proxy.site_path or None, require_registration=proxy.enabled)


def facts(settings: Settings, key: str = "facts") -> Facts:
    return Facts(**facts_args(settings), key=key, what="reading the host's state",
                 hint=f"is {settings.python} installed on the server?")


def guard(settings: Settings, expect: dict) -> Guard:
    """Stop unless the host is as remembered: what a plan made from memo relied on."""
    return Guard(**facts_args(settings), expect=expect, what="checking the host is as last seen")


def lock(settings: Settings, info: dict, only_laid_out: bool = False, unless_sha: str | None = None) -> Lock:
    """The host's facts; and unless it cannot take a deploy (or serves that wheel), locked."""
    return Lock(**facts_args(settings), info=info, only_laid_out=only_laid_out, unless_sha=unless_sha,
                preview=NEXT if settings.proxy.kind == "nginx" else None, key="facts",
                what="taking the deploy lock")


def unlock(layout: Layout) -> Unlock:
    return Unlock(layout.root, lock=layout.lock, what="releasing the deploy lock")


def audit(settings: Settings, layout: Layout, entry: dict, provisioned: bool) -> Audit:
    """One line of the audit log: root's (through the helper) on a provisioned host."""
    if provisioned:
        return Audit(entry, app=settings.app, what="writing the audit log")
    return Audit(entry, path=layout.audit_log, what="writing the audit log")


# -- installing ------------------------------------------------------------------

@dataclass(frozen=True)
class Installer:
    """How one host makes and fills a release's venv."""

    python: str                    # the server's Python, e.g. python3
    uv: str | None = None          # a uv binary on the server, found or unpacked
    uv_wheel: str | None = None    # the shipped uv wheel to unpack into `uv`'s folder first
    wheelhouse: str | None = None  # install offline from these wheels
    pip_wheel: str | None = None   # the shipped pip, run straight from its wheel


def uv_command(uv: str) -> str:
    """uv, trusting the system's CA store as pip does (older uv: UV_NATIVE_TLS)."""
    return f"env UV_SYSTEM_CERTS=1 UV_NATIVE_TLS=1 {quote(uv)}"


def unpack_uv(inst: Installer, folder: str) -> str:
    """A wheel is a zip: its uv binary works where it lands, once executable."""
    return (f"[ -x {quote(inst.uv)} ] || {{ {quote(inst.python)} -m zipfile -e {quote(inst.uv_wheel)}"
            f" {quote(folder)} && chmod +x {quote(inst.uv)}; }}")


def create_venv(inst: Installer, layout: Layout, release: str) -> str:
    venv = quote(layout.venv(release))
    if inst.uv:
        python = f'"$(command -v {quote(inst.python)})"'
        make = f"{uv_command(inst.uv)} venv --quiet --no-python-downloads --python {python} {venv}"
        if inst.uv_wheel:
            return f"{unpack_uv(inst, layout.uv_folder(inst.uv_wheel))} && {make}"
        return make
    # With a wheelhouse, pip comes from its wheel: no ensurepip, 0.05 s instead of 5.
    without_pip = " --without-pip" if inst.wheelhouse else ""
    return f"{quote(inst.python)} -m venv{without_pip} {venv}"


def install(inst: Installer, layout: Layout, release: str, wheel_path: str,
            packages: list[str]) -> str:
    """Install the wheel and packages into the release's venv; offline from a wheelhouse."""
    wanted = " ".join(quote(p) for p in [wheel_path, *packages])
    python = quote(layout.venv(release) + "/bin/python")
    offline = f" --no-index --find-links {quote(inst.wheelhouse)}" if inst.wheelhouse else ""
    if inst.uv:
        base = f"{uv_command(inst.uv)} pip install --quiet --python {python}"
        if offline:
            return f"{base} --offline{offline} {wanted}"
        # The uv cache alone first: no network, a third of a second; then the index.
        return f"{{ {base} --offline {wanted} 2>/dev/null || {base} {wanted}; }}"
    pip = f"{python} {quote(inst.pip_wheel + '/pip')}" if offline else quote(layout.venv(release) + "/bin/pip")
    return f"{pip} install --disable-pip-version-check --no-input --quiet{offline} {wanted}"


def build_wheels(python: str, pip_wheel: str, wheelhouse: str, sdists: list[str]) -> Sh:
    """Wheels of the shipped sdists, built on the server into its wheelhouse: once, offline.

    Built aside, then moved in: an interrupted build leaves no wheel behind to be trusted.
    """
    built = '"$d"'
    pip = (f"{quote(python)} {quote(pip_wheel + '/pip')} wheel --quiet --disable-pip-version-check"
           f" --no-index --find-links {quote(wheelhouse)} --no-deps --wheel-dir {built}"
           f" {' '.join(quote(s) for s in sdists)}")
    names = ", ".join(posixpath.basename(s).split("-")[0] for s in sdists)
    house = quote(wheelhouse)
    return Sh(f"d=$(mktemp -d {house}/.build-XXXXXX) && {{ {pip} && mv {built}/*.whl {house}/;"
              f' s=$?; rm -rf {built}; [ "$s" = 0 ]; }}',
              what=f"building {names} on the server (once)",
              hint="it needs a compiler and Apache's headers: fab -H root@<host> provision installs them"
                   " with server.kind mod_wsgi")


def compile_bytecode(layout: Layout, release: str, like: str | None) -> Compile:
    """Byte-compile the release's venv, reusing `like`'s bytecode where the source is the same."""
    return Compile(layout.venv(release) + "/bin/python", layout.venv(like) if like else None,
                   what="byte-compiling the release")


def static_links(settings: Settings, layout: Layout, release: str) -> Sh:
    """The release's public/<prefix> links to its package's static folders, which nginx serves.

    The package is where Flask looks (the wsgi module's, or its package's, folder);
    an auto folder is linked where the release has it, a configured one must be there.
    """
    module = settings.instance_name.replace(".", "/")
    parent = "/" + quote(module.rpartition("/")[0]) if "/" in module else ""
    lines = [f"cd {quote(layout.release(release))}", "set -- venv/lib/python*/site-packages",
             f'if [ -d "$1/"{quote(module)} ]; then pkg="$1/"{quote(module)}; else pkg="$1"{parent}; fi']
    for folder in settings.static:
        link = "public" + folder.prefix
        up = "../" * folder.prefix.count("/")
        make = (f"mkdir -p {quote(link.rsplit('/', 1)[0])}"
                f' && ln -sfn "{up}$pkg/"{quote(folder.folder)} {quote(link)}')
        if folder.required:
            lines.append(f'if [ -d "$pkg/"{quote(folder.folder)} ]; then {make};'
                         f" else echo \"static: {folder.prefix} -> {folder.folder}: no such folder in"
                         f' $pkg\" >&2; exit 1; fi')
        else:
            lines.append(f'if [ -d "$pkg/"{quote(folder.folder)} ]; then {make}; fi')
    return Sh(" && ".join(lines), what="linking the static files",
              hint="fix fabdeploy.static, or the package's data (its static files must be in the wheel)")


def previous_link(layout: Layout, release: str, previous: str) -> Link:
    """releases/<release>/previous -> ../<previous>: nginx serves the static files of both."""
    return Link(layout.previous(release), f"../{previous}", what="linking the previous release")


def link_instance(settings: Settings, layout: Layout, release: str) -> str:
    """Point the venv's Flask instance folder at the shared one."""
    link = layout.instance_link(release, settings.instance_name)
    return (f"mkdir -p {quote(link.rsplit('/', 1)[0])}"
            f" && ln -sfn {quote(layout.instance)} {quote(link)}")


def in_release(layout: Layout, release: str, command: str) -> str:
    """Run a command from the release directory, with the environment the release runs with
    (its env file: appenv.loader), never with $PORT set."""
    return " && ".join([*release_shell(layout, release), command])


def release_shell(layout: Layout, release: str) -> list[str]:
    """The one place a release's environment is made, as shell commands: its directory, its env
    file (env and secrets), never $PORT. The serve script loads the same file."""
    return [f"cd {quote(layout.release(release))}", appenv.loader(layout.env_file(release)), "unset PORT"]


def flask(settings: Settings, layout: Layout, release: str, words: tuple[str, ...]) -> str:
    venv_flask = quote(layout.venv(release) + "/bin/flask")
    return in_release(layout, release,
                      f"{venv_flask} --app {quote(settings.wsgi)} {' '.join(quote(w) for w in words)}")


# -- the release's environment: every command of a release runs in it (issue 15) ----------

def environment(settings: Settings, layout: Layout, release: str) -> list[str]:
    """The release's environment (release_shell), its venv first on PATH and FLASK_APP.
    Processes, timers, hooks and fab flask/shell/run all start here."""
    venv_bin = layout.venv(release) + "/bin"
    return [*release_shell(layout, release),
            f'export PATH={quote(venv_bin)}:"$PATH"', f"export FLASK_APP={quote(settings.wsgi)}"]


def in_env(settings: Settings, layout: Layout, release: str, command: str) -> str:
    """One shell command line: `command` in the release's environment."""
    return " && ".join([*environment(settings, layout, release), command])


def flask_words(settings: Settings, layout: Layout, release: str, words) -> str:
    """exec flask --app <wsgi> WORDS, by the release venv's own flask."""
    venv_flask = quote(layout.venv(release) + "/bin/flask")
    return f"exec {venv_flask} --app {quote(settings.wsgi)} {' '.join(quote(w) for w in words)}".rstrip()


def also(command: str) -> str:
    """`command` after the one before it, whatever that one did."""
    return f"; {command}" if command else ""


# A release's processes without systemd (processes.py): they go with its server.

def start_processes(settings: Settings, layout: Layout, release: str) -> str:
    """Start each of the release's processes that does not run yet, detached, with its pid file."""
    if not settings.processes:
        return ""
    parts = [f"mkdir -p {quote(layout.process_pids(release))}"]
    for name in settings.processes:
        pid = quote(layout.process_pid(release, name))
        parts.append(f'if [ -f {pid} ] && kill -0 "$(cat {pid})" 2>/dev/null; then :;'
                     f" else setsid {quote(layout.script(release, name))} </dev/null >/dev/null 2>&1 &"
                     f" echo $! > {pid}; fi")
    return "; ".join(parts)


def stop_processes(settings: Settings, layout: Layout, release: str) -> str:
    """Ask the release's processes to stop (SIGTERM: a worker finishes its job), and forget them."""
    if not settings.processes:
        return ""
    folder = quote(layout.process_pids(release))
    return (f'for f in {folder}/*.pid; do [ -f "$f" ] && kill -TERM "$(cat "$f")" 2>/dev/null; done;'
            f" rm -rf {folder}")


def other_processes(settings: Settings, layout: Layout, release: str) -> str:
    """Ask every other release's processes to stop: after a switch only current's take jobs."""
    if not settings.processes:
        return ""
    procs = quote(layout.run_dir + "/procs")
    return (f'for d in {procs}/*/; do [ -d "$d" ] || continue; n=${{d%/}}; n=${{n##*/}};'
            f' [ "$n" = {quote(release)} ] && continue;'
            f' for f in "$d"*.pid; do [ -f "$f" ] && kill -TERM "$(cat "$f")" 2>/dev/null; done;'
            f' rm -rf "$d"; done')


def init_app(settings: Settings, layout: Layout, release: str) -> Sh:
    init = " ".join(settings.init_command)
    return Sh(f"{flask(settings, layout, release, settings.init_command)}"
              f" && touch {quote(layout.initialized)}", what=f"flask {init}",
              hint="fix the app's init command, or set init_command to '' to skip it")


# -- running releases ---------------------------------------------------------------

def unit_name(settings: Settings, release: str) -> str:
    return f"{settings.app}@{release}.service"


def start_server(settings: Settings, layout: Layout, release: str, manager: str) -> Op:
    """Start a release's server, unless it runs already (a warm previous release).

    Without systemd, its serve script runs in a session of its own, detached
    from SSH; the shell records its PID, which the server keeps (exec).
    """
    what = f"starting release {release}"
    if manager == "systemd":
        return Helper(settings.app, ("start", release), what=what)
    pid_file = quote(layout.pid_file(release))
    return Sh(f'if [ -f {pid_file} ] && kill -0 "$(cat {pid_file})" 2>/dev/null; then :;'
              f" else setsid {quote(layout.serve(release))} </dev/null >/dev/null 2>&1 &"
              f" echo $! > {pid_file}; fi{also(start_processes(settings, layout, release))}", what=what)


def stop_server(settings: Settings, layout: Layout, release: str, manager: str) -> Op:
    """Stop a release's server gracefully, without waiting for it to drain."""
    what = f"stopping release {release}"
    if manager == "systemd":
        return Helper(settings.app, ("retire", release), what=what)
    pid_file = quote(layout.pid_file(release))
    return Sh(f"if [ -f {pid_file} ]; then kill -TERM \"$(cat {pid_file})\" 2>/dev/null; fi"
              f"{also(stop_processes(settings, layout, release))}; true", what=what)


def stop_and_wait(settings: Settings, layout: Layout, release: str, manager: str) -> Op:
    """Stop a release's server and wait until it has exited: its port is then free."""
    what = f"stopping release {release}"
    if manager == "systemd":
        return Helper(settings.app, ("stop", release), what=what)
    pid_file = quote(layout.pid_file(release))
    ticks = (settings.server.graceful_timeout + 5) * 20
    return Sh(f'if [ -f {pid_file} ]; then pid="$(cat {pid_file})"; kill -TERM "$pid" 2>/dev/null;'
              f' n=0; while kill -0 "$pid" 2>/dev/null && [ $n -lt {ticks} ]; do sleep 0.05; n=$((n+1)); done;'
              f" rm -f {pid_file}; fi", what=what)


def stop_others(settings: Settings, layout: Layout, keep: list[str], manager: str) -> Op:
    """Stop every release's server but those in `keep`: at most current and its backup."""
    what = "stopping older releases"
    if manager == "systemd":
        return Helper(settings.app, ("keep", *keep), what=what)
    keep_names = "|".join(quote(name) for name in keep)
    return Sh(f"for f in {quote(layout.run_dir)}/*.pid; do [ -f \"$f\" ] || continue;"
              f' n=${{f##*/}}; n=${{n%.pid}}; case "$n" in {keep_names}) ;;'
              f' *) kill -TERM "$(cat "$f")" 2>/dev/null;; esac; done'
              f"{also(other_processes(settings, layout, keep[0]))}; true", what=what)


def health(settings: Settings, layout: Layout, release: str, bind: Bind, manager: str) -> Health:
    """Probe a release's own server directly, before it takes traffic."""
    watch = ({"unit": unit_name(settings, release)} if manager == "systemd"
             else {"pid_file": layout.pid_file(release)})
    return Health(bind.probe, settings.health_path, settings.health_timeout, **watch,
                  log=layout.app_log, marker=servers.start_marker(release), what="health check")


def health_direct(settings: Settings, timeout: float) -> Health:
    """Probe the app server on its public address (proxy kind none)."""
    return Health(settings.server.public_bind.probe, settings.health_path, timeout,
                  what="health check on the public address")


def health_via_proxy(settings: Settings, stamp: str, timeout: float, preview_map: str | None = None) -> Health:
    """Probe through the proxy, as a visitor would, expecting the site's stamp.

    With preview_map, the request carries the host's preview token: nginx
    then routes it to shared/run/next.sock.
    """
    proxy = settings.proxy
    listen = proxy.listen[0]
    if settings.tls.enabled:  # plain HTTP only redirects: ask where visitors are sent
        listen = Listen(settings.tls.port, listen.address)
    return Health(listen.probe, settings.health_path, timeout, host_header=proxy.host_header,
                  stamp=stamp, preview_map=preview_map, tls=settings.tls.enabled,
                  what=f"health check through {proxy.kind}")


def switch_current(layout: Layout, release: str) -> list[Op]:
    """`current` moves in the same step as the release's RELEASE.json lands: a release
    becomes good only as it goes live."""
    return [Rename(layout.pending_meta(release), layout.meta(release), what="recording the release"),
            Link(layout.current, "releases/" + release, tmp=layout.root + "/.current.tmp",
                 what="switching current")]


def publish(settings: Settings, layout: Layout, release: str, old: str | None, keep: list[str],
            manager: str) -> list[Op]:
    """Switch `current`; at boot systemd starts only it; stop what is not kept."""
    steps = switch_current(layout, release)
    if manager == "systemd":
        # The warm standby is enabled too: after a reboot a rollback is as fast as before.
        steps.append(Helper(settings.app, ("enable", release), what="enabling the release at boot"))
    elif settings.processes:  # a switch back: the release's processes were stopped by the switch away
        steps.append(Sh(start_processes(settings, layout, release), what="starting the release's processes"))
    steps.append(stop_others(settings, layout, keep, manager))
    return steps


def mark_failed(layout: Layout, release: str, reason: str) -> Write:
    return Write(layout.failed_marker(release), reason + "\n", what="marking the release failed")


def remove_releases(settings: Settings, layout: Layout, names: list[str], manager: str) -> list[Op]:
    """Stop any server a removed release still runs (e.g. one killed mid-deploy), then delete.

    The releases leave releases/ at once, by rename into the trash; deleting
    a venv's thousand files happens in the background, nobody waits for it.
    """
    stops = [stop_server(settings, layout, name, manager) for name in names]
    files = tuple(p for name in names for p in (layout.socket(name), layout.pid_file(name)))
    # mod_wsgi-express's server roots go with their releases (none: nothing to move).
    trees = tuple(p for name in names for p in (layout.release(name), layout.server_root(name)))
    return [*stops, Remove(files, what="removing old sockets"),
            Trash(layout.trash, trees, what="removing old releases")]


def reload_servers(settings: Settings, layout: Layout, manager: str) -> Op:
    """HUP every running release: gunicorn replaces its workers, which reread config.py."""
    if manager == "systemd":
        return Helper(settings.app, ("reload",), what="reloading the app")
    return Sh(f"for f in {quote(layout.run_dir)}/*.pid; do [ -f \"$f\" ] &&"
              ' kill -HUP "$(cat "$f")"; done; true', what="reloading the app")


def server_state(settings: Settings, layout: Layout, release: str, manager: str) -> Query:
    """active, or why not: systemd's word, or the pid file's."""
    if manager == "systemd":
        return Query(f"systemctl is-active {quote(unit_name(settings, release))} || true",
                     key="service", what="reading the service state")
    pid_file = quote(layout.pid_file(release))
    return Query(f'if [ -f {pid_file} ] && kill -0 "$(cat {pid_file})" 2>/dev/null;'
                 f' then echo "active (pid $(cat {pid_file}))"; else echo inactive; fi',
                 key="service", what="reading the service state")


def lock_info(who: str, when: str, what: str) -> dict:
    return {"who": who, "when": when, "what": what}


def meta_text(meta: dict) -> str:
    return json.dumps(meta, indent=2) + "\n"


def write_meta(layout: Layout, release: str, meta: dict) -> Write:
    # Aside until the switch renames it into place: a release killed before then stays
    # partial, so neither rollback nor a later deploy's cleanup mistakes it for a good one.
    return Write(layout.pending_meta(release), meta_text(meta), what="recording the release")


def mkdir(path: str) -> Mkdir:
    return Mkdir(path, what=f"creating {path}")
