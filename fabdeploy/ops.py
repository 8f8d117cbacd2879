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

HELPER = "/usr/local/lib/fabdeploy/helper"  # agent.HELPER: installed there by provision


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

    def describe(self) -> list[str]:
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

    def describe(self) -> list[str]:
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
    kind = "write"

    def fields(self) -> dict:
        return {"path": self.path, "text": self.text, "mode": self.mode, "secret": self.secret}

    def describe(self) -> list[str]:
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

    def describe(self) -> list[str]:
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

    def describe(self) -> list[str]:
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

    def describe(self) -> list[str]:
        return [f"would link {self.link} -> {self.target}"]


@dataclass(frozen=True)
class Rename(Op):
    """mv: only if `source` exists (a rename is atomic)."""

    source: str
    dest: str
    kind = "sh"

    def fields(self) -> dict:
        return {"cmd": f"if [ -f {quote(self.source)} ]; then mv -f {quote(self.source)} {quote(self.dest)}; fi"}

    def describe(self) -> list[str]:
        return [f"would rename {self.source} -> {self.dest}"]


@dataclass(frozen=True)
class Remove(Op):
    paths: tuple
    kind = "remove"

    def fields(self) -> dict:
        return {"paths": list(self.paths)}

    def describe(self) -> list[str]:
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
    needs: dict | None = None        # {"program": "nginx", "problem": "no-nginx"}
    refuse_root: bool = True
    registration: str | None = None   # where provision records this app
    site_path: str | None = None
    require_registration: bool = False
    reads_only = True
    kind = "facts"

    def fields(self) -> dict:
        return {"root": self.root, "app": self.app, "python": self.python, "needs": self.needs,
                "refuse_root": self.refuse_root, "registration": self.registration,
                "site_path": self.site_path, "require_registration": self.require_registration}


@dataclass(frozen=True)
class Lock(Facts):
    info: dict = field(default_factory=dict)
    only_laid_out: bool = False
    preview: bool = False            # make the preview token here (a proxy of the deploy user's own)
    reads_only = False
    kind = "lock"

    def fields(self) -> dict:
        return {**super().fields(), "info": self.info, "only_laid_out": self.only_laid_out,
                "preview": self.preview}

    def describe(self) -> list[str]:
        return [f"would create {self.root} and its directories (where missing) and take the lock "
                f"{self.root}/.fabdeploy/lock: {json.dumps(self.info)}"]


@dataclass(frozen=True)
class Unlock(Op):
    root: str
    kind = "unlock"

    def fields(self) -> dict:
        return {"root": self.root}

    def describe(self) -> list[str]:
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

    def describe(self) -> list[str]:
        via = f" with the preview token of {self.preview_map}" if self.preview_map else ""
        stamp = f", stamped {self.stamp}" if self.stamp else ""
        scheme = "https://" if self.tls else ""
        return [f"would check {scheme}{self.target}{self.path} answers 2xx within {self.timeout:g}s{via}{stamp}"]


@dataclass(frozen=True)
class Reload(Op):
    """A proxy the deploy user runs: its reload, then (nginx) the wait for its old workers."""

    run: str
    pid_file: str | None = None
    timeout: float = 10
    kind = "reload"

    def fields(self) -> dict:
        return {"run": self.run, "pid_file": self.pid_file, "timeout": self.timeout}

    def describe(self) -> list[str]:
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
    kind = "site"

    def fields(self) -> dict:
        return {"path": self.path, "text": self.text, "test": self.test, "reload": self.reload,
                "pid_file": self.pid_file, "reload_nginx": self.reload_nginx}

    def describe(self) -> list[str]:
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
        return {"app": self.app, "argv": list(self.argv), "stdin": self.stdin}

    def describe(self) -> list[str]:
        return [f"would run: sudo -n {HELPER} {quote(self.app)} {' '.join(quote(a) for a in self.argv)}"]


@dataclass(frozen=True)
class Compile(Op):
    python: str
    like: str | None = None
    kind = "compile"

    def fields(self) -> dict:
        return {"python": self.python, "like": self.like}

    def describe(self) -> list[str]:
        like = f", reusing {self.like}'s bytecode where the source is the same" if self.like else ""
        return [f"would byte-compile the venv of {self.python}{like}"]


@dataclass(frozen=True)
class Trash(Op):
    trash: str
    releases: tuple
    kind = "trash"

    def fields(self) -> dict:
        return {"trash": self.trash, "releases": list(self.releases)}

    def describe(self) -> list[str]:
        return [f"would move {' '.join(self.releases)} into {self.trash} and delete it in the background"]


@dataclass(frozen=True)
class Audit(Op):
    entry: dict
    path: str | None = None        # the deploy user's own log
    app: str | None = None         # or root's, through the helper
    kind = "audit"

    def fields(self) -> dict:
        return {"entry": self.entry, "path": self.path, "app": self.app, "helper": bool(self.app) or None}

    def describe(self) -> list[str]:
        where = f"root's audit log (helper)" if self.app else self.path
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

    def describe(self) -> list[str]:
        group = f", group {self.group}" if self.group else ""
        head = f"would install {self.path} (mode {self.mode:o}{group}) if it differs"
        lines = [f"{head} (secret: not shown)"] if self.secret else [f"{head}:", *indented(self.text)]
        return lines + [f"would run: {c}" for c in (self.validate, self.test, self.after) if c]


@dataclass(frozen=True)
class Phase:
    """A named group of ops: one line of output, with its time."""

    name: str
    ops: tuple

    def wire(self) -> dict:
        return {"name": self.name, "ops": [op.wire() for op in self.ops]}
