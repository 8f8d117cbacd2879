"""The phases of a deploy and a rollback on one host, each a small function.

A deploy prepares a host fully (the new release installed, started on its
own socket and healthy) before any traffic moves, then switches. Commands
come from `plan`, files from `render`; here they are only put in order.
"""
from __future__ import annotations

import datetime as dt
import getpass
import json
import re
import socket
import threading
from concurrent.futures import Future, TimeoutError as FutureTimeout
from dataclasses import dataclass, field

from . import plan, render, secret, servers, wheelhouse
from .build import Wheel
from .errors import DeployError, tail
from .layout import Layout, Release, previous_release, releases_to_remove
from .remote import Host
from .settings import Settings

LOOPBACK = ("127.0.0.1", "localhost", "[::1]")
EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit)\b")


@dataclass(eq=False)  # identity, so targets can key dicts
class Target:
    """One host's state during one invocation."""

    host: Host
    settings: Settings
    release: str = ""
    wheel: Wheel | None = None
    building: Future | None = None  # the wheel, while it is built locally
    facts: dict = field(default_factory=dict)
    layout: Layout | None = None
    locked: bool = False
    started: bool = False      # the new release's server is running
    switched: bool = False     # traffic moved to the new release
    unchanged: bool = False    # the same wheel is already current
    bind: str = ""             # where the release being activated listens
    secret_key: str = field(default="", repr=False)  # never shown, not even in a repr
    installer: plan.Installer | None = None
    wheels: list = field(default_factory=list)       # local paths of the dependencies' wheels

    @property
    def manager(self) -> str:
        return self.settings.gunicorn["manager"] or ("systemd" if self.facts.get("systemd") else "pidfile")

    @property
    def current(self) -> str | None:
        return self.facts.get("current")

    @property
    def releases(self) -> list[Release]:
        return [Release(r["name"], r["state"], r["meta"]) for r in self.facts.get("releases", [])]

    def run(self, command: str | None, what: str, **kwargs):
        return self.host.run(command, what=what, **kwargs) if command else None


def who() -> str:
    return f"{getpass.getuser()}@{socket.gethostname()}"


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# -- reading the host -------------------------------------------------------

def connect(t: Target) -> None:
    t.host.connect()


def read_facts(t: Target) -> None:
    result = t.run(plan.facts(t.settings), "reading the host's state", query=True,
                   hint=f"is {t.settings['python']} installed on the server?")
    t.facts = json.loads(result.stdout)
    t.layout = Layout(t.facts["root"])
    t.host.root = t.layout.root


# -- preparing --------------------------------------------------------------

DEFERRED = "deferred"  # what a phase returns when it did nothing, and prints no line


def take_lock(t: Target, action: str, only_laid_out: bool = False) -> str | None:
    """Check the host, lay out deploy_to, take the lock, read the facts afresh: one round trip.

    only_laid_out: lock only a host deployed to before, and return DEFERRED
    on a fresh one (laid out later, once there is a wheel to deploy).
    """
    info = {"who": who(), "when": now(), "what": f"{action} {t.release}".strip()}
    if t.host.dry_run and only_laid_out:
        return DEFERRED  # the plan shows the lock once, where a fresh host would get it
    if t.host.dry_run:
        read_facts(t)
        check_server(t)
        t.host.say(f"[{t.host.name}] would create {t.layout.root} and its directories (where "
                   f"missing) and take the lock {t.layout.lock}: {json.dumps(info)}")
        return
    result = t.run(plan.facts(t.settings, info, only_laid_out), "taking the deploy lock")
    t.facts = json.loads(result.stdout)
    if t.facts.get("deferred"):
        return DEFERRED
    t.layout = Layout(t.facts["root"])
    t.host.root = t.layout.root
    check_server(t)
    if t.facts.get("lock_error"):
        raise DeployError(f"creating {t.layout.root} or its lock failed: {t.facts['lock_error']}",
                          t.host.name,
                          hint="make its parent writable, or allow passwordless sudo for mkdir and chown")
    if not t.facts.get("locked"):
        raise lock_held(t.facts.get("lock") or {})
    t.locked = True


