"""Issue 3, interruptions: kill -9, Ctrl-C, SIGTERM, a dropped connection, a full disk.

Each time `current` must stay put and keep serving, and the half-made release
must never become a rollback target. The scenarios share one live deployment
(a fresh baseline each would double the runtime): each starts from a healthy,
unlocked host, and deploys the same wheel again with --force, so that no
scenario waits for a wheel build. Which release answers is read from the app's
/about (its venv's path), as the wheels (and so the pages) are the same.
"""
import os
import shutil
import signal
import subprocess

import pytest
from faults import (SLOW_INSTALL, FabRun, FullDiskNotNamed, LostConnectionNotNamed,
                    PartialIsRollbackTarget, PauseIgnoresInterrupt, cmdlines, current_of, fill,
                    free_bytes, installing, last_phase, lock_dir, lock_info, mount_tmpfs,
                    new_release, one_line, phase_done, refuses_rollback_to, release_names,
                    release_served, sshd_session_pids, states, unmount, wait_until, wipe)
from harness.project import Project

pytestmark = pytest.mark.host

BALLAST_MB = 16


# -- the full disk runs first: its tmpfs must be under ~/srv before anything is deployed ----

@pytest.fixture(scope="class")
def on_tmpfs(host, tmp_path_factory):
    """The app deployed once onto a roomy tmpfs at ~/srv, which each test then fills."""
    srv = host.home / "srv"
    assert not srv.exists(), "another test left a deployment behind"
    # Roomy for the first deploy (about 110 MB: releases, wheelhouse, tools); filled after.
    mount_tmpfs(srv, "400m", host.user)
    project = Project(tmp_path_factory.mktemp("full") / "guestbook", host)
    try:
        project.fab("deploy")
        yield project
    finally:
        unmount(srv, project.deploy_to / "shared" / "run")
        wipe(host)


def wheel_bigger_than(project, size: int):
    """Random bytes packaged into the wheel, so it cannot fit in `size`; return an undo."""
    return with_ballast(project, size + (1 << 20))


class TestFullDisk:
    """Where the disk runs out: a command (venv, install), the SFTP upload, or ensurepip."""

    @pytest.mark.parametrize("where", [
        "install", "upload", "ensurepip",
    ])
    def test_a_full_disk_fails_before_the_switch_and_says_so(self, on_tmpfs, where):
        project, srv = on_tmpfs, on_tmpfs.host.home / "srv"
        before, known = current_of(project), release_names(project)
        undo = wheel_bigger_than(project, 1 << 20) if where == "upload" else None
        if where == "ensurepip":
            project.configure(**SLOW_INSTALL)
        ballast = fill(srv, leave=1 << 20)
        assert free_bytes(srv) <= 1 << 20
        try:
            result = project.fab("deploy", "--force", check=False)
        finally:
            ballast.unlink()
            project.configure()
            if undo:
                undo()

        assert result.returncode != 0
        assert "Traceback" not in result.stderr
        # It stopped where the disk ran out, well before the switch.
        expected = ("upload",) if where == "upload" else ("venv", "install")
        assert last_phase(result.stdout) in expected, result.stdout
        assert current_of(project) == before
        assert release_served(project.host) == before
        assert not lock_dir(project).exists()
        (failed,) = release_names(project) - known
        assert states(project)[failed] in ("failed", "partial")
        if "disk is full" not in result.stderr:
            raise FullDiskNotNamed(result.stderr)


# -- one live deployment for the rest ---------------------------------------------

@pytest.fixture(scope="module")
def live(host, tmp_path_factory):
    """The example app deployed once, for all the scenarios below."""
    project = Project(tmp_path_factory.mktemp("live") / "guestbook", host)
    project.fab("deploy")
    yield project
    wipe(host)


@pytest.fixture
def ready(live):
    """The live deployment with default settings, unlocked and serving, before each scenario."""
    live.configure()
    if lock_dir(live).exists():
        live.fab("unlock")  # a scenario that failed may have left it
    try:
        release_served(live.host)
    except (OSError, AssertionError):
        live.fab("deploy", "--force")
    return live


def kept_serving(project, before: str) -> None:
    """`current` did not move, and visitors are still served by it."""
    assert current_of(project) == before
    assert release_served(project.host) == before


def deploys_again(project, known: set[str]) -> None:
    """The next deploy (default settings) makes a new release, and it serves."""
    project.configure()
    project.fab("deploy", "--force")
    now = current_of(project)
    assert now not in known
    assert release_served(project.host) == now
    assert not lock_dir(project).exists()


def runs_from(project, release: str) -> list[str]:
    """Command lines of the processes that run from the release's directory."""
    where = f"{project.deploy_to}/releases/{release}/"
    return [line for line in cmdlines().values() if where in line]


def installers_in(project, release: str) -> list[str]:
    """What runs from the release and is not its gunicorn: a venv being made, an install."""
    return [line for line in runs_from(project, release) if "/bin/gunicorn" not in line]


# -- kill -9 ------------------------------------------------------------------------

