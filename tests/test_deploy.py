"""Issue 2: deploy and roll back the example app on a real sshd + nginx + gunicorn."""
import http.cookiejar
import json
import stat
import subprocess
import urllib.parse
import urllib.request

import pytest

pytestmark = pytest.mark.host


def get(url: str, opener=None) -> str:
    with (opener or urllib.request.build_opener()).open(url, timeout=10) as response:
        return response.read().decode()


def about(host) -> dict:
    return json.loads(get(host.url + "about"))


def sign(host, name: str, opener=None) -> None:
    data = urllib.parse.urlencode({"name": name}).encode()
    (opener or urllib.request.build_opener()).open(host.url + "sign", data=data, timeout=10).read()


def releases_on(project) -> list[str]:
    return sorted(p.name for p in (project.deploy_to / "releases").iterdir())


def current_of(project) -> str:
    return (project.deploy_to / "current").readlink().name


def test_deploy_serves_the_app_with_a_real_secret(project, host):
    result = project.fab("deploy")
    assert "deployed" in result.stdout
    assert get(host.url).startswith("Hello from the guestbook 1.0.0: 0 entries")
    info = about(host)
    assert info["secret_is_dev"] is False
    # the instance folder Flask uses is the shared one, kept across releases
    assert info["instance_path"].endswith("/venv/var/guestbook-instance")
    config = project.deploy_to / "shared" / "instance" / "config.py"
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert "SECRET_KEY" in config.read_text()
    # the secret is never printed
    secret = config.read_text().split("'")[1]
    assert secret not in result.stdout + result.stderr


def test_redeploy_serves_new_code_and_keeps_data_secret_and_sessions(project, host):
    project.fab("deploy")
    browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
    sign(host, "ada", browser)
    sign(host, "grace")
    config = project.deploy_to / "shared" / "instance" / "config.py"
    secret_before = config.read_text()
    first = current_of(project)

    project.set_version("1.1.0", greeting="Welcome to the guestbook")
    project.fab("deploy")

    assert current_of(project) != first
    assert get(host.url) == "Welcome to the guestbook 1.1.0: 2 entries\n"
    assert config.read_text() == secret_before
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    # a session cookie signed by the first release still works
    assert get(host.url + "whoami", browser) == "ada\n"


def test_rollback_serves_the_previous_release_and_keeps_data(project, host):
    project.fab("deploy")
    first = current_of(project)
    sign(host, "before")
    project.set_version("2.0.0", greeting="Version two")
    project.fab("deploy")
    sign(host, "after")
    assert get(host.url).startswith("Version two 2.0.0: 2 entries")

    result = project.fab("rollback")
    assert "rolled back to " + first in result.stdout
    assert current_of(project) == first
    assert get(host.url) == "Hello from the guestbook 1.0.0: 2 entries\n"

    table = project.fab("releases").stdout.splitlines()
    row = next(line for line in table if first in line)
    assert row.startswith("*") and "1.0.0" in row
    assert any("2.0.0" in line and not line.startswith("*") for line in table)


def test_rollback_with_a_single_release_refuses_cleanly(project, host):
    project.fab("deploy")
    only = current_of(project)
    result = project.fab("rollback", check=False)
    assert result.returncode != 0
    assert "nothing to roll back to" in result.stderr
    assert "Traceback" not in result.stderr
    assert current_of(project) == only
    assert get(host.url).startswith("Hello from the guestbook")
    assert not (project.deploy_to / ".fabdeploy" / "lock").exists()


def test_cleanup_keeps_exactly_keep_releases(project, host):
    project.configure(keep_releases=2)
    for n in range(4):
        project.set_version(f"1.0.{n + 1}")
        project.fab("deploy")
    names = releases_on(project)
    assert len(names) == 2
    assert current_of(project) in names
    assert current_of(project) == max(names)
    assert get(host.url).startswith("Hello from the guestbook 1.0.4")


def ssh_keygen_public(tmp_path) -> str:
    key = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    return (tmp_path / "other_key.pub").read_text().split()[:2]


@pytest.mark.parametrize("case", ["unknown", "changed"])
def test_untrusted_host_key_is_refused_and_host_untouched(project, host, tmp_path, case):
    known = tmp_path / "known_hosts"
    if case == "unknown":
        known.write_text("")
    else:
        kind, blob = ssh_keygen_public(tmp_path)
        known.write_text(f"[127.0.0.1]:{host.ssh_port} {kind} {blob}\n")
    project.configure(known_hosts=str(known))
    result = project.fab("deploy", check=False)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    expected = "unknown host key" if case == "unknown" else "host key changed"
    assert expected in result.stderr
    assert host.host_string in result.stderr
    # nothing happened on the host
    assert not project.deploy_to.exists()


def test_nginx_survives_a_deleted_deploy_to_and_so_does_the_next_deploy(project, host):
    """The site includes the host's preview map: deleting deploy_to must not break nginx,
    which would take every other site on it down at its next reload or restart."""
    project.fab("deploy")
    test_nginx = host.settings("guestbook")["proxy"]["test_command"]
    assert host.run_as_user(test_nginx, check=False).returncode == 0
    host.run_as_user(f"rm -rf {project.deploy_to}")
    checked = host.run_as_user(test_nginx, check=False)
    assert checked.returncode == 0, checked.stderr
    # Deploying again makes a new preview token; the site is the same text, but nginx is
    # reloaded to learn the token, or the check before the switch would never pass.
    project.set_version("1.0.1")
    project.fab("deploy")
    assert about(host)["version"] == "1.0.1"
    assert not (project.deploy_to / ".fabdeploy" / "preview.unloaded").exists()
