"""Prepare a Debian or Ubuntu server for an app, as root: everything root must own. No I/O here.

The trust boundary: root installs, once, everything that root parses or
runs for the app (the proxy's site, the units, the sudo rule, the helper,
the record of what it baked in), and none of it is the deploy user's to
write. The deploy user may then run exactly one program as root, the
helper, for this app only; the helper takes its facts from root's record.

Each step is a check and an action (or a root file installed only when it
differs), so a second run changes nothing and says so.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from shlex import quote

from . import certs, onhost, processes, render
from .errors import DeployError
from .layout import HELPER, Layout, SystemPaths
from .model import Bind
from .ops import Install, Op, Query, Sh
from .settings import Settings

PROXY_USER = "www-data"  # nginx's and Apache's workers on Debian
STOCK_SITE = "/etc/nginx/sites-enabled/default"  # Debian's, the default_server on port 80
OUR_RULE = re.compile(rf"^\(root\) NOPASSWD: {re.escape(HELPER)} [a-z_][a-z0-9_-]* \*$")
SUDO_GROUPS = ("sudo", "admin", "wheel")
HELPER_VERSION = 1
# Kept in the record for the helper and for people, but a change needs no new provision.
NOT_COMPARED = {"version", "ipv6", "server", "app", "user", "site", "audit_log", "access_log"}


def public_key(settings: Settings, key_filename: str | list | None) -> str:
    """The key the deploy user will log in with: configured, or next to the SSH key in use."""
    configured = settings.provision.public_key
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


def absolute_root(settings: Settings, home: str) -> str:
    """deploy_to, with ~/ the deploy user's home."""
    root = settings.deploy_to
    return f"{home.rstrip('/')}/{root[2:]}" if root.startswith("~/") else root


def tcp_ports(settings: Settings) -> list[int] | None:
    bind = settings.server.bind
    return [bind.port, bind.port + 1] if bind else None


def registration(settings: Settings, user: str, ipv6: bool, home: str | None = None) -> dict:
    """What provision bakes into root's files for the app, recorded for the helper and the deploy."""
    paths = SystemPaths(settings.app)
    return {
        "version": HELPER_VERSION,
        "app": settings.app,
        "user": user,
        "group": settings.group,
        "deploy_to": absolute_root(settings, home or f"/home/{user}"),
        "proxy": settings.proxy.kind,
        "listen": [listen.nginx for listen in settings.proxy.listen],
        "server_name": list(settings.proxy.server_name),
        "tcp_ports": tcp_ports(settings),
        "graceful_timeout": settings.server.graceful_timeout,
        "server": settings.server.kind,
        "ipv6": ipv6,
        "site": paths.site(settings.proxy.kind) if settings.proxy.enabled else None,
        "audit_log": paths.audit_log,
        # issue 13: what the site serves besides the app, and how
        "tls": tls_record(settings),
        "static": [folder.prefix for folder in settings.static],
        "extra": settings.proxy.extra.record(),
        "access_log": paths.access_log if settings.proxy.kind == "nginx" else None,
        **processes_registered(settings),
    }


def tls_record(settings: Settings) -> dict | None:
    """The tls settings root bakes in (not the local files' paths: the deploying machine's own)."""
    tls = settings.tls
    if not tls.enabled:
        return None
    record = {"mode": tls.mode, "port": tls.port, "hsts": tls.hsts}
    if tls.acme:
        record.update(directory=tls.directory, email=tls.email)
    return record


def processes_registered(settings: Settings) -> dict:
    """Which process units and timers root made (the helper's only source for their names);
    absent when there are none, so a record from before them still matches."""
    found = {}
    if settings.processes:
        found["processes"] = sorted(settings.processes)
    if settings.timers:
        found["timers"] = {timer.name: timer.on_calendar for timer in settings.timers}
    return found


# -- what root sees of the host before it provisions ------------------------------------------

