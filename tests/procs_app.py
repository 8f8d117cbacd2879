"""The example app with a job queue, a worker, and the commands the process and hook tests run.

The queue is a table in the instance folder's SQLite: a worker takes the
oldest free job in one UPDATE (atomic), does it, and records which release
did it. On SIGTERM it finishes the job it has, then exits: what systemd's
stop and the pidfile manager's kill ask of it.
"""
JOBS = '''"""A job queue in SQLite, its worker, and commands for fabdeploy's tests."""
import os
import signal
import sqlite3
import sys
import time
from importlib.metadata import version

import click
from flask import current_app


def release():
    return os.path.basename(os.path.dirname(sys.prefix))


def queue():
    conn = sqlite3.connect(os.path.join(current_app.instance_path, "queue.sqlite"), timeout=30,
                           isolation_level=None)
    conn.execute("CREATE TABLE IF NOT EXISTS jobs (id INTEGER PRIMARY KEY, taken_by TEXT)")
    conn.execute("CREATE TABLE IF NOT EXISTS done (job INTEGER, release TEXT, pid INTEGER)")
    return conn


@click.command("worker")
def worker():
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    conn, me = queue(), release()
    print(f"worker of {me} ready", flush=True)
    while not stopping:
        row = conn.execute("UPDATE jobs SET taken_by = ? WHERE id = (SELECT id FROM jobs"
                           " WHERE taken_by IS NULL ORDER BY id LIMIT 1) RETURNING id", (me,)).fetchone()
        if row is None:
            time.sleep(0.05)
            continue
        time.sleep(0.1)  # the work
        conn.execute("INSERT INTO done VALUES (?, ?, ?)", (row[0], me, os.getpid()))
    print(f"worker of {me} stopped", flush=True)


@click.command("enqueue")
@click.argument("count", type=int)
def enqueue(count):
    conn = queue()
    for _ in range(count):
        conn.execute("INSERT INTO jobs (taken_by) VALUES (NULL)")
    click.echo(f"enqueued {count}")


@click.command("create-admin")
@click.argument("name")
def create_admin(name):
    with open(os.path.join(current_app.instance_path, "admins.txt"), "a") as f:
        f.write(name + "\\n")
    click.echo(f"created admin {name} in release {release()}")


@click.command("stamp")
def stamp():
    """What a timer runs: which version and release it ran in."""
    with open(os.path.join(current_app.instance_path, "stamp.txt"), "w") as f:
        f.write(f"{version('guestbook')} {release()} {os.environ.get('PORT', '-')}\\n")


def init_app(app):
    for command in (worker, enqueue, create_admin, stamp):
        app.cli.add_command(command)
'''


def add_jobs(project) -> None:
    """Give the project copy the jobs module, registered by create_app."""
    package = project.path / "guestbook"
    (package / "jobs.py").write_text(JOBS)
    init = package / "__init__.py"
    text = init.read_text()
    if "jobs.init_app" not in text:
        init.write_text(text.replace("    db.init_app(app)\n",
                                     "    db.init_app(app)\n    from . import jobs\n    jobs.init_app(app)\n"))
