"""A guestbook: the Flask app fabdeploy's demo and tests deploy."""
import os
import sys
from importlib.metadata import version

from flask import Flask, jsonify, request, session, url_for
from werkzeug.middleware.proxy_fix import ProxyFix

from . import db

GREETING = "Hello from the guestbook"


def create_app(test_config=None):
    app = Flask(__name__, instance_relative_config=True)
    # "dev" is only a fallback: a deploy writes instance/config.py with a real key.
    app.config.from_mapping(SECRET_KEY="dev", DATABASE="guestbook.sqlite")
    if test_config is None:
        app.config.from_pyfile("config.py", silent=True)
    else:
        app.config.update(test_config)
    # One proxy (nginx) sits in front of the app.
    app.wsgi_app = ProxyFix(app.wsgi_app, x_for=1, x_proto=1, x_host=1, x_port=1, x_prefix=1)
    db.init_app(app)

    @app.get("/")
    def index():
        return f"{GREETING} {version('guestbook')}: {db.count()} entries\n"

    @app.get("/about")
    def about():
        return jsonify(
            version=version("guestbook"),
            # fabdeploy makes a venv per release: releases/<name>/venv.
            release=os.path.basename(os.path.dirname(sys.prefix)),
            greeting=GREETING,
            entries=db.count(),
            secret_is_dev=app.config["SECRET_KEY"] == "dev",
            instance_path=app.instance_path,
            remote_addr=request.remote_addr,
            scheme=request.scheme,
            url=url_for("about", _external=True),
        )

    @app.post("/sign")
    def sign():
        name = request.form.get("name", "anonymous")
        db.add(name)
        session["signed_as"] = name
        return f"signed as {name}\n"

    @app.post("/upload")
    def upload():
        return f"received {len(request.get_data())} bytes\n"

    @app.get("/whoami")
    def whoami():
        return f"{session.get('signed_as', 'nobody')}\n"

    return app