def lock_held(lock: dict) -> DeployError:
    holder = lock.get("who", "someone")
    what = f" ({lock['what']})" if lock.get("what") else ""
    age = lock.get("age")
    since = f" for {age:.0f}s" if isinstance(age, (int, float)) else ""
    return DeployError(f"locked by {holder}{what}{since}",
                       hint="wait for it; if no deploy is running, run fab unlock")


def release_lock(t: Target) -> None:
    """Release our lock, reconnecting once if the connection died."""
    if not t.locked:
        return
    try:
        t.run(plan.unlock(t.layout), "releasing the deploy lock", warn=True)
    except DeployError:
        t.host.reconnect()
        t.run(plan.unlock(t.layout), "releasing the deploy lock", warn=True)
    t.locked = False


def await_wheel(t: Target, cancelled: threading.Event) -> None:
    """The wheel the local build makes (it started before connect); Ctrl-C stops the wait."""
    while True:
        try:
            t.wheel = t.building.result(timeout=0.05)
            return
        except FutureTimeout:
            if cancelled.is_set():
                raise DeployError("interrupted while the wheel was being built") from None


def check_unchanged(t: Target, force: bool) -> None:
    """Skip the deploy when the very same wheel already serves."""
    current = next((r for r in t.releases if r.name == t.current), None)
    if not force and current and current.meta.get("sha256") == t.wheel.sha256:
        t.unchanged = True


PROBLEMS = {  # what the agent finds (agent.problems), and what to do about it
    "root": ("refusing to deploy as root: the app would run as root",
             "deploy as an unprivileged user with sudo rights (fab provision makes one)"),
    "no-nginx": ("nginx is not installed on the server",
                 "install it: sudo apt-get install nginx (fab provision does)"),
    "no-apache2ctl": ("Apache httpd is not installed on the server",
                      "install it: sudo apt-get install apache2, then a2enmod proxy_http "
                      "proxy_balancer lbmethod_byrequests headers"),
    "no-venv": ("the server's Python cannot create virtual environments",
                "install it: sudo apt-get install python3-venv"),
}


def check_server(t: Target) -> None:
    """Stop before anything changes on a host that cannot take a deploy."""
    for problem in t.facts.get("problems", []):
        what, hint = PROBLEMS[problem]
        raise DeployError(what, t.host.name, hint=hint)


def upload(t: Target) -> None:
    """The app's wheel into the release; the dependencies' wheels the host lacks."""
    t.host.mkdir(t.layout.release(t.release))
    t.host.put(str(t.wheel.path), f"{t.layout.release(t.release)}/{t.wheel.filename}")
    t.installer = choose_installer(t)
    if t.installer.wheelhouse:
        have = set(t.facts.get("wheelhouse", []))
        for path in t.wheels:
            shipped_uv_unused = path.name.startswith("uv-") and not t.installer.uv_wheel
            if path.name not in have and not shipped_uv_unused:
                t.host.put(str(path), f"{t.layout.wheelhouse}/{path.name}", atomic=True)


def choose_installer(t: Target) -> plan.Installer:
    """uv if the server has it or we ship it, else pip; from the wheelhouse if enabled."""
    python, mode = t.settings["python"], t.settings["installer"]
    server_uv = t.facts.get("uv") if mode in ("auto", "uv") else None
    if not t.settings["wheelhouse"]:
        if mode == "uv" and not server_uv:
            raise DeployError("installer is uv, but the server has no uv", t.host.name,
                              hint="install uv there, enable the wheelhouse, or set installer: auto")
        return plan.Installer(python, uv=server_uv)
    t.wheels = wheelhouse.fetch(t.wheel, servers.packages(t.settings),
                                wheelhouse.platform_of(t.facts))
    house = t.layout.wheelhouse
    pip_wheel = wheelhouse.tool_wheel(t.wheels, "pip")
    uv_wheel = wheelhouse.tool_wheel(t.wheels, "uv")
    if server_uv or mode == "pip" or uv_wheel is None:
        return plan.Installer(python, uv=server_uv, wheelhouse=house,
                              pip_wheel=f"{house}/{pip_wheel.name}")
    shipped = f"{house}/{uv_wheel.name}"
    return plan.Installer(python, uv=t.layout.uv_binary(shipped), uv_wheel=shipped, wheelhouse=house)


