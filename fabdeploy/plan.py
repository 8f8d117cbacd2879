"""The shell commands a deploy runs, built as strings. No I/O here.

Every path and value is quoted with shlex.quote. Nothing secret is ever
part of a command: the secret travels over SFTP only.
"""
from __future__ import annotations

import base64
import json
import zlib
from importlib import resources
from shlex import quote

from .layout import Layout
from .settings import Settings

LOCK_HELD = 3  # exit status of lock() when somebody else holds the lock


def _agent_bootstrap() -> str:
    source = resources.files("fabdeploy").joinpath("agent.py").read_bytes()
    packed = base64.b64encode(zlib.compress(source, 9)).decode()
    return f"import base64,zlib;exec(zlib.decompress(base64.b64decode('{packed}')))"


AGENT = _agent_bootstrap()


def agent(python: str, *args: object) -> str:
    """Run fabdeploy's agent on the server with the system Python."""
    return " ".join([quote(python), "-c", quote(AGENT), *(quote(str(a)) for a in args)])


def facts(settings: Settings) -> str:
    return agent(settings["python"], "facts", "--root", settings["deploy_to"])


def make_root(layout: Layout) -> str:
    """Create deploy_to (with sudo only if we must) and the directories under it."""
    root = quote(layout.root)
    dirs = " ".join(quote(d) for d in (layout.releases, layout.run_dir, layout.log_dir, layout.state))
    return (
        f"if [ ! -d {root} ]; then mkdir -p {root} 2>/dev/null || "
        f'{{ sudo -n mkdir -p {root} && sudo -n chown "$(id -un):$(id -gn)" {root}; }}; fi'
        f" && mkdir -p {dirs} && mkdir -p -m 0700 {quote(layout.instance)}"
    )


def lock(layout: Layout, info: dict) -> str:
    """Take the lock with an atomic mkdir; if held, say by whom and exit 3."""
    lock_dir = quote(layout.lock)
    info_file = quote(layout.lock + "/info.json")
    return (
        f"if mkdir {lock_dir} 2>/dev/null; then printf '%s\\n' {quote(json.dumps(info))} > {info_file};"
        f" elif [ -d {lock_dir} ]; then exit {LOCK_HELD}; else mkdir {lock_dir}; fi"
    )


def unlock(layout: Layout) -> str:
    return f"rm -rf {quote(layout.lock)}"


def audit(layout: Layout, entry: dict) -> str:
    """Append one JSON line to the host's audit log."""
    line = json.dumps(entry, sort_keys=True)
    return f"printf '%s\\n' {quote(line)} >> {quote(layout.audit_log)}"


def make_release_dir(layout: Layout, release: str) -> str:
    return f"mkdir -p {quote(layout.release(release))}"


def create_venv(settings: Settings, layout: Layout, release: str) -> str:
    return f"{quote(settings['python'])} -m venv {quote(layout.venv(release))}"


def install(layout: Layout, release: str, wheel_path: str, packages: list[str]) -> str:
    pip = quote(layout.venv(release) + "/bin/pip")
    wanted = " ".join(quote(p) for p in [wheel_path, *packages])
    return f"{pip} install --disable-pip-version-check --no-input --quiet {wanted}"


def link_instance(settings: Settings, layout: Layout, release: str) -> str:
    """Point the venv's Flask instance folder at the shared one."""
    link = layout.instance_link(release, settings.import_name)
    return (f"mkdir -p {quote(link.rsplit('/', 1)[0])}"
            f" && ln -sfn {quote(layout.instance)} {quote(link)}")


def in_release(layout: Layout, release: str, command: str) -> str:
    """Run a command from the release directory, never with $PORT set."""
    return f"cd {quote(layout.release(release))} && env -u PORT {command}"


def init_app(settings: Settings, layout: Layout, release: str) -> str:
    flask = quote(layout.venv(release) + "/bin/flask")
    init = " ".join(quote(word) for word in settings["init_command"].split())
    run = in_release(layout, release, f"{flask} --app {quote(settings['wsgi'])} {init}")
    return f"{run} && touch {quote(layout.initialized)}"


def gunicorn(layout: Layout, release: str, *options: str) -> str:
    """gunicorn from the release's own venv, by its absolute paths."""
    venv = layout.venv(release)
    conf = layout.gunicorn_conf(release)
    args = " ".join(quote(o) for o in options)
    return in_release(layout, release,
                      f"{quote(venv + '/bin/python')} {quote(venv + '/bin/gunicorn')} -c {quote(conf)} {args}".rstrip())


def unit_name(settings: Settings, release: str) -> str:
    return f"{settings.app}@{release}.service"


