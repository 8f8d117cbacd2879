"""The phases of a deploy and a rollback on one host, each a small function, and their order.

A remote phase returns the operations it needs on the host (from `plan`
and `render`); the runner (fleet.py) sends consecutive remote phases to
the host's agent as one request, so a phase costs no round trip of its
own. A local phase does its work here. The sequences at the end are the
deploy and the rollback, in the order the README numbers them.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import getpass
import hashlib
import re
import socket
import threading
from concurrent.futures import Future, TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Callable

from . import appenv, database, hooks, memo, plan, processes, provisioning, render, secret, servers, wheelhouse
from .build import Wheel
from .errors import DeployError, tail
from .layout import Layout, SystemPaths, previous_release, release_name, releases_to_remove
from .model import Bind, HostFacts, Problem, Release, ReleaseState
from .ops import Health, Helper, Link, Migrate, Op, Phase, Site, Upload, Write
from .remote import Host
from .settings import Settings
from .vcs import Source

EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit)\b")


@dataclass(eq=False)  # identity, so targets can key dicts
class Target:
    """One host's state during one invocation."""

    host: Host
    settings: Settings
    release: str = ""
    wheel: Wheel | None = None
    building: Future | None = None  # the wheel, while it is built locally
    facts: HostFacts | None = None
    layout: Layout | None = None
    locked: bool = False
    started: bool = False      # the new release's server was started
    switched: bool = False     # traffic moved to the new release
    unchanged: bool = False    # the same wheel is already current
    bind: Bind | None = None   # where the release being activated listens
    old: str | None = None     # what was current before this invocation's switch
    secret_key: str = field(default="", repr=False)  # never shown, not even in a repr
    installer: plan.Installer | None = None
    wheels: list = field(default_factory=list)       # local paths of the dependencies' wheels
    action: str = "deploy"
    checked: bool = False      # route checked the release through nginx's preview
    force: bool = False        # deploy even the wheel that is current
    raw_facts: dict = field(default_factory=dict, repr=False)  # as the agent said them: for memo
    repaired: str = ""         # what the deploy found half switched and put right
    source: Source | None = None  # the git commit the wheel was built from (issue 15)
    peers: tuple = ()          # every host of the invocation, for the hooks' FABDEPLOY_HOSTS
    cancelled: threading.Event = field(default_factory=threading.Event, repr=False)
    # -- the app's environment and data (issue 14)
    app_env: appenv.AppEnv | None = field(default=None, repr=False)  # env and secrets' values
    backup_taken: dict | None = None  # what the backup before this release's migration holds
    notes: list = field(default_factory=list)  # lines the fleet prints for this host after a phase

    @property
    def provisioned(self) -> bool:
        """provision set this host up: root owns the site and the units, the helper is the way in."""
        return self.facts is not None and self.facts.registration is not None

    @property
    def manager(self) -> str:
        chosen = self.settings.server.manager
        if chosen:
            return chosen
        return "systemd" if self.facts and self.facts.systemd and self.provisioned else "pidfile"

    @property
    def current(self) -> str | None:
        return self.facts.current if self.facts else None

    @property
    def releases(self) -> tuple[Release, ...]:
        return self.facts.releases if self.facts else ()

    def learn(self, data: dict) -> None:
        """Take in the host's facts as the agent reported them."""
        self.raw_facts = data
        self.facts = HostFacts.parse(data)
        self.layout = Layout(self.facts.root)
        self.host.root = self.layout.root


def who() -> str:
    return f"{getpass.getuser()}@{socket.gethostname()}"


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# -- reading the host, and the lock -----------------------------------------------

def connect(t: Target) -> None:
    t.host.connect()


def read_facts(t: Target) -> list[Op]:
    return [plan.facts(t.settings)]


def lock_while_building(t: Target) -> list[Op]:
    """A host deployed to before is locked while the wheel builds; a fresh one is only looked at.

    An unchanged tree's wheel comes from the cache at once: if it is the
    one that serves, the host is not even locked (no unlock to wait for).
    """
    return [plan.lock(t.settings, lock_info(t), only_laid_out=True, unless_sha=built_sha(t))]


def built_sha(t: Target) -> str | None:
    if t.force or t.building is None or not t.building.done() or t.building.exception():
        return None
    return t.building.result().sha256


def lock(t: Target) -> list[Op]:
    """Check the host, lay out deploy_to, take the lock, read the facts afresh: one request."""
    return [plan.lock(t.settings, lock_info(t), unless_sha=built_sha(t))]


def lock_info(t: Target) -> dict:
    return plan.lock_info(who(), now(), f"{t.action} {t.release}".strip())


def locked(t: Target, results: dict) -> None:
    """After the lock: a host that cannot take a deploy stops here, before anything changed."""
    t.learn(results["facts"])
    # The agent took the lock unless it found a problem: ours from now on, so that a host
    # refused below (say, for settings provision must install first) is unlocked again.
    t.locked = bool(t.facts.locked)
    check_server(t)
    if t.host.dry_run:
        return
    if t.facts.deferred or t.facts.unchanged:
        return
    if t.facts.lock_error:
        raise DeployError(f"creating {t.layout.root} or its lock failed: {t.facts.lock_error}", t.host.name,
                          hint="run fab -H root@<host> provision, or make deploy_to's parent writable")
    if not t.facts.locked:
        raise lock_held(t.facts.lock)
    t.locked = True


