"""Runs on the server, stdlib only: read the host's facts, probe health.

fabdeploy sends this file's text with `python3 -c`, so nothing has to be
installed or uploaded before the first command. Keep it small, and keep it
free of imports from fabdeploy.
"""
import argparse
import errno
import json
import os
import shutil
import socket
import sys
import time


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def release_state(path):
    """ready (complete), failed (marked bad) or partial (interrupted)."""
    if os.path.exists(os.path.join(path, "FAILED")):
        return "failed"
    if os.path.exists(os.path.join(path, "RELEASE.json")):
        return "ready"
    return "partial"


def lock_facts(lock_dir):
    try:
        mtime = os.stat(lock_dir).st_mtime
    except OSError:
        return None
    info = read_json(os.path.join(lock_dir, "info.json")) or {}
    info["age"] = round(time.time() - mtime, 1)
    return info


def current_bind(root):
    """Where the current release's server listens (its BIND file, see phases.configure_server)."""
    try:
        with open(os.path.join(root, "current", "BIND")) as f:
            return f.read().strip() or None
    except OSError:
        return None


def find_uv():
    """uv on PATH or in ~/.local/bin (the one fabdeploy ships lives in the wheelhouse)."""
    for path in (shutil.which("uv"), os.path.expanduser("~/.local/bin/uv")):
        if path and os.access(path, os.X_OK):
            return path
    return None


def glibc():
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").split()[1]
    except (ValueError, OSError, IndexError, AttributeError):
        return None


def venv_ok():
    """Debian splits venv's ensurepip out into python3-venv."""
    try:
        import ensurepip  # noqa: F401
        import venv  # noqa: F401
    except ImportError:
        return False
    return True


def read_facts(root):
    releases_dir = os.path.join(root, "releases")
    state_dir = os.path.join(root, ".fabdeploy")
    releases = []
    if os.path.isdir(releases_dir):
        for name in sorted(os.listdir(releases_dir)):
            path = os.path.join(releases_dir, name)
            if name.startswith(".") or not os.path.isdir(path):
                continue
            releases.append({"name": name, "state": release_state(path),
                             "meta": read_json(os.path.join(path, "RELEASE.json")) or {}})
    current = None
    if os.path.islink(os.path.join(root, "current")):
        current = os.path.basename(os.readlink(os.path.join(root, "current")))
    house = os.path.join(root, "shared", "wheelhouse")
    return {
        "home": os.path.expanduser("~"),
        "user": os.environ.get("USER") or os.environ.get("LOGNAME"),
        "uid": os.getuid(),
        "root": root,
        "root_exists": os.path.isdir(root),
        "current": current,
        "current_bind": current_bind(root),
        "releases": releases,
        "initialized": os.path.exists(os.path.join(state_dir, "initialized")),
        "config_exists": os.path.exists(os.path.join(root, "shared", "instance", "config.py")),
        # A new preview token, which nginx knows only after a reload (see make_preview_map).
        "preview_unloaded": os.path.exists(os.path.join(state_dir, "preview.unloaded")),
        "lock": lock_facts(os.path.join(state_dir, "lock")),
        "venv_ok": venv_ok(),
        "systemd": os.path.isdir("/run/systemd/system"),
        "uv": find_uv(),

        "python": "%d.%d" % sys.version_info[:2],
        "machine": os.uname().machine,
        "glibc": glibc(),
        "wheelhouse": sorted(os.listdir(house)) if os.path.isdir(house) else [],
    }


def problems(info, args):
    """What stops a deploy before anything changes (fabdeploy words them)."""
    found = []
    if args.refuse_root and info["uid"] == 0:
        found.append("root")
    sbin = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    if args.needs and not shutil.which(args.needs, path=sbin):
        found.append("no-" + args.needs)
    if not info["venv_ok"]:
        found.append("no-venv")
    return found


