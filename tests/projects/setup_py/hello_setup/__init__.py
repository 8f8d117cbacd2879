"""A setup.py-only project, as older tutorials make them, with a make_app factory."""
from flask import Flask


def make_app():
    app = Flask(__name__)

    @app.get("/")
    def index():
        return "hello from setup_py\n"

    return app
