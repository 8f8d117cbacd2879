"""The baseline: the fabfile a user writes by hand from Flask's deployment docs.

Build the wheel, put it, make a venv, pip install, init-db once, write
config.py once, start gunicorn or HUP it. One venv, reused; no lock, no
health check, no rollback. fabdeploy's benchmark times this against itself.
Settings come from fabric.yaml under `baseline:` (app_dir, port, site_path,
nginx_test, nginx_reload), written by bench/bench.py.
"""
import glob
import shlex
import subprocess
import sys
import tempfile

from fabric import task


@task
def deploy(c):
    cfg = c.config.baseline
    app_dir, q = cfg.app_dir, shlex.quote
    out = tempfile.mkdtemp()
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir", out, "."], check=True,
                   capture_output=True)
    wheel = glob.glob(f"{out}/*.whl")[0]
    name = wheel.rsplit("/", 1)[1]
    c.run(f"mkdir -p {q(app_dir)}/instance")
    c.put(wheel, f"{app_dir}/{name}")
    c.run(f"test -d {q(app_dir)}/venv || python3 -m venv {q(app_dir)}/venv")
    c.run(f"{q(app_dir)}/venv/bin/pip install -q --disable-pip-version-check {q(app_dir)}/{q(name)} gunicorn")
    # Flask's instance folder for an installed app lives inside the venv.
    c.run(f"mkdir -p {q(app_dir)}/venv/var && ln -sfn {q(app_dir)}/instance {q(app_dir)}/venv/var/guestbook-instance")
    c.run(f"test -f {q(app_dir)}/instance/config.py || (umask 077 && "
          f"{q(app_dir)}/venv/bin/python -c 'import secrets; print(\"SECRET_KEY = \" + repr(secrets.token_hex()))'"
          f" > {q(app_dir)}/instance/config.py)")
    c.run(f"test -f {q(app_dir)}/instance/guestbook.sqlite || "
          f"{q(app_dir)}/venv/bin/flask --app guestbook init-db")
    pid = f"{app_dir}/gunicorn.pid"
    running = c.run(f"test -f {q(pid)} && kill -0 $(cat {q(pid)})", warn=True).ok
    if running:
        c.run(f"kill -HUP $(cat {q(pid)})")
    else:
        c.run(f"cd {q(app_dir)} && venv/bin/gunicorn --daemon --pid {q(pid)} "
              f"--bind unix:{q(app_dir)}/app.sock 'guestbook:create_app()'")
        site = (f"server {{ listen 127.0.0.1:{cfg.port}; location / {{ proxy_pass http://unix:{app_dir}/app.sock; "
                f"proxy_set_header Host $host; }} }}\n")
        c.run(f"printf '%s' {q(site)} > {q(cfg.site_path)} && {cfg.nginx_test} && {cfg.nginx_reload}")
