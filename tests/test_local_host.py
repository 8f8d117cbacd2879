"""The loopback host harness: real sshd, nginx and (as root) a throwaway user."""
import contextlib
import http.client
import io
import json
import os
import pathlib
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

import fabric
import paramiko
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # so that plain `pytest` finds harness/, not only `python -m pytest`
from harness.local_host import LocalHost  # noqa: E402

pytestmark = pytest.mark.host


@pytest.fixture
def workdir():
    """A 0755 directory under /tmp: pytest's tmp_path is below a 0700 directory."""
    path = pathlib.Path(tempfile.mkdtemp(prefix="fdt-test-", dir="/tmp"))
    path.chmod(0o755)
    yield path / "host"  # not created yet: the harness must create it
    LocalHost(path / "host").stop()  # safety net from state.json, should a test fail midway
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def host(workdir):
    with LocalHost(workdir) as host:
        yield host


def ssh(host, command, **kw):
    return subprocess.run(host.ssh_argv(command, **kw), capture_output=True, text=True, timeout=30)


def alive(pid):
    """Running and not a zombie (zombies wait for a lazy init to reap them)."""
    try:
        state = pathlib.Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def children(pid):
    found = []
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            if pathlib.Path(f"/proc/{p}/stat").read_text().rpartition(")")[2].split()[1] == str(pid):
                found.append(int(p))
        except OSError:
            pass
    return found


def fetch(url, expected, timeout=10):
    """GET url until it returns `expected` (a reload applies asynchronously)."""
    deadline, body = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            body = urllib.request.urlopen(url, timeout=2).read().decode()
            if body == expected:
                return body
        except OSError:
            pass
        time.sleep(0.1)
    return body


def test_ssh_login_with_key_and_strict_known_hosts(host):
    result = ssh(host, "id -un")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == host.user
    assert host.known_hosts.read_text().startswith(f"[127.0.0.1]:{host.ssh_port} ssh-ed25519 AAAA")
    assert len(host.known_hosts.read_text().splitlines()) == 1
    assert oct(host.key_file.stat().st_mode & 0o777) == "0o600"
    assert host.host_string == f"{host.user}@127.0.0.1:{host.ssh_port}"


def test_root_login_refused(host):
    if os.geteuid() != 0:
        pytest.skip("only a created user is distinct from root")
    argv = host.ssh_argv("true")
    argv[-2] = f"root@{host.host}"
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert result.returncode == 255


def test_wrong_host_key_refused(host, workdir):
    other = workdir.parent / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    wrong = workdir.parent / "wrong_known_hosts"
    key = " ".join(other.with_suffix(".pub").read_text().split()[:2])
    wrong.write_text(f"[127.0.0.1]:{host.ssh_port} {key}\n")
    result = ssh(host, "true", known_hosts=wrong)
    assert result.returncode == 255
    assert "REMOTE HOST IDENTIFICATION HAS CHANGED" in result.stderr


def test_unknown_host_refused(host, workdir):
    empty = workdir.parent / "empty_known_hosts"
    empty.write_text("")
    result = ssh(host, "true", known_hosts=empty)
    assert result.returncode == 255
    assert "Host key verification failed" in result.stderr


def test_settings_shape(host):
    settings = host.settings("demo")
    assert settings["deploy_to"] == "~/srv/demo"
    assert settings["known_hosts"] == str(host.known_hosts)
    assert settings["server"] == {"manager": "pidfile"}
    assert settings["proxy"]["listen"] == host.http_port
    assert settings["proxy"]["site_path"] == str(host.site_dir / "demo.conf")
    assert host.fabric_yaml("demo") == {"connect_kwargs": {"key_filename": str(host.key_file)},
                                        "fabdeploy": settings}
    assert host.url == f"http://127.0.0.1:{host.http_port}/"


