"""A ledger: a Flask app whose settings come from its environment and its schema from migrations.

DATABASE_URL (SQLite or PostgreSQL), LEDGER_GREETING and the secret LEDGER_TOKEN
come from the release's environment; the tables from Alembic's migrations,
run by Flask-Migrate's `flask db upgrade`.
"""
import hashlib
import os
import sys
from importlib.metadata import version

from flask import Flask, jsonify, request
from flask_migrate import Migrate
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import inspect, text

MIGRATIONS = os.path.join(os.path.dirname(__file__), "migrations")
db = SQLAlchemy()


def create_app():
    app = Flask(__name__, instance_relative_config=True)
    app.config.from_mapping(SECRET_KEY="dev", SQLALCHEMY_DATABASE_URI=os.environ["DATABASE_URL"])
    app.config.from_pyfile("config.py", silent=True)
    db.init_app(app)
    Migrate(app, db, directory=MIGRATIONS)

    def count():
        return db.session.execute(text("SELECT COUNT(*) FROM entry")).scalar()

    @app.get("/")
    def index():
        return f"{os.environ.get('LEDGER_GREETING', 'ledger')} {version('ledger')}: {count()} entries\n"

    @app.get("/about")
    def about():
        token = os.environ.get("LEDGER_TOKEN", "")
        return jsonify(
            version=version("ledger"),
            release=os.path.basename(os.path.dirname(sys.prefix)),  # releases/<name>/venv
            greeting=os.environ.get("LEDGER_GREETING"),
            # Only a digest: the test knows the token and compares, the page never shows it.
            token_sha256=hashlib.sha256(token.encode()).hexdigest() if token else None,
            database=db.engine.url.get_backend_name(),
            columns=[column["name"] for column in inspect(db.engine).get_columns("entry")],
            entries=count(),
        )

    @app.post("/entries")
    def add():
        db.session.execute(text("INSERT INTO entry (name) VALUES (:name)"), {"name": request.form["name"]})
        db.session.commit()
        return "added\n"

    @app.get("/entries")
    def entries():
        rows = db.session.execute(text("SELECT * FROM entry ORDER BY id")).mappings().all()
        return jsonify([dict(row) for row in rows])

    return app