@dataclass(frozen=True)
class RootFacts:
    """What provision needs to know first: the user, their sudo rights, the host."""

    user_exists: bool
    home: str
    sudo_rules: tuple[str, ...]
    groups: tuple[str, ...]
    sudoers_files: dict        # path -> text, for files in /etc/sudoers.d that name the user
    main_sudoers_lines: tuple[str, ...]
    ipv6: bool
    systemd: bool
    listeners: tuple[tuple[int, str], ...] = ()  # (port, program) of each listening TCP socket
    web: dict = field(default_factory=dict)     # nginx, apache2 -> enabled, active, sites

    @classmethod
    def parse(cls, data: dict) -> "RootFacts":
        return cls(user_exists=data["user_exists"], home=data["home"] or "",
                   sudo_rules=tuple(sudo_rules(data["sudo_l"])), groups=tuple(data["groups"].split()),
                   sudoers_files=data["sudoers_files"], main_sudoers_lines=tuple(data["main_lines"]),
                   ipv6=data["ipv6"], systemd=data["systemd"],
                   listeners=tuple(listeners(data.get("ss", ""))), web=data.get("web", {}))


def root_facts(user: str) -> Query:
    """One command, as root: the user, what sudo grants them, and where it comes from."""
    script = f"""
import json, os, pwd, re, subprocess
user = {user!r}
try:
    home = pwd.getpwnam(user).pw_dir
except KeyError:
    home = None
run = lambda *a: subprocess.run(a, capture_output=True, text=True).stdout
named = re.compile(r"^\\s*" + re.escape(user) + r"\\s", re.M)
files = {{}}
for name in sorted(os.listdir("/etc/sudoers.d")) if os.path.isdir("/etc/sudoers.d") else []:
    path = os.path.join("/etc/sudoers.d", name)
    try:
        text = open(path).read()
    except OSError:
        continue
    if named.search(text):
        files[path] = text
main = open("/etc/sudoers").read() if os.path.exists("/etc/sudoers") else ""
systemd = os.path.isdir("/run/systemd/system")
def unit(verb, name):
    return systemd and subprocess.run(["systemctl", verb, "--quiet", name]).returncode == 0
def enabled(directory, suffix=""):
    return sorted(n for n in os.listdir(directory) if n.endswith(suffix)) if os.path.isdir(directory) else []
web = {{"nginx": enabled("/etc/nginx/sites-enabled") + ["conf.d/" + n for n in enabled("/etc/nginx/conf.d", ".conf")],
        "apache2": enabled("/etc/apache2/sites-enabled")}}
try:
    ss = run("ss", "-ltnpH")
except OSError:
    ss = ""
print(json.dumps({{
    "user_exists": home is not None, "home": home,
    "sudo_l": run("sudo", "-l", "-U", user) if home else "",
    "groups": run("id", "-nG", user) if home else "",
    "sudoers_files": files,
    "main_lines": [l for l in main.splitlines() if named.match(l)],
    "ipv6": os.path.exists("/proc/net/if_inet6"),
    "systemd": systemd, "ss": ss,
    "web": {{name: {{"enabled": unit("is-enabled", name), "active": unit("is-active", name), "sites": sites}}
            for name, sites in web.items() if os.path.isdir("/etc/" + name)}}}}))
"""
    return Query(f"python3 -c {quote(script)}", key="root", what="reading the host as root")


def listeners(ss: str) -> list[tuple[int, str]]:
    """(port, program) for each line of `ss -ltnpH`: who holds which TCP port."""
    found = []
    for line in ss.splitlines():
        fields = line.split()
        port = fields[3].rpartition(":")[2] if len(fields) > 3 else ""
        program = re.search(r'users:\(\("([^"]+)"', line)
        if port.isdigit() and program:
            found.append((int(port), program.group(1)))
    return sorted(set(found))


def sudo_rules(listing: str) -> list[str]:
    """The rules of `sudo -l -U user`: the indented lines after 'may run the following commands'."""
    rules, inside = [], False
    for line in listing.splitlines():
        if "may run the following commands" in line:
            inside = True
            continue
        if inside and line.startswith((" ", "\t")) and line.strip():
            rules.append(" ".join(line.split()))
        elif inside and line.strip():
            inside = False
    return rules


def broader_sudo(facts: RootFacts) -> list[str]:
    """Every sudo right of the user's that is not a fabdeploy helper rule, and where it comes from."""
    found = [f"the {g} group" for g in facts.groups if g in SUDO_GROUPS]
    found += [path for path in facts.sudoers_files if not os.path.basename(path).startswith("fabdeploy-")]
    found += ["/etc/sudoers" for _ in facts.main_sudoers_lines[:1]]
    if not found and any(not OUR_RULE.match(rule) for rule in facts.sudo_rules):
        found.append("sudo -l")  # from somewhere else: an alias, a group rule
    return found