def create_venv(t: Target) -> None:
    """A fresh venv, its Flask instance folder linked to the shared one."""
    t.run(f"{plan.create_venv(t.installer, t.layout, t.release)}"
          f" && {plan.link_instance(t.settings, t.layout, t.release)}", "creating the venv",
          hint="is python3-venv installed?")


def install(t: Target) -> None:
    """The wheel and its dependencies into the venv, byte-compiled before anything runs."""
    wheel = f"{t.layout.release(t.release)}/{t.wheel.filename}"
    like = t.current if any(r.name == t.current for r in t.releases) else None
    t.run(f"{plan.install(t.installer, t.layout, t.release, wheel, servers.packages(t.settings))}"
          f" && {plan.compile_bytecode(t.layout, t.release, like)}", "installing the wheel")


def write_secret(t: Target) -> None:
    """Write config.py with a new SECRET_KEY once; later deploys keep it."""
    if not t.facts.get("config_exists"):
        t.host.write_secret(t.layout.config_py, secret.new_config(t.secret_key))


def rotate_secret(t: Target) -> None:
    """A new SECRET_KEY, the old one kept as a fallback so sessions survive."""
    text = t.host.read(t.layout.config_py)
    if text is None:
        raise DeployError("there is no config.py to rotate yet", hint="deploy first")
    try:
        t.host.write_secret(t.layout.config_py, secret.rotate(text, t.secret_key))
    except (ValueError, SyntaxError) as exc:
        # Say what is wrong with the file, but never echo its contents.
        raise DeployError(f"cannot rotate {t.layout.config_py}: {type(exc).__name__}",
                          hint="fix config.py by hand") from None


def reload_releases(t: Target) -> None:
    """Restart the running releases' workers in place (gunicorn HUP): they reread config.py."""
    t.run(plan.reload_servers(t.settings, t.layout, t.manager), "reloading the app")


def initialise(t: Target) -> None:
    """Run init_command once per host: the tutorial's init-db drops its tables."""
    if t.facts.get("initialized") or not t.settings["init_command"]:
        return
    t.run(plan.init_app(t.settings, t.layout, t.release), f"flask {t.settings['init_command']}",
          hint="fix the app's init command, or set init_command to '' to skip it")


def choose_bind(t: Target) -> str:
    """Each release gets its own socket, so two can run side by side."""
    setting = t.settings.gunicorn["bind"]
    if not setting:
        return f"unix:{t.layout.socket(t.release)}"
    host, _, port = setting.rpartition(":")
    if host not in LOOPBACK or not port.isdigit():
        raise DeployError(f"gunicorn.bind must be a loopback host:port, not {setting!r}",
                          hint="leave it unset for a unix socket, or use 127.0.0.1:PORT")
    # Two ports, used in turn: the new release takes the one the old lacks.
    first, second = f"{host}:{port}", f"{host}:{int(port) + 1}"
    return second if t.facts.get("current_bind") == first else first


def configure_server(t: Target) -> None:
    """The release's server files, and the systemd unit where systemd runs it."""
    t.bind = choose_bind(t)
    write_server_files(t, t.release, t.bind)
    if t.manager == "systemd":
        ensure_unit(t)


def write_server_files(t: Target, release: str, bind: str) -> None:
    """What starts a release's server on `bind`: its serve script, BIND, gunicorn.conf.py."""
    if t.settings["server"] == "gunicorn":
        t.host.write(t.layout.gunicorn_conf(release),
                     render.gunicorn_conf(t.settings, t.layout, release, bind))
    t.host.write(t.layout.serve(release),
                 servers.serve_script(t.settings, t.layout, release, bind), mode=0o755)
    t.host.write(t.layout.bind_file(release), bind + "\n")


