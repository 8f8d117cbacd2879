"""Issue 5: what makes a redeploy fast, each shown working on a real host.

Times are the benchmark's business (./dev bench, docs/benchmarks.md); these
tests show that each means does what it claims and costs no correctness.
"""
import json
import os
import re
import shutil
import socket
import time
import urllib.request
from pathlib import Path

import pytest
from fabric import Connection

from fabdeploy import buildenv
from fabdeploy.ops import Phase, Sh
from fabdeploy.remote import Host, PromptAcks
from harness.project import EXAMPLE

pytestmark = pytest.mark.host

# A greeting the same length as the example's ("Hello from the guestbook"): the
# changed module keeps its size, which is all a careless bytecode check looks at.
SAME_SIZE_GREETING = "Howdy from the guestbook"


def served(host) -> str:
    with urllib.request.urlopen(host.url, timeout=10) as response:
        return response.read().decode()


def current(project) -> Path:
    return (project.deploy_to / "current").resolve()


def site_packages(release: Path) -> Path:
    (site,) = (release / "venv" / "lib").glob("python3*/site-packages")
    return site


def bytecode(source: Path) -> Path:
    """The one .pyc the release's Python would load for `source`."""
    (pyc,) = (source.parent / "__pycache__").glob(f"{source.stem}.cpython-*.pyc")
    return pyc


def pyc_flags(pyc: Path) -> int:
    """PEP 552: bit 0 set = hash-based, bit 1 set = checked against the source."""
    return int.from_bytes(pyc.read_bytes()[4:8], "little")


def test_every_module_of_a_release_is_compiled_before_it_serves(project, host):
    project.fab("deploy")
    site = site_packages(current(project))
    sources = sorted(site.rglob("*.py"))
    assert len(sources) > 100  # Flask, Werkzeug, Jinja2, gunicorn and the app
    missing = [str(s.relative_to(site)) for s in sources
               if not list((s.parent / "__pycache__").glob(f"{s.stem}.cpython-*.pyc"))]
    assert missing == []
    # Checked-hash bytecode: Python itself rejects a .pyc whose source differs.
    for module in ("guestbook/__init__.py", "flask/app.py"):
        assert pyc_flags(bytecode(site / module)) == 0b11, module


def test_a_redeploy_links_unchanged_bytecode_and_compiles_changed_code(project, host):
    project.fab("deploy")
    old = site_packages(current(project))
    project.set_version("1.0.1", greeting=SAME_SIZE_GREETING)
    changed = project.path / "guestbook" / "__init__.py"
    assert len(changed.read_bytes()) == len((old / "guestbook" / "__init__.py").read_bytes())
    project.fab("deploy")
    new = site_packages(current(project))
    assert new != old
    # A dependency's bytecode is the previous release's, linked, not compiled again.
    assert bytecode(new / "flask" / "app.py").stat().st_ino == bytecode(old / "flask" / "app.py").stat().st_ino
    # The app's changed module (same size, new bytes) got bytecode of its own ...
    app_old, app_new = bytecode(old / "guestbook" / "__init__.py"), bytecode(new / "guestbook" / "__init__.py")
    assert app_new.stat().st_ino != app_old.stat().st_ino
    assert app_new.read_bytes() != app_old.read_bytes()
    # ... and the new code is what serves.
    assert served(host).startswith(f"{SAME_SIZE_GREETING} 1.0.1:")


def listing(top: Path) -> list[str]:
    """Every path under top, relative; os.walk skips what a running rm deletes meanwhile."""
    found = []
    for folder, dirs, files in os.walk(top):
        found += [os.path.relpath(os.path.join(folder, n), top) for n in dirs + files]
    return found


def test_removed_releases_leave_at_once_and_are_deleted_in_the_background(project, host):
    """Cleanup renames old releases out of releases/ and does not wait for their deletion.

    The first release gets a file its owner cannot delete (a read-only
    directory), so deleting it in place would leave it half there.
    """
    project.configure(keep_releases=2)
    project.fab("deploy")
    first = current(project)
    host.run_as_user(f"mkdir {first}/stuck && touch {first}/stuck/file && chmod 555 {first}/stuck")
    try:
        made = [first.name]
        for _ in range(3):
            project.fab("deploy", "--force")  # the same wheel as a new release: quick
            made.append(current(project).name)
        releases = sorted(p.name for p in (project.deploy_to / "releases").iterdir())
        assert len(releases) == 2 and current(project).name in releases and first.name not in releases
        # Nothing of the removed releases is left running: no process runs from their directories
        # (their servers had their stop signal from cleanup and finish their requests first).
        removed = [name for name in made if name not in releases]
        assert len(removed) == 2
        deadline = time.monotonic() + 30
        while running_from(project, removed) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert running_from(project, removed) == []
        assert all(running_from(project, [name]) for name in releases), "the kept ones still run"
        # The background deletion removes all but what nobody could delete.
        trash = project.deploy_to / ".fabdeploy" / "trash"
        deadline = time.monotonic() + 20
        while len(listing(trash)) > 4 and time.monotonic() < deadline:
            time.sleep(0.1)
        left = sorted(path.split("/", 1)[1] for path in listing(trash) if "/" in path)
        assert left == [first.name, f"{first.name}/stuck", f"{first.name}/stuck/file"]
    finally:
        host.run_as_user(f"chmod -R u+w {project.deploy_to}", check=False)


