"""Settings: defaults, old names, and every value validated once, at load.

`resolve()` turns the `fabdeploy:` mapping of fabric.yaml into a frozen
`Settings`. A bad value fails here, naming its key, before anything
connects. Values that reach a shell are still quoted where they are used.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import ipaddress
import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import catalog
from .errors import DeployError
from .model import Bind

# None means "derived from other settings or from the host"; see derive().
DEFAULTS: dict[str, Any] = {
    "app": None,
    "wsgi": None,
    "deploy_to": None,
    "keep_releases": 5,
    "init_command": "init-db",
    "health_path": "/",
    "health_timeout": 30,
    "keep_previous_running": True,
    "python": "python3",
    "packages": [],
    "installer": "auto",
    "wheelhouse": True,
    "project_dir": ".",
    "output": "text",
    "known_hosts": "~/.ssh/known_hosts",
    # The app's other processes and commands (issue 15): see "hooks, processes, timers" below.
    "hooks": {point: [] for point in catalog.HOOK_POINTS},
    "processes": None,   # name: command; None is none
    "timers": None,      # name: {command, on_calendar}; None is none
    "version_from": "wheel",
    "server": {
        "kind": "gunicorn",
        "workers": 2,
        "threads": None,
        "worker_class": None,
        "asgi": False,
        "bind": None,
        "public_bind": "0.0.0.0:8000",
        "manager": None,
        "timeout": 30,
        "graceful_timeout": 20,
    },
    "proxy": {
        "kind": "nginx",
        "listen": 80,
        "server_name": "_",
        # Only where the proxy runs as the deploy user (a throwaway host); a provisioned
        # host's site is root's, rendered by provision.
        "site_path": None,
        "test_command": None,
        "reload_command": None,
        "pid_file": None,
        # A small, validated set of additions to the generated site (issue 13).
        "extra": {"client_max_body_size": None, "proxy_read_timeout": None, "headers": None,
                  "locations": None},
    },
    # HTTPS (issue 13): off, acme (certbot, http-01) or manual (your own certificate).
    "tls": {
        "mode": "off",
        "port": 443,
        "email": None,
        "directory": "https://acme-v02.api.letsencrypt.org/directory",
        "ca": None,
        "cert": None,
        "key": None,
        "hsts": False,
    },
    # The app's static files, served by nginx: auto, off, or {url prefix: folder in the package}.
    "static": "auto",
    "provision": {
        "user": "deploy",
        "public_key": None,
        "packages": None,
        "database_clients": ["samenet"],   # who may reach a database host's PostgreSQL
    },
    # -- the app's environment and data (issue 14) --
    "env": {},                 # NAME: value, plain settings for the app
    "secrets": {},             # NAME: {env: VAR} | {file: path} | {command: "..."}, read where you deploy
    "migrate_command": "",     # a flask command run on every deploy, e.g. "db upgrade"
    "database": "local",       # local (each host its own) | shared (one for the fleet: migrate once)
}
# Mappings whose keys are the user's own names, not settings of ours.
FREE_FORM = {"env", "secrets"}

# Old names, and the new key each now is. They work for this version, with a warning.
RENAMED = {
    "asgi": "server.asgi",
    "direct.bind": "server.public_bind",
    **{f"gunicorn.{k}": f"server.{k}" for k in ("manager", "bind", "workers", "worker_class",
                                                "timeout", "graceful_timeout")},
    **{f"{p}.{k}": f"proxy.{k}" for p in ("nginx", "apache")
       for k in ("listen", "server_name", "site_path", "test_command", "reload_command", "pid_file")},
}
# Old names with no new key: said once, then ignored.
DROPPED = {
    "gunicorn.group": "each app's units now run in a group of their own, fd-<app>, made by provision",
}

PROXY_DEFAULTS = {  # per proxy kind, for a proxy the deploy user runs itself
    "nginx": {"site_path": "/etc/nginx/sites-enabled/{app}.conf", "test_command": "nginx -t",
              "reload_command": "nginx -s reload", "pid_file": "/run/nginx.pid"},
    "apache": {"site_path": "/etc/apache2/sites-enabled/{app}.conf",
               "test_command": "apache2ctl configtest", "reload_command": "apache2ctl graceful",
               "pid_file": ""},
    "none": {"site_path": "", "test_command": "", "reload_command": "", "pid_file": ""},
}
PROVISION_PACKAGES = {"nginx": ["nginx", "python3", "python3-venv", "sudo"],
                      "apache": ["apache2", "python3", "python3-venv", "sudo"],
                      "none": ["python3", "python3-venv", "sudo"]}
# What a server needs beside those: mod_wsgi is compiled on the server against its Apache
# (and its serve script signals the daemons with pkill, from procps).
SERVER_PACKAGES = {"mod_wsgi": ["apache2-bin", "apache2-dev", "gcc", "python3-dev", "media-types", "procps"]}


# -- the typed settings ---------------------------------------------------------

@dataclass(frozen=True)
class Listen:
    """One address the proxy listens on: a port, on an address or on all of them."""

    port: int
    address: str | None = None  # None: every address (IPv4, and IPv6 where the host has it)

    @property
    def nginx(self) -> str:
        if self.address is None:
            return str(self.port)
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}"

    @property
    def probe(self) -> str:
        """Where the agent asks: loopback of the listen address's family."""
        if self.address is None or self.address == "0.0.0.0":
            return f"127.0.0.1:{self.port}"
        if self.address == "::":
            return f"[::1]:{self.port}"
        return self.nginx


@dataclass(frozen=True)
class ServerSettings:
    kind: str
    workers: int
    threads: int | None          # mod_wsgi's threads per process (None: its default)
    worker_class: str
    asgi: bool
    bind: Bind | None
    public_bind: Bind
    manager: str | None
    timeout: int
    graceful_timeout: int


