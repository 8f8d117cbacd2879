"""Smoke tests for the systemd-nspawn Debian 12 test hosts (harness/nspawn.py)."""

import contextlib
import os
import pathlib
import subprocess
import urllib.request

import pytest

from harness.nspawn import mounts_under, nspawn_hosts

pytestmark = [
    pytest.mark.nspawn,
    pytest.mark.skipif(os.geteuid() != 0, reason="systemd-nspawn hosts need root"),
]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """Two booted hosts, and the exit stack that stops them (the last test closes it early)."""
    with contextlib.ExitStack() as stack:
        hosts = stack.enter_context(nspawn_hosts(2, tmp_path_factory.mktemp("nspawn")))
        yield hosts, stack


@pytest.fixture
def hosts(fleet):
    """Just the hosts."""
    return fleet[0]


def ssh(key, known_hosts, target, command):
    """Plain OpenSSH as a deploy tool would use it: strict checking, no agent, no config."""
    argv = ["ssh", "-F", "/dev/null", "-i", str(key), "-o", "IdentitiesOnly=yes",
            "-o", f"UserKnownHostsFile={known_hosts}", "-o", "StrictHostKeyChecking=yes",
            "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", target, command]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def test_root_logs_in_with_strict_known_hosts(hosts):
    for host in hosts:
        result = ssh(host.root_key_file, host.known_hosts, f"root@{host.address}", "whoami")
        assert (result.returncode, result.stdout) == (0, "root\n"), result.stderr


def test_unknown_host_key_is_refused(hosts, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    result = ssh(hosts[0].root_key_file, empty, f"root@{hosts[0].address}", "true")
    assert result.returncode == 255
    assert "Host key verification failed" in result.stderr


def test_a_fresh_host_has_no_deploy_user_and_no_sudo_rule(hosts):
    """As a new VPS: provision makes the deploy user and its one sudo rule, nothing else does."""
    for host in hosts:
        assert host.run("id deploy", check=False).returncode != 0
        assert host.run("ls /etc/sudoers.d").stdout.split() == ["README"]
        assert host.run("getent group sudo").stdout.strip().endswith(":")  # nobody in it


def test_what_provision_needs_offline_is_installed_but_not_running(hosts):
    host = hosts[0]
    for program in ("apache2ctl", "certbot", "pg_ctlcluster", "apxs", "gcc", "logrotate", "sqlite3"):
        assert host.run(f"command -v {program}", check=False).returncode == 0, program
    for unit in ("apache2", "postgresql", "certbot.timer"):
        assert host.run(f"systemctl is-active {unit}", check=False).stdout.strip() == "inactive", unit


def test_a_host_answers_over_ipv6_too(hosts):
    no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    for host in hosts:
        with no_proxy.open(host.url("/", ipv6=True), timeout=10) as response:
            assert b"Welcome to nginx" in response.read()


def test_root_logs_in_by_key_only(hosts):
    host = hosts[0]
    result = ssh(host.root_key_file, host.known_hosts, f"root@{host.address}", "id -u")
    assert (result.returncode, result.stdout) == (0, "0\n"), result.stderr
    config = host.run("sshd -T").stdout.splitlines()
    assert "permitrootlogin without-password" in config
    assert "passwordauthentication no" in config


def test_systemd_is_pid_1_and_the_system_is_running(hosts):
    for host in hosts:
        assert host.run("cat /proc/1/comm").stdout == "systemd\n"
        # --wait: ssh answers before boot has fully finished.
        state = host.run("timeout 60 systemctl is-system-running --wait", check=False)
        failed = host.run("systemctl --failed --no-legend").stdout
        assert state.stdout == "running\n", failed


def test_nginx_answers_on_port_80_from_the_host(hosts):
    no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    for host in hosts:
        with no_proxy.open(host.url("/"), timeout=10) as response:
            assert response.status == 200
            assert b"Welcome to nginx" in response.read()


def test_python_venv_is_available(hosts):
    result = hosts[0].run("python3 -m venv --without-pip /tmp/venv && /tmp/venv/bin/python -V")
    assert result.stdout.startswith("Python 3.11")


def test_chattr_from_outside_binds_inside(hosts):
    host = hosts[0]
    host.run("mkdir -p /srv/locked")
    subprocess.run(["chattr", "+i", str(host.root / "srv/locked")], check=True)
    result = host.run("touch /srv/locked/file", check=False)
    assert result.returncode != 0 and "Operation not permitted" in result.stderr
    # Left immutable on purpose: stopping must still delete the tree.


def test_hosts_are_distinct(hosts):
    first, second = hosts
    assert first.address != second.address
    assert first.known_hosts.read_text().split()[2] != second.known_hosts.read_text().split()[2]
    assert first.run("hostname").stdout != second.run("hostname").stdout


def test_stopping_leaves_nothing_behind(fleet):
    # Runs last (pytest keeps file order): it stops the module's hosts to inspect the cleanup.
    hosts, stack = fleet
    stack.close()
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    for host in hosts:
        assert host.proc.poll() is not None
        assert not pathlib.Path(f"/proc/{host.proc.pid}").exists()
        assert not any(host.machine in cmdline for cmdline in all_cmdlines())
        assert host.machine not in netns
        assert host.veth not in links
        assert not host.tree.exists()
        assert not any(cgroup.exists() for cgroup in host.cgroups)
        assert not mounts_under(host.dir)


def all_cmdlines():
    """Command lines of every process on the machine."""
    for path in pathlib.Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            yield path.read_bytes().replace(b"\0", b" ").decode(errors="replace")