def make_root(root):
    """deploy_to and its directories; sudo only where the parent is not ours."""
    if not os.path.isdir(root):
        try:
            os.makedirs(root, exist_ok=True)  # a racing deploy may make it first: the lock decides
        except PermissionError:
            owner = "%d:%d" % (os.getuid(), os.getgid())
            for argv in (["sudo", "-n", "mkdir", "-p", root], ["sudo", "-n", "chown", owner, root]):
                import subprocess
                done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)
                if done.returncode:
                    raise OSError("%s: %s" % (" ".join(argv), done.stderr.strip()))
    for sub in ("releases", "shared/run", "shared/log", "shared/wheelhouse", ".fabdeploy"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    instance = os.path.join(root, "shared", "instance")
    os.makedirs(instance, exist_ok=True)
    os.chmod(instance, 0o700)
    make_preview_map(os.path.join(root, ".fabdeploy", "preview.map"))


def make_preview_map(path):
    """The nginx map line that routes requests with this host's token to the preview.

    Made once, here, 0600: the token never leaves the server (nginx's master
    reads the file as root; the agent reads it to send the token). nginx
    reads it at a reload: until one has happened, preview.unloaded says so.
    """
    if os.path.exists(path):
        return
    import secrets
    open(os.path.join(os.path.dirname(path), "preview.unloaded"), "w").close()
    tmp = "%s.%d" % (path, os.getpid())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write('"%s" _next;\n' % secrets.token_hex(16))  # _next: render.NEXT
    os.rename(tmp, path)


def preview_token(path):
    with open(path) as f:
        return f.read().split('"')[1]


def take_lock(root, info_json):
    """Exactly one of two racing deploys gets the lock, and it is never seen without its info.

    The info is written into a private directory first, then renamed to the
    lock's name: rename(2) is atomic, and fails if the lock already exists.
    """
    lock = os.path.join(root, ".fabdeploy", "lock")
    mine = "%s.%d" % (lock, os.getpid())
    os.mkdir(mine)
    with open(os.path.join(mine, "info.json"), "w") as f:
        f.write(info_json + "\n")
    try:
        os.rename(mine, lock)
    except OSError as exc:
        shutil.rmtree(mine, ignore_errors=True)
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR):
            return False
        raise
    return True


def facts(args):
    """Print the host's facts; with --lock, also lay out, lock, and read them afresh."""
    root = os.path.expanduser(args.root)
    info = read_facts(root)
    info["problems"] = problems(info, args)
    if args.lock is not None and args.only_laid_out and not info["root_exists"]:
        info["deferred"] = True  # a fresh host: nothing is made there yet
    elif args.lock is not None and not info["problems"]:
        try:
            make_root(root)
            locked = take_lock(root, args.lock)
        except OSError as exc:
            info["lock_error"] = str(exc)
        else:
            info = read_facts(root) if locked else info
            info.update(locked=locked, problems=[])
            if not locked:
                info["lock"] = lock_facts(os.path.join(root, ".fabdeploy", "lock"))
    print(json.dumps(info))


def unix_connection(path, timeout):
    import http.client

    class UnixHTTPConnection(http.client.HTTPConnection):
        def connect(self):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(self.timeout)
            self.sock.connect(path)

    return UnixHTTPConnection("localhost", timeout=timeout)