def lock_held(lock) -> DeployError:
    holder = lock.who if lock else "someone"
    what = f" ({lock.what})" if lock and lock.what else ""
    since = f" for {lock.age:.0f}s" if lock else ""
    return DeployError(f"locked by {holder}{what}{since}",
                       hint="wait for it; if no deploy is running, run fab unlock")


PROBLEMS = {  # what the agent finds, and what to do about it
    Problem.ROOT: ("refusing to deploy as root: the app would run as root",
                   "deploy as an unprivileged user (fab provision makes one)"),
    Problem.NO_NGINX: ("nginx is not installed on the server",
                       "install it: sudo apt-get install nginx (fab provision does)"),
    Problem.NO_APACHE: ("Apache httpd is not installed on the server",
                        "install it with fab provision and proxy.kind: apache"),
    Problem.NO_VENV: ("the server's Python cannot create virtual environments",
                      "install it: sudo apt-get install python3-venv"),
    Problem.NOT_PROVISIONED: ("this host is not provisioned for the app: root owns the proxy's site",
                              "run fab -H root@<host> provision, with the same fabric.yaml"),
}


def check_server(t: Target) -> None:
    """Stop before anything changes on a host that cannot take a deploy."""
    for problem in t.facts.problems:
        what, hint = PROBLEMS[problem]
        raise DeployError(what, t.host.name, hint=hint)
    if t.provisioned:
        check_registration(t)
    elif t.settings.tls.enabled:
        raise DeployError("tls needs a provisioned host: root installs the certificate and the site",
                          t.host.name, hint="run fab -H root@<host> provision, with this fabric.yaml")


def check_registration(t: Target) -> None:
    """What provision baked into root's files must still be what the settings say."""
    registered = t.facts.registration.values
    if registered.get("user") != t.facts.user:
        raise DeployError(f"{t.settings.app} on this host is deployed by {registered.get('user')!r}, "
                          f"not {t.facts.user!r}", t.host.name,
                          hint=f"connect as {registered.get('user')}, or provision again with provision.user")
    wanted = provisioning.registration(t.settings, t.facts.user, t.facts.ipv6)
    changed = [key for key in sorted(set(wanted) | set(registered))
               if wanted.get(key) != registered.get(key) and key not in provisioning.NOT_COMPARED]
    if changed:
        raise DeployError(f"settings that provision installs as root changed ({', '.join(changed)})",
                          t.host.name, hint="run fab -H root@<host> provision again, with this fabric.yaml")


def release_lock(t: Target) -> None:
    """Release our lock, reconnecting once if the connection died."""
    if not t.locked or t.layout is None:
        return
    try:
        t.host.execute([ops_phase("unlock", [plan.unlock(t.layout)])])
    except DeployError:
        try:
            t.host.reconnect()
            t.host.execute([ops_phase("unlock", [plan.unlock(t.layout)])])
        except DeployError:
            return
    t.locked = False


def ops_phase(name: str, ops: list[Op]) -> Phase:
    return Phase(name, tuple(ops))


def half_switched(t: Target) -> bool:
    """live.sock names another release than current: a switch was cut between its two steps."""
    current = t.facts.current_release if t.facts else None
    return bool(current and current.bind and current.bind.is_unix and t.facts.live_target
                and t.facts.live_target != t.current)


def repair(t: Target) -> list[Op]:
    """The live link back to current, which only a completed switch moves (its record with it)."""
    bind = t.facts.current_release.bind
    t.repaired = (f"live.sock pointed at {t.facts.live_target}, not at current {t.current}:"
                  f" pointed it back at {t.current}")
    return [Link(t.layout.live_socket, bind.path, what="repairing the live link")]


def say_repaired(t: Target, results: dict) -> None:
    t.facts = dataclasses.replace(t.facts, live_target=t.current)


# -- preparing ------------------------------------------------------------------------

def await_wheel(t: Target) -> None:
    """The wheel the local build makes (it started before connect); Ctrl-C stops the wait."""
    while True:
        try:
            t.wheel = t.building.result(timeout=0.05)
            return
        except FutureTimeout:
            if t.cancelled.is_set():
                raise DeployError("interrupted while the wheel was being built") from None


def check_unchanged(t: Target) -> None:
    """Skip the deploy when the very same wheel already serves."""
    current = t.facts.current_release if t.facts else None
    same_env = (t.app_env.sha256 if t.app_env else None) == t.facts.env_sha256
    if not t.force and current and current.meta.get("sha256") == t.wheel.sha256 and same_env:
        t.unchanged = True


def fetch_wheelhouse(t: Target) -> None:
    """Which installer the host uses; the dependencies' wheels for its platform, fetched here."""
    python, mode = t.settings.python, t.settings.installer
    server_uv = t.facts.uv if mode in ("auto", "uv") else None
    if not t.settings.wheelhouse:
        if mode == "uv" and not server_uv:
            raise DeployError("installer is uv, but the server has no uv", t.host.name,
                              hint="install uv there, enable the wheelhouse, or set installer: auto")
        t.installer = plan.Installer(python, uv=server_uv)
        return
    t.wheels = wheelhouse.fetch(t.wheel, servers.packages(t.settings),
                                wheelhouse.platform_of(t.facts))
    house = t.layout.wheelhouse
    pip_wheel = wheelhouse.tool_wheel(t.wheels, "pip")
    uv_wheel = wheelhouse.tool_wheel(t.wheels, "uv")
    if server_uv or mode == "pip" or uv_wheel is None:
        t.installer = plan.Installer(python, uv=server_uv, wheelhouse=house,
                                     pip_wheel=f"{house}/{pip_wheel.name}")
        return
    shipped = f"{house}/{uv_wheel.name}"
    t.installer = plan.Installer(python, uv=t.layout.uv_binary(shipped), uv_wheel=shipped, wheelhouse=house)


