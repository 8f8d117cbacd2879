"""The operations a host's agent carries out, as typed values. No I/O here.

Phases decide which operations a host needs; each operation says what it
sends to the agent (`wire`) and how a dry run shows it (`describe`). The
agent (agent.py) only carries them out. Nothing secret is ever shown: a
secret file's text, or a secret environment value, is replaced by a word.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from shlex import quote

from .layout import HELPER  # the root helper provision installs


def indented(text: str) -> list[str]:
    return [f"    {line}" for line in text.splitlines()]


@dataclass(frozen=True)
class Op:
    """One step on a host. `what` names it in an error ("<what> failed")."""

    what: str = field(default="", kw_only=True)
    hint: str | None = field(default=None, kw_only=True)
    key: str | None = field(default=None, kw_only=True)  # where the agent files its result
    reads_only = False  # a dry run carries out reads only

    kind = ""

    def wire(self) -> dict:
        body = {k: v for k, v in self.fields().items() if v is not None}
        return {"op": self.kind, **({"key": self.key} if self.key else {}), **body}

    def fields(self) -> dict:
        return {}

    def describe(self, results: dict | None = None) -> list[str]:
        """How a dry run (or --echo) shows it; `results`: what the agent answered for its request."""
        return [f"would {self.what}"]

    @property
    def upload(self) -> Path | None:
        """A local file whose bytes follow the request."""
        return None


@dataclass(frozen=True)
class Sh(Op):
    """A shell command, run by the deploy user's /bin/sh."""

    cmd: str
    env: dict = field(default_factory=dict)
    secret_env: frozenset = frozenset()   # names whose values are never shown
    unset: tuple = ()
    cwd: str | None = None
    check: bool = True
    stream: bool = False
    interruptible: bool = True
    stdin: str | None = field(default=None, repr=False)
    kind = "sh"

    def fields(self) -> dict:
        return {"cmd": self.cmd, "env": self.env or None, "unset": list(self.unset) or None,
                "cwd": self.cwd, "check": self.check, "stream": self.stream or None,
                "interruptible": self.interruptible, "stdin": self.stdin}

    def describe(self, results: dict | None = None) -> list[str]:
        env = " ".join(f"{k}={'<secret>' if k in self.secret_env else quote(v)}" for k, v in self.env.items())
        return [f"would run: {env + ' ' if env else ''}{self.cmd}"]


@dataclass(frozen=True)
class Query(Sh):
    """A command that only reads: a dry run runs it too, so the plan follows the host."""

    reads_only = True


@dataclass(frozen=True)
class Write(Op):
    path: str
    text: str = field(repr=False)
    mode: int = 0o644
    secret: bool = False
    shown: str | None = field(default=None, repr=False)  # a secret file as shown: each secret as <secret>
    kind = "write"

    def fields(self) -> dict:
        return {"path": self.path, "text": self.text, "mode": self.mode, "secret": self.secret}

    def describe(self, results: dict | None = None) -> list[str]:
        if self.secret and self.shown is not None:
            return [f"would write {self.path} (mode {self.mode:o}, secrets shown as <secret>):",
                    *indented(self.shown)]
        if self.secret:
            return [f"would write {self.path} (mode {self.mode:o}, secret: not shown)"]
        return [f"would write {self.path} (mode {self.mode:o}):", *indented(self.text)]


@dataclass(frozen=True)
class Upload(Op):
    local: str
    path: str
    size: int
    atomic: bool = False
    kind = "upload"

    def fields(self) -> dict:
        return {"path": self.path, "size": self.size, "atomic": self.atomic}

    def describe(self, results: dict | None = None) -> list[str]:
        return [f"would upload: {self.local} -> {self.path}"]

    @property
    def upload(self) -> Path | None:
        return Path(self.local)


@dataclass(frozen=True)
class Mkdir(Op):
    path: str
    kind = "mkdir"

    def fields(self) -> dict:
        return {"path": self.path}

    def describe(self, results: dict | None = None) -> list[str]:
        return [f"would create directory {self.path}"]


@dataclass(frozen=True)
class Link(Op):
    """A symlink made under a temporary name and renamed over `link`: atomic."""

    link: str
    target: str
    tmp: str | None = None
    kind = "link"

    def fields(self) -> dict:
        return {"link": self.link, "target": self.target, "tmp": self.tmp}

    def describe(self, results: dict | None = None) -> list[str]:
        return [f"would link {self.link} -> {self.target}"]


