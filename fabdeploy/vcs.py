"""Which commit a release is: the project's git commit, and whether its tree had changes.

Read locally, once per deploy, with the git command line; outside a git
repository (or without git) a release simply records no commit.
"""
from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from .errors import DeployError


@dataclass(frozen=True)
class Source:
    """The tree a wheel was built from, as git sees it."""

    commit: str                   # the full hash of HEAD
    dirty: bool                   # uncommitted changes (or untracked files) under the project
    changed: tuple[str, ...] = ()  # which files, for the warning
    describe: str = ""            # git describe --tags --always --dirty

    @property
    def short(self) -> str:
        return self.commit[:7]

    @property
    def label(self) -> str:
        """abc1234, or abc1234-dirty: git describe's way of saying it."""
        return f"{self.short}-dirty" if self.dirty else self.short

    def meta(self) -> dict:
        """What RELEASE.json and the audit log record."""
        return {"commit": self.commit, "dirty": self.dirty}


def git(project_dir: Path, *args: str) -> str | None:
    """git's output in the project, or None where it fails (no repository, no commit, no git)."""
    try:
        proc = subprocess.run(["git", *args], cwd=project_dir, capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


def source(project_dir: Path, describe: bool = False) -> Source | None:
    """The commit the project is at and whether its files differ from it; None outside git.
    With `describe`, git describe's name for it too (version_from: git)."""
    head = git(project_dir, "rev-parse", "--verify", "-q", "HEAD")
    if not head:
        return None
    # Untracked files count: the wheel is built from every file of the project, not git's tree.
    status = git(project_dir, "status", "--porcelain", "--untracked-files=normal", "--", ".") or ""
    changed = tuple(line[3:] for line in status.splitlines() if line.strip())
    named = (git(project_dir, "describe", "--tags", "--always", "--dirty") or "").strip() if describe else ""
    return Source(head.strip(), bool(changed), changed, named)


def required(project_dir: Path) -> Source:
    """version_from: git needs a commit to name the release after."""
    found = source(project_dir, describe=True)
    if found is None:
        raise DeployError(f"version_from is git, but {project_dir} has no git commit", host="local",
                          hint="commit the project, or set version_from: wheel")
    return found


def release_name(name: str, found: Source) -> str:
    """The release named after its commit: 20261121-103700-123-abc1234 (-dirty)."""
    return f"{name}-{found.label}"


def warning(found: Source, project_dir: Path) -> str:
    """What a deploy of a dirty tree says, once."""
    more = ", ..." if len(found.changed) > 3 else ""
    return (f"fabdeploy: warning: {project_dir} has uncommitted changes ({', '.join(found.changed[:3])}{more}):"
            f" the release records commit {found.short} with dirty: true")
