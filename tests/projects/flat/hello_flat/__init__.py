"""A flat layout: the package next to pyproject.toml, found by setuptools' discovery."""
import click
from flask import Flask


def create_app(test_config=None):
    app = Flask(__name__, instance_relative_config=True)
    app.config.from_mapping(SECRET_KEY="dev")
    app.config.from_pyfile("config.py", silent=True)

    @app.get("/")
    def index():
        return "hello from flat\n"

    @app.cli.command("init-db")
    def init_db():
        click.echo("initialized the database")

    return app
