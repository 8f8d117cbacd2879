"""The shell commands a deploy runs, built as strings. No I/O here.

Every path and value is quoted with shlex.quote. Nothing secret is ever
part of a command: the secret travels over SFTP only.
"""
from __future__ import annotations

import base64
import json
import zlib
from dataclasses import dataclass
from importlib import resources
from shlex import quote

from .layout import Layout
from .settings import Settings



def _agent_bootstrap() -> str:
    source = resources.files("fabdeploy").joinpath("agent.py").read_bytes()
    packed = base64.b64encode(zlib.compress(source, 9)).decode()
    return f"import base64,zlib;exec(zlib.decompress(base64.b64decode('{packed}')))"


AGENT = _agent_bootstrap()


def agent(python: str, *args: object, site: bool = False) -> str:
    """Run fabdeploy's agent on the server with the system Python.

    Without site (-S) unless it must see a venv: the agent needs only the
    standard library, and each run is a round trip someone waits for.
    """
    flags = ["-c"] if site else ["-S", "-c"]
    return " ".join([quote(python), *flags, quote(AGENT), *(quote(str(a)) for a in args)])


def facts(settings: Settings, lock_info: dict | None = None, only_laid_out: bool = False) -> str:
    """The host's facts; with lock_info, also lay out deploy_to and take the lock.

    One round trip, and one place (the agent) that decides whether a host
    is fit to deploy to before anything on it changes.
    """
    args = ["facts", "--root", settings["deploy_to"], "--refuse-root"]
    if settings["proxy"] != "none":
        args += ["--needs", PROXY_PROGRAMS[settings["proxy"]]]
    if lock_info is not None:
        args += ["--lock", json.dumps(lock_info)]
    if only_laid_out:
        args += ["--only-laid-out"]
    return agent(settings["python"], *args)


def remove_file(path: str) -> str:
    return f"rm -f {quote(path)}"


def unlock(layout: Layout) -> str:
    return f"rm -rf {quote(layout.lock)}"


def audit(layout: Layout, entry: dict) -> str:
    """Append one JSON line to the host's audit log."""
    line = json.dumps(entry, sort_keys=True)
    return f"printf '%s\\n' {quote(line)} >> {quote(layout.audit_log)}"


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


def compile_bytecode(layout: Layout, release: str, like: str | None) -> str:
    """Byte-compile the release's venv, reusing `like`'s bytecode where the source is the same."""
    python = layout.venv(release) + "/bin/python"
    return agent(python, "compile", *(["--like", layout.venv(like)] if like else []), site=True)


def link_instance(settings: Settings, layout: Layout, release: str) -> str:
    """Point the venv's Flask instance folder at the shared one."""
    link = layout.instance_link(release, settings.import_name)
    return (f"mkdir -p {quote(link.rsplit('/', 1)[0])}"
            f" && ln -sfn {quote(layout.instance)} {quote(link)}")


def in_release(layout: Layout, release: str, command: str) -> str:
    """Run a command from the release directory, never with $PORT set."""
    return f"cd {quote(layout.release(release))} && env -u PORT {command}"


def init_app(settings: Settings, layout: Layout, release: str) -> str:
    flask = quote(layout.venv(release) + "/bin/flask")
    init = " ".join(quote(word) for word in settings["init_command"].split())
    run = in_release(layout, release, f"{flask} --app {quote(settings['wsgi'])} {init}")
    return f"{run} && touch {quote(layout.initialized)}"


def unit_name(settings: Settings, release: str) -> str:
    return f"{settings.app}@{release}.service"


def start_server(settings: Settings, layout: Layout, release: str, manager: str) -> str:
    """Start a release's server, unless it runs already (a warm previous release).

    Without systemd, its serve script runs in a session of its own, detached
    from SSH; the shell records its PID, which the server keeps (exec).
    """
    if manager == "systemd":
        return f"sudo -n systemctl start {quote(unit_name(settings, release))}"
    pid_file = quote(layout.pid_file(release))
    return (f'if [ -f {pid_file} ] && kill -0 "$(cat {pid_file})" 2>/dev/null; then :;'
            f" else setsid {quote(layout.serve(release))} </dev/null >/dev/null 2>&1 &"
            f" echo $! > {pid_file}; fi")


