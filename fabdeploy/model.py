"""Typed values that cross the layers: binds, releases, and a host's facts. No I/O here.

The agent reports a host as JSON; `HostFacts.parse` is the one place that
reads it. Everything downstream works with these types.
"""
from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass, field

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class Bind:
    """Where an app server listens: a unix socket path, or a host and port."""

    path: str | None = None
    host: str | None = None
    port: int | None = None

    @classmethod
    def unix(cls, path: str) -> "Bind":
        return cls(path=path)

    @classmethod
    def tcp(cls, host: str, port: int) -> "Bind":
        return cls(host=host, port=int(port))

    @classmethod
    def parse(cls, text: str) -> "Bind":
        """gunicorn's spelling: unix:/path, or host:port ([v6]:port too)."""
        text = text.strip()
        if text.startswith("unix:"):
            return cls.unix(text[len("unix:"):])
        host, sep, port = text.rpartition(":")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"not a unix:/path or host:port: {text!r}")
        return cls.tcp(host.strip("[]") or "0.0.0.0", int(port))

    @property
    def is_unix(self) -> bool:
        return self.path is not None

    @property
    def address(self) -> str:
        """host:port, with brackets around an IPv6 host."""
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def gunicorn(self) -> str:
        return f"unix:{self.path}" if self.is_unix else self.address

    nginx = gunicorn  # nginx's upstream spelling is gunicorn's

    @property
    def apache(self) -> str:
        """mod_proxy's: unix:/x.sock|http://localhost, or http://host:port."""
        return f"unix:{self.path}|http://localhost" if self.is_unix else f"http://{self.address}"

    @property
    def probe(self) -> str:
        """Where a local client reaches it: a wildcard host means loopback."""
        if self.is_unix:
            return self.gunicorn
        host = "127.0.0.1" if self.host in ("0.0.0.0", "", "*") else ("::1" if self.host == "::" else self.host)
        return Bind.tcp(host, self.port).address

    @property
    def loopback(self) -> bool:
        if self.is_unix:
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return self.host == "localhost"

    def next_port(self) -> "Bind":
        return Bind.tcp(self.host, self.port + 1)

    def __str__(self) -> str:
        return self.gunicorn


class ReleaseState(str, enum.Enum):
    READY = "ready"      # complete: it went live once
    FAILED = "failed"    # marked bad: never a rollback target
    PARTIAL = "partial"  # interrupted before it went live


@dataclass(frozen=True)
class Release:
    """A release directory as the host reports it."""

    name: str
    state: ReleaseState
    meta: dict = field(default_factory=dict, compare=False)
    bind: Bind | None = None

    @property
    def good(self) -> bool:
        return self.state is ReleaseState.READY


class Problem(str, enum.Enum):
    """What the agent finds that stops a deploy before anything changes."""

    ROOT = "root"
    NO_NGINX = "no-nginx"
    NO_APACHE = "no-apache"
    NO_VENV = "no-venv"
    NOT_PROVISIONED = "not-provisioned"


@dataclass(frozen=True)
class Lock:
    """Who holds a host's deploy lock, since when, for what."""

    who: str = "someone"
    what: str = ""
    when: str = ""
    age: float = 0.0

    def as_dict(self) -> dict:
        return {"who": self.who, "what": self.what, "when": self.when, "age": self.age}


@dataclass(frozen=True)
class Registration:
    """What `provision` recorded as root for this app: the values it baked into root's files."""

    values: dict
    path: str = ""


@dataclass(frozen=True)
class Backup:
    """A copy of the app's databases in shared/backups/<name>, as the agent lists it."""

    name: str                 # the release whose migration it came before (or <name>-before-restore)
    taken_at: str = ""
    files: tuple[str, ...] = ()   # the SQLite files in it, and postgres.sql
    size: int = 0
    moved: bool = False       # the migration after it changed the schema
    note: str = ""            # why something could not be copied (no pg_dump on the server)

    @classmethod
    def parse(cls, data: dict) -> "Backup":
        return cls(data["name"], data.get("taken_at") or "", tuple(data.get("files") or ()),
                   int(data.get("size") or 0), bool(data.get("moved")), data.get("note") or "")


@dataclass(frozen=True)
class HostFacts:
    """A host as the agent saw it, parsed once."""

    root: str
    user: str
    uid: int
    home: str = ""
    root_exists: bool = False
    current: str | None = None
    releases: tuple[Release, ...] = ()
    live_target: str | None = None     # the release shared/run/live.sock points at
    initialized: bool = False
    config_exists: bool = False
    preview_unloaded: bool = False
    lock: Lock | None = None
    locked: bool = False
    deferred: bool = False             # a fresh host: nothing laid out yet (see phases.lock)
    unchanged: bool = False            # the wheel asked about serves already: not locked
    lock_error: str | None = None
    venv_ok: bool = True
    systemd: bool = False
    uv: str | None = None
    python: str = ""
    machine: str = ""
    glibc: str | None = None
    wheelhouse: frozenset = frozenset()
    problems: tuple[Problem, ...] = ()
    registration: Registration | None = None
    site_sha256: str | None = None      # the proxy site's content, where the deploy user writes it
    ipv6: bool = False
    failed_units: tuple[str, ...] = ()
    active_units: tuple[str, ...] = ()
    env_sha256: str | None = None       # the current release's env file (issue 14)
    backups: tuple[Backup, ...] = ()    # shared/backups, oldest first

    @classmethod
    def parse(cls, data: dict) -> "HostFacts":
        releases = tuple(Release(r["name"], ReleaseState(r["state"]), r.get("meta") or {},
                                 Bind.parse(r["bind"]) if r.get("bind") else None)
                         for r in data.get("releases", []))
        lock = data.get("lock")
        reg = data.get("registration")
        return cls(
            root=data["root"], user=data.get("user") or "", uid=int(data.get("uid", -1)),
            home=data.get("home", ""), root_exists=bool(data.get("root_exists")),
            current=data.get("current"), releases=releases, live_target=data.get("live_target"),
            initialized=bool(data.get("initialized")), config_exists=bool(data.get("config_exists")),
            preview_unloaded=bool(data.get("preview_unloaded")),
            lock=Lock(**{k: lock[k] for k in ("who", "what", "when", "age") if k in lock}) if lock else None,
            locked=bool(data.get("locked")), deferred=bool(data.get("deferred")),
            unchanged=bool(data.get("unchanged")),
            lock_error=data.get("lock_error"), venv_ok=bool(data.get("venv_ok", True)),
            systemd=bool(data.get("systemd")), uv=data.get("uv"), python=data.get("python", ""),
            machine=data.get("machine", ""), glibc=data.get("glibc"),
            wheelhouse=frozenset(data.get("wheelhouse", [])),
            problems=tuple(Problem(p) for p in data.get("problems", [])),
            registration=Registration(reg["values"], reg.get("path", "")) if reg else None,
            site_sha256=data.get("site_sha256"), ipv6=bool(data.get("ipv6")),
            failed_units=tuple(data.get("failed_units", [])),
            active_units=tuple(data.get("active_units", [])),
            env_sha256=data.get("env_sha256"),
            backups=tuple(Backup.parse(b) for b in data.get("backups") or ()))

    def release(self, name: str | None) -> Release | None:
        return next((r for r in self.releases if r.name == name), None)

    def backup(self, name: str | None) -> Backup | None:
        return next((b for b in self.backups if b.name == name), None)

    @property
    def current_release(self) -> Release | None:
        return self.release(self.current)

    @property
    def current_bind(self) -> Bind | None:
        current = self.current_release
        return current.bind if current else None