def upload(t: Target) -> list[Op]:
    """The app's wheel into the release; the dependencies' wheels the host lacks."""
    release_dir = t.layout.release(t.release)
    ops: list[Op] = [plan.mkdir(release_dir),
                     Upload(str(t.wheel.path), f"{release_dir}/{t.wheel.filename}",
                            t.wheel.path.stat().st_size, what=f"uploading to {release_dir}")]
    if t.installer.wheelhouse:
        for path in t.wheels:
            shipped_uv_unused = path.name.startswith("uv-") and not t.installer.uv_wheel
            if path.name not in t.facts.wheelhouse and not shipped_uv_unused:
                remote = f"{t.layout.wheelhouse}/{path.name}"
                ops.append(Upload(str(path), remote, path.stat().st_size, atomic=True,
                                  what=f"uploading to {remote}"))
    return ops


def create_venv(t: Target) -> list[Op]:
    """A fresh venv, its Flask instance folder linked to the shared one."""
    return [plan.Sh(f"{plan.create_venv(t.installer, t.layout, t.release)}"
                    f" && {plan.link_instance(t.settings, t.layout, t.release)}",
                    what="creating the venv", hint="is python3-venv installed?")]


def install(t: Target) -> list[Op]:
    """The wheel and its dependencies into the venv, byte-compiled before anything runs;
    its static folders linked for nginx."""
    wheel = f"{t.layout.release(t.release)}/{t.wheel.filename}"
    like = t.current if t.facts.current_release else None
    return [*build_on_server(t),
            plan.Sh(plan.install(t.installer, t.layout, t.release, wheel, servers.packages(t.settings)),
                    what="installing the wheel"),
            plan.compile_bytecode(t.layout, t.release, like),
            *(link_static(t) if t.settings.static else [])]


def link_static(t: Target) -> list[Op]:
    """The release's static folders, for nginx, and the release it replaces (whose pages
    may still ask for their own files). A rollback links its target to the one it leaves."""
    ops: list[Op] = [plan.static_links(t.settings, t.layout, t.release)]
    if t.current and t.current != t.release:
        ops.append(plan.previous_link(t.layout, t.release, t.current))
    return ops


def serves_static(t: Target) -> bool:
    return bool(t.settings.static)


def build_on_server(t: Target) -> list[Op]:
    """What ships no wheel (mod_wsgi), built into the host's wheelhouse: on its first deploy only."""
    sdists = wheelhouse.unbuilt(t.wheels, t.facts) if t.installer.wheelhouse else []
    if not sdists:
        return []
    house = t.layout.wheelhouse
    pip_wheel = f"{house}/{wheelhouse.tool_wheel(t.wheels, 'pip').name}"
    return [plan.build_wheels(t.settings.python, pip_wheel, house, [f"{house}/{s.name}" for s in sdists])]


def write_secret(t: Target) -> list[Op]:
    """config.py with a new SECRET_KEY once; later deploys keep it."""
    if t.facts.config_exists:
        return []
    return [Write(t.layout.config_py, secret.new_config(t.secret_key), mode=0o600, secret=True,
                  what=f"writing {t.layout.config_py}")]


def initialise(t: Target) -> list[Op]:
    """Run init_command once per host: the tutorial's init-db drops its tables."""
    if t.facts.initialized or not t.settings.init_command:
        return []
    return [plan.init_app(t.settings, t.layout, t.release)]


def choose_bind(t: Target, release: str) -> Bind:
    """Each release gets its own socket, so two can run side by side."""
    setting = t.settings.server.bind
    if setting is None:
        return Bind.unix(t.layout.socket(release))
    # Two ports, used in turn: the new release takes the one the old lacks.
    current = t.facts.current_bind
    return setting.next_port() if current == setting else setting


def configure(t: Target) -> list[Op]:
    """The release's server files, and its RELEASE.json, aside until the switch."""
    t.bind = choose_bind(t, t.release)
    return [*server_files(t, t.release, t.bind), *processes.files(t.settings, t.layout, t.release),
            plan.write_meta(t.layout, t.release, release_meta(t))]


def configure_rollback(t: Target) -> list[Op]:
    """The old release's server files again: over TCP it may get the other port."""
    t.bind = choose_bind(t, t.release)
    return [*server_files(t, t.release, t.bind), *processes.files(t.settings, t.layout, t.release)]


def server_files(t: Target, release: str, bind: Bind) -> list[Op]:
    """What starts a release's server on `bind`: its serve script, BIND, gunicorn.conf.py or app.wsgi."""
    files = []
    if t.settings.server.kind == "gunicorn":
        files.append(Write(t.layout.gunicorn_conf(release),
                           render.gunicorn_conf(t.settings, t.layout, release, bind),
                           what=f"writing {t.layout.gunicorn_conf(release)}"))
    if t.settings.server.kind == "mod_wsgi":
        files.append(Write(t.layout.wsgi_script(release), servers.wsgi_script(t.settings, release),
                           what=f"writing {t.layout.wsgi_script(release)}"))
    files.append(Write(t.layout.serve(release), servers.serve_script(t.settings, t.layout, release, bind),
                       mode=0o755, what=f"writing {t.layout.serve(release)}"))
    files.append(Write(t.layout.bind_file(release), bind.gunicorn + "\n",
                       what=f"writing {t.layout.bind_file(release)}"))
    return files


