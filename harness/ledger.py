"""The ledger app (tests/projects/ledger), copied and configured like the example app.

Its settings come from the release's environment (DATABASE_URL, LEDGER_GREETING,
the secret LEDGER_TOKEN) and its schema from Alembic's migrations, run by
`flask db upgrade`: release 1 has migration 0001; a test adds 0002 (a column)
and 0003 (a migration that fails) from tests/projects/ledger_migrations/.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from harness.project import COPY_IGNORE, ROOT, Project

LEDGER = ROOT / "tests" / "projects" / "ledger"
LATER = ROOT / "tests" / "projects" / "ledger_migrations"
MIGRATE = "db upgrade"


class Ledger(Project):
    """The ledger copied to `path`; fabric.yaml as Project writes it, plus the migrate command."""

    def __init__(self, path: Path, host, app: str = "ledger", **fabdeploy):
        if not path.exists():
            shutil.copytree(LEDGER, path, ignore=COPY_IGNORE)
        self.base = {"migrate_command": MIGRATE, "init_command": "", **fabdeploy}
        super().__init__(path, host, app=app)

    def configure(self, **fabdeploy) -> None:
        """The ledger's own settings, with `fabdeploy` overrides laid over them."""
        merged = dict(getattr(self, "base", {}))
        for key, value in fabdeploy.items():
            merged[key] = {**merged.get(key, {}), **value} if isinstance(value, dict) else value
        super().configure(**merged)

    def add_migration(self, name: str) -> None:
        """A later migration (0002_note, 0003_broken) into the package: the next build has it."""
        shutil.copy(LATER / f"{name}.py", self.path / "ledger" / "migrations" / "versions")

    def remove_migration(self, name: str) -> None:
        (self.path / "ledger" / "migrations" / "versions" / f"{name}.py").unlink()