def ensure_unit(t: Target) -> None:
    """The systemd unit as fabdeploy renders it: installed by root, never by the deploy user.

    Whoever writes a unit chooses its User=, so a deploy user allowed to
    install one is root. `provision` installs it; a deploy only checks it,
    and installs it only where the user has full sudo anyway.
    """
    unit = render.systemd_unit(t.settings, t.layout, t.facts.get("user") or t.host.conn.user)
    path = plan.unit_path(t.settings)
    if t.host.dry_run or t.host.read(path) == unit:
        return
    tmp = f"{t.layout.state}/{t.settings.app}@.service.new"
    t.host.write(tmp, unit)
    result = t.run(f"{plan.install_file(tmp, path)} && {plan.daemon_reload()}",
                   f"installing {path}", warn=True)
    if result.failed:
        raise DeployError(f"the systemd unit {path} is missing or out of date, and only root "
                          "may install it", t.host.name,
                          hint="run fab -H root@<host> provision (with the same settings)")


def record_release(t: Target) -> None:
    meta = {"release": t.release, "version": t.wheel.version, "wheel": t.wheel.filename,
            "sha256": t.wheel.sha256, "deployed_at": now(), "deployed_by": who()}
    # Aside until the switch renames it into place: a release killed before then stays
    # partial, so neither rollback nor a later deploy's cleanup mistakes it for a good one.
    t.host.write(t.layout.meta(t.release) + ".pending", json.dumps(meta, indent=2) + "\n")
    t.facts["releases"].append({"name": t.release, "state": "ready", "meta": meta})


def start_release(t: Target) -> None:
    """Start the release on its own socket and wait until it answers 2xx."""
    start_server(t, t.release)
    t.started = True
    healthy(t, t.release)


def start_server(t: Target, release: str) -> None:
    t.run(plan.start_server(t.settings, t.layout, release, t.manager), f"starting release {release}")


def healthy(t: Target, release: str) -> None:
    timeout = float(t.settings["health_timeout"])
    result = t.run(plan.health(t.settings, t.layout, release, t.bind, t.manager, timeout),
                   "health check", warn=True)
    if result is None or result.ok:
        return
    log = t.run(plan.tail_log(t.layout.app_log, 400), "reading the app's log", query=True)
    answer = result.stdout.strip().removeprefix("unhealthy: ")
    raise DeployError(f"release {release} is unhealthy: {answer}", t.host.name,
                      hint="the old release keeps serving; see the app's error above",
                      detail=app_error(this_run(log.stdout, release)) if log and log.stdout.strip() else None)


def this_run(log: str, release: str) -> str:
    """The shared log's lines since the release last started (its serve script's marker)."""
    marker = servers.start_marker(release) + "\n"
    return log.rsplit(marker, 1)[1] if marker in log else log


def app_error(log: str, lines: int = 20) -> str:
    """The app's own error from the server's log, not the server's reaction to it.

    Each worker prints the app's traceback, then gunicorn its own HaltServer:
    show the last exception that is not the server's, with the lines before it.
    """
    text = log.rstrip().splitlines()
    for end in range(len(text) - 1, -1, -1):
        line = text[end]
        if EXCEPTION_LINE.match(line) and not line.startswith(("gunicorn.", "SystemExit")):
            return "\n".join(text[max(0, end - lines + 1):end + 1])
    # No traceback (e.g. gunicorn's "Failed to find attribute"): the run's first lines say it.
    return "\n".join(text[:lines])


# -- switching --------------------------------------------------------------