def release_meta(t: Target) -> dict:
    meta = {"release": t.release, "version": t.wheel.version, "wheel": t.wheel.filename,
            "sha256": t.wheel.sha256, "deployed_at": now(), "deployed_by": who()}
    if t.source is not None:  # which commit, and whether the tree had changes (issue 15)
        meta.update(t.source.meta())
        if t.settings.version_from == "git":
            meta["version"] = t.source.describe or t.source.label
    return meta


def start(t: Target) -> list[Op]:
    """Start the release on its own socket; it must answer 2xx before anything else moves."""
    t.started = True
    check = plan.health(t.settings, t.layout, t.release, t.bind, t.manager)
    return [*free_port(t), plan.start_server(t.settings, t.layout, t.release, t.manager),
            dataclasses.replace(check, what=f"release {t.release} is unhealthy"),
            *processes.check(t.settings, t.layout, t.release, t.manager)]


def free_port(t: Target) -> list[Op]:
    """Over TCP the port current lacks is the warm standby's: it stops before the release takes it.

    Else the new server cannot bind, the standby answers its health check, and once
    the switch stops the standby, visitors get the release before (the site's backup).
    """
    if t.bind.is_unix:
        return []
    return [plan.stop_and_wait(t.settings, t.layout, r.name, t.manager) for r in t.releases
            if r.bind == t.bind and r.name not in (t.release, t.current)]


# -- switching ----------------------------------------------------------------------------

def site_shape(t: Target, active: Bind, backup: Bind | None) -> render.SiteShape:
    preview = t.settings.proxy.kind == "nginx" and active.is_unix
    return render.SiteShape(release=t.release, active=active, backup=backup, root=t.layout.root,
                            preview_map=t.layout.preview_map if preview else None,
                            next_socket=t.layout.next_socket if preview else None)


def local_site(t: Target, active: Bind, backup: Bind | None, reload: bool = False) -> list[Op]:
    """A proxy the deploy user runs itself: its site, installed only when it changes."""
    proxy = t.settings.proxy
    text = render.proxy_site(t.settings, site_shape(t, active, backup))
    if not reload and hashlib.sha256(text.encode()).hexdigest() == t.facts.site_sha256:
        return []
    return [Site(proxy.site_path, text, proxy.test_command, proxy.reload_command,
                 pid_file=proxy.pid_file or None, reload_nginx=proxy.kind == "nginx",
                 loaded=t.layout.preview_unloaded, what=f"routing {proxy.kind}")]


def preview_map(t: Target) -> str:
    return SystemPaths(t.settings.app).preview_map if t.provisioned else t.layout.preview_map


def route(t: Target) -> list[Op]:
    """Send the proxy's traffic to the started release; with nginx, checked through it first.

    Over unix sockets the site connects through shared/run/live.sock, and the
    switch renames that link: no reload, which would drop requests on
    keep-alive connections. nginx first shows the release through its
    preview (next.sock), and only a release that answers 2xx there gets the
    live link. Over TCP the site names the release's port, with the old one
    as backup, and is reloaded (by root's helper on a provisioned host).
    """
    t.checked = False
    if t.settings.proxy.kind == "none":
        return cold_switch(t)
    old = t.facts.current_bind
    if not t.bind.is_unix:
        if t.provisioned:
            return [Helper(t.settings.app, ("route-tcp", str(t.bind.port)), what=f"routing {t.settings.proxy.kind}")]
        return local_site(t, t.bind, old, reload=True)
    live = Bind.unix(t.layout.live_socket)
    ops = [] if t.provisioned else local_site(t, live, live, reload=t.facts.preview_unloaded)
    if t.settings.proxy.kind != "nginx":  # Apache's site has no preview: verify comes after
        return ops + [Link(t.layout.live_socket, t.bind.path, what="switching the live socket")]
    t.checked = True
    stamp = render.stamp(t.settings, live) + render.NEXT
    check = plan.health_via_proxy(t.settings, stamp, 10, preview_map(t))
    return ops + [Link(t.layout.next_socket, t.bind.path, what="pointing the preview at the release"),
                  dataclasses.replace(check, what=f"release {t.release} failed its check through nginx "
                                                  f"before the switch"),
                  Link(t.layout.live_socket, t.bind.path, what="switching the live socket")]


def verify(t: Target) -> list[Op]:
    """No preview (Apache, TCP binds): after the switch, the release through the proxy."""
    expected = render.stamp(t.settings, t.bind)
    return [plan.health_via_proxy(t.settings, expected, 10)]


def needs_verify(t: Target) -> bool:
    return t.settings.proxy.enabled and not t.checked


def switch_back(t: Target) -> list[Op]:
    """The old release again, after the new one failed behind the proxy."""
    old = t.facts.current_bind
    if old is None:
        return []
    if not old.is_unix:
        if t.provisioned:
            return [Helper(t.settings.app, ("route-tcp", str(old.port)), what="switching back")]
        return local_site(t, old, None, reload=True)
    return [Link(t.layout.live_socket, old.path, what="switching back")]