def replace_sudo(facts: RootFacts, user: str) -> list[Op]:
    """--replace-sudo: take away every broader right; refuse what cannot be taken away whole."""
    if facts.main_sudoers_lines:
        raise DeployError(f"/etc/sudoers itself grants {user} rights: "
                          f"{facts.main_sudoers_lines[0].strip()}", hint="remove that line with visudo")
    ops: list[Op] = []
    for group in facts.groups:
        if group in SUDO_GROUPS:
            ops.append(Sh(f"gpasswd -d {quote(user)} {quote(group)}", what=f"taking {user} out of {group}"))
    for path, text in facts.sudoers_files.items():
        if os.path.basename(path).startswith("fabdeploy-"):
            continue
        rules = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        if any(not line.lstrip().startswith(user) for line in rules if not line.lstrip().startswith("Defaults")):
            raise DeployError(f"{path} grants sudo rights to others too", hint="edit it by hand with visudo")
        ops.append(Sh(f"rm -f {quote(path)}", what=f"removing {path}"))
    return ops


# -- the steps ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Step:
    """One provisioning step: its name, as printed, and the op that checks and acts."""

    name: str
    op: Op


def checked(name: str, check: str, action: str) -> Step:
    """A step that acts only where its check fails, and says which it did.

    The check runs in a subshell: an `exit 1` in it (a loop's early no) must end the
    check, not the whole step before its action runs.
    """
    return Step(name, Sh(f"if ( {check} ) >/dev/null 2>&1; then echo unchanged;"
                         f" else {{ {action}; }} && echo changed; fi", key=name,
                         what=f"provisioning {name}", hint="provision needs root"))


def installed(name: str, op: Install) -> Step:
    return Step(name, Install(**{**{f: getattr(op, f) for f in op.__dataclass_fields__}, "key": name,
                                 "what": f"provisioning {name}"}))


def sudoers(settings: Settings, user: str) -> str:
    """One rule: the helper, for this app. The helper checks every argument itself."""
    return (f"# Written by fabdeploy provision: {user} may run fabdeploy's root helper for "
            f"{settings.app}, nothing else.\n"
            f"{user} ALL=(root) NOPASSWD: {HELPER} {settings.app} *\n")


def helper_text() -> str:
    return "#!/usr/bin/python3 -IS\n" + onhost.program("helper").decode()


def make_app_dir(root: str, user: str, group: str) -> str:
    """deploy_to, the user's and the app group's, 0750; never through a symlink.

    Under the user's home, the user makes it (as root, a link planted
    there could point mkdir anywhere). Elsewhere every parent must be
    root's alone, and the directory is opened without following links.
    """
    script = f"""
import grp, os, pwd, stat, sys
root, user, group = {root!r}, {user!r}, {group!r}
pw, gid = pwd.getpwnam(user), grp.getgrnam(group).gr_gid
if os.path.realpath(root).startswith(pw.pw_dir.rstrip("/") + "/"):
    import subprocess
    sys.exit(subprocess.call(["runuser", "-u", user, "--", "sh", "-c",
        'mkdir -p "$1" && chgrp "$2" "$1" && chmod 0750 "$1"', "-", root, group]))
parent = os.path.dirname(root)
while True:
    st = os.lstat(parent)
    if st.st_uid != 0 or st.st_mode & 0o022 or stat.S_ISLNK(st.st_mode):
        sys.exit("%s is not root's alone: refusing to make %s under it" % (parent, root))
    if parent == "/":
        break
    parent = os.path.dirname(parent)
os.makedirs(os.path.dirname(root), exist_ok=True)
try:
    os.mkdir(root, 0o750)
except FileExistsError:
    pass
fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
os.fchown(fd, pw.pw_uid, gid)
os.fchmod(fd, 0o750)
"""
    return f"python3 -c {quote(script)}"