def route_traffic(t: Target, release: str, active: str, backup: str | None,
                  check: bool = True) -> bool:
    """Send the proxy's traffic to `active`; `check`: through nginx's preview first.

    True when the release was checked that way (a check after the switch
    would see nothing new).

    Over unix sockets the site points at shared/run/live.sock, and the switch
    renames that link: no reload, which would drop requests on keep-alive
    connections. The site itself is installed only when it changes. nginx
    first shows the release through its preview (next.sock), and only a
    release that answers 2xx there gets the live link. Over TCP the site
    names `active`, with `backup` taking what it refuses, and is reloaded.
    If the proxy rejects a site, the previous one is put back.
    """
    if not active.startswith("unix:"):
        install_site(t, render.proxy_site(t.settings, release, active, backup))
        return False
    live, socket = f"unix:{t.layout.live_socket}", active[len("unix:"):]
    preview = t.settings["proxy"] == "nginx"  # Apache's site has none
    site = render.proxy_site(t.settings, release, live, live, t.layout if preview else None)
    # A new preview token (a fresh deploy_to) is nginx's only after a reload.
    unloaded = preview and t.facts.get("preview_unloaded", False)
    if install_site(t, site, reload=unloaded) and unloaded:
        t.run(plan.remove_file(t.layout.preview_unloaded), "noting the preview token as loaded")
        t.facts["preview_unloaded"] = False
    if not (preview and check):  # no preview, or back to what served a moment ago: at once
        t.run(plan.switch_link(t.layout.live_socket, socket), "switching the live socket")
        return False
    stamp = render.stamp(t.settings, release, live) + render.NEXT
    result = t.run(plan.preview_then_switch(t.settings, t.layout, socket, stamp, 10),
                   "checking the release through nginx, then switching", warn=True)
    if result is None or result.ok:
        return True
    answer = result.stdout.strip()
    if answer.startswith("unhealthy: "):
        raise DeployError(f"release {release} failed its check through nginx before the switch: "
                          f"{answer.removeprefix('unhealthy: ')}", t.host.name,
                          hint="nothing was switched: the old release keeps serving")
    raise DeployError(f"switching to release {release} failed (exit {result.exited})", t.host.name,
                      detail=tail(result.stdout + result.stderr) or None)


def install_site(t: Target, site_text: str, reload: bool = False) -> bool:
    """Install, test and reload the proxy's site, unless it is already exactly this
    (and no `reload` is asked for). True if the proxy was reloaded."""
    name = t.settings["proxy"]
    site = t.settings.proxy["site_path"]
    if not t.host.dry_run and not reload and t.host.read(site) == site_text:
        return False
    tmp = f"{t.layout.state}/site.conf.new"
    t.host.write(tmp, site_text)
    result = t.run(plan.route(t.settings, tmp, site, f"{t.layout.state}/site.conf.prev"),
                   f"routing {name}", warn=True)
    if result is None or result.ok:
        return result is not None
    output = tail(result.stdout + result.stderr)
    if result.exited == plan.PROXY_REJECTED:
        raise DeployError(f"{name} rejected the configuration", t.host.name,
                          hint=f"fix {name}'s configuration; nothing was switched", detail=output)
    if result.exited == plan.PROXY_STALE:
        raise DeployError(f"{name} still serves its old configuration after a reload", t.host.name,
                          hint=f"a reload {name} cannot apply is only logged: see {name}'s error log")
    raise DeployError(f"routing {name} failed (exit {result.exited})", t.host.name,
                      hint=f"allow passwordless sudo for install and the {name} commands, "
                           "or make the site's directory writable", detail=output)


def serve_publicly(t: Target, release: str) -> None:
    """proxy: none: run `release` on the public address, checked there, or raise."""
    t.release, t.bind = release, t.settings["direct"]["bind"]
    write_server_files(t, release, t.bind)
    start_server(t, release)
    result = t.run(plan.health_direct(t.settings, t.bind, float(t.settings["health_timeout"])),
                   "health check on the public address", warn=True)
    if result is not None and result.failed:
        t.run(plan.stop_and_wait(t.settings, t.layout, release, t.manager), "stopping it", warn=True)
        raise DeployError(f"release {release} is unhealthy on {t.bind}: {result.stdout.strip()}",
                          t.host.name)


