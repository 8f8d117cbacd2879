"""A hatchling project with a src/ layout named in its build settings."""
from flask import Flask


def create_app():
    app = Flask(__name__)

    @app.get("/")
    def index():
        return "hello from hatch\n"

    return app
