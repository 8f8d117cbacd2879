"""Production hosts: three Debian 12 systemd-nspawn hosts, set up only by provision, one project.

The hosts boot as a new VPS does (root with a key, no deploy user, nginx's
stock site) and get nothing but `fab -H root@... provision` with the
project's fabric.yaml: the deploy user, its key, one sudo rule for
fabdeploy's helper. Tests run in file order and build on each other's
state (each docstring says what it starts from).

fabric.yaml sets app, wsgi and deploy_to, how to reach the hosts (known_hosts,
an operator key in connect_kwargs) and the key provision installs for the
deploy user. Tests add hosts, stages or other settings where they are the subject.
"""
import json
import os
import re
import shlex
import socket
import subprocess
import time
import urllib.request
from collections import Counter

import pytest

from harness.fleet import module_fleet
from load import Load, assert_no_failed_request
from harness.project import Project

pytestmark = [
    pytest.mark.nspawn,
    pytest.mark.skipif(os.geteuid() != 0, reason="systemd-nspawn hosts need root"),
]

APP = "guestbook"
ROOT = f"/srv/{APP}"
DEPLOY_PHASES = ["connect", "build", "lock", "wheelhouse", "upload", "venv", "install", "secret",
                 "init", "configure", "start", "route", "switch", "cleanup"]
PHASE_LINE = re.compile(r"^\[(\S+)\] (\w+) +\d+\.\d+s$", re.M)
INNER_PORT = 2222


fleet = module_fleet(3, "production")


@pytest.fixture(scope="module")
def project(fleet, tmp_path_factory):
    """The example app, configured for all three hosts, which provision set up."""
    project = Project(tmp_path_factory.mktemp("project") / APP, fleet, app=APP)
    project.provision_output = fleet.provision(project).stdout
    return project


@pytest.fixture
def config(project):
    """Lets a test add settings to fabric.yaml; the plain configuration comes back after."""
    yield project.configure
    project.configure()


# -- reading the hosts -----------------------------------------------------------

def get(url: str) -> urllib.request.addinfourl:
    """GET a URL directly, never through a proxy from the environment."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    return opener.open(url, timeout=10)


def served(host) -> tuple[str, str]:
    """(version, release) of the app at http://<address>/, as a visitor gets it."""
    with get(host.url("/")) as response:
        body = response.read().decode()
    with get(host.url("/about")) as response:
        release = json.loads(response.read())["release"]
    match = re.match(r".* (\d+\.\d+\.\d+): \d+ entries", body)
    assert match, f"{host.address} answered {body!r}"
    return match.group(1), release


def served_version(host) -> str:
    """Only the version the app answers with."""
    return served(host)[0]


def wait_until_served(host, expected: tuple[str, str], timeout: float = 30) -> tuple[str, str]:
    """served(host) once it is `expected`, else the last answer at the deadline.

    While a release restarts, nginx hands its requests to the backup (the
    previous release, kept warm): that answer is right, but not the one we wait for.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            seen = served(host)
        except (OSError, AssertionError) as exc:
            seen = repr(exc)
        if seen == expected or time.monotonic() > deadline:
            return seen
        time.sleep(0.25)


def current(host) -> str:
    """The release `current` points at on the host."""
    return host.run(f"readlink {ROOT}/current").stdout.strip().rsplit("/", 1)[-1]


def releases(host) -> list[str]:
    """The release directories on the host, oldest first."""
    return host.run(f"ls {ROOT}/releases").stdout.split()


def unit(release: str) -> str:
    """The systemd unit that runs a release."""
    return f"{APP}@{release}.service"


def unit_properties(host, name: str, *props: str) -> dict:
    """Properties of a unit, as `systemctl show` reports them."""
    out = host.run(f"systemctl show {shlex.quote(name)} -p {','.join(props)}").stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def wait_for_unit_state(host, name: str, state: str, timeout: float = 40) -> str:
    """The unit's ActiveState once it is `state`, or the last one seen at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        seen = unit_properties(host, name, "ActiveState")["ActiveState"]
        if seen == state or time.monotonic() > deadline:
            return seen
        time.sleep(0.25)


def unit_process_users(host, name: str) -> list[str]:
    """The users the unit's gunicorn master and its workers run as."""
    pid = unit_properties(host, name, "MainPID")["MainPID"]
    assert pid != "0", f"{name} has no main process"
    found = [line.split() for line in host.run(f"ps -o user=,comm= --pid {pid} --ppid {pid}").stdout.splitlines()]
    # tee copies the output into the journal as well: it is the deploy user's too, and no server.
    assert all(user == "deploy" for user, _ in found), found
    return [user for user, comm in found if comm != "tee"]


