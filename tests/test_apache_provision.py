"""proxy.kind apache in provision (issue 18): a fresh host that provision alone puts Apache on.

One Debian 12 nspawn host as a provider hands it over: nginx enabled on port 80 with
only its stock site, Apache installed but disabled. `fab -H root@host provision` with
proxy.kind apache stops and disables nginx (it served nobody's site), enables the
modules fabdeploy's site needs, turns Apache's stock site off, installs the site as
root's, and grants the deploy user the helper and nothing else. Deploys then go through
Apache: gunicorn first, then mod_wsgi. Tests run in file order and build on each other.
"""
import json
import os
import re
import urllib.request

import pytest

import load
from harness.fleet import module_fleet
from harness.project import Project

pytestmark = [
    pytest.mark.nspawn,
    pytest.mark.skipif(os.geteuid() != 0, reason="systemd-nspawn hosts need root"),
]

APP = "guestbook"
ROOT = f"/srv/{APP}"
SITE = f"/etc/apache2/sites-enabled/{APP}.conf"
HELPER_RULE = f"(root) NOPASSWD: /usr/local/lib/fabdeploy/helper {APP} *"
MODULES = ["proxy", "proxy_http", "proxy_balancer", "lbmethod_byrequests", "headers", "slotmem_shm"]
THREADS, WARM_UP, AFTER = 4, 100, 0.5
MAX_REQUESTS, MAX_SECONDS = 400_000, 120
SETTINGS = {"proxy": {"kind": "apache", "listen": [80, 8080]}}


fleet = module_fleet(1, "apache")


@pytest.fixture(scope="module")
def project(fleet, tmp_path_factory):
    project = Project(tmp_path_factory.mktemp("project") / APP, fleet, app=APP)
    project.configure(**SETTINGS)
    project.provision_output = fleet.provision(project).stdout
    return project


def the(fleet):
    return fleet.hosts[0]


def get(fleet, path="/about", port=80):
    """(headers, JSON body) of a GET from the test machine, on a new connection."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://{the(fleet).address}:{port}{path}", timeout=10) as response:
        return response.headers, json.loads(response.read())


def current(fleet) -> str:
    return the(fleet).run(f"readlink {ROOT}/current").stdout.strip().rsplit("/", 1)[-1]


def state(fleet, unit: str) -> tuple[str, str]:
    """(is-enabled, is-active) of a unit."""
    run = lambda verb: the(fleet).run(f"systemctl {verb} {unit}", check=False).stdout.strip()
    return run("is-enabled"), run("is-active")


def listeners(fleet) -> set[tuple[str, str]]:
    """(port, program) of every TCP socket listening beyond loopback."""
    found = set()
    for line in the(fleet).run("ss -ltnpH").stdout.splitlines():
        address, port = line.split()[3].rsplit(":", 1)
        if not (address.startswith("127.") or address == "[::1]"):
            found.add((port, re.search(r'users:\(\("([^"]+)"', line).group(1)))
    return found


def redeploy_under_load(fleet, project, version):
    """A deploy of `version` under keep-alive load through Apache; the load's result."""
    before = current(fleet)
    project.set_version(version, greeting=f"Greetings from {version}")
    result, _, window = load.under_load(the(fleet).url("/"), lambda: project.fab("deploy"), THREADS, WARM_UP,
                                        AFTER, MAX_REQUESTS, MAX_SECONDS)
    print(f"redeploy to {version}: {len(result.failures)} failed of {result.total}; deploy took "
          f"{window[1] - window[0]:.1f}s\n{result.summary(5)}")
    assert current(fleet) != before
    return result


def test_provision_puts_apache_in_the_place_of_a_stock_nginx(fleet, project):
    """What provision did on the fresh host, and that a second run changes nothing."""
    out = project.provision_output
    as_root = f"[root@{the(fleet).address}] changed   "
    for step in ("nginx stopped and disabled (it served only its stock site)",
                 f"Apache modules {' '.join(MODULES)}", "Apache's stock site 000-default off",
                 f"site {SITE}", "apache2 enabled and running", f"sudo rule /etc/sudoers.d/fabdeploy-{APP}"):
        assert f"{as_root} {step}" in out, out
    assert state(fleet, "nginx") == ("disabled", "inactive")
    assert state(fleet, "apache2") == ("enabled", "active")
    enabled = the(fleet).run("ls /etc/apache2/mods-enabled").stdout.split()
    assert all(f"{module}.load" in enabled for module in MODULES), enabled
    assert the(fleet).run("ls /etc/apache2/sites-enabled").stdout.split() == [f"{APP}.conf"]
    assert the(fleet).run(f"stat -c %U:%a {SITE}").stdout == "root:644\n"
    rights = the(fleet).run("sudo -l -U deploy").stdout
    assert [" ".join(r.split()) for r in re.findall(r"^\s+(\(.*)$", rights, re.M)] == [HELPER_RULE], rights
    again = fleet.provision(project)
    assert again.stdout.strip().splitlines()[-1] == f"[root@{the(fleet).address}] nothing to change", again.stdout


def test_a_deploy_is_served_by_apache_on_both_its_ports(fleet, project):
    """From the provisioned host: the first deploy, with provision's rules only."""
    project.fab("deploy")
    for port in (80, 8080):
        headers, info = get(fleet, port=port)
        assert headers["X-Fabdeploy-Site"] == APP, dict(headers)  # our site; Apache holds both ports (below)
        assert (info["version"], info["release"]) == ("1.0.0", current(fleet))
        # ProxyFix trusts one hop: the client as Apache saw it, Apache's scheme.
        assert (info["remote_addr"], info["scheme"]) == (the(fleet).gateway, "http"), info
    assert listeners(fleet) == {("80", "apache2"), ("8080", "apache2"), ("22", "sshd")}, listeners(fleet)


def test_a_redeploy_under_load_through_apache_fails_no_request(fleet, project):
    """From 1.0.0: 1.1.0 under load; Apache follows the live link, and is never reloaded."""
    restarts = lambda: the(fleet).run("grep -c 'graceful restart' /var/log/apache2/error.log || true").stdout
    before = restarts()
    result = redeploy_under_load(fleet, project, "1.1.0")
    load.assert_no_failed_request(result)
    for n in range(THREADS):
        assert load.flips(result.versions(n)) == 1, result.summary()
    assert get(fleet)[1]["version"] == "1.1.0"
    assert restarts() == before


def test_rollback_through_apache(fleet, project):
    """From 1.1.0 (1.0.0 warm): rollback."""
    project.fab("rollback")
    assert get(fleet)[1]["version"] == "1.0.0" and get(fleet)[1]["release"] == current(fleet)


def test_mod_wsgi_behind_apache_redeploys_under_load_with_no_failed_request(fleet, project):
    """From 1.0.0 on gunicorn: server.kind mod_wsgi, provisioned again, deployed twice."""
    project.configure(server={"kind": "mod_wsgi"}, **SETTINGS)
    fleet.provision(project)
    project.set_version("2.0.0")
    project.fab("deploy")
    headers, info = get(fleet)
    assert info["version"] == "2.0.0" and headers["X-Fabdeploy-Site"] == APP
    assert (info["remote_addr"], info["scheme"]) == (the(fleet).gateway, "http"), info
    running = the(fleet).run(f"ps -e -o unit=,args= | grep '^{APP}@{current(fleet)}.service'").stdout
    assert "apache2 (mod_wsgi-express)" in running and "gunicorn" not in running, running
    result = redeploy_under_load(fleet, project, "2.1.0")
    load.assert_no_failed_request(result)
    assert get(fleet)[1]["version"] == "2.1.0"
