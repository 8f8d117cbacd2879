"""A src/ layout whose package is not named like the distribution (hello-src)."""
from flask import Flask
from werkzeug.middleware.proxy_fix import ProxyFix


def create_app():
    app = Flask(__name__)
    app.wsgi_app = ProxyFix(app.wsgi_app, x_for=1, x_proto=1, x_host=1, x_port=1)

    @app.get("/")
    def index():
        return "hello from src\n"

    return app
