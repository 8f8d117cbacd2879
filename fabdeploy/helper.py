"""fabdeploy's root helper: the one program a deploy user may run with sudo. Stdlib only.

provision installs it root-owned at /usr/local/lib/fabdeploy/helper, and for
each app a sudo rule: `<user> ALL=(root) NOPASSWD: <helper> <app> *`. It
takes its facts about the app (who deploys it, where, which ports) from
the root-owned record provision wrote (/etc/fabdeploy/apps/<app>.json), never
from its caller, and accepts only these verbs, each argument checked:

  start|stop|retire|reset-failed RELEASE      a release's unit (start and retire: its processes' too)
  enable RELEASE                              started at boot (and its processes run)
  keep RELEASE [RELEASE]                      stop and disable every other release's unit
                                              (and every other release's processes but the first's)
  reload                                      HUP the releases that run (rotate-secret)
  route-tcp PORT                              the site variant for PORT, tested and reloaded
  audit                                       append the JSON object on stdin to root's audit log
  access-log LINES [follow]                   the proxy's access log for the app (last LINES lines)
  renewed                                     root only (certbot's deploy hook): test, reload the proxy

Nothing it reads or runs is writable by the deploy user: the units and the
site are root's files, and release names are digits and dashes.
"""
import json
import os
import pwd
import re
import shutil
import stat
import subprocess
import sys
import time

try:
    from .hostlib import Failed, reload_nginx, run_shell
except ImportError:  # installed: hostlib's text comes first in this file (onhost.program)
    pass

APP = re.compile(r"^[a-z_][a-z0-9_-]{0,28}$")
# A time, then (version_from: git) the commit it was built from: 20261121-103700-123-abc1234-dirty.
RELEASE = re.compile(r"^[0-9]{8}-[0-9]{6}-[0-9]{3}(-[0-9a-f]{7}(-dirty)?)?$")
REGISTRY = "/etc/fabdeploy/apps"
MAX_AUDIT = 64 * 1024


class Refused(Exception):
    """A call the helper will not carry out: said in one line, exit 2."""


def root_owned(path):
    """The file and its directory are root's, and nobody else may write them."""
    for p in (path, os.path.dirname(path)):
        st = os.lstat(p)
        if st.st_uid != 0 or st.st_mode & 0o022 or stat.S_ISLNK(st.st_mode):
            raise Refused("%s is not root's alone" % p)


def registration(app):
    if not APP.match(app):
        raise Refused("not an app name: %r" % app)
    path = os.path.join(REGISTRY, app + ".json")
    try:
        root_owned(path)
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise Refused("%s is not provisioned on this host (no %s)" % (app, path))


def caller_allowed(reg):
    """Only root, or the app's own deploy user (sudo says who called)."""
    if os.getuid() != 0:
        raise Refused("must run as root (through sudo)")
    caller = os.environ.get("SUDO_UID")
    if caller is None:
        return  # root itself
    if int(caller) != pwd.getpwnam(reg["user"]).pw_uid:
        raise Refused("only %s deploys %s" % (reg["user"], reg["app"]))


def release(arg):
    if not RELEASE.match(arg or ""):
        raise Refused("not a release name: %r" % arg)
    return arg


def unit(reg, name):
    return "%s@%s.service" % (reg["app"], release(name))