def get_status(args):
    """One GET of the health path; the status code, or an error string."""
    import http.client  # here: only health checks pay for importing it
    if args.unix:
        conn = unix_connection(args.unix, timeout=5)
    else:
        host, _, port = args.tcp.rpartition(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        headers = {"Host": args.host_header}
        if args.preview_map:
            headers["X-Fabdeploy-Preview"] = preview_token(args.preview_map)
        conn.request("GET", args.path, headers=headers)
        response = conn.getresponse()
        served = response.getheader("X-Fabdeploy-Site")
        if args.stamp and served != args.stamp:
            return "X-Fabdeploy-Site is %r, not %r" % (served, args.stamp)
        if args.stamp and not 200 <= response.status < 300:
            # It is our site and our release answering: no point asking again.
            raise Final(response.status)
        return response.status
    except (OSError, http.client.HTTPException) as exc:
        return "%s: %s" % (type(exc).__name__, exc)
    finally:
        conn.close()


class Final(Exception):
    """An answer that settles the check: do not retry."""


def read_pid(path):
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def stat_fields(pid):
    """/proc/PID/stat after the command's name (state, ppid, ...); None if there is no such process."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def server_gone(args, started):
    """True when the server we wait for has died: no point waiting further."""
    if args.pid_file:
        if not os.path.exists(args.pid_file):
            # gunicorn writes it first thing, and removes it when it exits.
            return time.monotonic() - started > 10
        pid = read_pid(args.pid_file)
        fields = stat_fields(pid) if pid else None
        # A dead daemon may linger as a zombie until init reaps it.
        return not fields or fields[0] == "Z"
    if args.unit:
        import subprocess
        state = subprocess.run(["systemctl", "is-failed", "--quiet", args.unit])
        return state.returncode == 0
    return False


def health(args):
    """Poll until the path answers 2xx; exit 1 with the last answer if not."""
    started = time.monotonic()
    deadline = started + args.timeout
    last = "no answer"
    while True:
        try:
            last = get_status(args)
        except Final as answer:
            last = "the release answered %s" % answer
            break
        if isinstance(last, int) and 200 <= last < 300:
            print("ok %d" % last)
            return 0
        if server_gone(args, started):
            last = "the server exited (last answer: %s)" % last
            break
        if time.monotonic() > deadline:
            break
        time.sleep(0.02)  # a server comes up between polls: the deploy waits for the next
    print("unhealthy: %s" % last)
    return 1


STALE_PROXY = 91  # exit status of reload_proxy when the old configuration keeps serving


def accepting_worker(pid, master):
    """True while `pid` is a worker of nginx's `master` that still takes new connections.

    An nginx worker told to quit renames itself "worker process is shutting
    down" and, in the same step, closes its listening sockets.
    """
    fields = stat_fields(pid)
    if not fields or int(fields[1]) != master:
        return False
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return f.read().replace(b"\0", b" ").strip() == b"nginx: worker process"
    except OSError:
        return False


def reload_proxy(args):
    """Run the reload command; for nginx, then wait until its old workers take no more connections.

    nginx's master starts the new workers first and tells the old ones to
    quit about 100 ms later: meanwhile both accept connections, so a new
    connection may still meet the old configuration after one has met the
    new. The reload is done only when every worker from before it has
    stopped accepting. (Without nginx's pid file there is nothing to wait for.)
    """
    import subprocess
    master = read_pid(args.pid_file) if args.pid_file else None
    old = set()
    if master:
        old = set(int(n) for n in os.listdir("/proc") if n.isdigit() and accepting_worker(int(n), master))
    code = subprocess.call(args.run, shell=True)
    if code:
        return code
    deadline = time.monotonic() + args.timeout
    while True:
        old = set(pid for pid in old if accepting_worker(pid, master))
        if not old:
            return 0
        if time.monotonic() > deadline:
            print("its workers from before the reload still take connections after %gs" % args.timeout)
            return STALE_PROXY
        time.sleep(0.01)


def same_content(a, b):
    """Files with the same bytes (hard links of one file in uv's cache, most often)."""
    try:
        sa, sb = os.stat(a), os.stat(b)
        if (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino):
            return True
        if sa.st_size != sb.st_size:
            return False
        with open(a, "rb") as fa, open(b, "rb") as fb:
            return fa.read() == fb.read()
    except OSError:
        return False


def compile_venv(args):
    """Bytecode for every module of this (the release's) venv, made before it runs.

    A release's server cannot write __pycache__ under systemd's
    ProtectSystem, so without this every start compiles every module again.
    Where the previous release has the same source, its .pyc is linked
    (checked-hash pycs say which source they belong to, so Python itself
    rejects one that does not match); the rest are compiled here.
    """
    import importlib.util
    import py_compile
    import sysconfig
    site = sysconfig.get_paths()["purelib"]
    like = os.path.join(args.like, os.path.relpath(site, sys.prefix)) if args.like else None
    counts = {"linked": 0, "compiled": 0}
    for folder, dirs, files in os.walk(site):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for name in files:
            if not name.endswith(".py"):
                continue
            source = os.path.join(folder, name)
            pyc = importlib.util.cache_from_source(source)
            if os.path.exists(pyc):
                continue
            if like:
                old = os.path.join(like, os.path.relpath(source, site))
                old_pyc = importlib.util.cache_from_source(old)
                if os.path.exists(old_pyc) and same_content(source, old):
                    os.makedirs(os.path.dirname(pyc), exist_ok=True)
                    try:
                        os.link(old_pyc, pyc)
                    except OSError:
                        shutil.copy2(old_pyc, pyc)
                    counts["linked"] += 1
                    continue
            # A module that does not compile (a py2 leftover, a template) fails at import, if ever.
            if py_compile.compile(source, cfile=pyc, quiet=1,
                                  invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH):
                counts["compiled"] += 1
    print(json.dumps(counts))
    return 0


def main(argv):
    parser = argparse.ArgumentParser(prog="fabdeploy-agent")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("facts")
    p.add_argument("--root", required=True)
    p.add_argument("--lock", help="take the deploy lock, recording this JSON in it")
    p.add_argument("--only-laid-out", action="store_true",
                   help="with --lock: lock only where deploy_to exists already")
    p.add_argument("--needs", help="a program the host must have, e.g. the proxy's")
    p.add_argument("--refuse-root", action="store_true", help="the app must not run as root")
    p = sub.add_parser("health")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--unix")
    target.add_argument("--tcp")
    p.add_argument("--path", default="/")
    p.add_argument("--host-header", default="localhost")
    p.add_argument("--timeout", type=float, default=30)
    p.add_argument("--pid-file")
    p.add_argument("--unit")
    p.add_argument("--stamp", help="expect the proxy's X-Fabdeploy-Site header to say this")
    p.add_argument("--preview-map", help="send the preview token kept in this nginx map file")
    p = sub.add_parser("reload", help="reload the proxy and wait until it serves the new config")
    p.add_argument("--run", required=True, help="the proxy's reload command, run by sh")
    p.add_argument("--pid-file", help="nginx's pid file: wait for the workers of its master")
    p.add_argument("--timeout", type=float, default=10)
    p = sub.add_parser("compile", help="run with the venv's python")
    p.add_argument("--like", help="the previous release's venv, whose bytecode may be reused")
    args = parser.parse_args(argv)
    if args.command == "facts":
        return facts(args)
    if args.command == "compile":
        return compile_venv(args)
    if args.command == "reload":
        return reload_proxy(args)
    return health(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
