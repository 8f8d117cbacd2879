"""Settings: defaults, validation and the values derived from the project."""
from __future__ import annotations

import copy
import difflib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import DeployError

if sys.version_info >= (3, 11):
    import tomllib
else:  # build depends on tomli on 3.10
    import tomli as tomllib

# None means "derived from other settings or from the host"; see resolve().
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
    "server": "gunicorn",
    "asgi": False,
    "packages": [],
    "installer": "auto",
    "wheelhouse": True,
    "project_dir": ".",
    "output": "text",
    "known_hosts": "~/.ssh/known_hosts",
    "gunicorn": {
        "manager": None,
        "bind": None,
        "worker_class": None,
        "workers": 2,
        "timeout": 30,
        "graceful_timeout": 20,
        "group": "www-data",
    },
    "provision": {
        "user": "deploy",
        "public_key": None,
        "packages": ["nginx", "python3", "python3-venv", "sudo"],
    },
    "proxy": "nginx",
    "nginx": {
        "listen": 80,
        "server_name": "_",
        "site_path": None,
        "test_command": "sudo nginx -t",
        "reload_command": "sudo systemctl reload nginx",
        "pid_file": "/run/nginx.pid",  # its master's: a reload waits until the old workers stop
    },
    "apache": {
        "listen": 80,
        "server_name": "_",
        "site_path": None,
        "test_command": "sudo apache2ctl configtest",
        "reload_command": "sudo systemctl reload apache2",
    },
    "direct": {
        "bind": "0.0.0.0:8000",  # proxy: none: where the app server listens for the balancer
    },
}

PROXIES = ("nginx", "apache", "none")

MANAGERS = ("systemd", "pidfile")
INSTALLERS = ("auto", "uv", "pip")


