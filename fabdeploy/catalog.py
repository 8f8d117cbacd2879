"""What fabdeploy knows how to run: app servers, gunicorn's worker classes, proxies. Data only.

Settings validate against these names; servers.py turns them into commands.
"""
from __future__ import annotations

# Each app server, and the packages a release's venv needs for it.
SERVERS: dict[str, list[str]] = {
    "gunicorn": ["gunicorn"],
    "waitress": ["waitress"],
    "uwsgi": ["pyuwsgi"],
    "mod_wsgi": ["mod_wsgi"],
}

# Packages that ship no wheels: their sdist is shipped in the wheelhouse and built into a wheel
# on the server, once (mod_wsgi compiles against the server's own Apache), with these wheels.
BUILT_ON_SERVER: dict[str, list[str]] = {
    "mod-wsgi": ["setuptools"],
}

# gunicorn worker classes: the class gunicorn wants, and what they need installed.
WORKERS: dict[str, tuple[str, list[str]]] = {
    "sync": ("sync", []),
    "gthread": ("gthread", []),
    # gunicorn 27's gevent worker imports packaging without requiring it.
    "gevent": ("gevent", ["gevent", "packaging"]),
    # gunicorn 26 dropped its eventlet worker.
    "eventlet": ("eventlet", ["eventlet", "gunicorn<26"]),
    "uvicorn": ("uvicorn_worker.UvicornWorker", ["uvicorn-worker"]),
}

PROXIES = ("nginx", "apache", "none")
MANAGERS = ("systemd", "pidfile")
INSTALLERS = ("auto", "uv", "pip")

# Where a deploy or rollback runs the user's hooks (settings.hooks), in the order they come.
HOOK_POINTS = ("before_build", "before_switch", "after_switch", "after_deploy", "after_rollback", "failed")
VERSION_FROM = ("wheel", "git")
