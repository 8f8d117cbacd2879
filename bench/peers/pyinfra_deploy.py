"""pyinfra's deploy of the guestbook: the baseline fabfile's job, laid out as Capistrano does.

Build the wheel here, then on the host: releases/<timestamp> with the wheel
and a venv of its own, pip install, the instance folder kept in shared/,
config.py and init-db once, `current` switched atomically, gunicorn started
through `current` (so a HUP loads the new release) or HUP-ed, old releases
beyond five removed. Run from the project:

    pyinfra -y inventory.py pyinfra_deploy.py

bench/bench.py writes inventory.py: the host, and its data (app_dir, port,
site_path, nginx_test, nginx_reload).
"""
import atexit
import functools
import glob
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

from pyinfra import host
from pyinfra.operations import files, server

q = shlex.quote


@functools.cache
def wheel() -> str:
    """The project's wheel, built once per run (the deploy file runs once per host)."""
    out = tempfile.mkdtemp()
    atexit.register(shutil.rmtree, out, True)
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir", out, "."], check=True,
                   capture_output=True)
    return glob.glob(f"{out}/*.whl")[0]


@functools.cache
def release_name() -> str:
    return time.strftime("%Y%m%d%H%M%S", time.gmtime())


app = host.data.app_dir
release = f"{app}/releases/{release_name()}"
name = os.path.basename(wheel())
instance = f"{app}/shared/instance"
venv = f"{release}/venv"
pid = f"{app}/shared/gunicorn.pid"

files.directory(name="release and shared directories", path=release)
files.directory(name="instance folder", path=instance, mode="0700")
files.put(name="upload the wheel", src=wheel(), dest=f"{release}/{name}")
server.shell(name="venv and install", commands=[
    f"python3 -m venv {q(venv)}",
    f"{q(venv)}/bin/pip install -q --disable-pip-version-check {q(release)}/{q(name)} gunicorn",
    # Flask's instance folder for an installed app lives inside the venv: link the shared one.
    f"mkdir -p {q(venv)}/var && ln -sfn {q(instance)} {q(venv)}/var/guestbook-instance",
])
server.shell(name="config.py and the database, once", commands=[
    f"test -f {q(instance)}/config.py || (umask 077 && {q(venv)}/bin/python -c "
    f"'import secrets; print(\"SECRET_KEY = \" + repr(secrets.token_hex()))' > {q(instance)}/config.py)",
    f"test -f {q(instance)}/guestbook.sqlite || {q(venv)}/bin/flask --app guestbook init-db",
])
server.shell(name="switch current", commands=[
    f"ln -sfn {q(release)} {q(app)}/current.new && mv -Tf {q(app)}/current.new {q(app)}/current",
])
site = (f"server {{ listen 127.0.0.1:{host.data.port}; location / {{ proxy_pass http://unix:{app}/shared/app.sock; "
        f"proxy_set_header Host $host; }} }}\n")
server.shell(name="restart gunicorn", commands=[
    f"if test -f {q(pid)} && kill -0 $(cat {q(pid)}); then kill -HUP $(cat {q(pid)}); else "
    f"cd {q(app)} && current/venv/bin/python current/venv/bin/gunicorn --daemon --pid {q(pid)} "
    f"--bind unix:{q(app)}/shared/app.sock 'guestbook:create_app()' && "
    f"printf '%s' {q(site)} > {q(host.data.site_path)} && {host.data.nginx_test} && {host.data.nginx_reload}; fi",
])
server.shell(name="keep five releases", commands=[
    f"cd {q(app)}/releases && ls -1 | sort | head -n -5 | xargs -r rm -rf",
])