def running_from(project, names: list[str]) -> list[str]:
    """Command lines of live processes that run from one of these releases' directories."""
    wanted = [f"{project.deploy_to}/releases/{name}/".encode() for name in names]
    found = []
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            continue
        if state != "Z" and any(w in cmdline for w in wanted):
            found.append(cmdline.decode(errors="replace"))
    return found


def test_a_connection_sends_and_acknowledges_without_delay(host):
    conn = Connection(host.host_string, connect_kwargs={"key_filename": str(host.key_file)})
    remote = Host(conn, str(host.known_hosts))
    remote.connect()
    try:
        sock = conn.transport.sock
        assert isinstance(sock, PromptAcks)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        # The agent runs commands on the host and keeps both streams apart.
        reply = remote.execute([Phase("t", (Sh("echo out; echo err >&2; exit 3", check=False, key="r"),))])
        ran = reply.results["r"]
        assert (ran["stdout"], ran["stderr"], ran["exit"]) == ("out\n", "err\n", 3)
        # Megabytes on both streams at once: read as they come, no deadlock.
        reply = remote.execute([Phase("t", (Sh("head -c 3000000 /dev/zero | tr '\\0' o &"
                                                " head -c 3000000 /dev/zero | tr '\\0' e >&2; wait",
                                                key="r"),))])
        ran = reply.results["r"]
        assert (len(ran["stdout"]), len(ran["stderr"]), ran["exit"]) == (3000000, 3000000, 0)
        assert set(ran["stdout"]) == {"o"} and set(ran["stderr"]) == {"e"}
    finally:
        remote.close()


def test_a_failed_build_leaves_the_host_untouched_though_it_connected_meanwhile(project, host, tmp_path):
    """The build runs while the hosts connect; it fails before anything changes there."""
    pyproject = project.path / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('packages = ["guestbook"',
                                                       'packages = ["missing"'))
    result = project.fab("deploy", "--json", check=False,
                         env={"PIP_NO_INDEX": "1", "XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert result.returncode == 1
    doc = json.loads(result.stdout)
    assert doc["ok"] is False and doc["error"].startswith("local: building the wheel of ")
    (entry,) = doc["hosts"]
    assert "connect" in entry["phases"] and "lock" not in entry["phases"]
    assert not project.deploy_to.exists()


def phases(output: str) -> list[str]:
    return re.findall(r"^\[\S+\] (\w+) +\d+\.\d+s$", output, re.M)


def test_a_deployed_host_is_locked_while_the_wheel_builds_a_fresh_one_after(project, host, tmp_path):
    first = phases(project.fab("deploy").stdout)
    assert first.index("build") < first.index("lock") and first.count("lock") == 1, first
    release = current(project)
    project.set_version("1.0.1")
    second = phases(project.fab("deploy").stdout)
    assert second.index("lock") < second.index("build") and second.count("lock") == 1, second
    # A build that fails after the lock was taken: the lock goes, and nothing else moved.
    pyproject = project.path / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('packages = ["guestbook"',
                                                       'packages = ["missing"'))
    before = current(project)
    result = project.fab("deploy", check=False,
                         env={"PIP_NO_INDEX": "1", "XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert result.returncode == 1 and "building the wheel of " in result.stderr
    assert phases(result.stdout)[:2] == ["connect", "lock"]
    assert current(project) == before != release
    assert not (project.deploy_to / ".fabdeploy" / "lock").exists()
    audit = (project.deploy_to / ".fabdeploy" / "audit.jsonl").read_text().splitlines()
    assert [json.loads(line)["event"] for line in audit] == ["deploy", "deploy"]


def test_a_new_version_number_does_not_ask_the_build_backend_again(tmp_path, monkeypatch):
    """Whether fabdeploy's own env can build is asked of the backend (a subprocess, 0.25 s)
    once per [build-system], not once per pyproject.toml: a version bump changes the file."""
    project, cache = tmp_path / "guestbook", tmp_path / "cache"
    shutil.copytree(EXAMPLE, project, ignore=shutil.ignore_patterns("*.egg-info", "build"))

    def suffices() -> bool:
        return buildenv.here_suffices(buildenv.build_system(project), project, cache)

    assert suffices() is True  # this env has setuptools and wheel
    pyproject = project / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('version = "1.0.0"', 'version = "1.0.1"'))

    asked = []
    monkeypatch.setattr("build.ProjectBuilder", lambda *a, **k: asked.append(a) or 1 / 0)
    assert suffices() is True
    assert asked == []
    # Another build system is asked about (here the stand-in fails: a build env, to be safe).
    pyproject.write_text(pyproject.read_text().replace('requires = [', 'requires = ["wheel", '))
    assert suffices() is False
    assert len(asked) == 1