def switch_back_to(t: Target, new: str) -> list[Op]:
    """All the way back: traffic, `current` and the boot unit to t.release, from `new`."""
    old = t.facts.release(t.release)
    route_back = []
    if old and old.bind and old.bind.is_unix:
        route_back = [Link(t.layout.live_socket, old.bind.path, what="switching the live socket back")]
    elif old and old.bind and t.provisioned:
        route_back = [Helper(t.settings.app, ("route-tcp", str(old.bind.port)), what="switching back")]
    elif old and old.bind:
        route_back = local_site(t, old.bind, None, reload=True)
    return [*route_back, *plan.publish(t.settings, t.layout, t.release, new, [t.release], t.manager),
            audit_op(t, "switch-back", previous=new)]


def cold_switch(t: Target) -> list[Op]:
    """No proxy to move: stop the old release, start the new one on the public address.

    Requests in between fail; the README gives the measured gap.
    """
    new, old = t.release, t.current
    public = t.settings.server.public_bind
    ops = [plan.stop_and_wait(t.settings, t.layout, new, t.manager)]
    if old:
        ops.append(plan.stop_and_wait(t.settings, t.layout, old, t.manager))
    ops += server_files(t, new, public)
    ops.append(plan.start_server(t.settings, t.layout, new, t.manager))
    check = plan.health_direct(t.settings, t.settings.health_timeout)
    ops.append(dataclasses.replace(check, what=f"release {new} is unhealthy on {public.address}"))
    return ops


def restart_old_publicly(t: Target) -> list[Op]:
    """After a failed cold switch: the old release back on the public address."""
    old = t.current
    if not old:
        return []
    public = t.settings.server.public_bind
    return [plan.stop_and_wait(t.settings, t.layout, t.release, t.manager),
            *server_files(t, old, public), plan.start_server(t.settings, t.layout, old, t.manager),
            plan.health_direct(t.settings, t.settings.health_timeout)]


def switch(t: Target) -> list[Op]:
    """Make the release current, keep the old one warm as the proxy's backup, log it."""
    old = t.current
    warm = old and t.settings.keep_previous_running and t.settings.proxy.enabled
    keep = [t.release] + ([old] if warm else [])
    return [*plan.publish(t.settings, t.layout, t.release, old, keep, t.manager),
            audit_op(t, t.action, previous=old)]


def switched(t: Target, results: dict) -> None:
    t.switched = True
    t.old = t.current
    meta = t.facts.release(t.release)
    releases = t.facts.releases if meta else t.facts.releases + (
        Release(t.release, ReleaseState.READY, release_meta(t) if t.wheel else {}, t.bind),)
    t.facts = dataclasses.replace(t.facts, current=t.release, releases=releases)


def cleanup(t: Target) -> list[Op]:
    """Remove releases beyond keep_releases, and release the lock: the deploy is done
    (unless after_deploy hooks are still to run under it).

    Planned as the host is once the switch before it has run (it may go in
    the same request): the new release current, and good.
    """
    releases = [r for r in t.releases if r.name != t.release]
    releases.append(Release(t.release, ReleaseState.READY, {}, t.bind))
    doomed = releases_to_remove(releases, t.release, t.settings.keep_releases)
    steps = plan.remove_releases(t.settings, t.layout, doomed, t.manager) if doomed else []
    return [*steps, *unlock(t)] if unlocks_with_cleanup(t) else steps


def cleaned(t: Target, results: dict) -> None:
    if unlocks_with_cleanup(t):
        unlocked(t, results)


def unlocks_with_cleanup(t: Target) -> bool:
    return not hooks.at(t.settings, "after_deploy")


def unlocks_after_hooks(t: Target) -> bool:
    """Remote after_deploy hooks only: the lock goes right after them, in their request (a local
    one runs after every host's, and the fleet releases the lock after it)."""
    return hooked(t, "after_deploy") and not hooks.local_at(t.settings, "after_deploy")


def unlock(t: Target) -> list[Op]:
    """The lock released, and the host's facts as it is now, for the next plan made from memo."""
    return [plan.unlock(t.layout), plan.facts(t.settings, key="facts_after")]


def unlocked(t: Target, results: dict) -> None:
    t.locked = False
    if results.get("facts_after") and not t.host.dry_run:
        remember(t, results["facts_after"])


def remember(t: Target, raw: dict) -> None:
    memo.save(t.host.name, t.settings.app, t.settings.deploy_to, raw)


def recall(t: Target) -> bool:
    """Plan from the facts last seen of the host, if there are any: the agent checks them."""
    raw = memo.load(t.host.name, t.settings.app, t.settings.deploy_to)
    if raw is None:
        return False
    t.learn(raw)
    return True


def guard(t: Target) -> list[Op]:
    return [plan.guard(t.settings, memo.expectation(t.raw_facts))]


def audit_op(t: Target, event: str, **details):
    return plan.audit(t.settings, t.layout, audit_entry(t, event, **details), t.provisioned)


