"""fabdeploy's own tasks (run them with ./dev, or `fab -c tasks ...`).

This file is also the worked example of a project that has tasks of its
own and imports fabdeploy's next to them: see the Collection at the end.
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

from invoke import Collection, task

from fabdeploy import deploy, releases, rollback, unlock

ROOT = Path(__file__).resolve().parent
DEMO = ROOT / ".demo"


@task(help={"args": "extra pytest arguments, e.g. -k deploy or -x"})
def test(c, args=""):
    """Run the whole test suite: unit tests and real-host tests."""
    c.run(f"{sys.executable} -m pytest -ra {args}", pty=False, in_stream=False)


def demo_host_state() -> dict | None:
    state = DEMO / "host" / "state.json"
    return json.loads(state.read_text()) if state.exists() else None


@task
def demo_stop(c):
    """Stop the throwaway host the demo started, and remove it."""
    if demo_host_state():
        c.run(f"{sys.executable} -m harness.local_host stop {DEMO / 'host'}", in_stream=False)
    shutil.rmtree(DEMO, ignore_errors=True)


@task
def demo(c):
    """Start a throwaway host on loopback, deploy the example app to it, print its URL."""
    demo_stop(c)
    (DEMO / "host").mkdir(parents=True)
    DEMO.chmod(0o755)
    (DEMO / "host").chmod(0o755)
    out = subprocess.run([sys.executable, "-m", "harness.local_host", "start", str(DEMO / "host")],
                         cwd=ROOT, check=True, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    sys.path.insert(0, str(ROOT))
    from harness.local_host import LocalHost

    host = LocalHost.load(DEMO / "host")
    project = DEMO / "guestbook"
    shutil.copytree(ROOT / "example", project,
                    ignore=shutil.ignore_patterns("*.egg-info", "build", "dist", "__pycache__"))
    (project / "fabric.yaml").write_text(json.dumps(host.fabric_yaml("guestbook"), indent=2))
    fab = Path(sys.executable).with_name("fab")
    c.run(f"cd {project} && {fab} -H {host.host_string} deploy", in_stream=False)
    print(f"\nThe guestbook is served at {host.url}")
    print(f"  try: curl {host.url}   then: ./dev releases-demo, or ./dev demo-stop to remove it")
    del out


# fabdeploy's tasks sit next to this project's own: `fab -c tasks -H host deploy`.
ns = Collection(test, demo, demo_stop, deploy, rollback, releases, unlock)
