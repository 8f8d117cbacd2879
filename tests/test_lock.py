"""Issue 3, the lock: atomic, says who holds it and since when, released on failure, clearable."""
import datetime as dt
import getpass
import json
import multiprocessing
import os
import re
import signal
import socket
import time
from pathlib import Path

import pytest
from faults import (FabRun, audit_events, lock_dir, lock_info, one_line, release_names,
                    version_served)

from fabdeploy import agent

TRIALS = 200
WHO = f"{getpass.getuser()}@{socket.gethostname()}"


# -- the lock itself, raced locally ----------------------------------------------

def racy_lock(root: str, info_json: str) -> bool:
    """A lock that checks, then creates: the kind that loses races."""
    lock = os.path.join(root, ".fabdeploy", "lock")
    if os.path.isdir(lock):
        return False
    time.sleep(0)  # yield, as any real check-then-create does somewhere
    os.makedirs(lock, exist_ok=True)
    with open(os.path.join(lock, "info.json"), "w") as f:
        f.write(info_json)
    return True


def racer(lock_fn, root: str, who: str, barrier, results) -> None:
    barrier.wait()  # both processes take the lock at the same instant
    results.put((who, lock_fn(root, json.dumps({"who": who}))))


def race(lock_fn, root: Path) -> dict:
    """Two processes, released together by a barrier, each trying to take the lock."""
    barrier, results = multiprocessing.Barrier(2), multiprocessing.Queue()
    procs = [multiprocessing.Process(target=racer, args=(lock_fn, str(root), f"racer-{n}", barrier, results))
             for n in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(10)
    return dict(results.get(timeout=5) for _ in procs)


def race_trials(tmp_path: Path, lock_fn) -> list[tuple[dict, dict]]:
    """TRIALS races: who won, and what the lock says afterwards."""
    outcomes = []
    for n in range(TRIALS):
        root = tmp_path / str(n)
        (root / ".fabdeploy").mkdir(parents=True)
        won = race(lock_fn, root)
        info = json.loads((root / ".fabdeploy" / "lock" / "info.json").read_text())
        outcomes.append((won, info))
    return outcomes


def fabdeploy_lock(root: str, info_json: str) -> bool:
    """The agent's take_lock, on the lock path the layout gives it."""
    return agent.take_lock(os.path.join(root, ".fabdeploy", "lock"), info_json)


def test_the_lock_has_exactly_one_winner_per_race(tmp_path):
    """fabdeploy's lock (the agent's take_lock, run on the server) under a real race."""
    for won, info in race_trials(tmp_path, fabdeploy_lock):
        assert sorted(won.values()) == [False, True], won
        # The lock names the winner: the loser never overwrote what the winner recorded.
        assert info["who"] == next(who for who, ok in won.items() if ok)


def test_the_race_harness_catches_a_check_then_create_lock(tmp_path):
    """The harness really makes racers overlap: a racy lock double-wins."""
    double_wins = sum(all(won.values()) for won, _ in race_trials(tmp_path, racy_lock))
    assert double_wins >= 1, f"{double_wins} of {TRIALS}"


# -- the lock on a real host ----------------------------------------------------

def paused_deploy(project, phase: str = "venv") -> FabRun:
    """A deploy that holds the lock, paused before `phase`."""
    run = FabRun(project, "deploy", pause_before=phase)
    run.wait_for(rf"paused before {phase}$")
    return run


def locked_by(stderr: str, release: str) -> int:
    """The lock's age from fab's one-line refusal, which must name holder and release."""
    line = one_line(stderr)
    match = re.search(rf"locked by {re.escape(WHO)} \(deploy {release}\) for (\d+)s", line)
    assert match, line
    assert "fab unlock" in line
    return int(match.group(1))


@pytest.mark.host
def test_the_lock_records_who_when_and_what(project):
    with paused_deploy(project) as run:
        release = release_names(project).pop()
        info = lock_info(project)
        assert info["who"] == WHO
        assert info["what"] == f"deploy {release}"
        taken = dt.datetime.fromisoformat(info["when"])
        assert abs((dt.datetime.now(dt.timezone.utc) - taken).total_seconds()) < 60
        run.send(signal.SIGKILL)


@pytest.mark.host
def test_a_second_deploy_fails_at_once_naming_the_holder_and_the_age(project):
    with paused_deploy(project) as holder:
        release = lock_info(project)["what"].split()[1]
        time.sleep(2)  # so the lock's age is at least 2s
        started = time.monotonic()
        second = project.fab("deploy", check=False)
        took = time.monotonic() - started
        assert second.returncode != 0
        assert locked_by(second.stderr, release) >= 2
        assert took < 5, f"the second deploy took {took:.1f}s to give up"
        # The second deploy stopped at the lock: it made no release of its own.
        assert release_names(project) == {release}
        # rollback takes the same lock
        rollback = project.fab("rollback", check=False)
        assert rollback.returncode != 0
        locked_by(rollback.stderr, release)
        assert holder.proc.poll() is None, "the holder must still be running"
        holder.send(signal.SIGKILL)


@pytest.mark.host
def test_kill_9_leaves_a_stale_lock_that_deploy_reports_and_unlock_clears(project):
    with paused_deploy(project) as killed:
        release = lock_info(project)["what"].split()[1]
        killed.send(signal.SIGKILL)
        assert killed.wait() == -signal.SIGKILL
    time.sleep(2)
    refused = project.fab("deploy", check=False)
    assert refused.returncode != 0
    assert locked_by(refused.stderr, release) >= 2

    cleared = project.fab("unlock")
    assert re.search(rf"removed the lock held by {re.escape(WHO)} \(deploy {release}, \d+s old\)",
                     cleared.stdout), cleared.stdout
    assert not lock_dir(project).exists()
    assert audit_events(project)[-1]["event"] == "unlock"
    assert "not locked" in project.fab("unlock").stdout

    project.fab("deploy")
    assert version_served(project.host) == "1.0.0"
    assert not lock_dir(project).exists()


@pytest.mark.host
def test_a_deploy_that_fails_after_locking_releases_the_lock(project, host):
    # releases/ not writable: the deploy takes the lock, then fails making its release.
    releases = project.deploy_to / "releases"
    host.run_as_user(f"mkdir -p {releases} && chmod 0555 {releases}")
    result = project.fab("deploy", check=False)
    assert result.returncode != 0
    assert re.search(rf"creating {releases}/[\d-]+ failed \(\[Errno 13\] Permission denied\)",
                     result.stderr), result.stderr
    assert "Traceback" not in result.stderr
    assert "] lock " in result.stdout, "the deploy must have got as far as the lock"
    assert not lock_dir(project).exists()
    assert audit_events(project)[-1]["event"] == "failed"
    host.run_as_user(f"chmod 0755 {releases}")