@dataclass(frozen=True)
class ProxySettings:
    kind: str
    listen: tuple[Listen, ...]
    server_name: tuple[str, ...]
    site_path: str
    test_command: str
    reload_command: str
    pid_file: str
    extra: "ProxyExtra" = None  # settings.checked always gives one

    @property
    def enabled(self) -> bool:
        return self.kind != "none"

    @property
    def catch_all(self) -> bool:
        return self.server_name == ("_",)

    @property
    def host_header(self) -> str:
        """What the agent sends as Host when it asks through the proxy."""
        return "localhost" if self.catch_all else self.server_name[0].removeprefix("*.")


@dataclass(frozen=True)
class ProvisionSettings:
    user: str
    public_key: str | None
    packages: tuple[str, ...]
    database_clients: tuple[str, ...] = ("samenet",)


@dataclass(frozen=True)
class SecretSource:
    """Where a secret's value is read, on the machine you deploy from: never from fabric.yaml."""

    kind: str    # env | file | command
    value: str   # the variable's name, the file's path, or the command

    def describe(self) -> str:
        return {"env": f"the local environment variable {self.value}",
                "file": f"the local file {self.value}",
                "command": f"the output of the local command: {self.value}"}[self.kind]


@dataclass(frozen=True)
class Settings:
    """Every value of one invocation known but the host's, validated."""

    app: str
    wsgi: str
    deploy_to: str
    keep_releases: int
    init_command: tuple[str, ...]
    health_path: str
    health_timeout: float
    keep_previous_running: bool
    python: str
    packages: tuple[str, ...]
    installer: str
    wheelhouse: bool
    project_dir: str
    output: str
    known_hosts: str
    server: ServerSettings
    proxy: ProxySettings
    provision: ProvisionSettings
    tls: "TlsSettings" = None      # settings.checked always gives both
    static: tuple = ()             # StaticDir for each URL prefix nginx serves
    hooks: tuple = ()              # Hook, in the order fabric.yaml gives them
    processes: dict = field(default_factory=dict)   # name -> command, run beside each release's server
    timers: tuple = ()             # Timer
    version_from: str = "wheel"
    stage: str | None = None       # --stage, as given
    hosts: tuple = ()              # HostEntry for each configured host
    raw: dict = field(default_factory=dict, repr=False, compare=False)  # for per-host overrides
    base_dir: Path | None = None
    warnings: tuple[str, ...] = ()
    # -- the app's environment and data (issue 14) --
    env: dict = field(default_factory=dict, compare=False)      # NAME -> plain value
    secrets: dict = field(default_factory=dict, compare=False)  # NAME -> SecretSource
    migrate_command: tuple[str, ...] = ()
    database: str = "local"        # shared: one database for the fleet, migrated by its primary
    role: str = "app"              # this host's role, from its `hosts` entry: app or database
    primary: bool = False          # this host's entry is marked primary

    @property
    def shared_database(self) -> bool:
        return self.database == "shared"

    @property
    def import_name(self) -> str:
        return self.app.replace("-", "_")

    @property
    def instance_name(self) -> str:
        """Flask names an installed app's instance folder after the module that made it:
        wsgi's module, for `Flask(__name__)` there (venv/var/<module>-instance)."""
        return self.wsgi.split(":", 1)[0]

    @property
    def group(self) -> str:
        """The app's own group: its sockets and units, with the proxy's user in it."""
        return f"fd-{self.app}"

    def for_host(self, user: str | None, host: str, port: int | None) -> "Settings":
        """These settings with the host's own overrides, if `hosts` gives any."""
        entry = next((e for e in self.hosts if e.matches(user, host, port)), None)
        if entry is None:
            return self
        own = self if not entry.overrides else build(overlay(self.raw, entry.overrides), self.base_dir,
                                                     self.hosts, prefix=f"hosts[{entry.spec}].")
        database = "shared" if any(e.primary for e in self.hosts) else own.database
        return dataclasses.replace(own, role=entry.role, primary=entry.primary, database=database,
                                   stage=self.stage)


# -- reading fabric.yaml ----------------------------------------------------------

def fail(key: str, why: str) -> DeployError:
    return DeployError(f"setting 'fabdeploy.{key}' {why}", hint="fix fabric.yaml")