def steps(settings: Settings, user: str, key: str, facts: RootFacts, replace: bool = False) -> list[Step]:
    """Every step, in order; a user with broader sudo rights is refused unless `replace`."""
    app, group = settings.app, settings.group
    paths = SystemPaths(app)
    packages = " ".join(quote(pkg) for pkg in settings.provision.packages)
    home = facts.home or f"/home/{user}"
    root = absolute_root(settings, home)
    reg = registration(settings, user, facts.ipv6, home)
    keys = f"{quote(home)}/.ssh/authorized_keys"
    broader = broader_sudo(facts) if facts.user_exists else []
    if broader and not replace:
        raise DeployError(f"{user} already has broader sudo rights ({', '.join(broader)}): a stolen deploy "
                          "key would be root", hint="rerun with --replace-sudo to remove them, or choose "
                                                    "another provision.user")
    found: list[Step] = [
        checked("packages " + " ".join(settings.provision.packages),
                f"for p in {packages}; do dpkg-query -W -f='${{Status}}' \"$p\" 2>/dev/null"
                " | grep -q 'install ok installed' || exit 1; done",
                f"apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq {packages}"),
        checked(f"group {group}", f"getent group {quote(group)}", f"groupadd --system {quote(group)}"),
        checked(f"user {user}", f"id -u {quote(user)}",
                f"useradd --create-home --user-group --shell /bin/bash {quote(user)}"),
    ]
    # Exactly these: a user who deployed the app before (provision.user changed) leaves it.
    members = ",".join(sorted([user] + ([PROXY_USER] if settings.proxy.enabled else [])))
    found.append(checked(f"{group}'s members {members}",
                         f"[ \"$(getent group {quote(group)} | cut -d: -f4 | tr , '\\n' | sort | paste -sd,)\""
                         f" = {quote(members)} ]",
                         f"gpasswd -M {quote(members)} {quote(group)}"))
    found.append(checked(f"{user}'s authorized key", f"grep -qxF {quote(key)} {keys}",
                         f"install -d -m 0700 -o {quote(user)} -g {quote(user)} {quote(home)}/.ssh"
                         f" && printf '%s\\n' {quote(key)} >> {keys}"
                         f" && chown {quote(user)}: {keys} && chmod 0600 {keys}"))
    if broader:
        found += [Step(op.what, op) for op in replace_sudo(facts, user)]
    found += [
        installed(f"helper {HELPER}", Install(HELPER, helper_text(), mode=0o755)),
        installed(f"record {paths.registration}", Install(paths.registration, json.dumps(reg, indent=2) + "\n")),
        checked(f"deploy_to {root}",
                f"[ -d {quote(root)} ] && [ ! -L {quote(root)} ]"
                f" && [ \"$(stat -c %U:%G:%a {quote(root)})\" = {quote(f'{user}:{group}:750')} ]",
                make_app_dir(root, user, group)),
        checked(f"audit log {paths.audit_log}", f"[ -f {quote(paths.audit_log)} ]",
                f"install -d -m 0750 -o root -g {quote(user)} {quote(os.path.dirname(paths.audit_log))}"
                f" && install -m 0640 -o root -g {quote(user)} /dev/null {quote(paths.audit_log)}"),
    ]
    if facts.systemd:
        found.append(installed(f"systemd unit {paths.unit}",
                               Install(paths.unit, render.systemd_unit(settings, root, user),
                                       after="systemctl daemon-reload")))
        found += process_steps(settings, user, root)
    found.append(installed(f"log rotation {paths.logrotate}",
                           Install(paths.logrotate, render.logrotate_rule(settings, root, user),
                                   validate="logrotate -d {}")))
    found.append(installed(f"sudo rule {paths.sudoers}",
                           Install(paths.sudoers, sudoers(settings, user), mode=0o440,
                                   validate="visudo -cqf {}")))
    found += tls_before_site(settings)
    found += proxy_steps(settings, user, root, facts)
    found += tls_after_site(settings, facts)
    return found


# -- a release's other processes, and timers (issue 15) -------------------------------------

UNIT_DIR = "/etc/systemd/system"