@dataclass(frozen=True)
class Rename(Op):
    """mv: only if `source` exists (a rename is atomic)."""

    source: str
    dest: str
    kind = "sh"

    def fields(self) -> dict:
        return {"cmd": f"if [ -f {quote(self.source)} ]; then mv -f {quote(self.source)} {quote(self.dest)}; fi"}

    def describe(self, results: dict | None = None) -> list[str]:
        return [f"would rename {self.source} -> {self.dest}"]


@dataclass(frozen=True)
class Remove(Op):
    paths: tuple
    kind = "remove"

    def fields(self) -> dict:
        return {"paths": list(self.paths)}

    def describe(self, results: dict | None = None) -> list[str]:
        return [f"would remove {' '.join(self.paths)}"]


@dataclass(frozen=True)
class Read(Op):
    path: str
    reads_only = True
    kind = "read"

    def fields(self) -> dict:
        return {"path": self.path}


@dataclass(frozen=True)
class Tail(Op):
    path: str
    lines: int = 30
    marker: str | None = None
    reads_only = True
    kind = "tail"

    def fields(self) -> dict:
        return {"path": self.path, "lines": self.lines, "marker": self.marker}


@dataclass(frozen=True)
class Facts(Op):
    """The host's state, read by the agent (and with lock_info: the deploy lock taken)."""

    root: str
    app: str
    python: str
    paths: dict = field(default_factory=dict)  # Layout.for_agent(): where the agent looks
    needs: dict | None = None        # {"program": "nginx", "problem": "no-nginx"}
    refuse_root: bool = True
    registration: str | None = None   # where provision records this app
    site_path: str | None = None
    require_registration: bool = False
    reads_only = True
    kind = "facts"

    def fields(self) -> dict:
        return {"root": self.root, "paths": self.paths, "app": self.app, "python": self.python,
                "needs": self.needs,
                "refuse_root": self.refuse_root, "registration": self.registration,
                "site_path": self.site_path, "require_registration": self.require_registration}


@dataclass(frozen=True)
class Lock(Facts):
    info: dict = field(default_factory=dict)
    only_laid_out: bool = False
    preview: str | None = None       # make the preview token here, mapped to this (render.NEXT)
    unless_sha: str | None = None    # no lock if the wheel with this sha256 is current already
    reads_only = False
    kind = "lock"

    def fields(self) -> dict:
        return {**super().fields(), "info": self.info, "only_laid_out": self.only_laid_out,
                "preview": self.preview, "unless_sha": self.unless_sha}

    def describe(self, results: dict | None = None) -> list[str]:
        """Says it would create deploy_to only where the host's facts show there is none, and
        nothing where it took no lock: a fresh host while the wheel builds, the wheel current."""
        facts = (results or {}).get("facts") or {}
        current = [r for r in facts.get("releases", []) if r["name"] == facts.get("current")]
        if facts.get("deferred") or (self.unless_sha and current
                                     and current[0]["meta"].get("sha256") == self.unless_sha):
            return []
        root = facts.get("root", self.root)
        made = facts.get("created_root") or not facts.get("root_exists", True)
        make = f"create {root} and its directories and " if made else ""
        return [f"would {make}take the lock {root}/.fabdeploy/lock: {json.dumps(self.info)}"]


@dataclass(frozen=True)
class Guard(Facts):
    """Stop here unless the host still is as `expect` says (a plan made from remembered facts)."""

    expect: dict = field(default_factory=dict)
    kind = "guard"

    def fields(self) -> dict:
        return {**super().fields(), "expect": self.expect}

    def describe(self, results: dict | None = None) -> list[str]:
        return [f"would check {self.root} is as last seen (current {self.expect.get('current')})"]


@dataclass(frozen=True)
class Unlock(Op):
    root: str
    lock: str = ""
    kind = "unlock"

    def fields(self) -> dict:
        return {"root": self.root, "lock": self.lock}

    def describe(self, results: dict | None = None) -> list[str]:
        return [f"would remove the lock {self.root}/.fabdeploy/lock"]


