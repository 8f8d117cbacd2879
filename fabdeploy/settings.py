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
    "packages": ["gunicorn"],
    "installer": "auto",
    "wheelhouse": True,
    "project_dir": ".",
    "known_hosts": "~/.ssh/known_hosts",
    "hosts": [],
    "gunicorn": {
        "manager": None,
        "bind": None,
        "workers": 2,
        "timeout": 30,
        "graceful_timeout": 20,
        "group": "www-data",
    },
    "nginx": {
        "listen": 80,
        "server_name": "_",
        "site_path": None,
        "test_command": "sudo nginx -t",
        "reload_command": "sudo systemctl reload nginx",
    },
}

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


@dataclass(frozen=True)
class Settings:
    """Resolved settings for one invocation: every value known but the host's."""

    values: dict

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

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


def resolve(given: dict, base_dir: Path) -> Settings:
    """Validate the user's `fabdeploy` settings and fill in derived defaults."""
    values = merge(DEFAULTS, plain(given or {}))
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
    return Settings(values)