def process_steps(settings: Settings, user: str, root: str) -> list[Step]:
    """Each process's unit template; each timer's service and timer, enabled; units of names
    no longer in the settings taken away."""
    app = settings.app
    found: list[Step] = []
    for name in settings.processes:
        path = f"{UNIT_DIR}/{processes.template(app, name)}"
        found.append(installed(f"process unit {path}", Install(path, render.process_unit(settings, root, user, name),
                                                               after="systemctl daemon-reload")))
    for timer in settings.timers:
        timer_name, service = processes.timer_units(app, timer.name)
        found.append(installed(f"timer unit {UNIT_DIR}/{service}",
                               Install(f"{UNIT_DIR}/{service}",
                                       render.timer_service(settings, root, user, timer.name),
                                       after="systemctl daemon-reload")))
        # systemd's own parser checks the schedule before the timer goes in.
        found.append(installed(f"timer {UNIT_DIR}/{timer_name}",
                               Install(f"{UNIT_DIR}/{timer_name}",
                                       render.timer_timer(settings, timer.name, timer.on_calendar, service),
                                       validate=f"systemd-analyze calendar {quote(timer.on_calendar)} >/dev/null",
                                       after=f"systemctl daemon-reload && systemctl restart {quote(timer_name)}")))
        found.append(checked(f"timer {timer_name} enabled", f"systemctl is-enabled {quote(timer_name)}",
                             f"systemctl enable --now {quote(timer_name)}"))
    found.append(Step("old process and timer units", Sh(retire_units(settings), key="old process and timer units",
                                                        what="provisioning old process and timer units",
                                                        hint="provision needs root")))
    return found


def retire_units(settings: Settings) -> str:
    """A script that stops, disables and removes <app>.* units whose name is not in the settings."""
    app = settings.app
    wanted = sorted({processes.template(app, n) for n in settings.processes}
                    | {u for t in settings.timers for u in processes.timer_units(app, t.name)})
    script = f"""
import os, subprocess
app, wanted, folder = {app!r}, {wanted!r}, {UNIT_DIR!r}
run = lambda *a: subprocess.run(["systemctl", *a], stdin=subprocess.DEVNULL, capture_output=True)
old = sorted(n for n in os.listdir(folder) if n.startswith(app + ".") and n not in wanted
             and n.endswith((".service", ".timer")) and os.path.isfile(os.path.join(folder, n)))
for name in old:
    if name.endswith("@.service"):  # a process: every release's instance goes
        pattern = name.replace("@.service", "@*.service")
        run("stop", pattern)
        # Its instances' links in *.wants/ (enabled at boot), then the template.
        for link in subprocess.run(["find", folder, "-mindepth", "2", "-name", pattern],
                                   capture_output=True, text=True).stdout.split():
            os.unlink(link)
    else:
        run("disable", "--now", name)
    os.unlink(os.path.join(folder, name))
if old:
    run("daemon-reload")
print("changed" if old else "unchanged")
"""
    return f"python3 -c {quote(script)}"
# -- HTTPS (issue 13): root's certificate and key, before the site names them; ACME after it ------

def tls_before_site(settings: Settings) -> list[Step]:
    """The folder the site names its certificate in, and what goes in it before the site does."""
    tls = settings.tls
    if not tls.enabled:
        return []
    paths = SystemPaths(settings.app)
    folder = quote(paths.tls_dir)
    found = [checked(f"TLS folder {paths.tls_dir}", f"[ -d {folder} ] && [ ! -L {folder} ]"
                     f" && [ \"$(stat -c %U:%a {folder})\" = root:700 ]",
                     f"install -d -m 0755 /etc/fabdeploy/tls && install -d -m 0700 -o root -g root {folder}")]
    if settings.proxy.kind == "apache":
        found.append(checked("Apache modules ssl http2", "a2query -q -m ssl && a2query -q -m http2",
                             "a2enmod -q ssl http2"))
    if tls.mode == "manual":
        found.append(installed(f"certificate {certs.bundle_path(settings)}", Install(
            certs.bundle_path(settings), certs.bundle(settings), mode=0o600, secret=True,
            validate=certs.PAIR_CHECK, after=reload_if_running(settings))))
        return found
    webroot = quote(paths.acme_webroot)
    found.append(checked(f"ACME webroot {paths.acme_webroot}", f"[ -d {webroot} ]",
                         f"install -d -m 0755 /var/lib/fabdeploy /var/lib/fabdeploy/acme {webroot}"))
    if tls.ca:
        found.append(installed(f"trusted CA {paths.trusted_ca}", Install(
            paths.trusted_ca, certs.trusted_ca(settings), after="update-ca-certificates >/dev/null")))
    found.append(checked("placeholder certificate until ACME's", *certs.placeholder(settings)))
    return found


