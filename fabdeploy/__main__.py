"""`fabdeploy init [--force] [DIR]` (or python -m fabdeploy): the fabfile.py fab needs first.

The deciding is in scaffold.py; this reads the project's files and writes ours.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import __version__, scaffold
from .build import SKIP_DIRS
from .errors import DeployError

MAX_SOURCE = 1 << 20  # bigger .py files are generated or vendored, never where the app is made


def read_project(root: Path) -> dict[str, str]:
    """The project's metadata files and Python sources, as text, by posix path."""
    files = {}
    for top, dirs, names in os.walk(root):
        # No venvs (pyvenv.cfg), no caches or build output, no hidden directories.
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith(".")
                         and not d.endswith(".egg-info") and not (Path(top, d, "pyvenv.cfg")).exists())
        for name in names:
            path = Path(top, name)
            rel = path.relative_to(root).as_posix()
            if name.endswith(".py") or rel in scaffold.METADATA:
                text = read_text(path)
                if text is not None:
                    files[rel] = text
    return files


def read_text(path: Path) -> str | None:
    """The file's text; None for what cannot be a source (too big, unreadable, a dead link)."""
    try:
        if path.stat().st_size > MAX_SOURCE:
            return None
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def existing(root: Path) -> set[str]:
    """Which of the files init writes, or that would shadow them, are there already."""
    return {p for p in (*scaffold.WRITES, *scaffold.SHADOWS) if (root / p).exists()}


def init(root: Path, force: bool) -> str:
    """Write fabfile.py and fabric.yaml into the project at root; return what to tell the user."""
    if not root.is_dir():
        raise DeployError(f"{root} is not a directory", hint="name your project's directory")
    result = scaffold.scaffold(read_project(root), where=str(root))
    scaffold.check_free(existing(root), force)
    for name, text in result.files.items():
        (root / name).write_text(text)
    return scaffold.report(result, list(result.files))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fabdeploy", description="fabdeploy's own commands; "
                                     "deploys are Fabric tasks: fab -H deploy@host deploy")
    parser.add_argument("--version", action="version", version=f"fabdeploy {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    start = commands.add_parser("init", help="write fabfile.py and fabric.yaml for a project",
                                description="Write fabfile.py and fabric.yaml for the project in "
                                            "DIR, from its metadata and its source (nothing is run).")
    start.add_argument("--force", action="store_true", help="replace fabfile.py and fabric.yaml")
    start.add_argument("dir", nargs="?", default=".", type=Path, metavar="DIR",
                       help="the project: where pyproject.toml, setup.cfg or setup.py is (default .)")
    args = parser.parse_args(argv)
    try:
        print(init(args.dir, args.force))
    except DeployError as exc:
        if os.environ.get("FABDEPLOY_DEBUG"):
            raise
        print(f"fabdeploy: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
