"""Round trips, counted by a relay in front of sshd: a redeploy within about ten, from anywhere.

The relay (harness/relay.py) holds every byte a few milliseconds each way
and counts request/response turns: a turn begins when the client sends
after an answer to its last turn came back. round_trips() adds the TCP
handshake and counts the channel's close, which nobody waits for: an upper
bound on the round trips a deploy waited for. These are counts, not times.

The floor, with paramiko's handshake: TCP, key exchange (2), service
request, authentication, the channel's open: six; the agent's start goes
with the first request, so a task done in one request waits for seven.
"""
import json

import pytest

from fabdeploy import memo

from harness.relay import Relay, trust_relay

pytestmark = pytest.mark.host

BUDGET = {  # the counted round trips each may take; docs/benchmarks.md has them measured
    "code-change redeploy": 10,  # lock with the exec; install, switch and clean up in one request
    "no-change redeploy": 9,     # the lock op sees the wheel serves already: no lock, no unlock
    "rollback": 9,               # planned from the facts last seen, checked by the agent: one request
}


@pytest.fixture
def relay(project, host):
    project.fab("deploy")
    with Relay(host.ssh_port, delay_ms=5) as relay:
        trust_relay(host, relay)
        yield relay


def counted(project, relay, *args) -> tuple[int, str]:
    relay.reset()
    result = project.fab(*args, "--json", hosts=relay.host_string(project.host))
    assert relay.wait_idle(), "the relay still saw traffic after fab ended"
    assert [c.connected for c in relay.connections()] == [True], "one connection, made by this run"
    return relay.round_trips(), result.stdout


def test_a_redeploy_a_no_change_deploy_and_a_rollback_stay_within_their_round_trips(project, relay):
    project.set_version("1.0.1")
    trips, out = counted(project, relay, "deploy")
    assert json.loads(out)["ok"]
    found = {"code-change redeploy": trips}
    found["no-change redeploy"], out = counted(project, relay, "deploy")
    assert json.loads(out)["hosts"][0]["unchanged"] is True
    found["rollback"], out = counted(project, relay, "rollback")
    assert json.loads(out)["ok"]
    print("counted round trips:", found)
    assert all(found[name] <= BUDGET[name] for name in BUDGET), found
    # Each is well above the handshake alone: the relay really saw the deploys.
    assert min(found.values()) >= 7, found


def test_a_rollback_from_an_old_memory_takes_at_most_one_more_round_trip_and_is_still_right(project, relay):
    """The host changed since fab last saw it (another machine deployed): the guard notices.

    At most one more, not exactly one: SSH's own turns vary by one from run to run
    (test_relay), so only budgets are asserted.
    """
    project.set_version("1.0.1")
    project.fab("deploy", hosts=relay.host_string(project.host))
    before = (project.deploy_to / "current").readlink().name
    cache = project_cache(project)
    remembered = {p: p.read_text() for p in cache.glob("*.json")}
    project.set_version("1.0.2")
    project.fab("deploy", hosts=relay.host_string(project.host))
    served = (project.deploy_to / "current").readlink().name
    for path, text in remembered.items():  # as if this machine had not seen the last deploy
        path.write_text(text)
    trips, out = counted(project, relay, "rollback")
    result = json.loads(out)
    assert result["ok"], out
    back = (project.deploy_to / "current").readlink().name
    # The release before the one served: the memory, one deploy old, would have gone one further.
    assert back == before and back != served, (back, before, served)
    assert trips <= BUDGET["rollback"] + 1, trips


def project_cache(project):
    """Where fab keeps what it last saw of hosts (memo.py): under the user's cache."""
    return memo.path_for("x", "x", "x").parent