def tls_after_site(settings: Settings, facts: RootFacts) -> list[Step]:
    """With the site serving the challenge: the certificate from ACME, then its renewal timer."""
    tls = settings.tls
    if not tls.acme:
        return []
    names = " ".join(settings.proxy.server_name)
    found = [checked(f"certificate for {names} from {tls.directory}", certs.acme_script(settings, "check"),
                     f"{certs.acme_script(settings, 'issue')} && {certs.renew_hook(settings)}")]
    if facts.systemd:  # without systemd, Debian's certbot package renews from cron
        found.append(checked("certbot.timer enabled", "systemctl is-enabled certbot.timer"
                             " && systemctl is-active certbot.timer", "systemctl enable --now certbot.timer"))
    return found


def access_log_steps(settings: Settings) -> list[Step]:
    """The app's access log, made as Debian's logrotate makes it (nginx would make it 0644:
    a log of every visitor's address and URL, readable by every user of the host)."""
    if settings.proxy.kind != "nginx":
        return []
    log = SystemPaths(settings.app).access_log
    return [checked(f"access log {log}", f"[ \"$(stat -c %U:%G:%a {quote(log)})\" = www-data:adm:640 ]",
                    f"touch {quote(log)} && chown www-data:adm {quote(log)} && chmod 0640 {quote(log)}")]


def reload_if_running(settings: Settings) -> str:
    """After a new certificate: the proxy reloads (if it runs yet) to serve it."""
    service = "apache2" if settings.proxy.kind == "apache" else "nginx"
    return f"if systemctl is-active --quiet {service}; then {HELPER} {settings.app} renewed; fi"


def proxy_steps(settings: Settings, user: str, root: str, facts: RootFacts) -> list[Step]:
    """The proxy's site, rendered here as root's file; its preview token; Debian's stock site."""
    kind = settings.proxy.kind
    if kind == "none":
        return []
    paths = SystemPaths(settings.app)
    layout = Layout(root)
    service = WEB_SERVERS[kind]
    test = "nginx -t -q" if kind == "nginx" else "apache2ctl configtest"
    # reload-or-restart: the proxy may be installed but not running yet (Apache is, on Debian's images).
    reload = f"systemctl reload-or-restart {service}"
    found: list[Step] = apache_steps(settings) if kind == "apache" else []
    found += other_web_server(settings, facts)
    if kind == "nginx":
        token = "python3 -c " + quote('import secrets; print(\'"%s" _next;\' % secrets.token_hex(16))')
        found.append(checked(f"preview token {paths.preview_map}", f"[ -s {quote(paths.preview_map)} ]",
                             f"umask 077 && {token} > {quote(paths.preview_map)}.tmp"
                             f" && chgrp {quote(user)} {quote(paths.preview_map)}.tmp"
                             f" && chmod 0640 {quote(paths.preview_map)}.tmp"
                             f" && mv {quote(paths.preview_map)}.tmp {quote(paths.preview_map)}"))
    shape = site_shape(settings, layout, facts.ipv6)
    ports = tcp_ports(settings)
    for port in ports or []:
        variant = f"/etc/fabdeploy/apps/{settings.app}.tcp-{port}.conf"
        other = Bind.tcp(settings.server.bind.host, port + 1 if port == ports[0] else ports[0])
        text = render.proxy_site(settings, dataclasses.replace(
            shape, active=Bind.tcp(settings.server.bind.host, port), backup=other))
        found.append(installed(f"site variant {variant}", Install(variant, text)))
    found += access_log_steps(settings)
    found.append(installed(f"site {paths.site(kind)}",
                           Install(paths.site(kind), render.proxy_site(settings, shape),
                                   test=test, after=reload)))
    if kind == "nginx" and stock_site_shadows(settings):
        found.append(checked("nginx's stock default site off", f"[ ! -e {STOCK_SITE} ]",
                             f"rm -f {STOCK_SITE} && nginx -t -q && systemctl reload nginx"))
    found.append(checked(f"{service} enabled and running",
                         f"systemctl is-enabled {service} && systemctl is-active {service}",
                         f"systemctl enable --now {service}"))
    return found