def kill_during_upload(project, run: FabRun, known: set) -> str:
    """kill -9 once the wheel's first bytes are on the host, before its last."""
    release = new_release(project, known)
    wheel = wait_until(lambda: next((project.deploy_to / "releases" / release).glob("*.whl"), None),
                       30, "the wheel's upload to start")
    wait_until(lambda: wheel.stat().st_size > 0, 30, "the first bytes of the wheel")
    run.send(signal.SIGKILL)
    assert not run.printed(phase_done("upload")), "the upload had already finished"
    return release


def kill_during_venv(project, run: FabRun, known: set) -> str:
    """kill -9 once the venv has its python, before ensurepip has finished."""
    run.wait_for(phase_done("upload"))
    release = new_release(project, known)
    venv = project.deploy_to / "releases" / release / "venv"
    wait_until(lambda: (venv / "bin" / "python").exists(), 60, "the venv to be started")
    run.send(signal.SIGKILL)
    # ensurepip writes bin/pip last: without it, the venv was still being made
    assert not (venv / "bin" / "pip").exists(), "the venv was already complete"
    assert not run.printed(phase_done("venv"))
    return release


def kill_during_install(project, run: FabRun, known: set) -> str:
    """kill -9 while the installer runs in the release's venv."""
    run.wait_for(phase_done("venv"))
    release = new_release(project, known)
    wait_until(lambda: installing(project, release), 60, "the install to run")
    run.send(signal.SIGKILL)
    assert not (project.deploy_to / "releases" / release / "venv" / "bin" / "gunicorn").exists()
    assert not run.printed(phase_done("install"))
    return release


def kill_before_switch(project, run: FabRun, known: set) -> str:
    """kill -9 in the pause before route: started and healthy, taking no traffic yet."""
    run.wait_for(r"paused before route$")
    run.send(signal.SIGKILL)
    return new_release(project, known)


KILLS = {"upload": kill_during_upload, "venv": kill_during_venv, "install": kill_during_install,
         "switch": kill_before_switch}


def with_ballast(project, size: int):
    """Package `size` random bytes into the wheel; return an undo."""
    pyproject = project.path / "pyproject.toml"
    original = pyproject.read_text()
    ballast = project.path / "guestbook" / "ballast.bin"
    ballast.write_bytes(os.urandom(size))
    pyproject.write_text(original + '\n[tool.setuptools.package-data]\nguestbook = ["*.bin"]\n')

    def undo() -> None:
        """Take the ballast out again."""
        ballast.unlink()
        pyproject.write_text(original)
        # setuptools keeps build/lib between builds: a stale ballast.bin would ship again
        shutil.rmtree(project.path / "build", ignore_errors=True)
    return undo


@pytest.mark.parametrize("moment", [
    "upload", "venv", "install", "switch",
])
def test_kill_9_keeps_current_serving_and_the_next_deploy_succeeds(ready, moment):
    project = ready
    before, known = current_of(project), release_names(project)
    # A big wheel takes a good half second to upload: time to kill fab inside.
    undo = with_ballast(project, BALLAST_MB << 20) if moment == "upload" else None
    if moment in ("venv", "install"):
        project.configure(**SLOW_INSTALL)
    try:
        with FabRun(project, "deploy", "--force",
                    pause_before="route" if moment == "switch" else None) as run:
            killed = KILLS[moment](project, run, known)
            assert run.wait(30) == -signal.SIGKILL
    finally:
        if undo:
            undo()  # the live project must not ship the ballast to later scenarios
    if moment == "upload":
        wheel = next((project.deploy_to / "releases" / killed).glob("*.whl"))
        assert wheel.stat().st_size < BALLAST_MB << 20, "the upload was not cut short"

    kept_serving(project, before)
    # kill -9 leaves the lock, by design: it names the killed deploy
    assert lock_info(project)["what"] == f"deploy {killed}"
    state = states(project)[killed]
    # A killed fab leaves its remote command running (no pty, no SIGHUP): let a venv or
    # install in progress finish first, or it recreates the release cleanup removes.
    wait_until(lambda: not installers_in(project, killed), 60, f"installers in {killed} to end", 0.1)
    project.fab("unlock")
    if state != "ready":
        refuses_rollback_to(project, killed)
    deploys_again(project, known | {killed})
    if state == "ready":
        raise PartialIsRollbackTarget(f"{killed} was killed before the switch, yet is 'ready'")
    assert state in ("partial", "failed")
    # Cleanup removed it, and stopped whatever of it still ran (e.g. its gunicorn).
    assert killed not in release_names(project)
    wait_until(lambda: not runs_from(project, killed), 20, f"processes of {killed} to end", 0.1)


# -- Ctrl-C and SIGTERM ---------------------------------------------------------------