def merge(defaults: dict, given: dict, prefix: str = "") -> dict:
    """Deep-merge `given` over `defaults`, refusing keys the defaults lack."""
    merged = copy.deepcopy(defaults)
    for key, value in given.items():
        name = prefix + key
        if key not in defaults:
            close = difflib.get_close_matches(key, list(defaults), n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
            raise DeployError(f"unknown setting 'fabdeploy.{name}'{hint}",
                              hint="fix fabric.yaml")
        if isinstance(defaults[key], dict):
            if not isinstance(value, dict):
                raise DeployError(f"setting 'fabdeploy.{name}' must be a mapping",
                                  hint="fix fabric.yaml")
            merged[key] = merge(defaults[key], value, name + ".")
        else:
            merged[key] = value
    return merged


def plain(value: Any) -> Any:
    """Turn Invoke's DataProxy config objects into plain dicts and lists."""
    if hasattr(value, "items"):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def project_name(project_dir: Path) -> str:
    """The `[project].name` of the pyproject.toml in project_dir."""
    path = project_dir / "pyproject.toml"
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise DeployError(f"no pyproject.toml in {project_dir}",
                          hint="run fab from your project, or set fabdeploy.project_dir") from None
    except tomllib.TOMLDecodeError as exc:
        raise DeployError(f"{path} does not parse: {exc}", hint="fix pyproject.toml") from None
    try:
        return data["project"]["name"]
    except (KeyError, TypeError):
        raise DeployError(f"{path} has no [project].name",
                          hint="add it, or set fabdeploy.app") from None


def overlay(base: dict, extra: dict) -> dict:
    """Nested dicts merged without validation (that happens once, in derive)."""
    merged = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = overlay(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


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

    def matches(self, user: str | None, host: str, port: int | None) -> bool:
        e_user, e_host, e_port = split_host(self.spec)
        return e_host == host and e_user in (None, user) and e_port in (None, port)


def host_entries(raw: list) -> list[HostEntry]:
    entries = []
    for item in raw or []:
        if isinstance(item, str):
            entries.append(HostEntry(item, {}))
        elif isinstance(item, dict) and isinstance(item.get("host"), str):
            overrides = {k: v for k, v in item.items() if k != "host"}
            merge(DEFAULTS, overrides, prefix=f"hosts[{item['host']}].")  # validate early
            entries.append(HostEntry(item["host"], overrides))
        else:
            raise DeployError(f"each of fabdeploy.hosts must be 'user@host' or a mapping with "
                              f"a 'host' key, not {item!r}", hint="fix fabric.yaml")
    return entries


@dataclass(frozen=True)
class Settings:
    """Resolved settings for one invocation: every value known but the host's."""

    values: dict
    hosts: tuple = ()        # HostEntry for each configured host
    raw: dict | None = None  # what the user gave, for per-host overrides
    base_dir: Path | None = None

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def for_host(self, user: str | None, host: str, port: int | None) -> "Settings":
        """These settings with the host's own overrides, if `hosts` gives any."""
        entry = next((e for e in self.hosts if e.matches(user, host, port)), None)
        if entry is None or not entry.overrides:
            return self
        return Settings(derive(overlay(self.raw, entry.overrides), self.base_dir),
                        self.hosts, self.raw, self.base_dir)

    def __post_init__(self):
        from .servers import check  # servers reads Settings: import late
        check(self)

    @property
    def app(self) -> str:
        return self.values["app"]

    @property
    def import_name(self) -> str:
        return self.values["app"].replace("-", "_")

    @property
    def gunicorn(self) -> dict:
        return self.values["gunicorn"]

    @property
    def nginx(self) -> dict:
        return self.values["nginx"]

    @property
    def proxy(self) -> dict | None:
        """The chosen proxy's settings (listen, site_path, commands); None for proxy: none."""
        kind = self.values["proxy"]
        return None if kind == "none" else self.values[kind]


def resolve(given: dict, base_dir: Path, stage: str | None = None) -> Settings:
    """Validate the user's `fabdeploy` settings and fill in derived defaults.

    `hosts` lists hosts (each may carry its own settings); `stages` names
    sets of hosts and settings, chosen with --stage.
    """
    raw = plain(given or {})
    stages = raw.pop("stages", {}) or {}
    hosts = raw.pop("hosts", []) or []
    if stage:
        if stage not in stages:
            close = difflib.get_close_matches(stage, list(stages), n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"stages are: {', '.join(stages) or 'none'}"
            raise DeployError(f"no stage {stage!r} in fabdeploy.stages", hint=hint)
        chosen = dict(stages[stage])
        hosts = chosen.pop("hosts", hosts)
        raw = overlay(raw, chosen)
    return Settings(derive(raw, base_dir), tuple(host_entries(hosts)), raw, base_dir)


def derive(raw: dict, base_dir: Path) -> dict:
    values = merge(DEFAULTS, raw)
    project_dir = (base_dir / os.path.expanduser(values["project_dir"])).resolve()
    values["project_dir"] = str(project_dir)
    if not values["app"]:
        values["app"] = project_name(project_dir)
    app = values["app"]
    import_name = app.replace("-", "_")
    values["wsgi"] = values["wsgi"] or f"{import_name}:create_app()"
    values["deploy_to"] = (values["deploy_to"] or f"/srv/{app}").rstrip("/")
    if not (values["deploy_to"].startswith("/") or values["deploy_to"].startswith("~/")):
        raise DeployError(f"deploy_to must be absolute or start with ~/, not {values['deploy_to']!r}",
                          hint="fix fabdeploy.deploy_to")
    values["nginx"]["site_path"] = (values["nginx"]["site_path"]
                                    or f"/etc/nginx/sites-enabled/{app}.conf")
    values["apache"]["site_path"] = (values["apache"]["site_path"]
                                     or f"/etc/apache2/sites-enabled/{app}.conf")
    if values["proxy"] not in PROXIES:
        raise DeployError(f"proxy must be one of {', '.join(PROXIES)}, not {values['proxy']!r}",
                          hint="fix fabdeploy.proxy")
    manager = values["gunicorn"]["manager"]
    if manager is not None and manager not in MANAGERS:
        raise DeployError(f"gunicorn.manager must be one of {', '.join(MANAGERS)}, not {manager!r}",
                          hint="fix fabric.yaml")
    if values["installer"] not in INSTALLERS:
        raise DeployError(f"installer must be one of {', '.join(INSTALLERS)}, not {values['installer']!r}",
                          hint="fix fabdeploy.installer")
    if int(values["keep_releases"]) < 2:
        raise DeployError("keep_releases must be at least 2, so rollback has a target",
                          hint="fix fabdeploy.keep_releases")
    return values