def audit_entry(t: Target, event: str, **details) -> dict:
    """Who did what, when, to which release and wheel: one line of the audit log."""
    entry = {"event": event, "who": who(), "when": now(), "release": t.release or None, **details}
    meta = t.facts.release(t.release) if t.facts and t.wheel is None else None
    if t.wheel is not None:
        entry["sha256"] = t.wheel.sha256
    else:
        entry["sha256"] = meta.meta.get("sha256") if meta else None
    # Which commit (issue 15): the one built now, or the one the release recorded.
    recorded = meta.meta if meta else {}
    source = t.source.meta() if t.source else {k: recorded[k] for k in ("commit", "dirty") if k in recorded}
    return {**entry, **source}


def abandon(t: Target, reason: str) -> list[Op]:
    """A release that will not go live: stop it, mark it, say so in the log."""
    ops: list[Op] = [audit_op(t, "failed", reason=reason)]
    if t.started:
        ops.append(plan.stop_server(t.settings, t.layout, t.release, t.manager))
    ops.append(plan.mark_failed(t.layout, t.release, f"{now()} {reason}"))  # if it got a directory
    return ops


def stop_release(t: Target, release: str) -> list[Op]:
    return [plan.stop_server(t.settings, t.layout, release, t.manager)]


# -- turning the agent's failures into one clear line --------------------------------------

def explain(t: Target, op: Op, error: dict) -> DeployError:
    """The failing op and what the agent said about it, as the user reads it."""
    name, proxy = t.host.name, t.settings.proxy.kind
    output = (error.get("stderr") or "").strip() or (error.get("stdout") or "").strip()
    if error.get("disk_full") or disk_full(output + error.get("message", "")):
        return DeployError(f"{op.what} failed: the server's disk is full (the old release keeps serving)",
                           name)
    if isinstance(op, Health):
        answer = error.get("unhealthy") or error.get("message", "")
        if op.preview_map:
            return DeployError(f"{op.what}: {answer}", name,
                               hint="nothing was switched: the old release keeps serving")
        if op.stamp:
            hint = None
            if "X-Fabdeploy-Site" in answer:
                hint = (f"another {proxy} site answers for this name, e.g. Debian's stock default site: "
                        f"remove it (fab provision does) or set proxy.server_name")
            return DeployError(f"{op.what} failed: {answer}", name, hint=hint)
        log = error.get("log") or ""
        cause = server_cause(log) if "the server exited" in answer else None
        if cause:
            release = op.what.removesuffix(" is unhealthy")
            return DeployError(f"{release} cannot start: {cause}", name,
                               hint="the old release keeps serving; fix the app or fabdeploy.wsgi",
                               detail=app_error(log) if log.strip() else None)
        return DeployError(f"{op.what}: {answer}", name,
                           hint="the old release keeps serving; see the app's error above",
                           detail=app_error(log) if log.strip() else None)
    if isinstance(op, Site):
        if error.get("rejected"):
            return DeployError(f"{proxy} rejected the configuration", name,
                               hint=f"fix {proxy}'s configuration; nothing was switched",
                               detail=tail(output) or None)
        if error.get("stale"):
            return DeployError(f"{proxy} still serves its old configuration after a reload", name,
                               hint=f"a reload {proxy} cannot apply is only logged: see {proxy}'s error log")
    if isinstance(op, Migrate):
        return migration_failed(t, op, error)
    if isinstance(op, Helper):
        return DeployError(f"{op.what} failed ({first_line(output) or error.get('message')})", name,
                           hint=op.hint or "is the host provisioned with this fabric.yaml? "
                                           "run fab -H root@<host> provision")
    how = error.get("message") or "failed"
    cause = server_cause(output) if op.what.startswith("flask ") else None
    if cause:  # the app itself does not load: not the init command's fault
        return DeployError(f"{op.what} failed: the app does not load: {cause}", name,
                           hint="fix the app or fabdeploy.wsgi", detail=tail(output) or None)
    return DeployError(f"{op.what} failed ({how})", name, hint=op.hint, detail=tail(output) or None)


def first_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].removeprefix("fabdeploy-helper: ") if lines else ""


def disk_full(output: str) -> bool:
    return "No space left on device" in output or "Errno 28" in output or "os error 28" in output


# What each server says when it cannot load the app, most telling first.
CAUSES = [
    re.compile(r"(Failed to find attribute '[^']*' in '[^']*'\.?)"),         # gunicorn, flask
    re.compile(r"(Failed to find application object: '[^']*')"),             # gunicorn
    re.compile(r"Error: (Bad (?:module|object name) '[^']*')"),                # waitress-serve
    re.compile(r"Error: (While importing '[^']*', an ImportError was raised)"),  # flask
    re.compile(r"^((?:ModuleNotFoundError|ImportError): .*)$", re.M),         # any of them
    re.compile(r"(unable to load app \d+ .*)$", re.M),                        # uWSGI
    re.compile(r"(Could not import '[^']*'\.?)"),                             # flask
]


def server_cause(log: str) -> str | None:
    """Why the app did not load: its own exception, else the server's line for it."""
    exception = app_error(log, lines=1)
    if EXCEPTION_LINE.match(exception):
        return exception.strip()
    for pattern in CAUSES:
        found = pattern.search(log)
        if found:
            return found.group(1).strip()
    return None


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


# -- the app's environment and data (issue 14) --------------------------------------------------

def has_env(t: Target) -> bool:
    return t.app_env is not None and not t.app_env.empty


def write_env(t: Target) -> list[Op]:
    """The environment the release runs with (appenv): 0600 from its first byte, secrets never shown."""
    path = t.layout.env_file(t.release)
    return [Write(path, t.app_env.text, mode=0o600, secret=True, shown=t.app_env.shown,
                  what=f"writing {path}")]


