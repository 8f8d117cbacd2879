"""Alembic's environment for the ledger: the app's engine, and every run counted in the database.

The count comes first, committed on its own, so it holds for runs that then
fail: a fleet with one database must migrate it once per deploy.
"""
import logging
import socket

from alembic import context
from flask import current_app
from sqlalchemy import text

# What Alembic's own template logs: each revision it runs, on stderr.
logging.basicConfig(level=logging.INFO, format="%(levelname)-5.5s [%(name)s] %(message)s")
db = current_app.extensions["migrate"].db

with db.engine.connect() as connection:
    connection.execute(text("CREATE TABLE IF NOT EXISTS migration_runs (host VARCHAR(255) NOT NULL)"))
    connection.execute(text("INSERT INTO migration_runs (host) VALUES (:host)"), {"host": socket.gethostname()})
    connection.commit()
    context.configure(connection=connection, target_metadata=db.metadata)
    with context.begin_transaction():
        context.run_migrations()