def public_listeners(host, kind: str = "t") -> set[tuple[str, str]]:
    """(port, process) for every TCP (kind t) or UDP (u) socket listening beyond loopback."""
    found = set()
    for line in host.run(f"ss -l{kind}npH").stdout.splitlines():
        local, process = line.split()[3], line.split()[-1]
        address, port = local.rsplit(":", 1)
        if address.strip("[]") not in ("::1",) and not address.startswith("127."):
            name = re.search(r'users:\(\("([^"]+)"', process)
            found.add((port, name.group(1) if name else process))
    return found


def phase_lines(output: str) -> Counter:
    """(host, phase) -> how many progress lines fab printed for it."""
    return Counter(PHASE_LINE.findall(output))


def line_index(output: str, host, phase: str) -> int:
    """Where the phase line of host is in the output; -1 if missing."""
    for n, (name, step) in enumerate(PHASE_LINE.findall(output)):
        if (name, step) == (host.host_string, phase):
            return n
    return -1


def version_of(project) -> str:
    """The version the project's pyproject.toml says."""
    text = (project.path / "pyproject.toml").read_text()
    return re.search(r'^version = "(.*)"$', text, re.M).group(1)


def chattr(path, flag: str) -> None:
    """Set or clear a file attribute from outside the container."""
    subprocess.run(["chattr", flag, str(path)], check=True)


def ssh_as(fleet, target: str, command: str) -> subprocess.CompletedProcess:
    """OpenSSH with the operator key and strict host key checking, no user config."""
    return fleet.ssh(target, command)


def reboot(host, timeout: float = 60) -> None:
    """`systemctl reboot` inside, then start the container again, as systemd-nspawn@ would.

    nspawn exits with 133 when its container reboots; the unit that runs it in
    production restarts it on that code. The harness runs nspawn itself, so it
    does the restart: same tree, same network, a full boot of the container's systemd.
    """
    host.run("systemctl reboot --no-block")
    assert host.proc.wait(timeout) == 133, host.log_tail()
    host.kill_leader()
    host.remove_nspawn_state()
    host.boot()
    host.wait_for_ssh(timeout)


# -- one deploy, the server as issue 4 wants it ------------------------------------

def test_deploy_to_three_provisioned_hosts_with_only_app_wsgi_and_deploy_to(fleet, project):
    """Hosts set up by provision alone; -H a,b,c; hardened unit in the app's group, root's site."""
    result = project.fab("deploy")
    release = current(fleet.hosts[0])
    # One release name everywhere, and nginx on port 80 serves it to visitors.
    assert [current(h) for h in fleet.hosts] == [release] * 3
    for host in fleet.hosts:
        assert served(host) == ("1.0.0", release)
    for host in fleet.hosts:
        props = unit_properties(host, unit(release), "ActiveState", "UnitFileState", "User", "Group",
                                "NoNewPrivileges", "PrivateTmp", "ProtectSystem")
        assert props == {"ActiveState": "active", "UnitFileState": "enabled", "User": "deploy",
                         "Group": f"fd-{APP}", "NoNewPrivileges": "yes", "PrivateTmp": "yes",
                         "ProtectSystem": "strict"}
        # The master and its two workers (server.workers defaults to 2).
        assert unit_process_users(host, unit(release)) == ["deploy"] * 3
        site = f"/etc/nginx/sites-enabled/{APP}.conf"
        assert host.run(f"stat -c %U:%a {site}").stdout == "root:644\n"
        text = host.run(f"cat {site}").stdout
        assert re.search(r"^\s*listen 80;$", text, re.M) and re.search(r"^\s*listen \[::\]:80;$", text, re.M)
    every = ", ".join(h.host_string for h in fleet.hosts)
    assert result.stdout.splitlines()[-1].startswith(f"deployed {release} to {every} in ")


def test_the_app_answers_over_ipv6(fleet):
    """From the deploy above: each host's ULA, port 80, the same app and release."""
    for host in fleet.hosts:
        with get(host.url("/about", ipv6=True)) as response:
            assert json.loads(response.read())["release"] == current(host)


