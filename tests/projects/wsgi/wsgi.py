"""One module, no package: the app object at its top."""
from flask import Flask

app = Flask(__name__)


@app.get("/")
def index():
    return "hello from wsgi\n"
