"""Issue 16: a dry run lists exactly what the deploy then does on that host, no more, no less.

The dry run's "would ..." lines, and what `fab --echo deploy` shows it did,
compared action by action on a fresh host and on a deployed one; only the
release's name and the clock differ between the two runs.
"""
import re

import pytest

pytestmark = pytest.mark.host

VARIES = [  # what differs between two runs a second apart
    (re.compile(r"\d{8}-\d{6}-\d{3}"), "<release>"),
    (re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00"), "<time>"),
]


def actions(out: str, host_string: str, dry: bool) -> list[str]:
    """The action lines of a run, in order, as the dry run words them (without "would ")."""
    found = []
    prefix = f"[{host_string}] "
    for line in out.splitlines():
        if (not line.startswith(prefix) or re.match(r"^\S+ +\d+\.\d\ds$", line[len(prefix):])
                or "is already current" in line):
            continue  # not the host's, a phase's line, or the outcome
        text = line[len(prefix):]
        if dry:
            if not text.startswith(("would ", "    ")):
                continue
            text = text.removeprefix("would ")
        for pattern, word in VARIES:
            text = pattern.sub(word, text)
        found.append(text)
    return found


def compare(project, host) -> tuple[list[str], list[str]]:
    planned = actions(project.fab("deploy", "--dry-run").stdout, host.host_string, dry=True)
    done = actions(project.fab("--echo", "deploy").stdout, host.host_string, dry=False)
    return planned, done


def test_the_dry_run_of_a_first_deploy_is_what_it_then_does(project, host):
    planned, done = compare(project, host)
    assert planned == done
    assert any(a.startswith(f"create {project.deploy_to} and its directories") for a in planned), planned
    assert any(a.startswith("write ") and "site" not in a for a in planned)


def test_the_dry_run_of_a_redeploy_is_what_it_then_does(project, host):
    project.fab("deploy")
    project.set_version("1.0.1")
    planned, done = compare(project, host)
    assert planned == done
    # A deployed host is laid out, its site in place: neither is made again.
    assert not any(a.startswith("create ") and "its directories" in a for a in planned), planned
    assert not any(str(host.site_dir) in a for a in planned), planned


def test_the_dry_run_of_a_deploy_with_nothing_new_says_so_and_does_nothing(project, host):
    project.fab("deploy")
    dry = project.fab("deploy", "--dry-run").stdout
    assert actions(dry, host.host_string, dry=True) == []
    assert "is already current" in dry
    assert actions(project.fab("--echo", "deploy").stdout, host.host_string, dry=False) == []