def systemctl(*args, check=True):
    proc = subprocess.run(("systemctl",) + args, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if check and proc.returncode:
        raise Failed("systemctl %s: %s" % (" ".join(args), (proc.stderr or proc.stdout).strip()),
                     proc.returncode, proc.stdout, proc.stderr)
    return proc


def app_units(reg):
    """The app's release units that systemd knows of now (running, failed, stopping)."""
    out = systemctl("list-units", "--plain", "--no-legend", "--all", reg["app"] + "@*.service",
                    check=False).stdout
    names = []
    for line in out.splitlines():
        fields = line.split()
        if fields and RELEASE.match(fields[0][len(reg["app"]) + 1:-len(".service")] or ""):
            names.append((fields[0], fields[2] if len(fields) > 2 else ""))
    return names


def start(reg, args):
    for name in [unit(reg, args[0])] + process_units(reg, args[0]):
        systemctl("reset-failed", name, check=False)  # a unit that failed before may start again
        systemctl("start", name)


def stop(reg, args):
    systemctl("stop", unit(reg, args[0]))


def retire(reg, args):
    """Stop a release's unit (and processes) without waiting, and leave nothing of it marked failed."""
    for name in [unit(reg, args[0])] + process_units(reg, args[0]):
        systemctl("disable", "--now", "--no-block", name, check=False)
        systemctl("reset-failed", name, check=False)


def reset_failed(reg, args):
    systemctl("reset-failed", unit(reg, args[0]), check=False)


def enable(reg, args):
    """The release starts at boot; so do its processes, which run from now on (after a switch
    back too, where the switch away had stopped them)."""
    systemctl("enable", "--quiet", unit(reg, args[0]))
    for name in process_units(reg, args[0]):
        systemctl("enable", "--now", "--quiet", name)


def keep(reg, args):
    """Only these releases run, and start at boot: current and its warm standby."""
    kept = set(unit(reg, name) for name in args[:2])
    enabled = out_lines(systemctl("list-unit-files", "--plain", "--no-legend", "--state=enabled",
                                  reg["app"] + "@*.service", check=False).stdout)
    doomed = (set(n for n, _ in app_units(reg)) | set(enabled)) - kept
    # Processes: only the first release's run, so that after a switch no old worker takes a job.
    doomed |= set(other_processes(reg, release(args[0])))
    for name in doomed:
        systemctl("disable", "--now", "--no-block", name, check=False)
        systemctl("reset-failed", name, check=False)


def process_units(reg, name):
    """A release's process units, one per process name in root's record (processes.py)."""
    return ["%s.%s@%s.service" % (reg["app"], proc, release(name)) for proc in reg.get("processes") or []]


def other_processes(reg, name):
    """The process units of every release but this one that run, failed, or start at boot."""
    patterns = ["%s.%s@*.service" % (reg["app"], proc) for proc in reg.get("processes") or []]
    if not patterns:
        return []
    known = out_lines(systemctl("list-units", "--plain", "--no-legend", "--all", *patterns, check=False).stdout)
    known += out_lines(systemctl("list-unit-files", "--plain", "--no-legend", "--state=enabled", *patterns,
                                 check=False).stdout)
    mine = set(process_units(reg, name))
    return sorted(set(n for n in known if n.endswith(".service") and not n.endswith("@.service")) - mine)


def out_lines(text):
    return [line.split()[0] for line in text.splitlines() if line.strip()]


def reload(reg, args):
    """HUP the release units that run; a failed or stopped one is no error (it is not serving)."""
    for name, active in app_units(reg):
        if active == "active":
            systemctl("reload", name)


def route_tcp(reg, args):
    """Over TCP the site names the serving port: root's variant for it, tested, then reloaded."""
    port = int(args[0]) if args and args[0].isdigit() else None
    if port not in reg.get("tcp_ports") or []:
        raise Refused("not one of %s's ports: %r" % (reg["app"], args[0] if args else None))
    variant = os.path.join(REGISTRY, "%s.tcp-%d.conf" % (reg["app"], port))
    root_owned(variant)
    site = reg["site"]
    saved = open(site).read() if os.path.exists(site) else None
    shutil.copyfile(variant, site + ".fabdeploy-new")
    os.replace(site + ".fabdeploy-new", site)
    proxy = reg["proxy"]
    test = "nginx -t -q" if proxy == "nginx" else "apache2ctl configtest"
    try:
        run_shell(test)
    except Failed:
        if saved is not None:
            with open(site + ".fabdeploy-new", "w") as f:
                f.write(saved)
            os.replace(site + ".fabdeploy-new", site)
        raise
    if proxy == "nginx":
        reload_nginx("systemctl reload nginx", "/run/nginx.pid")
    else:
        run_shell("systemctl reload apache2")


def audit(reg, args):
    """One line of root's audit log: the caller's JSON object, with who called and when."""
    data = sys.stdin.read(MAX_AUDIT + 1)
    if len(data) > MAX_AUDIT:
        raise Refused("an audit entry is at most %d bytes" % MAX_AUDIT)
    try:
        entry = json.loads(data)
    except ValueError:
        raise Refused("an audit entry must be one JSON object")
    if not isinstance(entry, dict):
        raise Refused("an audit entry must be one JSON object")
    entry["logged_by_uid"] = int(os.environ.get("SUDO_UID", 0))
    entry["logged_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    line = json.dumps(entry, sort_keys=True) + "\n"
    fd = os.open(reg["audit_log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o640)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def access_log(reg, args):
    """The app's access log, which the deploy user may not read itself (/var/log/nginx is root's)."""
    lines = int(args[0]) if args[0].isdigit() else 0
    if not 1 <= lines <= 100000:
        raise Refused("not a line count from 1 to 100000: %r" % args[0])
    if args[1:] not in ([], ["follow"]):
        raise Refused("the second argument may only be follow, not %r" % args[1])
    path = reg.get("access_log")
    if not path:
        raise Refused("%s has no access log of fabdeploy's (proxy: %s)" % (reg["app"], reg["proxy"]))
    sys.stdout.flush()
    argv = ["tail", "-n", str(lines)] + (["-F"] if args[1:] else []) + ["--", path]
    os.execvp("tail", argv)  # root's record names the file: nothing of the caller's is opened


def renewed(reg, args):
    """A certificate changed: the proxy tests its configuration and reloads, if it runs."""
    if os.environ.get("SUDO_UID") is not None:
        raise Refused("renewed is certbot's (root's) to call")
    proxy = reg["proxy"]
    service = "apache2" if proxy == "apache" else "nginx"
    if systemctl("is-active", "--quiet", service, check=False).returncode:
        return
    run_shell("nginx -t -q" if proxy == "nginx" else "apache2ctl configtest")
    if proxy == "nginx":
        reload_nginx("systemctl reload nginx", "/run/nginx.pid")
    else:
        run_shell("systemctl reload apache2")


VERBS = {"start": (start, 1, 1), "stop": (stop, 1, 1), "retire": (retire, 1, 1),
         "reset-failed": (reset_failed, 1, 1), "enable": (enable, 1, 1), "keep": (keep, 1, 2),
         "reload": (reload, 0, 0), "route-tcp": (route_tcp, 1, 1), "audit": (audit, 0, 0),
         "access-log": (access_log, 1, 2), "renewed": (renewed, 0, 0)}


def main(argv):
    try:
        if len(argv) < 2:
            raise Refused("usage: helper APP VERB [ARG...]")
        app, verb, args = argv[0], argv[1], argv[2:]
        reg = registration(app)
        caller_allowed(reg)
        if verb not in VERBS:
            raise Refused("no such verb: %r" % verb)
        fn, least, most = VERBS[verb]
        if not least <= len(args) <= most:
            raise Refused("%s takes %d to %d arguments" % (verb, least, most))
        fn(reg, args)
    except Refused as exc:
        sys.stderr.write("fabdeploy-helper: %s\n" % exc)
        return 2
    except Failed as exc:
        sys.stderr.write("fabdeploy-helper: %s\n" % exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
