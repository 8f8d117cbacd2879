"""Alembic's migrations for the ledger: env.py, and one file per revision in versions/."""
