"""SQLite storage in the instance folder, as in the Flask tutorial."""
import os
import sqlite3

import click
from flask import current_app, g


def get_db():
    if "db" not in g:
        path = os.path.join(current_app.instance_path, current_app.config["DATABASE"])
        g.db = sqlite3.connect(path)
    return g.db


def close_db(exc=None):
    conn = g.pop("db", None)
    if conn is not None:
        conn.close()


def count():
    return get_db().execute("SELECT COUNT(*) FROM entry").fetchone()[0]


def add(name):
    conn = get_db()
    conn.execute("INSERT INTO entry (name) VALUES (?)", (name,))
    conn.commit()


@click.command("init-db")
def init_db_command():
    """Drop and create the tables, like the tutorial's init-db."""
    os.makedirs(current_app.instance_path, exist_ok=True)
    conn = get_db()
    conn.executescript(
        "DROP TABLE IF EXISTS entry;"
        "CREATE TABLE entry (id INTEGER PRIMARY KEY, name TEXT NOT NULL);"
    )
    click.echo("Initialised the database.")


def init_app(app):
    app.teardown_appcontext(close_db)
    app.cli.add_command(init_db_command)