@dataclass(frozen=True)
class Health(Op):
    """Poll a server (or the proxy) until the path answers 2xx."""

    target: str                      # unix:/path or host:port
    path: str
    timeout: float
    host_header: str = "localhost"
    stamp: str | None = None         # the proxy's X-Fabdeploy-Site must say this
    preview_map: str | None = None   # send the preview token kept there
    pid_file: str | None = None      # give up when this server has exited
    unit: str | None = None
    log: str | None = None           # on failure, return this log's lines since `marker`
    marker: str | None = None
    tls: bool = False                # over HTTPS, naming host_header (the proxy's own loopback)
    kind = "health"

    def fields(self) -> dict:
        return {"target": self.target, "path": self.path, "timeout": self.timeout,
                "host_header": self.host_header, "stamp": self.stamp, "preview_map": self.preview_map,
                "pid_file": self.pid_file, "unit": self.unit, "log": self.log, "marker": self.marker,
                "tls": self.tls or None}

    def describe(self, results: dict | None = None) -> list[str]:
        via = f" with the preview token of {self.preview_map}" if self.preview_map else ""
        stamp = f", stamped {self.stamp}" if self.stamp else ""
        scheme = "https://" if self.tls else ""
        return [f"would check {scheme}{self.target}{self.path} answers 2xx within {self.timeout:g}s{via}{stamp}"]


@dataclass(frozen=True)
class Running(Op):
    """A release's processes: each still runs `settle` seconds after it started (processes.py)."""

    checks: tuple                    # {"name", "unit" or "pid_file", "log", "marker"} per process
    settle: float
    kind = "running"

    def fields(self) -> dict:
        return {"checks": list(self.checks), "settle": self.settle}

    def describe(self) -> list[str]:
        names = ", ".join(c["name"] for c in self.checks)
        return [f"would check that {names} still run {self.settle:g}s after starting"]


@dataclass(frozen=True)
class Reload(Op):
    """A proxy the deploy user runs: its reload, then (nginx) the wait for its old workers."""

    run: str
    pid_file: str | None = None
    timeout: float = 10
    kind = "reload"

    def fields(self) -> dict:
        return {"run": self.run, "pid_file": self.pid_file, "timeout": self.timeout}

    def describe(self, results: dict | None = None) -> list[str]:
        wait = " and wait until nginx's old workers take no connections" if self.pid_file else ""
        return [f"would run: {self.run}{wait}"]


@dataclass(frozen=True)
class Site(Op):
    """A proxy site the deploy user runs itself: installed, tested (else put back), reloaded."""

    path: str
    text: str
    test: str
    reload: str
    pid_file: str | None = None
    reload_nginx: bool = False
    loaded: str | None = None  # removed once reloaded: the marker of a token nginx did not know yet
    kind = "site"

    def fields(self) -> dict:
        return {"path": self.path, "text": self.text, "test": self.test, "reload": self.reload,
                "pid_file": self.pid_file, "reload_nginx": self.reload_nginx, "loaded": self.loaded}

    def describe(self, results: dict | None = None) -> list[str]:
        return [f"would write {self.path} (mode 644):", *indented(self.text),
                f"would run: {self.test}", f"would run: {self.reload}"]


@dataclass(frozen=True)
class Helper(Op):
    """fabdeploy's root helper, through the one sudo rule provision grants for the app."""

    app: str
    argv: tuple
    stdin: str | None = None
    kind = "helper"

    def fields(self) -> dict:
        return {"helper": HELPER, "app": self.app, "argv": list(self.argv), "stdin": self.stdin}

    def describe(self, results: dict | None = None) -> list[str]:
        return [f"would run: sudo -n {HELPER} {quote(self.app)} {' '.join(quote(a) for a in self.argv)}"]


@dataclass(frozen=True)
class Compile(Op):
    python: str
    like: str | None = None
    kind = "compile"

    def fields(self) -> dict:
        return {"python": self.python, "like": self.like}

    def describe(self, results: dict | None = None) -> list[str]:
        like = f", reusing {self.like}'s bytecode where the source is the same" if self.like else ""
        return [f"would byte-compile the venv of {self.python}{like}"]


@dataclass(frozen=True)
class Trash(Op):
    trash: str
    releases: tuple
    kind = "trash"

    def fields(self) -> dict:
        return {"trash": self.trash, "releases": list(self.releases)}

    def describe(self, results: dict | None = None) -> list[str]:
        return [f"would move {' '.join(self.releases)} into {self.trash} and delete it in the background"]


