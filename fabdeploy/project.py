"""The project being deployed: its name, read from its metadata. (Interim: pyproject.toml only.)"""
from __future__ import annotations

import sys
from pathlib import Path

from .errors import DeployError

if sys.version_info >= (3, 11):
    import tomllib
else:  # build depends on tomli on 3.10
    import tomli as tomllib


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
        raise DeployError(f"{path} has no [project].name", hint="add it, or set fabdeploy.app") from None
