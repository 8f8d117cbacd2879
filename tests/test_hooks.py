"""Hooks and release identity on two production hosts (Debian 12 nspawn, set up by provision alone).

The project is a git repository (fabric.yaml ignored, as the tests rewrite
it), so each release records its commit. Tests run in file order and build
on each other's state; each docstring says what it starts from.
"""
import json
import os
import re
import subprocess
import time

import pytest

from harness.fleet import module_fleet
from harness.project import Project

pytestmark = [
    pytest.mark.nspawn,
    pytest.mark.skipif(os.geteuid() != 0, reason="systemd-nspawn hosts need root"),
]

APP = "guestbook"
ROOT = f"/srv/{APP}"
DUMP = "env | grep ^FABDEPLOY_ | sort"


fleet = module_fleet(2, "hooks")


def git(project, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args], cwd=project.path,
                          check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def project(fleet, tmp_path_factory):
    """The example app in a git repository, on both hosts, provisioned and deployed (1.0.0)."""
    project = Project(tmp_path_factory.mktemp("project") / APP, fleet, app=APP)
    (project.path / ".gitignore").write_text("fabric.yaml\n")
    git(project, "init", "-q")
    git(project, "add", ".")
    git(project, "commit", "-qm", "the guestbook")
    fleet.provision(project)
    project.fab("deploy")
    return project


@pytest.fixture
def config(project):
    yield project.configure
    project.configure()


def current(host) -> str:
    return host.run(f"readlink {ROOT}/current").stdout.strip().rsplit("/", 1)[-1]


def served_version(host) -> str:
    import urllib.request
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(host.url("/about"), timeout=10) as response:
        return json.loads(response.read())["version"]


def commit(project, version: str, message: str) -> str:
    project.set_version(version)
    git(project, "commit", "-qam", message)
    return git(project, "rev-parse", "HEAD").strip()


def variables(text: str) -> dict:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


# -- hooks ----------------------------------------------------------------------------------------

def test_a_failing_before_switch_hook_leaves_the_old_release_live(fleet, project, config, tmp_path):
    """From 1.0.0 on both: a remote before_switch hook fails on host2 only; `failed` hooks run."""
    before = [current(h) for h in fleet.hosts]
    failed_log = tmp_path / "failed.env"
    config(hooks={"before_switch": [{"remote": f"test $FABDEPLOY_HOST != {fleet.hosts[1].host_string}"}],
                  "failed": [{"local": f"{DUMP} > {failed_log}"},
                             {"remote": f"{DUMP} > {ROOT}/shared/failed.env"}]})
    commit(project, "1.1.0", "a release that will not go live")
    result = project.fab("deploy", check=False)
    assert result.returncode == 1
    line = result.stderr.strip().splitlines()
    assert line[0] == "fabdeploy: deploy failed on 1 of 2 hosts", result.stderr
    assert any("before_switch hook 'test $FABDEPLOY_HOST" in l and "failed (exit 1)" in l and
               "nothing was switched" in l for l in line), result.stderr
    for host, old in zip(fleet.hosts, before):
        assert current(host) == old and served_version(host) == "1.0.0"
        new = max(host.run(f"ls {ROOT}/releases").stdout.split())
        assert host.run(f"test -f {ROOT}/releases/{new}/FAILED", check=False).returncode == 0
        # The failed hook ran on each host (locked, in the live release) with the error.
        seen = variables(host.run(f"cat {ROOT}/shared/failed.env").stdout)
        assert seen["FABDEPLOY_HOOK"] == "failed" and seen["FABDEPLOY_PREVIOUS"] == old
        assert seen["FABDEPLOY_ERROR"].startswith("deploy failed on 1 of 2 hosts")
    local = variables(failed_log.read_text())
    assert local["FABDEPLOY_RELEASE"] == new and local["FABDEPLOY_ERROR"].startswith("deploy failed")


def test_a_failing_local_before_switch_hook_changes_nothing(fleet, project, config):
    """From 1.0.0 live (1.1.0 failed): a local before_switch hook exits 3."""
    before = [current(h) for h in fleet.hosts]
    config(hooks={"before_switch": {"local": "exit 3"}})
    result = project.fab("deploy", "--force", check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "fabdeploy: local: before_switch hook 'exit 3' failed (exit 3)"
        " (nothing was switched: the old release keeps serving)"), result.stderr
    assert [current(h) for h in fleet.hosts] == before
    assert {served_version(h) for h in fleet.hosts} == {"1.0.0"}