def migrates(t: Target) -> bool:
    return bool(t.settings.migrate_command)


def backup(t: Target) -> list[Op]:
    """The databases as the live release leaves them, before the new one migrates them."""
    return [database.backup(t.settings, t.layout, t.release, t.current)]


def backed_up(t: Target, results: dict) -> None:
    t.backup_taken = results.get("backup")
    if t.backup_taken and t.backup_taken.get("note"):
        t.notes.append(t.backup_taken["note"])


def migrate(t: Target) -> list[Op]:
    """migrate_command on every deploy: the new release's code and environment, before it starts."""
    return database.migrate(t.settings, t.layout, t.release)


def migrated(t: Target, results: dict) -> None:
    if not (results.get("schema") or {}).get("moved"):
        return
    command = f"flask {' '.join(t.settings.migrate_command)}"
    if t.backup_taken and t.backup_taken.get("files"):
        t.notes.append(f"{command} changed the schema; backup {t.release} holds the database from before it")
    else:
        t.notes.append(f"{command} made the schema (there was no database before it)")


def migration_failed(t: Target, op: Migrate, error: dict) -> DeployError:
    """A failed migration: its cause and output, that the live release serves on, and the backup."""
    output = "\n".join(text.strip() for text in (error.get("stdout") or "", error.get("stderr") or "")
                       if text.strip())
    # Its own exception, else its last line: Flask-Migrate logs "ERROR [flask_migrate] Error: ..." and exits 1.
    last = next((line.strip() for line in reversed(output.splitlines()) if line.strip()), "")
    cause = server_cause(output) or last.partition("Error: ")[2] or last or error.get("message") or "failed"
    return DeployError(f"{op.what} failed: {cause}", t.host.name,
                       hint=f"the live release keeps serving; {backup_words(t)}", detail=tail(output, 25) or None)


def backup_words(t: Target) -> str:
    taken = t.backup_taken
    if not taken:
        return "no backup was taken"
    if not taken.get("files"):
        return f"backup {taken['name']} holds no database ({taken.get('note') or 'none was found'})"
    return f"the database before it is backup {taken['name']} in {taken['folder']} (fab db-backups)"


def installing(t: Target) -> tuple:
    """A host's install. With a database of its own it migrates it and starts, in the same request;
    with one database for the fleet only INSTALL runs here, and fleet.migrate_first runs MIGRATE
    on the primary once every host is installed, then START on every host."""
    return INSTALL if t.settings.shared_database else INSTALL + MIGRATE + START


def primary_of(targets: list[Target]) -> Target | None:
    """The host that migrates a shared database: the one marked primary, else the first."""
    marked = [t for t in targets if t.settings.primary]
    return (marked or list(targets) or [None])[0]


def database_hosts(targets: list[Target]) -> list[Target]:
    """Where the app's database is backed up, migrated and restored: the primary, or every host."""
    if any(t.settings.shared_database for t in targets):
        return [primary_of(targets)]
    return list(targets)


def share_initialized(targets: list[Target]) -> None:
    """init_command ran on a host of the fleet before: the shared database has it, not again."""
    primary = primary_of(targets)
    if primary and any(t.facts.initialized for t in targets):
        primary.facts = dataclasses.replace(primary.facts, initialized=True)


def restore_ops(t: Target, name: str) -> list[Op]:
    """Backup `name` back into the current release's databases, audited; they are kept as a backup first."""
    save = f"{release_name()}-before-restore"
    return [database.restore(t.layout, name, t.current, save),
            audit_op(t, "restore-db", backup=name, saved=save)]


def restore_db(t: Target) -> list[Op]:
    """After a rollback --restore-db: the backup taken before the migration of the release it left."""
    return restore_ops(t, t.old)


def restored(t: Target, results: dict) -> None:
    done = results.get("restore") or {}
    t.notes.append(f"restored the database from backup {done.get('restored')};"
                   f" as it was just before, it is backup {done.get('saved')}")


def check_restorable(targets: list[Target]) -> None:
    """Before anything moves: each database host has the backup of the release being left."""
    for t in database_hosts(targets):
        found = t.facts.backup(t.current)
        if found is None or not found.files:
            why = "there is none" if found is None else f"it holds no database ({found.note or 'none was found'})"
            raise DeployError(f"cannot restore the backup taken before release {t.current}'s migration: {why}",
                              t.host.name, hint="see fab db-backups; roll back without --restore-db")


def restore_question(targets: list[Target]) -> str:
    hosts = database_hosts(targets)
    name = hosts[0].current
    return (f"Put back backup {name}, the database from before release {name}'s migration, on "
            f"{', '.join(t.host.name for t in hosts)}? What was written since is lost "
            f"(the database as it is now is kept as a backup).")


def schema_note(targets: list[Target]) -> str | None:
    """After a plain rollback across a migration: the one line that says so, and how to restore."""
    moved = [t for t in database_hosts(targets) if t.old and t.facts.backup(t.old) and t.facts.backup(t.old).moved]
    if not moved:
        return None
    old = moved[0].old
    return (f"the database keeps the schema release {old}'s migration made: fab db-restore --backup {old}"
            f" puts back the one from before it (on {', '.join(t.host.name for t in moved)};"
            f" what was written since is lost)")