def cold_switch(t: Target, old: str | None) -> None:
    """No proxy to move: stop the old release, start the new one on the public address.

    Requests in between fail; the README gives the measured gap. If the new
    release does not answer there, the old one is started again.
    """
    new = t.release
    t.run(plan.stop_and_wait(t.settings, t.layout, new, t.manager), "stopping the checked release")
    if old:
        t.run(plan.stop_and_wait(t.settings, t.layout, old, t.manager), f"stopping release {old}")
    try:
        serve_publicly(t, new)
    except DeployError:
        if old:
            serve_publicly(t, old)
            t.release = new
        raise


def restore_site(t: Target) -> None:
    """Put back the site the last route replaced (or remove ours, if there was none)."""
    saved = f"{t.layout.state}/site.conf.prev"
    t.run(f"{plan.restore_copy(t.settings.proxy['site_path'], saved)} && "
          f"{plan.reload_proxy(t.settings)}", "restoring the proxy's site", warn=True)


def publish(t: Target, old: str | None, event: str) -> None:
    """Make the release current, keep the old one warm as nginx's backup, log it."""
    warm = old and t.settings["keep_previous_running"] and t.settings["proxy"] != "none"
    keep = [t.release] + ([old] if warm else [])
    log = plan.audit(t.layout, audit_entry(t, event, previous=old))
    t.run(f"{plan.publish(t.settings, t.layout, t.release, old, keep, t.manager)}; {log}",
          "switching current")
    t.switched = True
    t.facts["current"] = t.release


def stop_release(t: Target, release: str | None) -> None:
    if release:
        t.run(plan.stop_server(t.settings, t.layout, release, t.manager),
              f"stopping release {release}", warn=True)


def verify_through_proxy(t: Target) -> None:
    """The health path through the proxy answers 2xx, from the release we switched to."""
    name = t.settings["proxy"]
    release = t.release or t.current  # rotate-secret checks what serves already
    expected = render.stamp(t.settings, release, t.bind or t.facts.get("current_bind") or "unix:")
    result = t.run(plan.health_via_proxy(t.settings, expected, 10), f"health check through {name}",
                   warn=True)
    if result is None or result.ok:
        return
    answer = result.stdout.strip()
    hint = None
    if "X-Fabdeploy-Site" in answer:
        hint = (f"another {name} site answers for this name, e.g. Debian's stock default site: "
                f"remove it (fab provision does) or set {name}.server_name")
    raise DeployError(f"health check through {name} failed: {answer}", t.host.name, hint=hint)


def cleanup(t: Target) -> list[str]:
    """Remove releases beyond keep_releases, and release the lock: the deploy is done."""
    doomed = releases_to_remove(t.releases, t.current, int(t.settings["keep_releases"]))
    steps = [plan.remove_releases(t.settings, t.layout, doomed, t.manager)] if doomed else []
    t.run("; ".join([*steps, plan.unlock(t.layout)]), "removing old releases")
    t.locked = False
    return doomed


def audit_entry(t: Target, event: str, **details) -> dict:
    """Who did what, when, to which release and wheel: one line of the audit log."""
    entry = {"event": event, "who": who(), "when": now(), "release": t.release or None, **details}
    if t.wheel is not None:
        entry["sha256"] = t.wheel.sha256
    else:
        meta = next((r.meta for r in t.releases if r.name == t.release), {})
        entry["sha256"] = meta.get("sha256")
    return entry


def audit(t: Target, event: str, **details) -> None:
    t.run(plan.audit(t.layout, audit_entry(t, event, **details)), "writing the audit log", warn=True)


def mark_failed(t: Target, reason: str) -> None:
    """Stop and mark a release that did not make it, so nothing picks it again."""
    if t.started:
        stop_release(t, t.release)
        t.started = False
    t.run(plan.mark_failed(t.layout, t.release, f"{now()} {reason}"),
          "marking the release failed", warn=True)
