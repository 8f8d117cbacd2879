"""Where things live on the server, and which releases to keep. No I/O here."""
from __future__ import annotations

import datetime as dt
import posixpath
from dataclasses import dataclass

from .model import Release

STATE_DIR = ".fabdeploy"
HELPER = "/usr/local/lib/fabdeploy/helper"


def release_name(now: dt.datetime | None = None) -> str:
    """A name that sorts by time, to the millisecond: 20261121-103700-123."""
    now = now or dt.datetime.now(dt.timezone.utc)
    return now.strftime("%Y%m%d-%H%M%S-") + f"{now.microsecond // 1000:03d}"


@dataclass(frozen=True)
class Layout:
    """Paths under deploy_to, which must be absolute here."""

    root: str

    def _join(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    @property
    def releases(self) -> str:
        return self._join("releases")

    @property
    def current(self) -> str:
        return self._join("current")

    @property
    def instance(self) -> str:
        return self._join("shared", "instance")

    @property
    def config_py(self) -> str:
        return self._join("shared", "instance", "config.py")

    @property
    def run_dir(self) -> str:
        return self._join("shared", "run")

    @property
    def app_log(self) -> str:
        """What every release's server writes: its errors and the app's tracebacks."""
        return self._join("shared", "log", "app.log")

    @property
    def state(self) -> str:
        return self._join(STATE_DIR)

    @property
    def trash(self) -> str:
        """Where removed releases wait for a background rm."""
        return self._join(STATE_DIR, "trash")

    @property
    def lock(self) -> str:
        return self._join(STATE_DIR, "lock")

    @property
    def audit_log(self) -> str:
        return self._join(STATE_DIR, "audit.jsonl")

    @property
    def initialized(self) -> str:
        return self._join(STATE_DIR, "initialized")

    @property
    def wheelhouse(self) -> str:
        return self._join("shared", "wheelhouse")

    def uv_folder(self, uv_wheel: str) -> str:
        """Where a shipped uv wheel is unpacked: one folder per version."""
        return self._join(STATE_DIR, "tools", posixpath.basename(uv_wheel)[: -len(".whl")])

    def uv_binary(self, uv_wheel: str) -> str:
        version = posixpath.basename(uv_wheel).split("-")[1]
        return posixpath.join(self.uv_folder(uv_wheel), f"uv-{version}.data", "scripts", "uv")

    def release(self, name: str) -> str:
        return self._join("releases", name)

    def venv(self, name: str) -> str:
        return self._join("releases", name, "venv")

    def meta(self, name: str) -> str:
        return self._join("releases", name, "RELEASE.json")

    def failed_marker(self, name: str) -> str:
        return self._join("releases", name, "FAILED")

    def public(self, name: str) -> str:
        """Links to the release's static folders, one per URL prefix: what nginx serves."""
        return self._join("releases", name, "public")

    def previous(self, name: str) -> str:
        """A link to the release this one replaced: nginx serves its static files too."""
        return self._join("releases", name, "previous")

    def bind_file(self, name: str) -> str:
        """Where the release's server listens, for the next switch to know."""
        return self._join("releases", name, "BIND")

    def serve(self, name: str) -> str:
        """The script that runs a release's server in the foreground."""
        return self._join("releases", name, "serve")

    def gunicorn_conf(self, name: str) -> str:
        return self._join("releases", name, "gunicorn.conf.py")

    def wsgi_script(self, name: str) -> str:
        """mod_wsgi's entry point for the release: a file, not a module, so it shadows none."""
        return self._join("releases", name, "app.wsgi")

    def server_root(self, name: str) -> str:
        """mod_wsgi-express's Apache of the release: its config, pid file, locks and sockets."""
        return self._join("shared", "run", f"{name}.apache")

    def socket(self, name: str) -> str:
        return self._join("shared", "run", f"{name}.sock")

    @property
    def live_socket(self) -> str:
        """A link to the serving release's socket: the proxy connects through it."""
        return self._join("shared", "run", "live.sock")

    @property
    def next_socket(self) -> str:
        """A link to the socket of the release a switch is about to go to (nginx's preview)."""
        return self._join("shared", "run", "next.sock")

    @property
    def preview_map(self) -> str:
        """nginx map lines, made by the agent: the host's preview token -> the preview upstream."""
        return self._join(STATE_DIR, "preview.map")

    @property
    def preview_unloaded(self) -> str:
        """Present from a new preview token until nginx has been reloaded with it."""
        return self._join(STATE_DIR, "preview.unloaded")

    def pending_meta(self, name: str) -> str:
        """RELEASE.json, written aside until the switch renames it into place."""
        return self._join("releases", name, "RELEASE.json.pending")

    @property
    def backups(self) -> str:
        return self._join("shared", "backups")

    def env_file(self, name: str) -> str:
        """The environment release `name` runs with (env and secrets, 0600): see plan.in_release."""
        return self._join("releases", name, "env")

    def backup(self, name: str) -> str:
        """A copy of the app's databases, taken before release `name`'s migration (or a restore)."""
        return self._join("shared", "backups", name)

    def pid_file(self, name: str) -> str:
        return self._join("shared", "run", f"{name}.pid")

    def for_agent(self) -> dict:
        """Where the agent looks, and what it lays out with which modes: it knows no layout itself."""
        shared = self._join("shared")
        return {
            "root": self.root, "releases": self.releases, "current": self.current,
            "live": self.live_socket, "lock": self.lock, "initialized": self.initialized,
            "config": self.config_py, "wheelhouse": self.wheelhouse, "preview_map": self.preview_map,
            "preview_unloaded": self.preview_unloaded, "backups": self.backups,
            "release_files": {"bind": "BIND", "meta": "RELEASE.json", "failed": "FAILED", "env": "env"},
            # Private where it holds secrets or logs; open where the proxy's workers read.
            "dirs": {self.releases: 0o755, shared: 0o755, self.run_dir: 0o755,
                     self._join("shared", "log"): 0o750, self.wheelhouse: 0o755, self.instance: 0o700,
                     self.backups: 0o700, self.state: 0o700},
        }

    def instance_link(self, name: str, import_name: str) -> str:
        """Where Flask looks for an installed app's instance folder."""
        return self._join("releases", name, "venv", "var", f"{import_name}-instance")

    # A release's other processes and timers (processes.py).

    def script(self, release: str, name: str) -> str:
        """The script of one of a release's processes or timers, run in its environment."""
        return self._join("releases", release, "bin", name)

    def process_log(self, name: str) -> str:
        return self._join("shared", "log", f"{name}.log")

    def process_pids(self, release: str) -> str:
        """Without systemd: the pid files of a release's processes."""
        return self._join("shared", "run", "procs", release)

    def process_pid(self, release: str, name: str) -> str:
        return self._join("shared", "run", "procs", release, f"{name}.pid")


def previous_release(releases: list[Release], current: str | None) -> Release | None:
    """The newest good release older than current: the rollback target."""
    older = [r for r in releases if r.good and (current is None or r.name < current)]
    return max(older, key=lambda r: r.name, default=None)


def releases_to_remove(releases: list[Release], current: str | None, keep: int) -> list[str]:
    """Old, failed and partial releases beyond `keep`; never current or its predecessor."""
    protected = {current}
    before = previous_release(releases, current)
    if before:
        protected.add(before.name)
    kept = [r.name for r in releases if r.good or r.name in protected]
    kept.sort(reverse=True)
    newest = kept[:keep]
    # After a rollback, current may be older than the newest `keep`: make room.
    for name in sorted(protected - {None} - set(newest)):
        droppable = [n for n in newest if n not in protected]
        newest.remove(min(droppable))
        newest.append(name)
    return sorted(r.name for r in releases if r.name not in newest)


@dataclass(frozen=True)
class SystemPaths:
    """Where provision puts an app's root-owned files. None of them is the deploy user's."""

    app: str

    @property
    def registration(self) -> str:
        """What provision baked into root's files for the app, and who deploys it (JSON)."""
        return f"/etc/fabdeploy/apps/{self.app}.json"

    @property
    def preview_map(self) -> str:
        """The app's preview token, as an nginx map line: root's, readable by the deploy user."""
        return f"/etc/fabdeploy/apps/{self.app}.preview"

    @property
    def unit(self) -> str:
        return f"/etc/systemd/system/{self.app}@.service"

    @property
    def sudoers(self) -> str:
        return f"/etc/sudoers.d/fabdeploy-{self.app}"

    @property
    def nginx_site(self) -> str:
        return f"/etc/nginx/sites-enabled/{self.app}.conf"

    @property
    def apache_site(self) -> str:
        return f"/etc/apache2/sites-enabled/{self.app}.conf"

    def site(self, proxy: str) -> str:
        return self.apache_site if proxy == "apache" else self.nginx_site

    @property
    def audit_log(self) -> str:
        """Root's record of every deploy: the deploy user appends through the helper only."""
        return f"/var/log/fabdeploy/{self.app}/audit.jsonl"

    @property
    def access_log(self) -> str:
        """nginx's access log for the app (Debian's logrotate rotates /var/log/nginx/*.log)."""
        return f"/var/log/nginx/{self.app}.access.log"

    @property
    def tls_dir(self) -> str:
        """The app's certificate and key, as the site names them: root's alone (0700)."""
        return f"/etc/fabdeploy/tls/{self.app}"

    @property
    def acme_webroot(self) -> str:
        """Where certbot puts http-01 challenges and nginx serves them from: root's, not deploy_to."""
        return f"/var/lib/fabdeploy/acme/{self.app}"

    @property
    def trusted_ca(self) -> str:
        """tls.ca, in the host's trust store (certbot reads it there, its timer too)."""
        return f"/usr/local/share/ca-certificates/fabdeploy-{self.app}.crt"

    @property
    def logrotate(self) -> str:
        return f"/etc/logrotate.d/fabdeploy-{self.app}"