def start_server(settings: Settings, layout: Layout, release: str, manager: str) -> str:
    if manager == "systemd":
        return f"sudo -n systemctl start {quote(unit_name(settings, release))}"
    return gunicorn(layout, release, "--daemon")


def stop_server(settings: Settings, layout: Layout, release: str, manager: str) -> str:
    """Stop a release's server gracefully, without waiting for it to drain."""
    if manager == "systemd":
        return (f"sudo -n systemctl disable --now --no-block {quote(unit_name(settings, release))}"
                " 2>/dev/null; true")
    pid_file = quote(layout.pid_file(release))
    return f"if [ -f {pid_file} ]; then kill -TERM \"$(cat {pid_file})\" 2>/dev/null; fi; true"


def enable_server(settings: Settings, release: str, manager: str) -> str | None:
    """Make the active release start at boot (systemd only)."""
    if manager == "systemd":
        return f"sudo -n systemctl enable --quiet {quote(unit_name(settings, release))}"
    return None


def health(settings: Settings, layout: Layout, release: str, bind: str, manager: str,
           timeout: float) -> str:
    """Probe a release's own server directly, before it takes traffic."""
    target = ["--unix", bind[len("unix:"):]] if bind.startswith("unix:") else ["--tcp", bind]
    watch = (["--unit", unit_name(settings, release)] if manager == "systemd"
             else ["--pid-file", layout.pid_file(release)])
    return agent(settings["python"], "health", *target, *watch,
                 "--path", settings["health_path"], "--timeout", timeout)


def health_via_proxy(settings: Settings, timeout: float) -> str:
    """Probe through nginx, as a visitor would reach the app."""
    nginx = settings.nginx
    host = "localhost" if nginx["server_name"] in ("_", "") else nginx["server_name"].split()[0]
    return agent(settings["python"], "health", "--tcp", f"127.0.0.1:{nginx['listen']}",
                 "--host-header", host, "--path", settings["health_path"], "--timeout", timeout)


def as_owner(directory: str, command: str) -> str:
    """Run a command plainly where we may write the directory, else with sudo."""
    return f"if [ -w {quote(directory)} ]; then {command}; else sudo -n {command}; fi"


def parent(path: str) -> str:
    return path.rsplit("/", 1)[0] or "/"


def install_file(tmp: str, dest: str) -> str:
    """Put a rendered file in place, with sudo where the directory is not ours."""
    return f"{as_owner(parent(dest), f'install -m 0644 {quote(tmp)} {quote(dest)}')} && rm -f {quote(tmp)}"


def save_copy(path: str, backup: str) -> str:
    """Keep the file we are about to replace, or note that there was none."""
    return f"if [ -f {quote(path)} ]; then cp {quote(path)} {quote(backup)}; else rm -f {quote(backup)}; fi"


def restore_copy(path: str, backup: str) -> str:
    put_back = as_owner(parent(path), f"install -m 0644 {quote(backup)} {quote(path)}")
    remove = as_owner(parent(path), f"rm -f {quote(path)}")
    return f"if [ -f {quote(backup)} ]; then {put_back}; else {remove}; fi"


def switch_current(layout: Layout, release: str) -> str:
    """Atomic: a symlink under a temporary name, renamed over `current`."""
    tmp = quote(layout.root + "/.current.tmp")
    return f"ln -sfn {quote('releases/' + release)} {tmp} && mv -Tf {tmp} {quote(layout.current)}"


def mark_failed(layout: Layout, release: str, reason: str) -> str:
    return f"printf '%s\\n' {quote(reason)} > {quote(layout.failed_marker(release))}"


def remove_releases(settings: Settings, layout: Layout, names: list[str], manager: str) -> str:
    """Stop any server a removed release still runs (e.g. one killed mid-deploy), then delete."""
    stops = "; ".join(stop_server(settings, layout, name, manager) for name in names)
    paths = []
    for name in names:
        paths += [layout.release(name), layout.socket(name), layout.pid_file(name)]
    return f"{stops}; rm -rf " + " ".join(quote(p) for p in paths)


def reload_server(settings: Settings, layout: Layout, release: str, manager: str) -> str:
    """gunicorn re-reads its config and replaces its workers on HUP."""
    if manager == "systemd":
        return f"sudo -n systemctl reload {quote(unit_name(settings, release))}"
    return f"kill -HUP \"$(cat {quote(layout.pid_file(release))})\""


def daemon_reload() -> str:
    return "sudo -n systemctl daemon-reload"


def tail_log(path: str, lines: int = 30) -> str:
    return f"tail -n {int(lines)} {quote(path)} 2>/dev/null || true"
