"""Runs on the server, stdlib only: fabdeploy's persistent agent, one per host and connection.

The client starts it once over a single SSH channel (see session.py: a small
bootstrap reads this file's text from the channel, or from a copy cached by
hash, never from the command line) and then speaks JSON lines with it:

  client -> agent   {"id": 1, "phases": [{"name": "venv", "ops": [...]}, ...]}
                    followed by the bytes of each upload op, in order;
                    {"control": "cancel"} at any time.
  agent -> client   {"id": 1, "phase": "venv", "seconds": 0.41}  after each phase
                    {"id": 1, "out": "..."}                       a streamed op's output
                    {"id": 1, "ok": true, "results": {...}}       or
                    {"id": 1, "ok": false, "phase": ..., "index": i, "error": {...}}

The client decides every command and file; the agent only carries them
out on the host, phase by phase, and stops at the first failure. A request
marked interruptible stops between phases once the client is gone (kill -9,
a dropped connection) or cancels; one that is not (the switch) runs to its
end, so a host is never left half switched by a client that died.

Keep it free of imports from fabdeploy: it runs with the server's Python.
"""
import errno
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time

try:
    from .hostlib import Failed, read_pid, reload_nginx, run_shell, stat_fields
except ImportError:  # on the host: hostlib's text comes first in this file (onhost.program)
    pass



class Stopped(Exception):
    """The client cancelled, or is gone: stop before the next phase."""


# -- the channel --------------------------------------------------------------------

class Inbox:
    """The channel's stdin: request lines, upload bytes, and control lines between them."""

    def __init__(self, fd=0, pending=b""):
        self.fd = fd
        self.buf = pending
        self.eof = False
        self.cancelled = False
        self.blobs = 0  # upload bytes of the running request still to come: no lines among them

    def _fill(self, block):
        if self.eof:
            return False
        if not block and not select.select([self.fd], [], [], 0)[0]:
            return False
        data = os.read(self.fd, 1 << 16)
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def line(self):
        """The next line that is not a control line, or None at the end."""
        while True:
            while b"\n" not in self.buf:
                if not self._fill(True):
                    return None
            line, _, self.buf = self.buf.partition(b"\n")
            if not self._control(line):
                return line

    def _control(self, line):
        if line.startswith(b'{"control"'):
            self.cancelled = self.cancelled or json.loads(line).get("control") == "cancel"
            return True
        return False

    def copy(self, size, out):
        """size bytes of an upload into the file object out (None: read and drop them)."""
        while size > 0:
            if not self.buf and not self._fill(True):
                raise Stopped("the client went away during an upload")
            chunk, self.buf = self.buf[:size], self.buf[size:]
            if out is not None:
                out.write(chunk)
            size -= len(chunk)
            self.blobs -= len(chunk)

    def poll(self):
        """Between phases: take in what has arrived; True if the client cancelled or is gone."""
        while self._fill(False):
            pass
        while not self.blobs and b"\n" in self.buf:  # control lines at the front only: after them may come a request
            line, _, rest = self.buf.partition(b"\n")
            if not self._control(line):
                break
            self.buf = rest
        return self.cancelled or self.eof


class Outbox:
    """The channel's stdout: one JSON line per event; a gone client is noted, not fatal."""

    def __init__(self, stream):
        self.stream = stream
        self.gone = False

    def send(self, message):
        if self.gone:
            return
        try:
            self.stream.write(json.dumps(message).encode() + b"\n")
            self.stream.flush()
        except (BrokenPipeError, OSError):
            self.gone = True


# -- facts -----------------------------------------------------------------------------