def test_output_is_one_line_per_host_per_phase(fleet, project):
    """A redeploy of new code to the three hosts; every phase line counted."""
    project.set_version("1.0.1")
    result = project.fab("deploy")
    lines = phase_lines(result.stdout)
    expected = {(h.host_string, p): 1 for h in fleet.hosts for p in DEPLOY_PHASES}
    assert dict(lines) == expected, result.stdout
    for host in fleet.hosts:
        assert served(host) == ("1.0.1", current(host))
    # No phase line ends up on stderr, and nothing else is printed there on success.
    assert result.stderr == ""


def test_app_comes_back_after_restarts_and_a_reboot(fleet, project):
    """From 1.0.1 on all hosts: restart nginx, then the unit, then reboot host2."""
    host = fleet.hosts[1]
    release = current(host)
    for service in ("nginx", unit(release)):
        host.run(f"systemctl restart {service}")
        assert wait_until_served(host, ("1.0.1", release)) == ("1.0.1", release), service
    reboot(host)
    # The unit came up at boot because it is enabled, not because anything started it.
    assert wait_for_unit_state(host, unit(release), "active") == "active"
    assert wait_until_served(host, ("1.0.1", release)) == ("1.0.1", release)
    assert current(host) == release


def test_only_nginx_and_sshd_listen_beyond_loopback(fleet):
    """From the running hosts (host2 after its reboot)."""
    for host in fleet.hosts:
        listeners = public_listeners(host)
        assert listeners == {("80", "nginx"), ("22", "sshd")}, host.run("ss -ltnp").stdout
        assert public_listeners(host, "u") == set(), host.run("ss -lunp").stdout


# -- several hosts --------------------------------------------------------------

def test_a_host_that_cannot_take_the_release_keeps_all_on_the_old_one(fleet, project):
    """From 1.0.1 on all; host2's releases directory is made immutable from outside."""
    before = {h.address: current(h) for h in fleet.hosts}
    project.set_version("1.1.0")
    broken = fleet.hosts[1]
    chattr(broken.root / ROOT.lstrip("/") / "releases", "+i")
    try:
        result = project.fab("deploy", check=False)
    finally:
        chattr(broken.root / ROOT.lstrip("/") / "releases", "-i")
    assert result.returncode != 0
    for host in fleet.hosts:
        assert current(host) == before[host.address]
        assert served_version(host) == "1.0.1"
        assert line_index(result.stdout, host, "route") == -1, result.stdout
    # The failure names the host, in the summary that ends the output.
    last = result.stderr.strip().splitlines()
    assert last[0] == "fabdeploy: deploy failed on 1 of 3 hosts", result.stderr
    assert any(line.startswith(f"  | {broken.host_string}: ") for line in last[1:]), result.stderr
    # The hosts that were prepared stopped the new release and marked it failed.
    for host in (fleet.hosts[0], fleet.hosts[2]):
        new = max(releases(host))
        assert new > before[host.address]
        assert wait_for_unit_state(host, unit(new), "inactive") == "inactive"
        assert host.run(f"test -f {ROOT}/releases/{new}/FAILED", check=False).returncode == 0


def stop_nginx(host):
    """nginx stopped on a host: prepare does not need it, the switch (checked through it) fails."""
    host.run("systemctl stop nginx")


def test_a_host_that_fails_to_switch_takes_the_others_back_with_it(fleet, project):
    """From 1.1.0's failure, 1.0.1 on all; host3's nginx stops between prepare and switch.

    Under load on hosts 1 and 2 the whole time: they switch, then go back, and
    not one request fails.
    """
    before = {h.address: current(h) for h in fleet.hosts}
    project.set_version("1.2.0")
    broken = fleet.hosts[2]
    stop_nginx(broken)
    loads = [Load(h.url("/"), threads=4, max_requests=20_000, max_seconds=120) for h in fleet.hosts[:2]]
    try:
        for load in loads:
            load.start()
            load.wait_for_successes(50)
        result = project.fab("deploy", "--json", check=False)
        time.sleep(0.5)
    finally:
        results = [load.result() for load in loads]
        broken.run("systemctl start nginx")
    for load_result in results:
        assert load_result.stop_reason == "asked", load_result.summary()
        assert_no_failed_request(load_result)
    assert result.returncode != 0
    doc = json.loads(result.stdout[result.stdout.index("{"):])
    ends = {entry["host"]: (entry["current"], entry["switched"], bool(entry["error"])) for entry in doc["hosts"]}
    for host in fleet.hosts:
        # Every host ends where it began: current, the live link, and what visitors get.
        assert current(host) == before[host.address], result.stderr
        assert served(host) == ("1.0.1", before[host.address])
        assert ends[host.host_string][:2] == (before[host.address], False), ends
    assert ends[broken.host_string][2] and not ends[fleet.hosts[0].host_string][2], ends
    assert broken.host_string in result.stderr


