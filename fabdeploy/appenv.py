"""The environment a release runs with: `env` and `secrets`, read where you deploy, as one file.

Each release gets `releases/<name>/env` (0600, the deploy user's): the plain
values of fabric.yaml's `env`, and the secrets, read here on the machine you
deploy from (the local environment, a local file, or a local command's
output, such as a password manager's). The release's serve script and every
command fabdeploy runs for it load that file (plan.in_release), so the app,
init_command, migrate_command and every later process see the same values.

A secret's value never goes on a command line, into output, a log or an
exception: it travels in the file's text over the agent's channel, and a
dry run or --echo shows <secret>.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from shlex import quote

from .errors import DeployError
from .settings import SecretSource, Settings

HEADER = ("# Written by fabdeploy: the environment this release runs with (0600).\n"
          "# Its serve script and every command fabdeploy runs for it load this file.\n")
SHOWN = "<secret>"


def loader(path: str) -> str:
    """Shell that loads an env file into the running shell, where the release has one.

    This is how anything gets the environment a release runs with: its
    serve script, plan.in_release (every flask command), and any process
    started for a release later. Releases from before env files have none.
    """
    return f"{{ [ ! -f {quote(path)} ] || . {quote(path)}; }}"


def render(values: dict[str, str]) -> str:
    """An env file that sh can source (`. env`) and the agent can read (shlex): export NAME='value'."""
    return HEADER + "".join(f"export {name}={quote(value)}\n" for name, value in values.items())


@dataclass(frozen=True)
class AppEnv:
    """The plain values and the secrets' values of one host's release."""

    plain: dict = field(default_factory=dict)
    secrets: dict = field(default_factory=dict, repr=False)  # never shown, not even in a repr

    @property
    def empty(self) -> bool:
        return not self.plain and not self.secrets

    @property
    def text(self) -> str:
        return render({**self.plain, **self.secrets})

    @property
    def shown(self) -> str:
        """The file as a dry run and --echo show it: every secret's value is <secret>."""
        return HEADER + "".join(f"export {name}={quote(value)}\n" for name, value in self.plain.items()) + \
            "".join(f"export {name}={SHOWN}\n" for name in self.secrets)

    @property
    def sha256(self) -> str | None:
        """What tells a redeploy that the environment changed; None for none at all."""
        return None if self.empty else hashlib.sha256(self.text.encode()).hexdigest()


def read_secret(name: str, source: SecretSource, base_dir: Path | None) -> str:
    """The secret's value from where fabric.yaml says, or one line naming what is missing."""
    key = f"fabdeploy.secrets.{name}"
    hint = f"or change where {key} comes from"
    if source.kind == "env":
        value = os.environ.get(source.value)
        if value is None:
            raise DeployError(f"secret {name} is missing: the local environment variable {source.value} "
                              "is not set", hint=f"export {source.value}, {hint}")
    elif source.kind == "file":
        path = local_path(source.value, base_dir)
        try:
            value = path.read_text()
        except OSError as exc:
            raise DeployError(f"secret {name} is missing: cannot read the local file {path} ({exc.strerror})",
                              hint=f"create it, {hint}") from None
        value = value[:-1] if value.endswith("\n") else value
    else:
        # A password manager may ask for its passphrase: stdin and stderr stay the terminal's.
        done = subprocess.run(source.value, shell=True, stdout=subprocess.PIPE, cwd=base_dir or None)
        if done.returncode:
            raise DeployError(f"secret {name} is missing: its local command exited {done.returncode}",
                              hint=f"run it yourself to see why ({source.value}), {hint}")
        value = done.stdout.decode(errors="replace")
        value = value[:-1] if value.endswith("\n") else value
    if not value:
        raise DeployError(f"secret {name} is empty ({source.describe()})", hint=hint)
    if "\0" in value:
        raise DeployError(f"secret {name} holds a NUL character, which no environment can", hint=hint)
    return value


def local_path(value: str, base_dir: Path | None) -> Path:
    path = Path(os.path.expanduser(value))
    return path if path.is_absolute() or base_dir is None else base_dir / path


class Resolver:
    """Reads each secret once per invocation, however many hosts use it."""

    def __init__(self):
        self._read: dict[tuple[str, str], str] = {}

    def app_env(self, settings: Settings) -> AppEnv:
        return AppEnv(dict(settings.env), {name: self.secret(settings, name) for name in settings.secrets})

    def secret(self, settings: Settings, name: str) -> str:
        source = settings.secrets[name]
        where = (source.kind, str(local_path(source.value, settings.base_dir)) if source.kind == "file"
                 else source.value)
        if where not in self._read:
            self._read[where] = read_secret(name, source, settings.base_dir)
        return self._read[where]

    def value(self, settings: Settings, name: str) -> str | None:
        """One name of the environment: a secret (read now) or a plain value; None if neither."""
        return self.secret(settings, name) if name in settings.secrets else settings.env.get(name)


def availability(source: SecretSource, base_dir: Path | None) -> str:
    """Whether a secret can be read, without reading it: a command is only run by a deploy."""
    if source.kind == "env":
        return "set" if source.value in os.environ else "NOT SET"
    if source.kind == "file":
        return "readable" if os.access(local_path(source.value, base_dir), os.R_OK) else "MISSING"
    return "run by each deploy"


def config_lines(settings: Settings) -> list[str]:
    """What `fab config` prints: each name and where its value comes from, never a value."""
    width = max([len(n) for n in (*settings.env, *settings.secrets)] + [4])
    lines = [f"{settings.app}: each release runs with releases/<release>/env (0600), loaded by its"
             " serve script and every command fabdeploy runs for it"]
    if not settings.env and not settings.secrets:
        lines.append("  no env or secrets are set (fabric.yaml: fabdeploy.env, fabdeploy.secrets)")
    for name in settings.env:
        lines.append(f"  {name:<{width}}  env     fabric.yaml (fabdeploy.env.{name})")
    for name, source in settings.secrets.items():
        lines.append(f"  {name:<{width}}  secret  {source.describe()} "
                     f"({availability(source, settings.base_dir)})")
    commands = {"init_command": settings.init_command, "migrate_command": settings.migrate_command}
    for key, words in commands.items():
        lines.append(f"{key}: " + (f"flask {' '.join(words)}" if words else "none"))
    where = ("shared: init and migrate run once per deploy, on the primary" if settings.shared_database
             else "local: each host its own; init and migrate run on every host")
    lines.append(f"database: {where}")
    return lines


# -- a PostgreSQL URL, for the database host that provision sets up ------------

@dataclass(frozen=True)
class DatabaseUrl:
    """postgresql://user:password@host:port/name, as DATABASE_URL gives it."""

    user: str
    password: str = field(repr=False)
    host: str
    port: int
    name: str

    @classmethod
    def parse(cls, text: str) -> "DatabaseUrl | None":
        """The parts of a PostgreSQL URL (any SQLAlchemy driver suffix); None for another database."""
        parts = urllib.parse.urlsplit(text)
        if parts.scheme.split("+")[0] not in ("postgres", "postgresql"):
            return None
        try:
            port = parts.port or 5432
        except ValueError:
            port = 0
        return cls(urllib.parse.unquote(parts.username or ""), urllib.parse.unquote(parts.password or ""),
                   parts.hostname or "", port, parts.path.lstrip("/"))