def stop_server(settings: Settings, layout: Layout, release: str, manager: str) -> str:
    """Stop a release's server gracefully, without waiting for it to drain."""
    if manager == "systemd":
        return (f"sudo -n systemctl disable --now --no-block {quote(unit_name(settings, release))}"
                " 2>/dev/null; true")
    pid_file = quote(layout.pid_file(release))
    return f"if [ -f {pid_file} ]; then kill -TERM \"$(cat {pid_file})\" 2>/dev/null; fi; true"


def stop_and_wait(settings: Settings, layout: Layout, release: str, manager: str) -> str:
    """Stop a release's server and wait until it has exited: its port is then free."""
    if manager == "systemd":
        return f"sudo -n systemctl stop {quote(unit_name(settings, release))}"
    pid_file = quote(layout.pid_file(release))
    ticks = (int(settings.gunicorn["graceful_timeout"]) + 5) * 20
    return (f'if [ -f {pid_file} ]; then pid="$(cat {pid_file})"; kill -TERM "$pid" 2>/dev/null;'
            f' n=0; while kill -0 "$pid" 2>/dev/null && [ $n -lt {ticks} ]; do sleep 0.05; n=$((n+1)); done;'
            f" rm -f {pid_file}; fi")


def health_direct(settings: Settings, bind: str, timeout: float) -> str:
    """Probe the app server on its public address (proxy: none)."""
    host, _, port = bind.rpartition(":")
    host = "127.0.0.1" if host in ("0.0.0.0", "", "*") else host
    return agent(settings["python"], "health", "--tcp", f"{host}:{port}",
                 "--path", settings["health_path"], "--timeout", timeout)


def stop_others(settings: Settings, layout: Layout, keep: list[str], manager: str) -> str:
    """Stop every release's server but those in `keep`: at most current and its backup."""
    if manager == "systemd":
        keep_units = "|".join(quote(unit_name(settings, name)) for name in keep)
        listing = (f"systemctl list-units --plain --no-legend --state=active"
                   f" {quote(settings.app + '@*.service')} | cut -d' ' -f1")
        return (f"for u in $({listing}); do case \"$u\" in {keep_units}) ;;"
                f' *) sudo -n systemctl disable --now --no-block "$u";; esac; done; true')
    keep_names = "|".join(quote(name) for name in keep)
    return (f"for f in {quote(layout.run_dir)}/*.pid; do [ -f \"$f\" ] || continue;"
            f' n=${{f##*/}}; n=${{n%.pid}}; case "$n" in {keep_names}) ;;'
            f' *) kill -TERM "$(cat "$f")" 2>/dev/null;; esac; done; true')


def publish(settings: Settings, layout: Layout, release: str, old: str | None,
            keep: list[str], manager: str) -> str:
    """Switch `current`; at boot systemd starts only it; stop what is not kept."""
    steps = [switch_current(layout, release)]
    if manager == "systemd":
        steps.append(f"sudo -n systemctl enable --quiet {quote(unit_name(settings, release))}")
        if old:
            steps.append(f"sudo -n systemctl disable --quiet {quote(unit_name(settings, old))}")
    return " && ".join(steps) + "; " + stop_others(settings, layout, keep, manager)


def health(settings: Settings, layout: Layout, release: str, bind: str, manager: str,
           timeout: float) -> str:
    """Probe a release's own server directly, before it takes traffic."""
    target = ["--unix", bind[len("unix:"):]] if bind.startswith("unix:") else ["--tcp", bind]
    watch = (["--unit", unit_name(settings, release)] if manager == "systemd"
             else ["--pid-file", layout.pid_file(release)])
    return agent(settings["python"], "health", *target, *watch,
                 "--path", settings["health_path"], "--timeout", timeout)


