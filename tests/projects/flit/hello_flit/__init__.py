"""A flit project: the app object in the package's __init__."""
from flask import Flask

app = Flask(__name__)


@app.get("/")
def index():
    return "hello from flit\n"