def test_after_deploy_sees_the_right_variables(fleet, project, config, tmp_path):
    """From 1.0.0: a deploy by --stage production, with local and remote after_deploy hooks."""
    local_env = tmp_path / "after_deploy.env"
    hosts = [h.host_string for h in fleet.hosts]
    config(stages={"production": {"hosts": hosts}},
           hooks={"after_deploy": [{"remote": f"{{ {DUMP}; echo PWD=$(pwd); echo FLASK=$(command -v flask); }}"
                                              f" > {ROOT}/shared/after_deploy.env"},
                                   {"local": f"{{ {DUMP}; echo PWD=$(pwd); }} > {local_env}"}]})
    previous = current(fleet.hosts[0])
    project.fab("deploy", "--stage", "production", "--force", hosts="")
    release = current(fleet.hosts[0])
    assert release != previous
    common = {"FABDEPLOY_HOOK": "after_deploy", "FABDEPLOY_RELEASE": release,
              "FABDEPLOY_HOSTS": ",".join(hosts), "FABDEPLOY_PREVIOUS": previous, "FABDEPLOY_STAGE": "production"}
    for host in fleet.hosts:
        seen = variables(host.run(f"cat {ROOT}/shared/after_deploy.env").stdout)
        assert seen == {**common, "FABDEPLOY_HOST": host.host_string, "PWD": f"{ROOT}/releases/{release}",
                        "FLASK": f"{ROOT}/releases/{release}/venv/bin/flask"}
    # A local hook inherits fab's environment, with whatever FABDEPLOY_* variable the
    # operator (or the test harness: FABDEPLOY_IMAGE_CACHE) set there.
    inherited = {k: v for k, v in os.environ.items() if k.startswith("FABDEPLOY_")}
    assert variables(local_env.read_text()) == {**inherited, **common, "PWD": str(project.path)}


def test_a_second_deploy_while_after_deploy_runs_is_refused_by_the_lock(fleet, project, config, tmp_path):
    """From the deploy above: the first deploy's after_deploy hook sleeps; a second one starts."""
    started = tmp_path / "after_deploy.started"
    config(hooks={"after_deploy": [{"remote": "sleep 1"}, {"local": f"touch {started} && sleep 8"}]})
    first = subprocess.Popen([project.fab_program, "-H", fleet.host_string, "deploy", "--force"], cwd=project.path,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not started.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert started.exists(), first.communicate()
        second = project.fab("deploy", "--force", check=False)
        assert first.poll() is None, "the first deploy ended before the second was refused"
    finally:
        out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert second.returncode == 1
    assert "locked by " in second.stderr and "(deploy " in second.stderr, second.stderr
    # Released once the hook was done: the next deploy gets the lock.
    project.configure()
    project.fab("deploy", "--force")


# -- release identity -------------------------------------------------------------------------------

def test_releases_and_status_show_the_commit_and_a_dirty_tree(fleet, project):
    """A clean commit deployed, then the same with an uncommitted change: warned, recorded dirty."""
    sha = commit(project, "1.2.0", "1.2.0")
    clean = project.fab("deploy")
    assert "uncommitted" not in clean.stderr
    init = project.path / "guestbook" / "__init__.py"
    init.write_text(init.read_text() + "\n# a change not committed\n")
    dirty = project.fab("deploy")
    assert ("has uncommitted changes (guestbook/__init__.py): the release records commit "
            f"{sha[:7]} with dirty: true") in dirty.stderr, dirty.stderr
    git(project, "checkout", "--", "guestbook/__init__.py")
    table = project.fab("releases", hosts=fleet.hosts[0].host_string).stdout
    header, *rows = [line for line in table.splitlines()[1:]]
    assert header.split() == ["RELEASE", "STATE", "VERSION", "COMMIT", "DEPLOYED", "AT", "BY"]
    newest, before = rows[-1].split(), rows[-2].split()
    assert newest[:5] == ["*", current(fleet.hosts[0]), "ready", "1.2.0", f"{sha[:7]}-dirty"], table
    assert before[3] == sha[:7], table
    status = project.fab("status", hosts=fleet.hosts[0].host_string).stdout
    assert f"(version 1.2.0, commit {sha[:7]}-dirty, " in status, status
    audit = [json.loads(line) for line in
             fleet.hosts[0].run(f"cat /var/log/fabdeploy/{APP}/audit.jsonl").stdout.splitlines()]
    assert (audit[-1]["commit"], audit[-1]["dirty"]) == (sha, True)
    assert (audit[-2]["commit"], audit[-2]["dirty"]) == (sha, False)


def test_version_from_git_names_the_release_after_its_commit(fleet, project, config):
    """version_from: git on the provisioned hosts: the helper takes the longer name."""
    sha = commit(project, "1.3.0", "1.3.0")
    git(project, "tag", "v1.3.0")
    config(version_from="git", hooks={"after_rollback": {"remote": f"{DUMP} > {ROOT}/shared/after_rollback.env"}})
    project.fab("deploy")
    for host in fleet.hosts:
        release = current(host)
        assert re.fullmatch(rf"\d{{8}}-\d{{6}}-\d{{3}}-{sha[:7]}", release), release
        assert host.run(f"systemctl is-active {APP}@{release}.service").stdout.strip() == "active"
        meta = json.loads(host.run(f"cat {ROOT}/releases/{release}/RELEASE.json").stdout)
        assert (meta["version"], meta["commit"], meta["dirty"]) == ("v1.3.0", sha, False)
    named = current(fleet.hosts[0])
    project.fab("rollback")  # a git-named release and a time-named one, in order
    back = current(fleet.hosts[0])
    assert back < named and not back.endswith(sha[:7])
    seen = variables(fleet.hosts[0].run(f"cat {ROOT}/shared/after_rollback.env").stdout)
    assert (seen["FABDEPLOY_HOOK"], seen["FABDEPLOY_RELEASE"], seen["FABDEPLOY_PREVIOUS"]) == (
        "after_rollback", back, named)