def stock_site_shadows(settings: Settings) -> bool:
    """Debian's stock site answers every name on port 80 first: a catch-all site there needs it off."""
    return settings.proxy.catch_all and any(listen.port == 80 for listen in settings.proxy.listen)


# -- Apache, and another web server in the way ------------------------------------------------------

WEB_SERVERS = {"nginx": "nginx", "apache": "apache2"}  # proxy.kind -> its service and program
STOCK_SITES = {"nginx": {"default"}, "apache2": {"000-default.conf"}}
# What fabdeploy's Apache site uses: mod_proxy_balancer needs a shared memory provider.
APACHE_MODULES = ("proxy", "proxy_http", "proxy_balancer", "lbmethod_byrequests", "headers", "slotmem_shm")
APACHE_STOCK_SITE = "/etc/apache2/sites-enabled/000-default.conf"


def apache_steps(settings: Settings) -> list[Step]:
    """The modules the site needs, and Debian's stock site off where it would answer first."""
    modules = " ".join(APACHE_MODULES)
    found = [checked(f"Apache modules {modules}",
                     f"for m in {modules}; do [ -e /etc/apache2/mods-enabled/$m.load ] || exit 1; done",
                     f"a2enmod -q {modules}")]
    if stock_site_shadows(settings):
        found.append(checked("Apache's stock site 000-default off", f"[ ! -e {APACHE_STOCK_SITE} ]",
                             "a2dissite -q 000-default"))
    return found


def other_web_server(settings: Settings, facts: RootFacts) -> list[Step]:
    """The other web server, which would hold the proxy's ports (now, or at the next boot).

    Where it serves nothing but its stock site (and this app's own old one), it is
    stopped and disabled: nobody's site is lost. Where it serves other sites and holds
    a port the proxy needs, provision refuses and names them: moving those is the
    operator's call. Anything else on those ports is refused too, by name.
    """
    ours, ports = WEB_SERVERS[settings.proxy.kind], {listen.port for listen in settings.proxy.listen}
    if settings.tls.enabled:
        ports.add(settings.tls.port)
    found: list[Step] = []
    for other, state in sorted(facts.web.items()):
        if other == ours:
            continue
        own = f"{settings.app}.conf"
        holds = sorted(port for port, program in facts.listeners if program == other and port in ports)
        theirs = [site for site in state["sites"] if site not in STOCK_SITES[other] and site != own]
        if own in state["sites"]:
            site = f"/etc/{other}/sites-enabled/{own}"
            reload = f" && {{ ! systemctl is-active --quiet {other} || systemctl reload {other}; }}"
            found.append(checked(f"{other}'s site for {settings.app} removed", f"[ ! -e {site} ]",
                                 f"rm -f {site}{reload}"))
        if theirs and holds:
            kind = next(k for k, s in WEB_SERVERS.items() if s == other)
            raise DeployError(f"port {holds[0]} is taken by {other}, which serves other sites "
                              f"({', '.join(theirs)})", hint=f"move them, choose another proxy.listen, "
                                                             f"or set proxy.kind: {kind}")
        if not theirs and (holds or state["enabled"] or state["active"]):
            found.append(checked(f"{other} stopped and disabled (it served only its stock site)",
                                 f"! systemctl is-enabled --quiet {other} && ! systemctl is-active --quiet {other}",
                                 f"systemctl disable --quiet --now {other}"))
    foreign = [(port, program) for port, program in facts.listeners
               if port in ports and program != ours and program not in facts.web]
    if foreign:
        raise DeployError(f"port {foreign[0][0]} is taken by {foreign[0][1]}",
                          hint="stop it, or choose another proxy.listen")
    return found


def site_shape(settings: Settings, layout: Layout, ipv6: bool) -> render.SiteShape:
    """The site of a provisioned host: over unix sockets it never changes with a release."""
    bind = settings.server.bind
    if bind is not None:
        return render.SiteShape(release="", active=bind, backup=bind.next_port(), ipv6=ipv6, listens=True,
                                root=layout.root, system=True)
    live = Bind.unix(layout.live_socket)
    preview = settings.proxy.kind == "nginx"
    return render.SiteShape(release="", active=live, backup=live, ipv6=ipv6, listens=True,
                            root=layout.root, system=True,
                            preview_map=SystemPaths(settings.app).preview_map if preview else None,
                            next_socket=layout.next_socket if preview else None)