# -- hooks on the hosts, and the timers' warning (issue 15) -----------------------------------------

def hooked(t: Target, point: str) -> bool:
    return hooks.remote_at(t.settings, point)


def hook_variables(t: Target, point: str, **extra: str) -> dict:
    """What a hook on this host gets: the deploy's variables, and FABDEPLOY_HOST."""
    previous = t.old if t.switched else t.current
    return hooks.variables(point, t.release, t.peers or (t.host.name,), previous, t.settings.stage,
                           host=t.host.name, **extra)


def remote_hooks(t: Target, point: str, **extra: str) -> list[Op]:
    """A point's remote hooks: in the release's environment (`failed`: current's, if any)."""
    release = t.current if point == "failed" else t.release
    return hooks.remote_ops(t.settings, t.layout, release, point, hook_variables(t, point, **extra))


def timer_warning(t: Target) -> str | None:
    return processes.timer_warning(t.settings, t.manager)


# -- the sequences --------------------------------------------------------------------------------

def always(t: Target) -> bool:
    return True


@dataclass(frozen=True)
class Step:
    """One phase as declared: its printed name, its function, and when it applies.

    Remote phases return ops; `done` then reads the agent's results. Local
    phases do their work in `fn` and return nothing. A phase's line is
    printed as it ends; with `shown`, only once `done` ran and if it says so.
    """

    name: str
    fn: Callable
    remote: bool = True
    when: Callable[[Target], bool] = always
    done: Callable[[Target, dict], None] | None = None
    shown: Callable[[Target], bool] | None = None
    printed: bool = True
    steady: bool = False  # once begun, runs to its end even if the client is gone (the switch)


def changed(t: Target) -> bool:
    return not t.unchanged


def not_yet_locked(t: Target) -> bool:
    return not t.locked and not (t.facts and t.facts.unchanged)


def real_run(t: Target) -> bool:
    return not t.host.dry_run


def laid_out(t: Target) -> bool:
    """After the early lock: its line is printed only where it did lock (or found it need not)."""
    return t.locked or t.facts.unchanged


CONNECT = Step("connect", connect, remote=False)
LOCK = Step("lock", lock, done=locked)

# Deploy, as the README numbers it. The wheel builds meanwhile (from before connect);
# a host deployed to before is locked while it builds, a fresh one once it exists.
PREPARE = (
    CONNECT,
    Step("lock", lock_while_building, when=real_run, done=locked, shown=laid_out),
    Step("build", await_wheel, remote=False),
    Step("lock", lock, when=not_yet_locked, done=locked),
    Step("repair", repair, when=half_switched, done=say_repaired, printed=False),
    Step("check", check_unchanged, remote=False, printed=False),
    Step("wheelhouse", fetch_wheelhouse, remote=False, when=changed),
)
INSTALL = (
    Step("upload", upload),
    Step("venv", create_venv),
    Step("install", install),
    Step("secret", write_secret),
    Step("env", write_env, when=has_env),
)
MIGRATE = (
    Step("init", initialise),
    Step("backup", backup, when=migrates, done=backed_up),
    Step("migrate", migrate, when=migrates, done=migrated),
)
START = (
    Step("configure", configure),
    Step("start", start),
    Step("before_switch", lambda t: remote_hooks(t, "before_switch"), when=lambda t: hooked(t, "before_switch")),
)
# From here on a host is never left half switched: these run to their end.
GO_LIVE = (
    Step("route", route, steady=True),
    Step("verify", verify, when=needs_verify, steady=True),
    Step("switch", switch, done=switched, steady=True),
)
FINISH = (
    Step("cleanup", cleanup, done=cleaned, steady=True),
    Step("after_deploy", lambda t: remote_hooks(t, "after_deploy"), when=lambda t: hooked(t, "after_deploy")),
    Step("unlock", unlock, when=unlocks_after_hooks, done=unlocked, printed=False, steady=True),
)




def pick_target(t: Target) -> None:
    """The release a rollback goes to: --release, else the newest good one before current."""
    good = {rel.name for rel in t.releases if rel.good}
    wanted = t.release
    if wanted:
        if wanted not in good:
            raise DeployError(f"release {wanted} is not a good release on this host", hint="see fab releases")
        if wanted == t.current:
            raise DeployError(f"release {wanted} is already current")
        return
    before = previous_release(list(t.releases), t.current)
    if before is None:
        raise DeployError("nothing to roll back to: there is no earlier good release",
                          hint="deploy a fixed release instead")
    t.release = before.name


ROLLBACK_PREPARE = (CONNECT, LOCK,
                    Step("repair", repair, when=half_switched, done=say_repaired, printed=False),
                    Step("pick", pick_target, remote=False, printed=False))
ROLLBACK_START = (Step("static", link_static, when=serves_static, printed=False),
                  Step("configure", configure_rollback), Step("start", start))
UNLOCK = (Step("unlock", unlock, done=unlocked, printed=False, steady=True),)
GUARD = Step("guard", guard, printed=False)
RESTORE = (Step("restore", restore_db, done=restored),)
AFTER_SWITCH = (Step("after_switch", lambda t: remote_hooks(t, "after_switch"),
                     when=lambda t: hooked(t, "after_switch")),)
AFTER_ROLLBACK = (Step("after_rollback", lambda t: remote_hooks(t, "after_rollback"),
                       when=lambda t: hooked(t, "after_rollback")),)