def test_batch_1_switches_one_host_at_a_time_and_stops_at_the_first_failure(fleet, project):
    """From 1.0.1 on all; host2's nginx is stopped, which only the switch (checked through it) needs."""
    before = {h.address: current(h) for h in fleet.hosts}
    project.set_version("1.2.0")
    first, second, third = fleet.hosts
    stop_nginx(second)
    try:
        result = project.fab("deploy", "--batch", "1", check=False)
    finally:
        second.run("systemctl start nginx")
    assert result.returncode != 0
    out = result.stdout
    # Every host was prepared before any switched.
    last_start = max(line_index(out, h, "start") for h in fleet.hosts)
    assert min(line_index(out, h, "start") for h in fleet.hosts) >= 0, out
    assert last_start < line_index(out, first, "route"), out
    # host1 passed its check through nginx (route: nginx's preview, then the live link) and
    # switched before host2 began; host3 never began.
    assert line_index(out, first, "route") < line_index(out, first, "switch"), out
    assert line_index(out, first, "switch") < line_index(out, second, "route"), out
    assert line_index(out, second, "switch") == line_index(out, third, "route") == -1, out
    # The batch before the failing one stays on the new release, and the output says so.
    assert served_version(first) == "1.2.0" and current(first) != before[first.address]
    assert f"the batches before stay on the new release: {first.host_string}" in out
    for host in (second, third):
        assert served_version(host) == "1.0.1" and current(host) == before[host.address]
    assert second.host_string in result.stderr and "through nginx" in result.stderr


def test_hosts_from_config_with_their_own_settings(fleet, project, config):
    """From host1 on 1.2.0, host2 and host3 on 1.0.1; no -H; host3 keeps only 2 releases."""
    first, second, third = fleet.hosts
    config(hosts=[first.host_string, second.host_string,
                  {"host": third.host_string, "keep_releases": 2}])
    result = project.fab("deploy", hosts="")
    assert [served_version(h) for h in fleet.hosts] == ["1.2.0"] * 3
    assert first.host_string in result.stdout and third.host_string in result.stdout
    # Its own keep_releases: current and the one before it; the failed ones went too.
    assert len(releases(third)) == 2, releases(third)
    assert len(releases(second)) > 2, releases(second)


def test_a_redeploy_after_a_partial_rollout_leaves_one_release_name(fleet):
    """The state the deploy above left: every host must be on the same release."""
    names = [current(h) for h in fleet.hosts]
    assert len(set(names)) == 1, names


def test_rollback_by_stage_returns_every_host_to_the_same_release(fleet, project, config):
    """Two deploys by --stage production (1.3.0, then 1.4.0), then a rollback by stage."""
    config(stages={"production": {"hosts": [h.host_string for h in fleet.hosts]}})
    project.set_version("1.3.0")
    project.fab("deploy", "--stage", "production", hosts="")
    target = current(fleet.hosts[0])
    project.set_version("1.4.0")
    project.fab("deploy", "--stage", "production", hosts="")
    assert {served_version(h) for h in fleet.hosts} == {"1.4.0"}
    result = project.fab("rollback", "--stage", "production", hosts="")
    assert [current(h) for h in fleet.hosts] == [target] * 3
    for host in fleet.hosts:
        assert served(host) == ("1.3.0", target)
    assert result.stdout.splitlines()[-1].startswith(f"rolled back to {target} on ")


def test_rollback_without_any_host_fails_with_one_clear_line(project):
    """No -H, no hosts and no stages in fabric.yaml."""
    result = project.fab("rollback", hosts="", check=False)
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fabdeploy: no host given"), result.stderr


