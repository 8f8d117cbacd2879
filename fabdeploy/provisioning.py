"""Prepare a fresh Debian or Ubuntu server for deploys: packages, user, sudo, nginx.

Each step is a check and an action. The action runs only where the check
fails, so a second run changes nothing and says so.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from shlex import quote

from . import plan, render
from .plan import STOCK_SITE
from .errors import DeployError
from .layout import STATE_DIR, Layout
from .settings import Settings

# A release's name, 20261121-103700-123 (layout.release_name), as a sudoers pattern.
RELEASE_PATTERN = "-".join("[0-9]" * n for n in (8, 6, 3))


@dataclass(frozen=True)
class Step:
    name: str
    check: str   # exits 0 when nothing needs doing
    action: str

    def command(self, sudo: str) -> str:
        """One round trip: check, act if needed, and say which."""
        wrap = (lambda c: f"{sudo}sh -c {quote(c)}") if sudo else (lambda c: c)
        return (f"if {wrap(self.check)} >/dev/null 2>&1; then echo unchanged;"
                f" else {wrap(self.action)} && echo changed; fi")


def public_key(settings: Settings, key_filename: str | list | None) -> str:
    """The key the deploy user will log in with: configured, or next to the SSH key in use."""
    configured = settings["provision"]["public_key"]
    candidates = [configured] if configured else []
    for key in ([key_filename] if isinstance(key_filename, str) else key_filename or []):
        candidates.append(f"{key}.pub")
    candidates += ["~/.ssh/id_ed25519.pub", "~/.ssh/id_ecdsa.pub", "~/.ssh/id_rsa.pub"]
    for path in candidates:
        path = Path(os.path.expanduser(path))
        if path.is_file():
            return path.read_text().strip()
    raise DeployError("no public key found for the deploy user",
                      hint="set fabdeploy.provision.public_key to a .pub file")


def absolute_root(settings: Settings, user: str) -> str:
    """deploy_to, with ~/ taken to be /home/<user>, useradd's default."""
    root = settings["deploy_to"]
    return f"/home/{user}/{root[2:]}" if root.startswith("~/") else root


def sudoers(settings: Settings, user: str) -> str:
    """Exactly the commands deploy, rollback and logs run as root; nothing else.

    A deploy_to under ~/ is taken to be under /home/<user>, useradd's default.
    """
    app, root, site = settings.app, absolute_root(settings, user), settings.nginx["site_path"]
    state = f"{root}/{STATE_DIR}"
    # sudo's * matches spaces too, so `app@*` would let further arguments (another
    # unit, a unit file) through: a release's unit name only, a character class each.
    unit = f"{app}@{RELEASE_PATTERN}.service"
    commands = [
        f"/usr/bin/systemctl start {unit}",
        f"/usr/bin/systemctl stop {unit}",
        f"/usr/bin/systemctl enable --quiet {unit}",
        f"/usr/bin/systemctl disable --quiet {unit}",
        f"/usr/bin/systemctl disable --now --no-block {unit}",
        f"/usr/bin/systemctl reload {app}@\\*.service",  # the literal pattern, for rotate-secret
        "/usr/bin/systemctl reload nginx",
        "/usr/sbin/nginx -t",
        f"/usr/bin/install -m 0644 {state}/site.conf.new {site}",
        f"/usr/bin/install -m 0644 {state}/site.conf.prev {site}",
        f"/usr/bin/rm -f {site}",
    ]
    escaped = [c.replace(":", "\\:").replace(",", "\\,") for c in commands]
    alias = "FABDEPLOY_" + "".join(ch if ch.isalnum() else "_" for ch in app).upper()
    body = ", \\\n    ".join(escaped)
    return (f"# Written by fabdeploy provision: what deploying {app} needs as root, nothing more.\n"
            f"Cmnd_Alias {alias} = \\\n    {body}\n"
            f"{user} ALL=(root) NOPASSWD: {alias}\n")


def steps(settings: Settings, user: str, key: str) -> list[Step]:
    p = settings["provision"]
    packages = " ".join(quote(pkg) for pkg in p["packages"])
    home = f"$(getent passwd {quote(user)} | cut -d: -f6)"
    keys = f"{home}/.ssh/authorized_keys"
    sudoers_file = f"/etc/sudoers.d/fabdeploy-{user}"
    rules = sudoers(settings, user)
    root = settings["deploy_to"]
    if root.startswith("~/"):
        root = f"{home}/{root[2:]}"
    else:
        root = quote(root)
    unit = render.systemd_unit(settings, Layout(absolute_root(settings, user)), user)
    unit_file = plan.unit_path(settings)
    return [
        Step("packages " + " ".join(p["packages"]),
             f"for p in {packages}; do dpkg-query -W -f='${{Status}}' \"$p\" 2>/dev/null"
             " | grep -q 'install ok installed' || exit 1; done",
             f"apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq {packages}"),
        Step(f"user {user}", f"id -u {quote(user)}",
             f"useradd --create-home --shell /bin/bash {quote(user)}"),
        Step(f"{user}'s authorized key", f"grep -qxF {quote(key)} {keys}",
             f"install -d -m 0700 -o {quote(user)} -g {quote(user)} {home}/.ssh"
             f" && printf '%s\\n' {quote(key)} >> {keys}"
             f" && chown {quote(user)}: {keys} && chmod 0600 {keys}"),
        Step(f"sudo rights for {user}", f"printf '%s' {quote(rules)} | cmp -s - {sudoers_file}",
             f"printf '%s' {quote(rules)} > {sudoers_file}.tmp && visudo -cqf {sudoers_file}.tmp"
             f" && chmod 0440 {sudoers_file}.tmp && mv {sudoers_file}.tmp {sudoers_file}"),
        Step(f"deploy_to {settings['deploy_to']}",
             f"[ -d {root} ] && [ \"$(stat -c %U {root})\" = {quote(user)} ]",
             f"mkdir -p {root} && chown {quote(user)}: {root}"),
        # Only root writes the unit: whoever writes it picks the User= it runs as.
        Step(f"systemd unit {unit_file}",
             f"[ ! -d /run/systemd/system ] || printf '%s' {quote(unit)} | cmp -s - {unit_file}",
             f"printf '%s' {quote(unit)} > {unit_file} && systemctl daemon-reload"),
        Step("nginx's stock default site off", f"[ ! -e {STOCK_SITE} ]",
             f"rm -f {STOCK_SITE} && nginx -t -q && systemctl reload nginx"),
        Step("nginx enabled and running", "systemctl is-enabled nginx && systemctl is-active nginx",
             "systemctl enable --now nginx"),
    ]