def health_via_proxy(settings: Settings, stamp: str, timeout: float,
                     preview_map: str | None = None) -> str:
    """Probe through the proxy, as a visitor would, expecting the site's stamp.

    With preview_map, the request carries the host's preview token: nginx
    then routes it to shared/run/next.sock.
    """
    proxy = settings.proxy
    host = "localhost" if proxy["server_name"] in ("_", "") else proxy["server_name"].split()[0]
    preview = ["--preview-map", preview_map] if preview_map else []
    return agent(settings["python"], "health", "--tcp", f"127.0.0.1:{proxy['listen']}",
                 "--host-header", host, "--path", settings["health_path"], "--timeout", timeout,
                 "--stamp", stamp, *preview)


def preview_then_switch(settings: Settings, layout: Layout, socket: str, stamp: str,
                        timeout: float) -> str:
    """Point next.sock at the release, check it through nginx, and only then switch live.sock.

    Visitors never reach a release that fails behind the proxy: the check
    sees exactly what they would, before the switch.
    """
    return (f"{switch_link(layout.next_socket, socket)}"
            f" && {health_via_proxy(settings, stamp, timeout, layout.preview_map)}"
            f" && {switch_link(layout.live_socket, socket)}")


def as_owner(directory: str, command: str) -> str:
    """Run a command plainly where we may write the directory, else with sudo."""
    return f"if [ -w {quote(directory)} ]; then {command}; else sudo -n {command}; fi"


def parent(path: str) -> str:
    return path.rsplit("/", 1)[0] or "/"


PROXY_REJECTED = 90  # exit status of route() when the proxy's config test fails
PROXY_STALE = 91  # the agent's reload: the old configuration still takes connections
PROXY_PROGRAMS = {"nginx": "nginx", "apache": "apache2ctl"}  # what the agent looks for


STOCK_SITE = "/etc/nginx/sites-enabled/default"  # Debian's, the default_server on port 80


def route(settings: Settings, tmp: str, site: str, saved: str) -> str:
    """Install the site, test the proxy's config (putting the old site back on failure), reload."""
    proxy = settings.proxy
    return (f"{save_copy(site, saved)} && {install_file(tmp, site)}"
            f" && {{ {proxy['test_command']} || {{ {restore_copy(site, saved)}; exit {PROXY_REJECTED}; }}; }}"
            f"{disable_stock_site(settings)} && {reload_proxy(settings)}")


def reload_proxy(settings: Settings, timeout: float = 10) -> str:
    """The proxy's reload, done only once no new connection can meet the old configuration.

    For nginx that is when every worker from before the reload has stopped
    accepting, which nginx's master tells them about 100 ms after the new
    ones started; the agent waits for it. Apache's graceful reload is run
    as it is: whether its old children have such a window is not measured.
    """
    proxy = settings.proxy
    if settings["proxy"] != "nginx" or not proxy.get("pid_file"):
        return proxy["reload_command"]
    return agent(settings["python"], "reload", f"--run={proxy['reload_command']}",
                 f"--pid-file={proxy['pid_file']}", "--timeout", timeout)


def disable_stock_site(settings: Settings) -> str:
    """A catch-all site on port 80 never sees a request while Debian's default site is enabled.

    That site is the port's default_server, so it answers every name ours does not
    list, and `_` lists none. Its link goes once nginx has accepted ours.
    """
    nginx = settings.nginx
    if settings["proxy"] != "nginx" or str(nginx["listen"]) != "80" or nginx["server_name"] not in ("_", ""):
        return ""
    stock = quote(STOCK_SITE)
    return f" && {{ [ ! -L {stock} ] || {as_owner(parent(STOCK_SITE), f'rm -f {stock}')}; }}"


def install_file(tmp: str, dest: str) -> str:
    """Put a rendered file in place, with sudo where the directory is not ours."""
    return f"{as_owner(parent(dest), f'install -m 0644 {quote(tmp)} {quote(dest)}')} && rm -f {quote(tmp)}"