def test_deploying_as_root_is_refused(fleet, project):
    """From 1.3.0 on all; as root, one host and then all three."""
    before = [current(h) for h in fleet.hosts]
    one = project.fab("deploy", "--force", hosts=f"root@{fleet.hosts[0].address}", check=False)
    assert one.returncode == 1
    assert one.stderr.startswith(f"fabdeploy: root@{fleet.hosts[0].address}: refusing to deploy as root")
    every = ",".join(f"root@{h.address}" for h in fleet.hosts)
    many = project.fab("deploy", "--force", hosts=every, check=False)
    lines = many.stderr.strip().splitlines()
    assert many.returncode == 1 and lines[0] == "fabdeploy: deploy failed on 3 of 3 hosts", many.stderr
    for host in fleet.hosts:
        assert sum(line.startswith(f"  | root@{host.address}: refusing to deploy as root")
                   for line in lines) == 1, many.stderr
    assert [current(h) for h in fleet.hosts] == before


# -- provision ------------------------------------------------------------------

HELPER_RULE = f"(root) NOPASSWD: /usr/local/lib/fabdeploy/helper {APP} *"


def test_provision_made_the_user_roots_files_and_one_sudo_rule(fleet, project):
    """What the module's provision did on the fresh hosts, and that a second run changes nothing."""
    out = project.provision_output
    for host in fleet.hosts:
        as_root = f"root@{host.address}"
        for step in ("user deploy", "nginx's stock default site off", f"systemd unit /etc/systemd/system/{APP}@.service",
                     f"sudo rule /etc/sudoers.d/fabdeploy-{APP}", f"site /etc/nginx/sites-enabled/{APP}.conf"):
            assert f"[{as_root}] changed    {step}" in out, out
        assert host.run("test ! -e /etc/nginx/sites-enabled/default", check=False).returncode == 0
        # The deploy user logs in with the configured key, and sudo grants it one rule: the helper.
        assert ssh_as(fleet, host.host_string, "id -un").stdout == "deploy\n"
        rights = host.run("sudo -l -U deploy").stdout
        assert [" ".join(r.split()) for r in re.findall(r"^\s+(\(.*)$", rights, re.M)] == [HELPER_RULE], rights
        shadow = ssh_as(fleet, host.host_string, "sudo -n cat /etc/shadow")
        assert shadow.returncode != 0 and "a password is required" in shadow.stderr, shadow
    again = fleet.provision(project, hosts=fleet.hosts[:1])
    as_root = f"root@{fleet.hosts[0].address}"
    assert again.stdout.strip().splitlines()[-1] == f"[{as_root}] nothing to change", again.stdout
    assert " changed " not in again.stdout


ESCALATIONS = {
    # sudo names only the helper now: systemctl, install and nginx are not among its rules.
    "systemctl": "sudo -n systemctl start proof.service",
    "nginx -t": "sudo -n nginx -t",
    # The helper checks its arguments: a release name is digits and dashes, nothing more.
    "a unit of deploy's own": f"sudo -n /usr/local/lib/fabdeploy/helper {APP} start '20000101-000000-000 proof'",
    "an argument in the name": f"sudo -n /usr/local/lib/fabdeploy/helper {APP} start '../../proof'",
    # ...and only the app's own user may drive it, for that app only.
    "another app": "sudo -n /usr/local/lib/fabdeploy/helper other start 20000101-000000-000",
}


def test_the_narrow_sudo_rights_do_not_make_deploy_root(fleet):
    """host3 as provision left it; deploy tries to run its own code as root with its rights alone."""
    host = fleet.hosts[2]
    unit_text = "[Service]\nType=oneshot\nExecStart=/bin/sh -c 'id -un > /etc/escalated'\n"
    planted = (f"printf '%s' {shlex.quote(unit_text)} > {ROOT}/proof.service"
               f" && ln -sf {ROOT}/proof.service {ROOT}/proof")
    assert ssh_as(fleet, host.host_string, planted).returncode == 0
    escalated, refused = {}, {}
    try:
        for name, way in ESCALATIONS.items():
            result = ssh_as(fleet, host.host_string, way)
            # 255 is ssh's own failure: then nothing was tried, and nothing proven.
            assert result.returncode != 255, result.stderr
            refused[name] = result.returncode != 0
            proof = host.run("cat /etc/escalated 2>/dev/null && rm /etc/escalated", check=False)
            if proof.stdout:
                escalated[name] = proof.stdout.strip()
    finally:
        host.run(f"rm -f /etc/escalated {ROOT}/proof.service {ROOT}/proof")
    assert escalated == {}, f"deploy ran its own code as: {escalated}"
    assert all(refused.values()), refused


# -- a bastion ------------------------------------------------------------------

