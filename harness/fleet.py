"""nspawn hosts as one deploy target: one operator key, for root and (once provisioned) the deploy user.

A host starts as a fresh VPS: root only. `provision()` runs the real
`fab -H root@host provision` with the project's fabric.yaml, which makes
the deploy user, with the operator key, and narrow sudo: the only set-up
a production-host test gets.
"""
from __future__ import annotations

import shlex
import subprocess
from pathlib import Path


class Fleet:
    """Booted hosts, an operator key authorized for their root, and one known_hosts for all."""

    user = "deploy"

    def __init__(self, hosts, workdir: Path):
        self.hosts = hosts
        self.workdir = workdir
        self.key = workdir / "operator_key"
        if not self.key.exists():
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "operator",
                            "-f", str(self.key)], check=True)
        self.public_key = workdir / "operator_key.pub"
        self.known_hosts = workdir / "known_hosts"
        self.known_hosts.write_text("".join(h.known_hosts.read_text() for h in hosts))
        for host in hosts:
            authorize(host, "/root", self.public_key.read_text())

    @property
    def host_string(self) -> str:
        return ",".join(h.host_string for h in self.hosts)

    @property
    def root_string(self) -> str:
        return ",".join(f"root@{h.address}" for h in self.hosts)

    def fabric_yaml(self, app: str) -> dict:
        """app, wsgi, deploy_to, how to reach the hosts, and the key provision gives the deploy user."""
        return {"connect_kwargs": {"key_filename": str(self.key)},
                "fabdeploy": {"app": app, "wsgi": f"{app}:create_app()", "deploy_to": f"/srv/{app}",
                              "known_hosts": str(self.known_hosts),
                              "provision": {"public_key": str(self.public_key)}}}

    def provision(self, project, *args: str, hosts=None, check: bool = True):
        """`fab -H root@... provision` in the project: the real task, its settings."""
        targets = ",".join(f"root@{h.address}" for h in hosts) if hosts else self.root_string
        return project.fab("provision", *args, hosts=targets, check=check)

    def ssh(self, target: str, command: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """OpenSSH with the operator key and strict host key checking, no user config."""
        argv = ["ssh", "-F", "/dev/null", "-i", str(self.key), "-o", "IdentitiesOnly=yes",
                "-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "StrictHostKeyChecking=yes",
                "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", target, command]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


def authorize(host, home: str, public_key: str) -> None:
    """Add a public key to a user's authorized_keys inside the host."""
    host.run(f"mkdir -p {home}/.ssh && chmod 700 {home}/.ssh && "
             f"printf '%s\\n' {shlex.quote(public_key.strip())} >> {home}/.ssh/authorized_keys")


def module_fleet(count: int, name: str, fixture: str = "fleet"):
    """A pytest fixture for one test module: `count` booted nspawn hosts as one Fleet, fresh
    (provision is the tests' own), shut down and removed after the module."""
    import pytest

    from harness.nspawn import nspawn_hosts

    @pytest.fixture(scope="module", name=fixture)
    def booted(tmp_path_factory):
        workdir = tmp_path_factory.mktemp(name)
        with nspawn_hosts(count, workdir) as hosts:
            yield Fleet(hosts, workdir)
    return booted