@dataclass(frozen=True)
class Audit(Op):
    entry: dict
    path: str | None = None        # the deploy user's own log
    app: str | None = None         # or root's, through the helper
    kind = "audit"

    def fields(self) -> dict:
        return {"entry": self.entry, "path": self.path, "app": self.app, "helper": HELPER if self.app else None}

    def describe(self, results: dict | None = None) -> list[str]:
        where = "root's audit log (helper)" if self.app else self.path
        return [f"would append to {where}: {json.dumps(self.entry, sort_keys=True)}"]


@dataclass(frozen=True)
class Install(Op):
    """A root-owned file, written only when its text differs: "changed" or "unchanged".

    `validate` checks the new text (its path replaces {}) before it goes in;
    `test` runs once it is in, and a failure puts the old text back;
    `after` runs when it changed.
    """

    path: str
    text: str = field(repr=False)
    mode: int = 0o644
    group: str | None = None
    validate: str | None = None
    test: str | None = None
    after: str | None = None
    secret: bool = False             # a private key: its text is never shown
    kind = "install"

    def fields(self) -> dict:
        return {"path": self.path, "text": self.text, "mode": self.mode, "group": self.group,
                "validate": self.validate, "test": self.test, "after": self.after}

    def describe(self, results: dict | None = None) -> list[str]:
        group = f", group {self.group}" if self.group else ""
        head = f"would install {self.path} (mode {self.mode:o}{group}) if it differs"
        lines = [f"{head} (secret: not shown)"] if self.secret else [f"{head}:", *indented(self.text)]
        return lines + [f"would run: {c}" for c in (self.validate, self.test, self.after) if c]


# -- the app's data: backups, migrations, restores (issue 14) ---------------------------

@dataclass(frozen=True)
class Migrate(Sh):
    """The app's migrate_command; a failure names the backup taken just before it."""

    backup: str = ""                 # the folder the backup op before it fills (not sent)


@dataclass(frozen=True)
class Backup(Op):
    """A consistent copy of the app's databases into `folder`, and a fingerprint of their schema.

    The SQLite files in `instance` (and the one DATABASE_URL names) through
    SQLite's backup API; a PostgreSQL DATABASE_URL, read from `env_file`, with
    pg_dump where the server has it. The newest `keep` backups stay, and
    always those in `protect`; older ones are removed.
    """

    instance: str
    env_file: str
    folder: str
    keep: int = 5
    protect: tuple = ()
    kind = "backup"

    def fields(self) -> dict:
        return {"instance": self.instance, "env_file": self.env_file, "folder": self.folder,
                "keep": self.keep, "protect": list(self.protect)}

    def describe(self, results: dict | None = None) -> list[str]:
        return [f"would back up the app's databases (SQLite in {self.instance}; PostgreSQL with pg_dump)"
                f" to {self.folder}, keeping the newest {self.keep} backups"]


@dataclass(frozen=True)
class Schema(Op):
    """After a migration: whether the schema moved, noted in the backup taken before it."""

    instance: str
    env_file: str
    folder: str
    kind = "schema"

    def fields(self) -> dict:
        return {"instance": self.instance, "env_file": self.env_file, "folder": self.folder}

    def describe(self, results: dict | None = None) -> list[str]:
        return [f"would note in {self.folder} whether the migration changed the schema"]


@dataclass(frozen=True)
class Restore(Op):
    """Put the databases of backup `folder` back; the databases as they are go to `save` first."""

    folder: str
    instance: str
    env_file: str
    save: str
    kind = "restore"

    def fields(self) -> dict:
        return {"folder": self.folder, "instance": self.instance, "env_file": self.env_file, "save": self.save}

    def describe(self, results: dict | None = None) -> list[str]:
        return [f"would copy the databases as they are to {self.save}, then put back those of {self.folder}"]


@dataclass(frozen=True)
class Phase:
    """A named group of ops: one line of output, with its time.

    An interruptible phase is not begun once the client has cancelled or is
    gone; one that is not (the switch) runs whatever happens to the client.
    """

    name: str
    ops: tuple
    interruptible: bool = True

    def wire(self) -> dict:
        return {"name": self.name, "ops": [op.wire() for op in self.ops], "interruptible": self.interruptible}