@pytest.mark.parametrize("sig, moment", [
    (signal.SIGINT, "install"),
    (signal.SIGTERM, "install"),
    (signal.SIGINT, "paused"),
], ids=["SIGINT-install", "SIGTERM-install", "SIGINT-paused"])
def test_an_interrupt_stops_cleanly_unlocks_and_keeps_current_serving(ready, sig, moment):
    project = ready
    before, known = current_of(project), release_names(project)
    if moment == "install":
        project.configure(**SLOW_INSTALL)
    with FabRun(project, "deploy", "--force",
                pause_before="install" if moment == "paused" else None) as run:
        if moment == "paused":
            run.wait_for(r"paused before install$")
            release = new_release(project, known)
        else:
            run.wait_for(phase_done("venv"))
            release = new_release(project, known)
            wait_until(lambda: installing(project, release), 60, "the install to run")
        run.send(sig)
        try:
            code = run.wait(60 if moment == "install" else 10)
        except subprocess.TimeoutExpired:
            if moment == "paused":
                raise PauseIgnoresInterrupt(f"fab still runs 10s after {sig.name}") from None
            raise

    assert code == 1
    assert "interrupted" in one_line(run.stderr)
    assert "Traceback" not in run.stderr
    assert not lock_dir(project).exists()
    kept_serving(project, before)
    assert states(project)[release] in ("failed", "partial")
    refuses_rollback_to(project, release)


# -- a dropped SSH connection -----------------------------------------------------------

def test_a_dropped_connection_keeps_current_serving_and_the_next_deploy_succeeds(ready, host):
    project = ready
    before, known = current_of(project), release_names(project)
    project.configure(**SLOW_INSTALL)
    with FabRun(project, "deploy", "--force") as run:
        run.wait_for(phase_done("venv"))
        release = new_release(project, known)
        wait_until(lambda: installing(project, release), 60, "the install to run")
        dropped = sshd_session_pids(host)
        assert dropped, "fab must have a connection to drop"
        for pid in dropped:
            os.kill(pid, signal.SIGKILL)
        code = run.wait(60)

    assert code != 0
    message = one_line(run.stderr)
    assert host.host_string in message
    assert "Traceback" not in run.stderr
    kept_serving(project, before)
    if lock_dir(project).exists():
        # Not released after the drop: the next deploy must name the dropped one.
        refused = project.fab("deploy", check=False)
        assert refused.returncode != 0 and f"(deploy {release})" in refused.stderr, refused.stderr
        project.fab("unlock")
        print("after the drop the lock stayed; fab unlock cleared it")
    else:
        print("after the drop fabdeploy reconnected and released its lock")
    assert states(project)[release] in ("failed", "partial")
    refuses_rollback_to(project, release)
    deploys_again(project, known | {release})
    if "connection" not in message:
        raise LostConnectionNotNamed(message)


# -- kill -9 during the switch: a host is never left half switched (issue 16) -----------

SLOW_PREVIEW = '''

@app.get("/slow-health")
def slow_health():
    import time
    time.sleep(float(__import__("os").environ.get("FABDEPLOY_TEST_SLOW", "0")) or 2.0)
    return "ok"
'''


def live_target(project) -> str | None:
    """The release shared/run/live.sock points at (the proxy's traffic)."""
    link = project.deploy_to / "shared" / "run" / "live.sock"
    return link.readlink().name.removesuffix(".sock") if link.is_symlink() else None


def settled(project, timeout: float = 60) -> None:
    """The killed deploy's agent finished what it had begun: its lock is gone."""
    wait_until(lambda: not lock_dir(project).exists(), timeout, "the agent to finish the switch", 0.1)


def slow_checks(project) -> None:
    """Health checks that take two seconds: the route's check through nginx is long enough to kill in."""
    app = project.path / "guestbook" / "__init__.py"
    text = app.read_text()
    if "slow-health" not in text:
        app.write_text(text.replace("    return app\n", SLOW_PREVIEW.replace("\n", "\n    ") + "\n    return app\n"))
    project.configure(health_path="/slow-health")


@pytest.mark.parametrize("moment", ["inside route", "between route and switch", "inside switch"])
def test_kill_9_during_the_switch_leaves_current_and_the_live_link_agreeing(ready, moment):
    project = ready
    before, known = current_of(project), release_names(project)
    slow_checks(project)
    try:
        pause = "switch" if moment == "between route and switch" else None
        with FabRun(project, "deploy", "--force", pause_before=pause) as run:
            if moment == "inside route":
                run.wait_for(phase_done("start"), 120)  # the check through nginx now takes 2 s
            elif moment == "inside switch":
                run.wait_for(phase_done("route"), 120)
            else:
                run.wait_for(r"paused before switch$", 120)
            run.send(signal.SIGKILL)
            assert run.wait(30) == -signal.SIGKILL
        new = new_release(project, known)
        if moment == "between route and switch":
            # The client died between two requests: the live link moved, current did not. It
            # serves the checked release, and the next deploy puts the two back together.
            assert (current_of(project), live_target(project)) == (before, new)
            project.fab("unlock")
            healed = project.fab("deploy", "--force")
            assert f"repaired: live.sock pointed at {new}, not at current {before}" in healed.stdout
        else:
            # One request on the host: the agent finishes the switch it had begun.
            settled(project)
            assert current_of(project) == live_target(project) == new
            assert release_served(project.host) == new
            assert states(project)[new] == "ready"
        project.configure()
        deploys_again(project, release_names(project))
        assert current_of(project) == live_target(project)
    finally:
        project.configure()