def save_copy(path: str, backup: str) -> str:
    """Keep the file we are about to replace, or note that there was none."""
    return f"if [ -f {quote(path)} ]; then cp {quote(path)} {quote(backup)}; else rm -f {quote(backup)}; fi"


def restore_copy(path: str, backup: str) -> str:
    put_back = as_owner(parent(path), f"install -m 0644 {quote(backup)} {quote(path)}")
    remove = as_owner(parent(path), f"rm -f {quote(path)}")
    return f"if [ -f {quote(backup)} ]; then {put_back}; else {remove}; fi"


def switch_link(link: str, target: str, tmp: str | None = None) -> str:
    """Atomic: a symlink under a temporary name, renamed over the link."""
    tmp = quote(tmp or link + ".tmp")
    return f"ln -sfn {quote(target)} {tmp} && mv -Tf {tmp} {quote(link)}"


def switch_current(layout: Layout, release: str) -> str:
    """Atomic: a symlink under a temporary name, renamed over `current`.

    A new release's RELEASE.json, written aside, is renamed into place in the
    same command: a release becomes good only as it goes live.
    """
    meta, pending = quote(layout.meta(release)), quote(layout.meta(release) + ".pending")
    complete = f"if [ -f {pending} ]; then mv -f {pending} {meta}; fi"
    link = switch_link(layout.current, "releases/" + release, layout.root + "/.current.tmp")
    return f"{complete} && {link}"


def mark_failed(layout: Layout, release: str, reason: str) -> str:
    return f"printf '%s\\n' {quote(reason)} > {quote(layout.failed_marker(release))}"


def remove_releases(settings: Settings, layout: Layout, names: list[str], manager: str) -> str:
    """Stop any server a removed release still runs (e.g. one killed mid-deploy), then delete.

    The releases leave releases/ at once, by rename into the trash; deleting
    a venv's thousand files happens in the background, nobody waits for it.
    """
    stops = "; ".join(stop_server(settings, layout, name, manager) for name in names)
    files = [p for name in names for p in (layout.socket(name), layout.pid_file(name))]
    trash = quote(layout.trash)
    releases = " ".join(quote(layout.release(name)) for name in names)
    return (f"{stops}; rm -f {' '.join(quote(p) for p in files)}; mkdir -p {trash}"
            f' && bin="$(mktemp -d {trash}/XXXXXX)" && mv {releases} "$bin"/'
            f" && (setsid rm -rf {trash} </dev/null >/dev/null 2>&1 &)")


def reload_servers(settings: Settings, layout: Layout, manager: str) -> str:
    """HUP every running release: gunicorn replaces its workers, which reread config.py."""
    if manager == "systemd":
        return f"sudo -n systemctl reload {quote(settings.app + '@*.service')}"
    return (f"for f in {quote(layout.run_dir)}/*.pid; do [ -f \"$f\" ] &&"
            ' kill -HUP "$(cat "$f")"; done; true')


def unit_path(settings: Settings) -> str:
    return f"/etc/systemd/system/{settings.app}@.service"


def daemon_reload() -> str:
    return "sudo -n systemctl daemon-reload"


def tail_log(path: str, lines: int = 30, follow: bool = False) -> str:
    if follow:
        return f"tail -n {int(lines)} -F {quote(path)}"
    return f"tail -n {int(lines)} {quote(path)} 2>/dev/null || true"


def server_state(settings: Settings, layout: Layout, release: str, manager: str) -> str:
    """active, or why not: systemd's word, or the pid file's."""
    if manager == "systemd":
        return f"systemctl is-active {quote(unit_name(settings, release))} || true"
    pid_file = quote(layout.pid_file(release))
    return (f'if [ -f {pid_file} ] && kill -0 "$(cat {pid_file})" 2>/dev/null;'
            f' then echo "active (pid $(cat {pid_file}))"; else echo inactive; fi')