def test_user_deploys_a_site_and_reloads_nginx(host):
    nginx = host.settings("demo")["proxy"]
    site = f"server {{ listen 127.0.0.1:{host.http_port}; location / {{ return 200 'hello fdt'; }} }}\n"
    result = subprocess.run(host.ssh_argv(f"cat > {nginx['site_path']}"), input=site,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert pathlib.Path(nginx["site_path"]).stat().st_uid == pwd.getpwnam(host.user).pw_uid
    for command in (nginx["test_command"], nginx["reload_command"]):
        result = ssh(host, command)
        assert result.returncode == 0, result.stderr
    assert fetch(host.url, "hello fdt") == "hello fdt"


def test_broken_site_fails_nginx_test(host):
    nginx = host.settings("demo")["proxy"]
    result = ssh(host, f"echo 'server {{ nonsense; }}' > {nginx['site_path']} && {nginx['test_command']}")
    assert result.returncode == 1
    assert "nonsense" in result.stderr
    assert host.run_as_user(f"rm {nginx['site_path']}").returncode == 0


def test_run_as_user(host):
    result = host.run_as_user("id -un; echo $HOME")
    assert result.stdout.split() == [host.user, str(host.home)]
    assert host.run_as_user("exit 3", check=False).returncode == 3


def test_start_is_idempotent(host):
    pid = json.loads((host.workdir / "state.json").read_text())["sshd_pid"]
    assert host.start() is host
    assert json.loads((host.workdir / "state.json").read_text())["sshd_pid"] == pid


def test_stop_leaves_nothing_behind(workdir):
    host = LocalHost(workdir).start()
    state = json.loads((workdir / "state.json").read_text())
    # A daemon of the kind a deploy leaves behind: detached, with a pid file under ~/srv.
    app = f"fdt-test-{os.getpid()}"
    stray = host.run_as_user(f"mkdir -p ~/srv/{app}/shared/run\n"
                             "setsid sleep 600 </dev/null >/dev/null 2>&1 &\n"
                             f"echo $! | tee ~/srv/{app}/shared/run/stray.pid")
    pids = [state["sshd_pid"], state["nginx_pid"], int(stray.stdout),
            *children(state["sshd_pid"]), *children(state["nginx_pid"])]
    assert all(alive(p) for p in pids)
    host.stop()
    assert [p for p in pids if alive(p)] == []
    if os.geteuid() == 0:
        with pytest.raises(KeyError):
            pwd.getpwnam(host.user)
        assert not host.home.exists()
    host.stop()  # a second stop is harmless
    if os.geteuid() != 0:  # the home is real: tidy up
        shutil.rmtree(host.home / "srv" / app)
        with contextlib.suppress(OSError):
            (host.home / "srv").rmdir()
    assert json.loads((workdir / "state.json").read_text())["running"] is False


def test_stop_spares_a_recycled_pid(workdir):
    """A PID from state.json that now runs something else is left alone."""
    bystander = subprocess.Popen(["sleep", "60"])
    workdir.mkdir()
    (workdir / "state.json").write_text(json.dumps(
        {"running": True, "created_user": False, "sshd_pid": bystander.pid, "nginx_pid": bystander.pid}))
    LocalHost.load(workdir).stop()
    assert bystander.poll() is None
    bystander.kill()
    bystander.wait()


def test_sshd_failure_is_reported_with_its_log(workdir):
    class BrokenSshd(LocalHost):
        def _write_ssh_files(self):
            super()._write_ssh_files()
            (self.ssh_dir / "sshd_config").write_text("NoSuchOption yes\n")

    with pytest.raises(RuntimeError, match="NoSuchOption"):
        BrokenSshd(workdir).start()


def test_failed_start_cleans_up(workdir):
    class FailsLate(LocalHost):
        def _wait_for_ssh(self, timeout=15):
            raise RuntimeError("injected")

    with pytest.raises(RuntimeError, match="injected"):
        FailsLate(workdir).start()
    state = json.loads((workdir / "state.json").read_text())
    assert state["sshd_pid"] and state["nginx_pid"]
    assert not alive(state["sshd_pid"]) and not alive(state["nginx_pid"])
    if os.geteuid() == 0:
        with pytest.raises(KeyError):
            pwd.getpwnam(state["user"])


def test_cli_start_and_stop_from_separate_processes(workdir):
    cli = [sys.executable, "-m", "harness.local_host"]
    started = subprocess.run([*cli, "start", str(workdir)], cwd=REPO, capture_output=True,
                             text=True, timeout=60)
    assert started.returncode == 0, started.stderr
    state = json.loads(started.stdout)
    assert state == json.loads((workdir / "state.json").read_text())
    # The starting process has exited; its daemons serve on.
    host = LocalHost.load(workdir)
    assert (host.user, host.ssh_port, host.http_port) == (state["user"], state["ssh_port"], state["http_port"])
    assert ssh(host, "id -un").stdout.strip() == state["user"]
    stopped = subprocess.run([*cli, "stop", str(workdir)], cwd=REPO, capture_output=True,
                             text=True, timeout=60)
    assert stopped.returncode == 0, stopped.stderr
    assert not alive(state["sshd_pid"]) and not alive(state["nginx_pid"])
    if os.geteuid() == 0:
        with pytest.raises(KeyError):
            pwd.getpwnam(state["user"])


def test_fabric_connects_strictly_and_uploads(host):
    """What fabdeploy itself does: Fabric with fabric_yaml's key, known_hosts enforced, SFTP."""
    conf = host.fabric_yaml("demo")
    conn = fabric.Connection(host.host_string, connect_kwargs=conf["connect_kwargs"])
    conn.client.load_host_keys(conf["fabdeploy"]["known_hosts"])
    conn.client.set_missing_host_key_policy(paramiko.RejectPolicy())
    with conn:
        assert conn.run("id -un", hide=True, in_stream=False).stdout.strip() == host.user
        name = f"fdt-test-{os.getpid()}.txt"
        conn.put(io.StringIO("uploaded\n"), name)  # relative: resolved against the SFTP home
        assert (host.home / name).read_text() == "uploaded\n"
        conn.sftp().remove(name)


@pytest.fixture
def apache_host(workdir):
    with LocalHost(workdir, proxy="apache") as host:
        yield host


def test_apache_variant_serves_a_site_the_user_tests_and_reloads(apache_host, workdir):
    """proxy="apache": Apache httpd run by the user, configtest and graceful without sudo."""
    host = apache_host
    settings = host.settings("demo")
    assert settings["proxy"]["kind"] == "apache" and "nginx" not in settings
    apache = settings["proxy"]
    assert apache["listen"] == host.http_port
    assert apache["site_path"] == str(host.site_dir / "demo.conf")
    state = json.loads((workdir / "state.json").read_text())
    assert state["proxy"] == "apache" and alive(state["apache_pid"])
    # fabdeploy's preflight looks for apache2ctl on the user's PATH plus /usr/sbin.
    assert ssh(host, "PATH=$PATH:/usr/sbin command -v apache2ctl").returncode == 0
    site = (f"<VirtualHost *:{host.http_port}>\n"
            "    Header always set X-Fdt yes\n</VirtualHost>\n")
    result = subprocess.run(host.ssh_argv(f"cat > {apache['site_path']}"), input=site,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    for command in (apache["test_command"], apache["reload_command"]):
        result = ssh(host, command)
        assert result.returncode == 0, result.stderr
    assert headers_of(host.url).get("X-Fdt") == "yes"
    # A broken site fails the test command, with Apache's own message.
    result = ssh(host, f"echo 'Nonsense yes' > {apache['site_path']} && {apache['test_command']}")
    assert result.returncode != 0 and "Nonsense" in result.stderr
    pids = [state["apache_pid"], *children(state["apache_pid"])]
    LocalHost.load(workdir).stop()  # load() finds that Apache ran, and stops it by its PID
    assert [p for p in pids if alive(p)] == []


def headers_of(url, timeout=10):
    """The headers of an answer of any status, once a reload has applied."""
    deadline, parts = time.monotonic() + timeout, urllib.parse.urlsplit(url)
    while True:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=2)
        try:
            conn.request("GET", "/")
            response = conn.getresponse()
            response.read()
            if response.getheader("X-Fdt") or time.monotonic() > deadline:
                return dict(response.getheaders())
        except OSError:
            if time.monotonic() > deadline:
                raise
        finally:
            conn.close()
        time.sleep(0.1)