def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read_text(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def release_state(path, names):
    """ready (complete), failed (marked bad) or partial (interrupted)."""
    if os.path.exists(os.path.join(path, names["failed"])):
        return "failed"
    if os.path.exists(os.path.join(path, names["meta"])):
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


def venv_ok(python):
    """Debian splits venv's ensurepip out into python3-venv: ask the Python that makes venvs."""
    if python in (None, "", sys.executable):
        try:
            import ensurepip  # noqa: F401
            import venv  # noqa: F401
        except ImportError:
            return False
        return True
    try:
        return subprocess.run([python, "-c", "import ensurepip, venv"], stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0
    except OSError:
        return False


def sha256_of(path):
    import hashlib
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None


def units(app, state):
    """The app's release units in a systemd state (active, failed), by name."""
    if not app or not os.path.isdir("/run/systemd/system"):
        return []
    try:
        out = subprocess.run(["systemctl", "list-units", "--plain", "--no-legend", "--all",
                              "--state=" + state, app + "@*.service"], stdin=subprocess.DEVNULL,
                             capture_output=True, text=True).stdout
    except OSError:
        return []
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def link_name(path):
    try:
        return os.readlink(path)
    except OSError:
        return None


def expanded(args):
    """Layout.for_agent()'s paths, ~ as this user's home."""
    paths = dict(args["paths"])
    for key, value in list(paths.items()):
        if isinstance(value, str):
            paths[key] = os.path.expanduser(value)
    paths["dirs"] = dict((os.path.expanduser(k), v) for k, v in args["paths"]["dirs"].items())
    return paths


def read_facts(args):
    paths = expanded(args)
    root, names = paths["root"], paths["release_files"]
    releases = []
    if os.path.isdir(paths["releases"]):
        for name in sorted(os.listdir(paths["releases"])):
            path = os.path.join(paths["releases"], name)
            if name.startswith(".") or not os.path.isdir(path):
                continue
            bind = (read_text(os.path.join(path, names["bind"])) or "").strip() or None
            releases.append({"name": name, "state": release_state(path, names), "bind": bind,
                             "meta": read_json(os.path.join(path, names["meta"])) or {}})
    current = link_name(paths["current"])
    live = link_name(paths["live"])
    house = paths["wheelhouse"]
    registration = None
    if args.get("registration"):
        values = read_json(args["registration"])
        if values is not None:
            registration = {"values": values, "path": args["registration"]}
    site = args.get("site_path")
    app = args.get("app")
    return {
        "home": os.path.expanduser("~"),
        "user": os.environ.get("USER") or os.environ.get("LOGNAME"),
        "uid": os.getuid(),
        "root": root,
        "root_exists": os.path.isdir(root),
        "current": os.path.basename(current) if current else None,
        "live_target": os.path.basename(live)[:-len(".sock")] if live and live.endswith(".sock") else None,
        "releases": releases,
        "initialized": os.path.exists(paths["initialized"]),
        "config_exists": os.path.exists(paths["config"]),
        # A new preview token, which nginx knows only after a reload (see make_preview_map).
        "preview_unloaded": os.path.exists(paths["preview_unloaded"]),
        "lock": lock_facts(paths["lock"]),
        "venv_ok": venv_ok(args.get("python")),
        "systemd": os.path.isdir("/run/systemd/system"),
        "uv": find_uv(),
        "python": "%d.%d" % sys.version_info[:2],
        "machine": os.uname().machine,
        "glibc": glibc(),
        "wheelhouse": sorted(os.listdir(house)) if os.path.isdir(house) else [],
        "registration": registration,
        "site_sha256": sha256_of(site) if site and not registration else None,
        "ipv6": os.path.exists("/proc/net/if_inet6"),
        "failed_units": units(app, "failed"),
        "active_units": units(app, "active"),
        # issue 14: the current release's environment (new values make the same wheel deploy again),
        # and the database backups taken before migrations.
        "env_sha256": sha256_of(os.path.join(paths["releases"], os.path.basename(current), paths["release_files"]["env"])) if current else None,
        "backups": list_backups(paths["backups"]),
    }


def problems(info, args):
    """What stops a deploy before anything changes (fabdeploy words them)."""
    found = []
    if args.get("refuse_root") and info["uid"] == 0:
        found.append("root")
    sbin = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    needs = args.get("needs")
    if needs and not shutil.which(needs["program"], path=sbin):
        found.append(needs["problem"])
    if not info["venv_ok"]:
        found.append("no-venv")
    if args.get("require_registration") and not info["registration"]:
        site = args.get("site_path")
        if not (site and os.access(os.path.dirname(site) or "/", os.W_OK)):
            found.append("not-provisioned")
    return found


def op_facts(args, ctx):
    info = read_facts(args)
    info["problems"] = problems(info, args)
    return info


# -- laying out and locking --------------------------------------------------------------

def make_root(paths, preview):
    """deploy_to and its directories (a provisioned host's deploy_to is made by provision)."""
    root = paths["root"]
    if not os.path.isdir(root):
        try:
            os.makedirs(root, mode=0o750, exist_ok=True)  # a racing deploy may make it first
        except OSError as exc:
            raise OSError("%s does not exist and cannot be created (%s)" % (root, exc.strerror))
    for path, mode in sorted(paths["dirs"].items()):
        try:
            os.mkdir(path, mode)
        except FileExistsError:
            pass
        have = os.stat(path).st_mode & 0o7777
        if have & ~mode:  # tighten a private directory; never open one up
            os.chmod(path, have & mode)
    if preview:
        make_preview_map(paths["preview_map"], paths["preview_unloaded"], preview)


def make_preview_map(path, unloaded, value):
    """The nginx map line that routes requests with this host's token to the preview.

    Made once, here, 0600, where the proxy is the deploy user's own (a
    provisioned host's token is root's: provision makes it). nginx reads it
    at a reload: until one has happened, `unloaded` says so.
    """
    if os.path.exists(path):
        return
    import secrets
    open(unloaded, "w").close()
    tmp = "%s.%d" % (path, os.getpid())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write('"%s" %s;\n' % (secrets.token_hex(16), value))
    os.rename(tmp, path)


def take_lock(lock, info_json):
    """Exactly one of two racing deploys gets the lock, and it is never seen without its info.

    The info is written into a private directory first, then renamed to the
    lock's name: rename(2) is atomic, and fails if the lock already exists.
    """
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


def op_lock(args, ctx):
    """The host's facts; then lay out deploy_to, take the lock and read them afresh."""
    paths = expanded(args)
    info = op_facts(args, ctx)
    if args.get("only_laid_out") and not info["root_exists"]:
        info["deferred"] = True  # a fresh host: nothing is made there yet
        return info
    current = next((r for r in info["releases"] if r["name"] == info["current"]), None)
    if args.get("unless_sha") and current and current["meta"].get("sha256") == args["unless_sha"]:
        info["unchanged"] = True  # the very wheel serves already: nothing to lock for
        return info
    if info["problems"]:
        return info
    try:
        make_root(paths, None if info["registration"] else args.get("preview"))  # else root made it
        locked = take_lock(paths["lock"], json.dumps(args["info"]))
    except OSError as exc:
        info["lock_error"] = str(exc)
        return info
    if locked:
        created = not info["root_exists"]
        info = op_facts(args, ctx)
        info.update(locked=True, created_root=created)
    else:
        info["lock"] = lock_facts(paths["lock"])
    return info


def op_guard(args, ctx):
    """A plan made from the facts the client remembered holds only if the host is still so."""
    info = read_facts(args)
    moved = sorted(key for key, value in args["expect"].items() if info.get(key) != value)
    if moved:
        raise Failed("the host changed since it was last seen (%s)" % ", ".join(moved), stale=True,
                     facts=info)


def op_unlock(args, ctx):
    shutil.rmtree(os.path.expanduser(args["lock"]), ignore_errors=True)


# -- files ------------------------------------------------------------------------------------

def temporary(path):
    return os.path.join(os.path.dirname(path), ".%s.%d" % (os.path.basename(path), os.getpid()))


def op_write(args, ctx):
    """A file written aside and renamed into place; a secret is 0600 from the instant it exists."""
    path = args["path"]
    tmp = temporary(path)
    mode = int(args.get("mode", 0o644))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600 if args.get("secret") else 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(args["text"].encode())
        os.rename(tmp, path)
    except BaseException:
        with_quiet(os.unlink, tmp)
        raise


def op_upload(args, ctx):
    """A file whose bytes follow the request, written straight to its path as they come."""
    path = args["path"]
    target = temporary(path) if args.get("atomic") else path
    with open(target, "wb") as f:
        ctx.inbox.copy(args["size"], f)
    if args.get("atomic"):
        os.rename(target, path)


def op_install(args, ctx):
    """A root-owned file (provision): written aside, checked, renamed in; put back if its test fails."""
    path, text = args["path"], args["text"]
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    old = read_text(path)
    if old == text and (os.stat(path).st_mode & 0o7777) == args["mode"]:
        return "unchanged"
    tmp = temporary(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            if args.get("group"):
                import grp
                os.fchown(f.fileno(), 0, grp.getgrnam(args["group"]).gr_gid)
            os.fchmod(f.fileno(), args["mode"])
        if args.get("validate"):
            run_shell(args["validate"].replace("{}", tmp))
        os.rename(tmp, path)
    except BaseException:
        with_quiet(os.unlink, tmp)
        raise
    if args.get("test"):
        try:
            run_shell(args["test"])
        except Failed:
            if old is None:
                with_quiet(os.unlink, path)
            else:
                with open(tmp, "w") as f:
                    f.write(old)
                os.rename(tmp, path)
            raise
    if args.get("after"):
        run_shell(args["after"])
    return "changed"


def op_read(args, ctx):
    return read_text(args["path"])


def op_mkdir(args, ctx):
    os.makedirs(args["path"], exist_ok=True)


def op_link(args, ctx):
    """Atomic: a symlink under a temporary name, renamed over the link."""
    tmp = args.get("tmp") or args["link"] + ".tmp"
    with_quiet(os.unlink, tmp)
    os.symlink(args["target"], tmp)
    os.rename(tmp, args["link"])


def op_remove(args, ctx):
    for path in args["paths"]:
        with_quiet(os.unlink, path)


def op_tail(args, ctx):
    """The last lines of a file (since the last `marker` line, when one is given)."""
    return tail(args["path"], args.get("lines", 30), args.get("marker"))


def tail(path, lines, marker=None):
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 256 * 1024))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    if marker and marker + "\n" in text:
        text = text.rsplit(marker + "\n", 1)[1]
    return "\n".join(text.splitlines()[-lines:])


def with_quiet(fn, *args):
    try:
        fn(*args)
    except OSError:
        pass


def op_trash(args, ctx):
    """Releases leave releases/ at once, renamed into the trash; a background rm deletes them."""
    trash = args["trash"]
    os.makedirs(trash, exist_ok=True)
    import tempfile
    bin_dir = tempfile.mkdtemp(dir=trash)
    for path in args["releases"]:
        if os.path.lexists(path):
            os.rename(path, os.path.join(bin_dir, os.path.basename(path)))
    subprocess.Popen(["rm", "-rf", trash], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL, start_new_session=True)


def op_audit(args, ctx):
    """One JSON line: through the root helper where provision made the log root's, else appended here."""
    line = json.dumps(args["entry"], sort_keys=True)
    if args.get("helper"):
        run_helper(args["helper"], args["app"], ["audit"], stdin=line + "\n")
        return
    with open(args["path"], "a") as f:
        f.write(line + "\n")


# -- commands ------------------------------------------------------------------------------

def op_sh(args, ctx):
    """A shell command; its output is returned (and streamed, with stream)."""
    env = dict(os.environ)
    env.update(args.get("env") or {})
    for name in args.get("unset") or []:
        env.pop(name, None)
    proc = subprocess.Popen(["/bin/sh", "-c", args["cmd"]], cwd=args.get("cwd"), env=env,
                            stdin=subprocess.PIPE if args.get("stdin") is not None else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    out, err = communicate(proc, args, ctx)
    if proc.returncode and args.get("check", True):
        raise Failed("exit %d" % proc.returncode, proc.returncode, out, err)
    return {"exit": proc.returncode, "stdout": out, "stderr": err}


def communicate(proc, args, ctx):
    """Both streams as they come; a cancel stops an interruptible command (its process group)."""
    if args.get("stdin") is not None:
        try:
            proc.stdin.write(args["stdin"].encode())
            proc.stdin.close()
        except BrokenPipeError:
            pass
    streams = {proc.stdout.fileno(): [], proc.stderr.fileno(): []}
    open_fds = set(streams)
    poller = select.poll()
    for fd in open_fds:
        poller.register(fd, select.POLLIN | select.POLLHUP)
    while open_fds:
        for fd, _ in poller.poll(200):
            data = os.read(fd, 1 << 16)
            if not data:
                poller.unregister(fd)
                open_fds.discard(fd)
                continue
            streams[fd].append(data)
            if args.get("stream"):
                ctx.out.send({"id": ctx.request, "out": data.decode(errors="replace")})
        if ctx.interruptible and args.get("interruptible", True) and ctx.inbox.poll() and ctx.inbox.cancelled:
            with_quiet(os.killpg, proc.pid, signal.SIGTERM)
    proc.wait()
    return (b"".join(streams[proc.stdout.fileno()]).decode(errors="replace"),
            b"".join(streams[proc.stderr.fileno()]).decode(errors="replace"))


def run_helper(helper, app, argv, stdin=None):
    """fabdeploy's root helper, the one program provision lets the deploy user run with sudo."""
    proc = subprocess.run(["sudo", "-n", helper, app] + list(argv), input=stdin, text=True,
                          capture_output=True,
                          stdin=None if stdin is not None else subprocess.DEVNULL)
    if proc.returncode:
        raise Failed("exit %d" % proc.returncode, proc.returncode, proc.stdout, proc.stderr)
    return proc.stdout


def op_helper(args, ctx):
    out = run_helper(args["helper"], args["app"], args["argv"], args.get("stdin"))
    return out


def op_compile(args, ctx):
    """Byte-compile a release's venv with its own Python, which runs this file's `compile`."""
    argv = [args["python"], ctx.source, "compile"] + (["--like", args["like"]] if args.get("like") else [])
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if proc.returncode:
        raise Failed("exit %d" % proc.returncode, proc.returncode, proc.stdout, proc.stderr)
    return json.loads(proc.stdout or "{}")


# -- health ---------------------------------------------------------------------------------------

def unix_connection(path, timeout):
    import http.client

    class UnixHTTPConnection(http.client.HTTPConnection):
        def connect(self):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(self.timeout)
            self.sock.connect(path)

    return UnixHTTPConnection("localhost", timeout=timeout)


class Final(Exception):
    """An answer that settles the check: do not retry."""


def tls_connection(host, port, server_name, timeout):
    """HTTPS to the proxy on this host, naming the site (SNI). Its certificate is not checked:
    this asks our own proxy over loopback whether it routes to the app, as the stamp then says."""
    import http.client
    import ssl

    class SiteHTTPSConnection(http.client.HTTPSConnection):
        def connect(self):
            raw = socket.create_connection((host, port), self.timeout)
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            self.sock = context.wrap_socket(raw, server_hostname=server_name)

    return SiteHTTPSConnection(host, port, timeout=timeout)


def preview_token(path):
    with open(path) as f:
        return f.read().split('"')[1]


def get_status(args):
    """One GET of the health path; the status code, or an error string."""
    import http.client  # here: only health checks pay for importing it
    target = args["target"]
    if target.startswith("unix:"):
        conn = unix_connection(target[len("unix:"):], timeout=5)
    else:
        host, _, port = target.rpartition(":")
        if args.get("tls"):
            conn = tls_connection(host.strip("[]"), int(port), args.get("host_header"), timeout=5)
        else:
            conn = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=5)
    try:
        headers = {"Host": args.get("host_header") or "localhost"}
        if args.get("preview_map"):
            headers["X-Fabdeploy-Preview"] = preview_token(args["preview_map"])
        conn.request("GET", args["path"], headers=headers)
        response = conn.getresponse()
        served = response.getheader("X-Fabdeploy-Site")
        stamp = args.get("stamp")
        if stamp and served != stamp:
            return "X-Fabdeploy-Site is %r, not %r" % (served, stamp)
        if stamp and not 200 <= response.status < 300:
            raise Final(response.status)  # our site and our release answering: settled
        return response.status
    except (OSError, http.client.HTTPException) as exc:
        return "%s: %s" % (type(exc).__name__, exc)
    finally:
        conn.close()


def server_gone(args, started):
    """True when the server we wait for has died: no point waiting further."""
    if args.get("pid_file"):
        if not os.path.exists(args["pid_file"]):
            return time.monotonic() - started > 10  # the serve script writes it first thing
        pid = read_pid(args["pid_file"])
        fields = stat_fields(pid) if pid else None
        return not fields or fields[0] == "Z"  # a dead daemon may linger as a zombie
    if args.get("unit"):
        # Failed, or exited once already and waiting to be restarted: either way the
        # server did not come up, and systemd's restarts would only repeat that.
        shown = subprocess.run(["systemctl", "show", "-p", "ActiveState,SubState,NRestarts", args["unit"]],
                               stdin=subprocess.DEVNULL, capture_output=True, text=True).stdout
        state = dict(line.split("=", 1) for line in shown.splitlines() if "=" in line)
        return (state.get("ActiveState") == "failed" or state.get("SubState") == "auto-restart"
                or int(state.get("NRestarts") or 0) > 0)
    return False


def op_health(args, ctx):
    """Poll until the path answers 2xx; fail with the last answer (and the app's log) if not."""
    started = time.monotonic()
    deadline = started + float(args["timeout"])
    last = "no answer"
    while True:
        try:
            last = get_status(args)
        except Final as answer:
            last = "the release answered %s" % answer
            break
        if isinstance(last, int) and 200 <= last < 300:
            return "ok %d" % last
        if server_gone(args, started):
            last = "the server exited (last answer: %s)" % last
            break
        if time.monotonic() > deadline:
            break
        if ctx.interruptible and ctx.inbox.poll() and ctx.inbox.cancelled:
            raise Stopped("cancelled")
        time.sleep(0.02)  # a server comes up between polls: the deploy waits for the next
    log = tail(args["log"], 400, args.get("marker")) if args.get("log") else ""
    raise Failed("unhealthy: %s" % last, 1, log=log, unhealthy=str(last))


# -- a release's other processes ----------------------------------------------------------------

def unit_state(name):
    shown = subprocess.run(["systemctl", "show", "-p", "ActiveState,SubState,NRestarts,ActiveEnterTimestampMonotonic",
                            name], stdin=subprocess.DEVNULL, capture_output=True, text=True).stdout
    return dict(line.split("=", 1) for line in shown.splitlines() if "=" in line)


def process_age(check):
    """Seconds a process has run; None if it does not run (exited, failed, restarting)."""
    if check.get("unit"):
        state = unit_state(check["unit"])
        if (state.get("ActiveState") != "active" or state.get("SubState") != "running"
                or int(state.get("NRestarts") or 0) > 0):
            return None
        # systemd's monotonic clock is this process's: the same kernel's CLOCK_MONOTONIC.
        return time.monotonic() - int(state.get("ActiveEnterTimestampMonotonic") or 0) / 1e6
    pid = read_pid(check["pid_file"])
    fields = stat_fields(pid) if pid else None
    if not fields or fields[0] == "Z":
        return None
    return time.time() - os.stat(check["pid_file"]).st_mtime  # written as the process started


def op_running(args, ctx):
    """Each process still runs `settle` seconds after it started; else fail with its log."""
    settle = float(args["settle"])
    while True:
        youngest = settle
        for check in args["checks"]:
            age = process_age(check)
            if age is None:
                log = tail(check["log"], 40, check.get("marker")) if check.get("log") else ""
                raise Failed("%s is not running" % check["name"], 1, stdout=log, process=check["name"])
            youngest = min(youngest, age)
        if youngest >= settle:
            return "ok"
        if ctx.interruptible and ctx.inbox.poll() and ctx.inbox.cancelled:
            raise Stopped("cancelled")
        time.sleep(min(settle - youngest, 0.2))


# -- reloading nginx ----------------------------------------------------------------------------

def op_reload(args, ctx):
    reload_nginx(args["run"], args.get("pid_file"), float(args.get("timeout", 10)))


def op_site(args, ctx):
    """A proxy site the deploy user runs itself: install, test (the old one back on failure), reload."""
    site, text = args["path"], args["text"]
    old = read_text(site)
    op_write({"path": site, "text": text, "mode": 0o644}, ctx)
    test = subprocess.run(args["test"], shell=True, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if test.returncode:
        if old is None:
            with_quiet(os.unlink, site)
        else:
            op_write({"path": site, "text": old, "mode": 0o644}, ctx)
        raise Failed("rejected", test.returncode, test.stdout, test.stderr, rejected=True)
    if args.get("reload_nginx"):
        reload_nginx(args["reload"], args.get("pid_file"), 10)
    else:
        run_shell(args["reload"])
    if args.get("loaded"):  # a new preview token is nginx's now
        with_quiet(os.unlink, args["loaded"])


OPS = {"facts": op_facts, "lock": op_lock, "guard": op_guard, "unlock": op_unlock, "write": op_write, "upload": op_upload,
       "read": op_read, "install": op_install, "mkdir": op_mkdir, "link": op_link, "remove": op_remove, "tail": op_tail,
       "trash": op_trash, "audit": op_audit, "sh": op_sh, "helper": op_helper, "compile": op_compile,
       "health": op_health, "reload": op_reload, "site": op_site, "running": op_running}


# -- the app's data: backups, migrations, restores (issue 14) -------------------------------------

SQLITE_MAGIC = b"SQLite format 3\0"
RECORD = "backup.json"   # in each backup folder: what it holds, and where each file came from


def now_utc():
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def release_env(path):
    """NAME -> value from a release's env file (appenv.render writes it), {} where there is none."""
    import shlex
    text = read_text(path)
    if text is None:
        return {}
    env = {}
    for word in shlex.split(text, comments=True):
        name, sep, value = word.partition("=")
        if sep:
            env[name] = value
    return env


def is_sqlite(path):
    try:
        if os.path.islink(path) or not os.path.isfile(path):
            return False
        with open(path, "rb") as f:
            return f.read(16) == SQLITE_MAGIC
    except OSError:
        return False


def sqlite_files(instance, url):
    """The app's SQLite databases: those in its instance folder, and an absolute sqlite:/// DATABASE_URL."""
    names = sorted(os.listdir(instance)) if os.path.isdir(instance) else []
    found = [os.path.join(instance, n) for n in names if is_sqlite(os.path.join(instance, n))]
    if url and url.split(":", 1)[0].split("+")[0] == "sqlite" and "://" in url:
        rest = url.split("://", 1)[1]  # sqlite:////abs/path.db: the path after the third slash
        path = rest[1:].split("?", 1)[0] if rest.startswith("/") else ""
        if os.path.isabs(path) and is_sqlite(path) and path not in found:
            found.append(path)
    return found


def postgres_env(url):
    """libpq's variables for a PostgreSQL URL (with any +driver): the password in the environment, never argv."""
    import urllib.parse
    parts = urllib.parse.urlsplit(url or "")
    if parts.scheme.split("+")[0] not in ("postgres", "postgresql"):
        return None
    env = {"PGHOST": parts.hostname or "", "PGPORT": str(parts.port or 5432),
           "PGUSER": urllib.parse.unquote(parts.username or ""),
           "PGPASSWORD": urllib.parse.unquote(parts.password or ""),
           "PGDATABASE": urllib.parse.unquote(parts.path.lstrip("/"))}
    for key, value in urllib.parse.parse_qsl(parts.query):
        if key == "sslmode":
            env["PGSSLMODE"] = value
    return {k: v for k, v in env.items() if v}


def run_pg(argv, pg, stdin=None):
    """A PostgreSQL client program with the URL's variables; what it writes is the deploy user's alone."""
    env = dict(os.environ)
    env.update(pg)
    proc = subprocess.run(argv, env=env, input=stdin, capture_output=True, text=True,
                          stdin=None if stdin is not None else subprocess.DEVNULL,
                          preexec_fn=lambda: os.umask(0o077))
    if proc.returncode:
        last = [line for line in proc.stderr.splitlines() if line.strip()][-1:] or ["exit %d" % proc.returncode]
        raise Failed("%s: %s" % (argv[0], last[0]), proc.returncode, "", proc.stderr)
    return proc.stdout


def databases(args):
    """The SQLite files and the PostgreSQL variables of the app, as its release's environment says."""
    url = release_env(args["env_file"]).get("DATABASE_URL")
    return sqlite_files(args["instance"], url), postgres_env(url)


def schema_of(sqlite, pg):
    """A fingerprint of the databases' schema: what a migration changes, and the data does not."""
    import hashlib
    import sqlite3
    digest = hashlib.sha256()
    for path in sqlite:
        con = sqlite3.connect(path, timeout=30)
        try:
            rows = con.execute("SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name").fetchall()
        finally:
            con.close()
        digest.update(repr((os.path.basename(path), rows)).encode())
    if pg and shutil.which("pg_dump"):
        digest.update(run_pg(["pg_dump", "--schema-only", "--no-owner", "--no-privileges"], pg).encode())
    return digest.hexdigest()


def copy_sqlite(source, dest):
    """A consistent copy of a live SQLite database, by its backup API (cp can catch a write half done)."""
    import sqlite3
    os.close(os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
    src = sqlite3.connect(source, timeout=30)
    try:
        out = sqlite3.connect(dest)
        try:
            src.backup(out)
        finally:
            out.close()
    finally:
        src.close()


def take_backup(folder, sqlite, pg):
    """The databases into `folder` (made aside, renamed into place), and its record."""
    partial = folder + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(os.path.dirname(folder), mode=0o700, exist_ok=True)
    os.mkdir(partial, 0o700)
    record = {"name": os.path.basename(folder), "taken_at": now_utc(), "sqlite": {}, "postgres": None,
              "note": "", "schema_before": schema_of(sqlite, pg)}
    for path in sqlite:
        name = os.path.basename(path)
        while name in record["sqlite"]:
            name = "_" + name
        copy_sqlite(path, os.path.join(partial, name))
        record["sqlite"][name] = path
    if pg and shutil.which("pg_dump"):
        run_pg(["pg_dump", "--no-owner", "--no-privileges", "--file", os.path.join(partial, "postgres.sql")], pg)
        record["postgres"] = "postgres.sql"
    elif pg:
        record["note"] = "pg_dump is not installed on this host: the PostgreSQL database was not copied"
    write_record(partial, record)
    if os.path.isdir(folder):
        shutil.rmtree(folder)
    os.rename(partial, folder)
    return record


def write_record(folder, record):
    op_write({"path": os.path.join(folder, RECORD), "text": json.dumps(record, indent=2) + "\n",
              "mode": 0o600}, None)


def prune_backups(parent, keep, protect):
    """The newest `keep` backups stay, and those in `protect` (the current release's)."""
    names = [b["name"] for b in list_backups(parent)]
    for name in names[:-keep] if keep else []:
        if name not in protect:
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def list_backups(parent):
    """Each backup in shared/backups, oldest first: what it holds, its size, whether the schema moved after."""
    found = []
    try:
        names = sorted(os.listdir(parent))
    except OSError:
        return found
    for name in names:
        path = os.path.join(parent, name)
        if name.startswith(".") or name.endswith(".partial") or not os.path.isdir(path):
            continue
        record = read_json(os.path.join(path, RECORD)) or {}
        files = sorted(record.get("sqlite") or {}) + ([record["postgres"]] if record.get("postgres") else [])
        size = 0
        for f in files:
            try:
                size += os.path.getsize(os.path.join(path, f))
            except OSError:
                pass
        found.append({"name": name, "taken_at": record.get("taken_at"), "files": files, "size": size,
                      "moved": bool(record.get("moved")), "note": record.get("note") or ""})
    return found


def op_backup(args, ctx):
    sqlite, pg = databases(args)
    record = take_backup(args["folder"], sqlite, pg)
    prune_backups(os.path.dirname(args["folder"]), int(args.get("keep") or 0), args.get("protect") or [])
    return {"name": record["name"], "folder": args["folder"], "files": sorted(record["sqlite"]) +
            ([record["postgres"]] if record["postgres"] else []), "note": record["note"]}


def op_schema(args, ctx):
    """After the migration: the schema's fingerprint again; the backup's record says if it moved."""
    record = read_json(os.path.join(args["folder"], RECORD))
    if record is None:
        return {"moved": None}
    sqlite, pg = databases(args)
    record["schema_after"] = schema_of(sqlite, pg)
    record["moved"] = record["schema_after"] != record.get("schema_before")
    write_record(args["folder"], record)
    return {"moved": record["moved"]}


def op_restore(args, ctx):
    """The databases as they are into `save` first; then those of the backup, put back in place.

    SQLite files through the backup API (the running app sees the old
    content at its next query); PostgreSQL in one transaction: what the
    app's role owns is dropped, then the dump is loaded, or nothing changes.
    """
    folder = args["folder"]
    record = read_json(os.path.join(folder, RECORD))
    if record is None:
        raise Failed("there is no backup %s" % os.path.basename(folder))
    sqlite, pg = databases(args)
    if not record.get("sqlite") and not record.get("postgres"):
        raise Failed("backup %s holds no database%s" % (record["name"], ": " + record["note"] if record.get("note") else ""))
    if record.get("postgres") and not pg:
        raise Failed("backup %s holds a PostgreSQL dump, but DATABASE_URL names no PostgreSQL database" % record["name"])
    saved = take_backup(args["save"], sqlite, pg if record.get("postgres") else None)
    import sqlite3
    for name, path in sorted((record.get("sqlite") or {}).items()):
        src = sqlite3.connect(os.path.join(folder, name))
        try:
            live = sqlite3.connect(path, timeout=30)
            try:
                src.backup(live)
            finally:
                live.close()
        finally:
            src.close()
    if record.get("postgres"):
        run_pg(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "--single-transaction",
                "-c", "DROP OWNED BY CURRENT_USER", "-f", os.path.join(folder, record["postgres"])], pg)
    return {"restored": record["name"], "saved": saved["name"]}


OPS.update({"backup": op_backup, "schema": op_schema, "restore": op_restore})


# -- serving requests -----------------------------------------------------------------------------

class Context:
    """What an op may use of the session: the channel, and the request it belongs to."""

    def __init__(self, inbox, out, source):
        self.inbox = inbox
        self.out = out
        self.source = source
        self.request = None
        self.interruptible = True


def disk_full(root):
    try:
        fs = os.statvfs(root)
    except OSError:
        return False
    return fs.f_bavail * fs.f_frsize < 4 << 20


def drain(ops, inbox):
    """Read and drop the bytes of uploads that will not run, so the next request parses."""
    for op in ops:
        if op.get("op") == "upload":
            inbox.copy(op["size"], None)


def handle(request, ctx):
    """Run a request's phases in order; stop at the first failure, or when told to stop."""
    ctx.request = request.get("id")
    steady = not request.get("interruptible", True)
    ctx.inbox.blobs = sum(op["size"] for phase in request.get("phases", []) for op in phase["ops"]
                          if op.get("op") == "upload")
    results = {}
    phases = request.get("phases", [])
    for p, phase in enumerate(phases):
        ctx.interruptible = not steady and phase.get("interruptible", True)
        if p and ctx.interruptible and ctx.inbox.poll():
            drain([op for later in phases[p:] for op in later["ops"]], ctx.inbox)
            return {"ok": False, "phase": phase["name"], "index": -1, "stopped": True,
                    "error": {"message": "cancelled" if ctx.inbox.cancelled else "the client went away"}}
        started = time.monotonic()
        ops = phase["ops"]
        for i, op in enumerate(ops):
            try:
                value = OPS[op["op"]](op, ctx)
            except (Failed, Stopped, OSError, ValueError, KeyError) as exc:
                drain(ops[i + 1:] + [o for later in phases[p + 1:] for o in later["ops"]], ctx.inbox)
                if isinstance(exc, Failed):
                    error = exc.info
                elif isinstance(exc, Stopped):
                    error = {"message": str(exc)}
                elif isinstance(exc, OSError) and exc.errno:
                    error = {"message": "[Errno %d] %s" % (exc.errno, exc.strerror)}
                else:
                    error = {"message": "%s: %s" % (type(exc).__name__, exc)}
                error["disk_full"] = bool(request.get("root")) and disk_full(request["root"])
                ctx.out.send({"id": ctx.request, "phase": phase["name"],
                              "seconds": round(time.monotonic() - started, 3)})
                return {"ok": False, "phase": phase["name"], "index": i, "error": error,
                        "stopped": isinstance(exc, Stopped), "results": results}
            if op.get("key"):
                results[op["key"]] = value
        ctx.out.send({"id": ctx.request, "phase": phase["name"],
                      "seconds": round(time.monotonic() - started, 3)})
    return {"ok": True, "results": results}


def serve(first=b"", source=None):
    """The session: requests until the client closes the channel."""
    inbox = Inbox(0, first)
    out = Outbox(sys.stdout.buffer)
    ctx = Context(inbox, out, source)
    out.send({"ready": True, "pid": os.getpid()})
    while not out.gone:
        line = inbox.line()
        if line is None:
            return 0
        request = json.loads(line)
        reply = handle(request, ctx)
        reply["id"] = request.get("id")
        out.send(reply)
        inbox.cancelled = False  # a cancel ends one request
    return 0


# -- byte-compiling, run by a release venv's own Python -------------------------------------------

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


def compile_venv(like):
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
    like = os.path.join(like, os.path.relpath(site, sys.prefix)) if like else None
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
    if argv[:1] == ["compile"]:
        return compile_venv(argv[2] if argv[1:2] == ["--like"] else None)
    return serve(source=globals().get("__file__"))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