def plain(value: Any) -> Any:
    """Turn Invoke's DataProxy config objects into plain dicts and lists."""
    if hasattr(value, "items"):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def merge(defaults: dict, given: dict, prefix: str = "") -> dict:
    """Deep-merge `given` over `defaults`, refusing keys the defaults lack."""
    merged = copy.deepcopy(defaults)
    for key, value in given.items():
        name = prefix + key
        if key not in defaults:
            close = difflib.get_close_matches(key, list(defaults), n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
            raise DeployError(f"unknown setting 'fabdeploy.{name}'{hint}", hint="fix fabric.yaml")
        if isinstance(defaults[key], dict) and name not in FREE_FORM:
            if not isinstance(value, dict):
                raise fail(name, "must be a mapping")
            merged[key] = merge(defaults[key], value, name + ".")
        else:
            merged[key] = value
    return merged


def overlay(base: dict, extra: dict) -> dict:
    """Nested dicts merged without validation (that happens once, in build)."""
    merged = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = overlay(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def modernise(raw: dict, prefix: str = "") -> tuple[dict, list[str]]:
    """Old setting names moved to their new keys; one warning line for each."""
    raw = copy.deepcopy(raw)
    warnings = []
    for section in ("server", "proxy"):  # `server: waitress` is now server.kind
        if isinstance(raw.get(section), str):
            raw[section] = {"kind": raw[section]}
            warnings.append(f"'{prefix}{section}: {raw[section]['kind']}' is now "
                            f"'{prefix}{section}.kind'")
    kind = (raw.get("proxy") or {}).get("kind", "nginx")
    for old, new in {**RENAMED, **{k: None for k in DROPPED}}.items():
        top, _, sub = old.partition(".")
        source = raw.get(top)
        if sub and not (isinstance(source, dict) and sub in source):
            continue
        if not sub and top not in raw:
            continue
        value = source.pop(sub) if sub else raw.pop(top)
        if sub and not source:
            raw.pop(top)
        if new is None:
            warnings.append(f"'{prefix}{old}' is no longer used: {DROPPED[old]}")
            continue
        if top in ("nginx", "apache") and top != kind:
            warnings.append(f"'{prefix}{old}' is ignored: the proxy is {kind}")
            continue
        section, _, key = new.partition(".")
        raw.setdefault(section, {}).setdefault(key, value)
        warnings.append(f"'{prefix}{old}' is now '{prefix}{new}'")
    return raw, warnings


# -- checks: each turns a raw value into a typed one, or fails naming the key ------

NAME = re.compile(r"^[a-z_][a-z0-9_-]*$")
SAFE_PATH = re.compile(r"^[A-Za-z0-9._/@+~-]+$")
HOSTNAME = re.compile(r"^(\*\.)?([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
URL_PATH = re.compile(r"^/[!-~]*$")  # printable ASCII, no space, CR or LF
PACKAGE = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")  # a Debian package name
FLASK_WORD = re.compile(r"^[^\x00-\x1f\x7f]+$")


def name(key: str, value: Any, longest: int = 29) -> str:
    """app and provision.user: a Unix-style name (group fd-<app> must stay under 32 characters)."""
    if not isinstance(value, str) or not NAME.match(value) or len(value) > longest:
        raise fail(key, f"must match ^[a-z_][a-z0-9_-]*$ (at most {longest} characters), not {value!r}")
    return value


def integer(key: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).strip().isdigit():
        raise fail(key, f"must be a whole number, not {value!r}")
    number = int(value)
    if not low <= number <= high:
        raise fail(key, f"must be from {low} to {high}, not {number}")
    return number


def seconds(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 3600:
        raise fail(key, f"must be a number of seconds above 0, not {value!r}")
    return float(value)


def boolean(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise fail(key, f"must be true or false, not {value!r}")
    return value


def choice(key: str, value: Any, options) -> str:
    if value not in options:
        raise fail(key, f"must be one of {', '.join(options)}, not {value!r}")
    return value


def text(key: str, value: Any, allow_empty: bool = True) -> str:
    """A one-line string: no control characters (a newline would end a directive or a line)."""
    if not isinstance(value, str) or (value and not FLASK_WORD.match(value)) or (not value and not allow_empty):
        raise fail(key, f"must be one line of text, not {value!r}")
    return value


def path(key: str, value: Any, absolute: bool = False) -> str:
    """A path from a safe character set, with no '..' part."""
    if not isinstance(value, str) or not SAFE_PATH.match(value) or ".." in value.split("/"):
        raise fail(key, f"must be a plain path (letters, digits, ._/@+~-, no '..'), not {value!r}")
    if absolute and not value.startswith("/"):
        raise fail(key, f"must be an absolute path, not {value!r}")
    return value


def deploy_to(key: str, value: Any) -> str:
    value = path(key, value).rstrip("/")
    if not (value.startswith("/") or value.startswith("~/")) or "//" in value or value in ("", "~"):
        raise fail(key, f"must be absolute or start with ~/, not {value!r}")
    if "~" in value[1:] or "/./" in value + "/":
        raise fail(key, f"must be a plain path, not {value!r}")
    return value


def words(key: str, value: Any) -> tuple[str, ...]:
    """A flask command and its arguments, e.g. 'init-db' or 'db upgrade'; '' for none."""
    text(key, value)
    try:
        return tuple(shlex.split(value))
    except ValueError as exc:
        raise fail(key, f"does not split into words: {exc}") from None


def requirement(key: str, value: Any) -> str:
    from packaging.requirements import InvalidRequirement, Requirement  # build depends on packaging
    try:
        Requirement(text(key, value, allow_empty=False))
    except InvalidRequirement as exc:
        raise fail(key, f"is not a requirement: {str(exc).splitlines()[0]}") from None
    return value


def debian_package(key: str, value: Any) -> str:
    if not isinstance(value, str) or not PACKAGE.match(value):
        raise fail(key, f"is not a Debian package name: {value!r}")
    return value


def listing(key: str, value: Any, check: Callable[[str, Any], Any]) -> tuple:
    if not isinstance(value, (list, tuple)):
        raise fail(key, f"must be a list, not {value!r}")
    return tuple(check(f"{key}[{i}]", item) for i, item in enumerate(value))


def server_names(key: str, value: Any) -> tuple[str, ...]:
    """Hostnames (a list, or separated by spaces), *.wildcards, or _ for any name."""
    names = text(key, value).split() if isinstance(value, str) else value
    if not isinstance(names, (list, tuple)) or not names:
        raise fail(key, f"must be hostnames or _, not {value!r}")
    checked = []
    for item in names:
        if not isinstance(item, str) or not (item == "_" or (HOSTNAME.match(item.lower()) and len(item) <= 253)):
            raise fail(key, f"must be hostnames (letters, digits, '-', '.', a leading '*.') or _,"
                            f" not {item!r}")
        checked.append(item.lower())
    if "_" in checked and len(checked) > 1:
        raise fail(key, "_ (any name) cannot be listed with other names")
    return tuple(checked)


def listen(key: str, value: Any) -> tuple[Listen, ...]:
    """Ports, or [v6addr]:port and v4addr:port; a single one or a list."""
    items = value if isinstance(value, (list, tuple)) else [value]
    found = []
    for item in items:
        spec = str(item).strip() if isinstance(item, (int, str)) and not isinstance(item, bool) else None
        if spec and spec.isdigit():
            found.append(Listen(integer(key, spec, 1, 65535)))
            continue
        address, sep, port = (spec or "").rpartition(":")
        try:
            if not sep or not port.isdigit():
                raise ValueError
            if address.startswith("["):
                if not address.endswith("]"):
                    raise ValueError
                address = str(ipaddress.IPv6Address(address[1:-1]))
            else:
                address = str(ipaddress.IPv4Address(address))
        except ValueError:
            raise fail(key, f"must be a port, or [v6 address]:port or v4 address:port, not {item!r}") from None
        found.append(Listen(integer(key, port, 1, 65535), address))
    if not found:
        raise fail(key, "must name at least one port")
    return tuple(found)


def is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def bind(key: str, value: Any, loopback: bool) -> Bind:
    try:
        parsed = Bind.parse(text(key, value, allow_empty=False))
    except ValueError:
        raise fail(key, f"must be host:PORT, not {value!r}") from None
    if parsed.is_unix:
        raise fail(key, f"must be host:PORT (leave it unset for a unix socket per release), not {value!r}")
    if not (parsed.host in ("0.0.0.0", "::", "localhost") or HOSTNAME.match(parsed.host) or is_ip(parsed.host)):
        raise fail(key, f"must be an address or hostname and a port, not {value!r}")
    if loopback and not parsed.loopback:
        raise fail(key, f"must be a loopback host:PORT such as 127.0.0.1:8000, not {value!r}")
    return parsed


# -- putting it together ---------------------------------------------------------

def project_name(project_dir: Path) -> str:
    """The app's default name: the project's own, as pip would normalise it."""
    from .project import project_name as read  # the project's metadata, however it is built
    return re.sub(r"[-_.]+", "-", read(project_dir)).lower()


def build(raw: dict, base_dir: Path, hosts: tuple = (), prefix: str = "") -> Settings:
    """Validate one host's (or the invocation's) raw settings into Settings."""
    try:
        return checked(raw, base_dir, hosts, prefix)
    except DeployError as exc:
        if prefix:  # a host's own settings: name the host in the key
            exc.what = exc.what.replace("'fabdeploy.", f"'fabdeploy.{prefix}", 1)
        raise


def checked(raw: dict, base_dir: Path, hosts: tuple, prefix: str) -> Settings:
    raw, warnings = modernise(raw)
    v = merge(DEFAULTS, raw)
    project_dir = (base_dir / os.path.expanduser(v["project_dir"])).resolve()
    app = name("app", v["app"] or project_name(project_dir))
    s, p, pv = v["server"], v["proxy"], v["provision"]
    kind = choice("server.kind", s["kind"], catalog.SERVERS)
    asgi = boolean("server.asgi", s["asgi"])
    if asgi and kind != "gunicorn":
        raise DeployError(f"server.asgi: true runs under gunicorn with uvicorn workers, not {kind}",
                          hint="set server.kind: gunicorn")
    proxy_kind = choice("proxy.kind", p["kind"], catalog.PROXIES)
    local = {k: (p[k] if p[k] is not None else PROXY_DEFAULTS[proxy_kind][k].format(app=app))
             for k in ("site_path", "test_command", "reload_command", "pid_file")}
    server = ServerSettings(
        kind=kind,
        workers=integer("server.workers", s["workers"], 1, 256),
        threads=threads("server.threads", s["threads"], kind),
        worker_class=choice("server.worker_class", s["worker_class"] or ("uvicorn" if asgi else "sync"),
                            catalog.WORKERS),
        asgi=asgi,
        bind=None if s["bind"] is None else bind("server.bind", s["bind"], loopback=True),
        public_bind=bind("server.public_bind", s["public_bind"], loopback=False),
        manager=None if s["manager"] is None else choice("server.manager", s["manager"], catalog.MANAGERS),
        timeout=integer("server.timeout", s["timeout"], 1, 3600),
        graceful_timeout=integer("server.graceful_timeout", s["graceful_timeout"], 1, 3600))
    proxy = ProxySettings(
        kind=proxy_kind,
        listen=listen("proxy.listen", p["listen"]),
        server_name=server_names("proxy.server_name", p["server_name"]),
        site_path=path("proxy.site_path", local["site_path"], absolute=True) if local["site_path"] else "",
        test_command=text("proxy.test_command", local["test_command"]),
        reload_command=text("proxy.reload_command", local["reload_command"]),
        pid_file=path("proxy.pid_file", local["pid_file"], absolute=True) if local["pid_file"] else "",
        extra=proxy_extra("proxy.extra", p["extra"], proxy_kind))
    tls = tls_settings(v["tls"], proxy, base_dir)
    static = static_dirs("static", v["static"], proxy)
    provision = ProvisionSettings(
        user=name("provision.user", pv["user"], longest=32),
        public_key=None if pv["public_key"] is None else text("provision.public_key", pv["public_key"]),
        packages=listing("provision.packages", pv["packages"] or default_packages(proxy_kind, kind)
                         + (["certbot"] if tls.acme else []), debian_package),
        database_clients=listing("provision.database_clients", pv["database_clients"], database_client))
    wsgi = text("wsgi", v["wsgi"] or f"{app.replace('-', '_')}:create_app()", allow_empty=False)
    overlapping("proxy.extra.locations", [d.prefix for d in static]
                + [prefix.rstrip("/") for prefix, _ in proxy.extra.locations])
    return Settings(
        app=app, wsgi=wsgi,
        deploy_to=deploy_to("deploy_to", v["deploy_to"] or f"/srv/{app}"),
        keep_releases=integer("keep_releases", v["keep_releases"], 2, 1000),
        init_command=words("init_command", v["init_command"]),
        health_path=health_path("health_path", v["health_path"]),
        health_timeout=seconds("health_timeout", v["health_timeout"]),
        keep_previous_running=boolean("keep_previous_running", v["keep_previous_running"]),
        python=path("python", v["python"]),
        packages=listing("packages", v["packages"], requirement),
        installer=choice("installer", v["installer"], catalog.INSTALLERS),
        wheelhouse=boolean("wheelhouse", v["wheelhouse"]),
        project_dir=str(project_dir),
        output=choice("output", v["output"], ("text", "json")),
        known_hosts=path("known_hosts", v["known_hosts"]),
        server=server, proxy=proxy, provision=provision, tls=tls, static=static,
        **app_processes(v),
        hosts=hosts, raw=raw, base_dir=base_dir,
        warnings=tuple(prefix + w for w in warnings),
        **data_settings(v))


# -- hooks, processes, timers (issue 15) ------------------------------------------------

@dataclass(frozen=True)
class Hook:
    """A command of the user's at a point of a deploy: run here (local) or on each host (remote)."""

    point: str
    where: str      # "local" or "remote"
    command: str


@dataclass(frozen=True)
class Timer:
    """A flask command that systemd runs on a schedule, in whichever release is current."""

    name: str
    command: tuple[str, ...]
    on_calendar: str


PROCESS_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
CALENDAR = re.compile(r"^[A-Za-z0-9 :*/.,~+_-]+$")  # systemd.time's OnCalendar= characters
SHELL_OPERATORS = set("();<>|&")
RESERVED_NAMES = {"app": "the web server's log is shared/log/app.log"}


def app_processes(v: dict) -> dict:
    """hooks, processes, timers and version_from, checked; the Settings fields they fill."""
    processes = process_commands("processes", v["processes"])
    timers = timer_specs("timers", v["timers"])
    for timer in timers:
        if timer.name in processes:
            raise fail(f"timers.{timer.name}", "has the name of a process: each name has one log and one unit")
    return {"hooks": hook_list(v["hooks"]), "processes": processes, "timers": timers,
            "version_from": choice("version_from", v["version_from"], catalog.VERSION_FROM)}


def hook_list(raw: dict) -> tuple[Hook, ...]:
    """Each point's commands: `- local: CMD` and `- remote: CMD` (or one such mapping)."""
    found = []
    for point in catalog.HOOK_POINTS:
        entries = raw[point]
        entries = [entries] if isinstance(entries, dict) else entries
        if not isinstance(entries, (list, tuple)):
            raise fail(f"hooks.{point}", f"must be a list of {{local: CMD}} or {{remote: CMD}}, not {entries!r}")
        for i, entry in enumerate(entries):
            key = f"hooks.{point}[{i}]"
            if not isinstance(entry, dict) or len(entry) != 1 or next(iter(entry)) not in ("local", "remote"):
                raise fail(key, f"must be {{local: CMD}} or {{remote: CMD}}, not {entry!r}")
            where, commands = next(iter(entry.items()))
            if point == "before_build" and where == "remote":
                raise fail(key, "is remote, but before_build runs before any host is reached: "
                                "run it locally, or at before_switch")
            for command in commands if isinstance(commands, (list, tuple)) else [commands]:
                found.append(Hook(point, where, text(f"{key}.{where}", command, allow_empty=False)))
    return tuple(found)


def process_name(key: str, value: Any) -> str:
    if not isinstance(value, str) or not PROCESS_NAME.match(value):
        raise fail(key, f"must be a name matching ^[a-z][a-z0-9_-]*$ (at most 32 characters), not {value!r}")
    if value in RESERVED_NAMES:
        raise fail(key, f"cannot be {value!r}: {RESERVED_NAMES[value]}")
    return value


def exec_command(key: str, value: Any) -> str:
    """One program and its arguments: the process's script execs it, so it gets systemd's signals."""
    command = text(key, value, allow_empty=False)
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    try:
        tokens = list(lexer)
    except ValueError as exc:
        raise fail(key, f"does not split into words: {exc}") from None
    if any(token and set(token) <= SHELL_OPERATORS for token in tokens):
        raise fail(key, f"must be one program and its arguments (it is exec'd, to get the stop signal): "
                        f"put a pipeline or a list of commands in a script, not {value!r}")
    return command


def process_commands(key: str, raw: Any) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise fail(key, f"must be a mapping of names to commands, not {raw!r}")
    return {process_name(f"{key}.{name}", name): exec_command(f"{key}.{name}", command)
            for name, command in raw.items()}


def timer_specs(key: str, raw: Any) -> tuple[Timer, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise fail(key, f"must be a mapping of names to {{command, on_calendar}}, not {raw!r}")
    timers = []
    for name, spec in raw.items():
        where = f"{key}.{process_name(f'{key}.{name}', name)}"
        if not isinstance(spec, dict) or set(spec) != {"command", "on_calendar"}:
            raise fail(where, f"must be {{command: FLASK COMMAND, on_calendar: SCHEDULE}}, not {spec!r}")
        command = words(f"{where}.command", spec["command"])
        if not command:
            raise fail(f"{where}.command", "must name a flask command")
        calendar = text(f"{where}.on_calendar", spec["on_calendar"], allow_empty=False)
        if not CALENDAR.match(calendar):
            raise fail(f"{where}.on_calendar", f"must be a systemd calendar event such as daily or "
                                               f"'*-*-* 03:00:00', not {calendar!r}")
        timers.append(Timer(name, command, calendar))
    return tuple(timers)


def threads(key: str, value: Any, kind: str) -> int | None:
    """Threads per process: mod_wsgi's only (waitress runs 4 threads per worker)."""
    if value is None:
        return None
    if kind != "mod_wsgi":
        raise fail(key, f"applies to server.kind mod_wsgi only, not {kind} (waitress runs 4 threads per worker)")
    return integer(key, value, 1, 256)


def default_packages(proxy_kind: str, server_kind: str) -> list[str]:
    """What provision installs unless provision.packages says: the proxy's and the server's."""
    return PROVISION_PACKAGES[proxy_kind] + SERVER_PACKAGES.get(server_kind, [])


# -- tls, static and proxy.extra (issue 13) ---------------------------------------
# All three end up in the proxy's site, which root renders: each value is checked
# here against a narrow pattern, so that nothing but the intended directive reaches it.

TLS_MODES = ("off", "acme", "manual")
EMAIL = re.compile(r"^[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+$")
HTTPS_URL = re.compile(r"^https://[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[A-Za-z0-9._~%/-]*)?$")
URL_PREFIX = re.compile(r"^(/[A-Za-z0-9._~-]+)+/?$")
FOLDER = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*(/[A-Za-z0-9_-][A-Za-z0-9._-]*)*$")
SIZE = re.compile(r"^[0-9]{1,6}[kKmMgG]?$")
HEADER = re.compile(r"^[A-Za-z][A-Za-z0-9-]{0,63}$")
OWN_HEADERS = {"x-fabdeploy-site": "fabdeploy's own", "strict-transport-security": "set by tls.hsts"}
# What nginx's workers must never serve, however a location is configured.
SYSTEM_TREES = ("/etc", "/proc", "/sys", "/dev", "/run", "/root", "/boot", "/var/lib", "/var/log")
ACME_CHALLENGE = "/.well-known/acme-challenge"


@dataclass(frozen=True)
class TlsSettings:
    mode: str                 # off, acme or manual
    port: int
    email: str | None
    directory: str            # the ACME server
    ca: str | None            # a local CA file to trust, for a private ACME server
    cert: str | None          # manual: local paths of the chain and the key
    key: str | None
    hsts: bool

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    @property
    def acme(self) -> bool:
        return self.mode == "acme"


@dataclass(frozen=True)
class StaticDir:
    """One URL prefix nginx serves from a folder of the installed app package."""

    prefix: str      # /static: no trailing slash
    folder: str      # static: relative to the package of the wsgi module
    required: bool   # given in fabric.yaml: a release without it fails; auto: linked if there


@dataclass(frozen=True)
class ProxyExtra:
    """proxy.extra, validated: the only additions a site takes."""

    client_max_body_size: str | None = None
    proxy_read_timeout: int | None = None
    headers: tuple[tuple[str, str], ...] = ()
    locations: tuple[tuple[str, str], ...] = ()   # URL prefix (with a trailing /) -> local folder

    def record(self) -> dict:
        """As provision's record keeps it (JSON's types, so a deploy compares like with like)."""
        return {"client_max_body_size": self.client_max_body_size,
                "proxy_read_timeout": self.proxy_read_timeout,
                "headers": [list(h) for h in self.headers], "locations": [list(l) for l in self.locations]}


def off(value: Any) -> bool:
    """YAML reads a bare `off` (and `no`) as false."""
    return value is False or value == "off"


def local_file(key: str, value: Any, base_dir: Path) -> str:
    """A file on the machine that runs fab, relative to the project; read only by provision."""
    text(key, value, allow_empty=False)
    return str((base_dir / os.path.expanduser(value)).absolute())


def tls_settings(t: dict, proxy: ProxySettings, base_dir: Path) -> TlsSettings:
    mode = "off" if off(t["mode"]) else choice("tls.mode", t["mode"], TLS_MODES)
    files = {k: None if t[k] is None else local_file(f"tls.{k}", t[k], base_dir) for k in ("ca", "cert", "key")}
    email = t["email"]
    if email is not None and (not isinstance(email, str) or not EMAIL.match(email)):
        raise fail("tls.email", f"must be an email address, not {email!r}")
    directory = t["directory"]
    if not isinstance(directory, str) or not HTTPS_URL.match(directory):
        raise fail("tls.directory", f"must be an ACME directory's https:// URL, not {directory!r}")
    tls = TlsSettings(mode=mode, port=integer("tls.port", t["port"], 1, 65535), email=email,
                      directory=directory, hsts=boolean("tls.hsts", t["hsts"]), **files)
    tls_fits(tls, proxy)
    return tls


def tls_fits(tls: TlsSettings, proxy: ProxySettings) -> None:
    """The combinations that cannot work, refused by the key that makes them so."""
    for key in ("cert", "key"):
        if getattr(tls, key) and tls.mode != "manual":
            raise fail(f"tls.{key}", "is for tls.mode manual (your own certificate)")
        if tls.mode == "manual" and not getattr(tls, key):
            raise fail(f"tls.{key}", "is needed with tls.mode manual: the local path of the "
                                     + ("certificate chain" if key == "cert" else "private key"))
    if tls.ca and not tls.acme:
        raise fail("tls.ca", "is the CA of a private ACME server: it is for tls.mode acme")
    if not tls.enabled:
        return
    if not proxy.enabled:
        raise fail("tls.mode", "needs a proxy in front (proxy.kind nginx or apache) to serve HTTPS")
    if tls.acme and proxy.kind != "nginx":
        raise fail("tls.mode", f"acme works with proxy.kind nginx; with {proxy.kind}, use tls.mode manual")
    if proxy.catch_all:
        raise fail("proxy.server_name", "must be the site's real hostnames with tls on, not _: "
                                        "a certificate names them")
    wildcard = next((n for n in proxy.server_name if n.startswith("*.")), None)
    if tls.acme and wildcard:
        raise fail("proxy.server_name", f"cannot have a wildcard ({wildcard}) with tls.mode acme: the "
                                        "http-01 challenge proves single names only (use tls.mode manual)")
    if tls.port in [listen.port for listen in proxy.listen]:
        raise fail("tls.port", f"is also in proxy.listen ({tls.port}): HTTP and HTTPS need ports of their own")


def url_prefix(key: str, prefix: Any, example: str) -> None:
    """A URL prefix the site gives a location of its own (never ACME's /.well-known)."""
    if not isinstance(prefix, str) or not URL_PREFIX.match(prefix) or prefix.startswith("/.well-known"):
        raise fail(key, f"must be a URL prefix such as {example} (letters, digits, ._~-)")


def static_dirs(key: str, value: Any, proxy: ProxySettings) -> tuple[StaticDir, ...]:
    """auto: the Flask app's static folder at /static, where nginx serves; off; or a mapping."""
    if off(value) or value is None:
        return ()
    if value == "auto":
        return (StaticDir("/static", "static", required=False),) if proxy.kind == "nginx" else ()
    if not isinstance(value, dict) or not value:
        raise fail(key, f"must be auto, off, or a mapping of URL prefixes to folders, not {value!r}")
    if proxy.kind != "nginx":
        raise fail(key, f"is served by nginx only (proxy.kind is {proxy.kind}): set static: off")
    found = []
    for prefix, folder in value.items():
        item = f"{key}[{prefix}]"
        url_prefix(item, prefix, "/static")
        if not isinstance(folder, str) or not FOLDER.match(folder) or ".." in folder.split("/"):
            raise fail(item, f"must be a folder inside the app's package, such as static, not {folder!r}")
        found.append(StaticDir(prefix.rstrip("/"), folder, required=True))
    overlapping(key, [d.prefix for d in found])
    return tuple(found)


def overlapping(key: str, prefixes: list[str]) -> None:
    """No prefix may hold another: nginx would serve one of them from the wrong place."""
    for a in prefixes:
        for b in prefixes:
            if a != b and (b + "/").startswith(a.rstrip("/") + "/"):
                raise fail(key, f"has {b} inside {a}: give prefixes that do not overlap")


def proxy_extra(key: str, extra: dict, kind: str) -> ProxyExtra:
    given = {k: v for k, v in extra.items() if v is not None}
    if given and kind != "nginx":
        raise fail(f"{key}.{next(iter(given))}", f"is for nginx's site (proxy.kind is {kind})")
    size = given.get("client_max_body_size")
    if size is not None and (isinstance(size, bool) or not SIZE.match(str(size))):
        raise fail(f"{key}.client_max_body_size", f"must be a size such as 20m (digits, then k, m or g), "
                                                  f"not {size!r}")
    timeout = given.get("proxy_read_timeout")
    return ProxyExtra(
        client_max_body_size=None if size is None else str(size),
        proxy_read_timeout=None if timeout is None else integer(f"{key}.proxy_read_timeout", timeout, 1, 86400),
        headers=headers(f"{key}.headers", given.get("headers") or {}),
        locations=locations(f"{key}.locations", given.get("locations") or {}))


def headers(key: str, value: Any) -> tuple[tuple[str, str], ...]:
    """Response headers: a name, and a value nginx takes literally (no quotes, $, ;, braces, \\)."""
    if not isinstance(value, dict):
        raise fail(key, f"must be a mapping of header names to values, not {value!r}")
    found = []
    for header, content in value.items():
        if not isinstance(header, str) or not HEADER.match(header):
            raise fail(key, f"has a header name that is not letters, digits and -: {header!r}")
        if header.lower() in OWN_HEADERS:
            raise fail(f"{key}.{header}", f"is {OWN_HEADERS[header.lower()]}")
        if (not isinstance(content, (str, int)) or isinstance(content, bool) or not str(content)
                or any(not 32 <= ord(c) < 127 or c in '"$\\;{}' for c in str(content))):
            raise fail(f"{key}.{header}", f"must be printable text without quotes, $, ;, braces or "
                                          f"backslashes, not {content!r}")
        found.append((header, str(content)))
    return tuple(found)


def locations(key: str, value: Any) -> tuple[tuple[str, str], ...]:
    """URL prefixes nginx serves from local folders (the operator's own, outside the system's)."""
    if not isinstance(value, dict):
        raise fail(key, f"must be a mapping of URL prefixes to folders, not {value!r}")
    found = []
    for prefix, folder in value.items():
        item = f"{key}[{prefix}]"
        url_prefix(item, prefix, "/downloads/")
        checked_folder = path(item, folder, absolute=True).rstrip("/")
        if not checked_folder or any(checked_folder == t or checked_folder.startswith(t + "/")
                                     for t in SYSTEM_TREES):
            raise fail(item, f"must be a folder of your own, not the system's {folder!r}")
        found.append((prefix.rstrip("/") + "/", checked_folder + "/"))
    overlapping(key, [p.rstrip("/") for p, _ in found])
    return tuple(found)


def health_path(key: str, value: Any) -> str:
    if not isinstance(value, str) or not URL_PATH.match(value):
        raise fail(key, f"must be a URL path such as /healthz (no spaces), not {value!r}")
    return value


# -- the app's environment and data (issue 14) ---------------------------------

ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Names the release's processes get from fabdeploy, never from the user.
RESERVED_ENV = {"PORT": "gunicorn would bind 0.0.0.0:$PORT, so a release never runs with it"}
SOURCES = ("env", "file", "command")
DATABASES = ("local", "shared")
ROLES = ("app", "database")


def env_name(key: str, name: Any) -> str:
    if not isinstance(name, str) or not ENV_NAME.match(name):
        raise fail(key, f"is not an environment variable name (letters, digits, _): {name!r}")
    if name in RESERVED_ENV or name.startswith("FABDEPLOY_"):
        why = RESERVED_ENV.get(name, "FABDEPLOY_* names are fabdeploy's own")
        raise fail(key, f"cannot be set: {why}")
    return name


def env_values(key: str, value: Any) -> dict:
    """Plain values for the app: strings or numbers (quote true/false, which YAML reads as booleans)."""
    if not isinstance(value, dict):
        raise fail(key, f"must be a mapping of NAME: value, not {value!r}")
    found = {}
    for name, item in value.items():
        env_name(f"{key}.{name}", name)
        if isinstance(item, bool) or not isinstance(item, (str, int, float)):
            raise fail(f"{key}.{name}", f"must be a string or a number (quote it: '{item}'), not {item!r}"
                       if isinstance(item, bool) else f"must be a string or a number, not {item!r}")
        if "\0" in str(item):
            raise fail(f"{key}.{name}", "cannot hold a NUL character")
        found[name] = str(item)
    return found


def secret_sources(key: str, value: Any) -> dict:
    """Where each secret comes from: exactly one of env, file or command, never the value itself."""
    if not isinstance(value, dict):
        raise fail(key, "must be a mapping of NAME: {env: VAR}, {file: path} or {command: ...}")
    found = {}
    for name, item in value.items():
        where = f"{key}.{name}"
        env_name(where, name)
        given = [k for k in SOURCES if isinstance(item, dict) and k in item]
        if not isinstance(item, dict) or len(given) != 1 or len(item) != 1:
            # Never echo the item: it may be the secret itself, written where it must not be.
            raise fail(where, "must be one of {env: VAR}, {file: path} or {command: ...}: "
                              "the value itself never goes into fabric.yaml")
        kind = given[0]
        source = item[kind]
        if kind == "env":
            if not isinstance(source, str) or not ENV_NAME.match(source):
                raise fail(f"{where}.env", f"is not an environment variable name: {source!r}")
        else:
            source = text(f"{where}.{kind}", source, allow_empty=False)
        found[name] = SecretSource(kind, source)
    return found


def database_client(key: str, value: Any) -> str:
    """Who may reach a database host's PostgreSQL: samenet, samehost, or a network (CIDR)."""
    if value in ("samenet", "samehost"):
        return value
    try:
        return str(ipaddress.ip_network(str(value), strict=False))
    except ValueError:
        raise fail(key, f"must be samenet, samehost or a network such as 10.0.0.0/16, not {value!r}") from None


def data_settings(v: dict) -> dict:
    """env, secrets, migrate_command and database, checked; a name in both env and secrets is refused."""
    env = env_values("env", v["env"] or {})
    secrets = secret_sources("secrets", v["secrets"] or {})
    both = sorted(set(env) & set(secrets))
    if both:
        raise fail(f"secrets.{both[0]}", "is in env too: give each name once")
    return {"env": env, "secrets": secrets,
            "migrate_command": words("migrate_command", v["migrate_command"]),
            "database": choice("database", v["database"], DATABASES)}


def entry_role(spec: str, item: dict) -> tuple[str, bool]:
    """A `hosts` entry's role (app, or the database host provision sets up) and its primary mark."""
    key = f"hosts[{spec}]"
    role = choice(f"{key}.role", item.get("role", "app"), ROLES)
    primary = boolean(f"{key}.primary", item.get("primary", False))
    if primary and role != "app":
        raise fail(f"{key}.primary", "marks the app host that migrates a shared database, not the database host")
    return role, primary


def split_host(spec: str) -> tuple[str | None, str, int | None]:
    """user@host:port -> (user, host, port); missing parts are None."""
    user, _, rest = spec.rpartition("@")
    host, _, port = rest.partition(":")
    return user or None, host, int(port) if port.isdigit() else None


@dataclass(frozen=True)
class HostEntry:
    """One host from `hosts` (or a stage's): its address and its own settings."""

    spec: str
    overrides: dict
    role: str = "app"        # or database: provision sets up PostgreSQL there; deploys skip it
    primary: bool = False    # migrates the fleet's shared database

    def matches(self, user: str | None, host: str, port: int | None) -> bool:
        e_user, e_host, e_port = split_host(self.spec)
        return e_host == host and e_user in (None, user) and e_port in (None, port, 22 if port is None else None)


def host_entries(raw: list, base: dict, base_dir: Path) -> list[HostEntry]:
    entries = []
    for item in raw or []:
        if isinstance(item, str):
            entries.append(HostEntry(item, {}))
        elif isinstance(item, dict) and isinstance(item.get("host"), str):
            overrides = {k: v for k, v in item.items() if k not in ("host", "role", "primary")}
            build(overlay(base, overrides), base_dir, prefix=f"hosts[{item['host']}].")  # validate now
            entries.append(HostEntry(item["host"], overrides, *entry_role(item["host"], item)))
        else:
            raise DeployError(f"each of fabdeploy.hosts must be 'user@host' or a mapping with "
                              f"a 'host' key, not {item!r}", hint="fix fabric.yaml")
    return entries


def resolve(given: dict, base_dir: Path, stage: str | None = None) -> Settings:
    """Validate the user's `fabdeploy` settings and fill in derived defaults.

    `hosts` lists hosts (each may carry its own settings); `stages` names
    sets of hosts and settings, chosen with --stage.
    """
    raw = plain(given or {})
    stages = raw.pop("stages", {}) or {}
    hosts = raw.pop("hosts", []) or []
    if not isinstance(stages, dict):
        raise fail("stages", "must be a mapping of stage names")
    if stage:
        if stage not in stages:
            close = difflib.get_close_matches(stage, list(stages), n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"stages are: {', '.join(stages) or 'none'}"
            raise DeployError(f"no stage {stage!r} in fabdeploy.stages", hint=hint)
        chosen = dict(stages[stage])
        hosts = chosen.pop("hosts", hosts)
        raw = overlay(raw, chosen)
    entries = tuple(host_entries(hosts, raw, base_dir))
    primaries = [e.spec for e in entries if e.primary]
    if len(primaries) > 1:
        raise fail(f"hosts[{primaries[1]}].primary", f"is set on {primaries[0]} already: one host migrates")
    if primaries and raw.get("database") == "local":
        raise fail("database", f"is local, but {primaries[0]} is marked primary: set database: shared")
    settings = dataclasses.replace(build(raw, base_dir, entries), stage=stage)
    return dataclasses.replace(settings, database="shared") if primaries else settings


def warn(settings: Settings, stream=None) -> None:
    """Each deprecation once, on stderr: the old name works in this version only."""
    for line in dict.fromkeys(settings.warnings):
        print(f"fabdeploy: warning: fabric.yaml: {line} (the old name works in this version only)",
              file=stream or sys.stderr, flush=True)
