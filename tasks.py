"""fabdeploy's own tasks (run them with ./dev, or `fab -c tasks ...`).

This file is also the worked example of a project that has tasks of its
own and imports fabdeploy's next to them: see the Collection at the end.
"""
import json
import shutil
import shlex
import sys
from pathlib import Path

from invoke import Collection, task
from invoke.exceptions import Exit

from fabdeploy import deploy, releases, rollback, rotate_secret, unlock
from harness.local_host import LocalHost
from harness.project import Project

ROOT = Path(__file__).resolve().parent
DEMO = ROOT / ".demo"


@task(help={"args": "extra pytest arguments, e.g. -k deploy or -x"})
def test(c, args=""):
    """Run the whole test suite: unit tests and real-host tests."""
    c.run(f"{sys.executable} -m pytest -ra {args}", pty=False, in_stream=False)


def demo_host_state() -> dict | None:
    state = DEMO / "host" / "state.json"
    return json.loads(state.read_text()) if state.exists() else None


@task(help={"ops": "how many operations (default 100; CI runs 20)"})
def soak(c, ops=100):
    """The long soak on a provisioned nspawn host: deploys, rollbacks, rotations, reboots, under load."""
    c.run(f"{sys.executable} -m pytest -s tests/test_soak.py", pty=False, in_stream=False,
          env={"FABDEPLOY_SOAK_OPS": str(int(ops))})


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
    c.run(f"{sys.executable} -m harness.local_host start {DEMO / 'host'}", hide=True, in_stream=False)
    host = LocalHost.load(DEMO / "host")
    print(Project(DEMO / "guestbook", host).fab("deploy").stdout)
    print(f"The guestbook is served at {host.url}")
    print(f"  try: curl {host.url}    remove it with: ./dev demo-stop")


@task(help={"runs": "runs per scenario (default 5)", "fleet": "host counts, e.g. 1,5,20",
            "rtt": "round-trip times in ms, e.g. 0,50,150: every scenario at each, through a delaying relay",
            "backends": "also a code-change redeploy per build backend (setuptools, flit_core, hatchling)",
            "peers": "also pyinfra and Ansible doing the same job (installs them once; takes minutes)",
            "fleet_rtt": "round-trip times in ms for the fleet, each host behind its own relay",
            "static": "also a static file's throughput from nginx and from gunicorn, side by side",
            "write": "also write the report to this file, e.g. docs/benchmarks.md"})
def bench(c, runs=5, fleet="1,5,20", rtt="", backends=False, peers=False, fleet_rtt="", static=False, write=""):
    """Time fabdeploy against a hand-written fabfile on throwaway hosts; print ratios."""
    argv = ["bench/bench.py", "--runs", str(int(runs)), "--fleet", fleet]
    for option, value in (("--rtt", rtt), ("--fleet-rtt", fleet_rtt), ("--write", write)):
        argv += [option, value] if value else []
    argv += (["--backends"] if backends else []) + (["--peers"] if peers else []) + (["--static"] if static else [])
    c.run(shlex.join([sys.executable, *argv]), pty=False, in_stream=False)


@task(help={"outdir": "where the wheel and the sdist go (default dist/)"})
def dist(c, outdir="dist"):
    """Build fabdeploy's sdist, then its wheel from that sdist, into dist/ (nothing is published)."""
    out = (ROOT / outdir).resolve()
    for old in [*out.glob("fabdeploy-*.whl"), *out.glob("fabdeploy-*.tar.gz")]:
        old.unlink()  # one version in dist/, so an upload of dist/* sends that one only
    # setuptools merges a leftover SOURCES.txt into the next sdist: files deleted since would return.
    for stale in (ROOT / "build", ROOT / "fabdeploy.egg-info"):
        shutil.rmtree(stale, ignore_errors=True)
    result = c.run(f"{sys.executable} -m build --outdir {shlex.quote(str(out))} {shlex.quote(str(ROOT))}",
                   hide=True, warn=True, pty=False, in_stream=False)
    if result.failed:
        raise Exit(f"{result.stdout}{result.stderr}dist: the build failed (its output is above)", code=1)
    for built in sorted(out.glob("fabdeploy-*")):
        print(built.relative_to(ROOT) if built.is_relative_to(ROOT) else built)


# fabdeploy's tasks sit next to this project's own: `fab -c tasks -H host deploy`.
ns = Collection(test, demo, demo_stop, bench, soak, dist, deploy, rollback, releases, unlock, rotate_secret)