# UsePAM as in Debian's own sshd_config: without it sshd refuses the deploy user,
# whose password is locked ("!"), even for a key login.
INNER_SSHD = f"""\
Port {INNER_PORT}
UsePAM yes
ListenAddress 127.0.0.1
HostKey /etc/ssh/inner_host_key
PidFile /run/sshd-inner.pid
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin no
Subsystem sftp /usr/lib/openssh/sftp-server
"""


@pytest.fixture
def inner_sshd(fleet):
    """A second sshd inside host1, on its loopback only: reachable through host1 alone."""
    host = fleet.hosts[0]
    host.run(f"rm -f /etc/ssh/inner_host_key* /var/log/sshd-inner.log"
             f" && ssh-keygen -q -t ed25519 -N '' -f /etc/ssh/inner_host_key"
             f" && printf '%s' {shlex.quote(INNER_SSHD)} > /etc/ssh/sshd_inner_config"
             f" && /usr/sbin/sshd -f /etc/ssh/sshd_inner_config -E /var/log/sshd-inner.log")
    kind, blob = host.run("cat /etc/ssh/inner_host_key.pub").stdout.split()[:2]
    try:
        yield host, f"[127.0.0.1]:{INNER_PORT} {kind} {blob}\n"
    finally:
        host.run("kill $(cat /run/sshd-inner.pid)")


def bastion_files(fleet, workdir, jump, inner_known: str, trust_jump: bool):
    """An ssh config with ProxyJump through `jump`, and a known_hosts for both hops."""
    ssh_config = workdir / "ssh_config"
    ssh_config.write_text(f"Host 127.0.0.1\n    ProxyJump {jump.host_string}\n")
    known = workdir / "bastion_known_hosts"
    known.write_text((jump.known_hosts.read_text() if trust_jump else "") + inner_known)
    return ssh_config, known


def test_deploy_through_a_bastion_with_proxyjump(fleet, project, config, inner_sshd, tmp_path):
    """From host1 on 1.3.0; deploy 1.5.0 to deploy@127.0.0.1:2222 via ProxyJump deploy@host1."""
    host, inner_known = inner_sshd
    # Nothing listens on 2222 from outside: only a hop through host1 gets there.
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((host.address, INNER_PORT), timeout=5).close()
    ssh_config, known = bastion_files(fleet, tmp_path, host, inner_known, trust_jump=True)
    config(known_hosts=str(known))
    raw = json.loads((project.path / "fabric.yaml").read_text())
    raw["ssh_config_path"] = str(ssh_config)
    (project.path / "fabric.yaml").write_text(json.dumps(raw))
    before = current(host)
    project.set_version("1.5.0")
    inner = f"deploy@127.0.0.1:{INNER_PORT}"
    result = project.fab("deploy", hosts=inner)
    assert f"[{inner}] switch" in result.stdout
    assert current(host) != before
    assert served(host) == ("1.5.0", current(host))
    log = host.run("cat /var/log/sshd-inner.log").stdout
    assert "Accepted publickey for deploy from 127.0.0.1" in log, log


def test_a_bastion_with_an_unknown_host_key_is_refused(fleet, project, config, inner_sshd, tmp_path):
    """Only the inner host's key is known: the jump host's must stop the deploy before it starts."""
    host, inner_known = inner_sshd
    ssh_config, known = bastion_files(fleet, tmp_path, host, inner_known, trust_jump=False)
    config(known_hosts=str(known))
    before = current(host)
    project.set_version("1.6.0")
    result = project.fab("-S", str(ssh_config), "deploy", hosts=f"deploy@127.0.0.1:{INNER_PORT}",
                         check=False)
    # Not "cannot connect": -S routed it through the jump host, whose key is the unknown one.
    assert result.returncode == 1
    assert "unknown host key" in result.stderr, result.stderr
    assert current(host) == before
    assert "Accepted" not in host.run("cat /var/log/sshd-inner.log").stdout


def test_the_refusal_names_the_jump_host(fleet, project, config, inner_sshd, tmp_path):
    """As above; the one line must point at the host whose key is missing."""
    host, inner_known = inner_sshd
    ssh_config, known = bastion_files(fleet, tmp_path, host, inner_known, trust_jump=False)
    config(known_hosts=str(known))
    result = project.fab("-S", str(ssh_config), "deploy", hosts=f"deploy@127.0.0.1:{INNER_PORT}",
                         check=False)
    assert result.returncode == 1 and host.address in result.stderr, result.stderr
