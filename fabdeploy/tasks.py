"""The Fabric tasks: deploy, rollback, releases, status, logs, unlock, rotate-secret, provision.

`fab -H a,b deploy` calls a task once per host, one host after another.
To prepare every host before switching any, each per-host call only
collects its Connection; a `post` task, which Fabric runs once after all
of them, then runs the task's body over the whole fleet. Without -H, the
hosts come from the `fabdeploy.hosts` setting. `@fleet_task` does that
for every task, so each body below is its own logic only.
"""
from __future__ import annotations

import difflib
import functools
import inspect
import json as jsonlib
import os
import signal
import sys
from pathlib import Path

from fabric import Config, Connection
from invoke import Task
from invoke.parser import Argument
from invoke.exceptions import Exit

from . import appenv, commands, fleet, hostinfo, secret, vcs
from . import phases as ph
from .build import start_build
from .errors import DeployError
from .layout import release_name
from .remote import Host
from .settings import Settings, resolve, warn

_collected: dict[str, dict] = {}
STAGE_HELP = "use the hosts and settings of this stage (fabdeploy.stages)"
JSON_HELP = "print a machine-readable result (or set fabdeploy.output: json)"


def interrupt(signum, frame):
    raise KeyboardInterrupt


def misspelt_section(config) -> None:
    """A top-level key of fabric.yaml close to `fabdeploy` is a typo, not a section of its own."""
    known = set(Config.global_defaults()) | {"fabdeploy"}
    for key in config:
        if key not in known and difflib.get_close_matches(key, ["fabdeploy"], n=1, cutoff=0.75):
            raise DeployError(f"fabric.yaml has a section {key!r}, not 'fabdeploy': its settings would be"
                              " ignored", hint="did you mean 'fabdeploy'? fix fabric.yaml")


def unparsable_config(kind, value, trace, previous=sys.excepthook):
    """A fabric.yaml that does not parse: one line naming the file and line, not a traceback.

    Invoke reads the file before any task runs, so the error can only be met here.
    """
    mark = getattr(value, "problem_mark", None)
    if "yaml" in type(value).__module__.split(".") and mark is not None and not os.environ.get("FABDEPLOY_DEBUG"):
        print(f"fabdeploy: {mark.name}:{mark.line + 1}: {getattr(value, 'problem', value)}"
              " (fix the YAML, e.g. its indentation or quoting)", file=sys.stderr)
        sys.exit(1)
    previous(kind, value, trace)


sys.excepthook = unparsable_config


class Invocation:
    """One task's run: the settings, the hosts, what prints, what runs them."""

    def __init__(self, c, conns: list, stage: str | None, quiet: bool = False, json: bool = False,
                 parallel: int = 10, dry_run: bool = False):
        base = getattr(c.config, "_project_prefix", None) or os.getcwd()
        misspelt_section(c.config)
        self.config = c.config
        self.settings: Settings = resolve(c.config.get("fabdeploy", {}), Path(base), stage)
        warn(self.settings)
        self.conns = conns
        self.dry_run = dry_run
        self.json = bool(json or self.settings.output == "json")
        self.printer = fleet.Printer(quiet, json_out=self.json)
        self.runner = fleet.Runner(parallel)
        self.hosts: list[ph.Target] = []

    def targets(self, databases: bool = False, **fields) -> list[ph.Target]:
        """One Target per host (-H, else the configured hosts), each with its own settings.

        A host with `role: database` is provision's only (the app is not deployed there).
        """
        conns = self.conns
        if not conns:
            entries = [e for e in self.settings.hosts if databases or e.role == "app"]
            if not entries:
                raise DeployError("no host given",
                                  hint="pass -H user@host, or set fabdeploy.hosts (or stages and --stage)")
            conns = [Connection(entry.spec, config=self.config) for entry in entries]
        for conn in conns:
            own = self.settings.for_host(conn.user, conn.host, conn.port)
            if own.role == "database" and not databases:
                raise DeployError(f"{conn.host} is the database host (role: database): the app is not deployed "
                                  "there", hint="name the app hosts with -H, or leave -H out")
            host = Host(conn, own.known_hosts, python=own.python, dry_run=self.dry_run)
            self.hosts.append(ph.Target(host, own, cancelled=self.runner.cancelled, **fields))
        return self.hosts

    def one_by_one(self, work, only: str | None = None, **fields) -> None:
        """work(target) on each host in turn (or the one `only` names); its failure names the host."""
        for t in pick(self.targets(**fields), only):
            try:
                work(t)
            except DeployError as exc:
                raise exc.on(t.host.name)

    def close(self) -> None:
        for t in self.hosts:
            t.host.close()


def pick(targets: list[ph.Target], only: str | None) -> list[ph.Target]:
    """The targets, or the one `only` names: user@host[:port], or the host alone (--host)."""
    if not only:
        return targets
    chosen = [t for t in targets
              if only in (t.host.name, t.host.conn.host, f"{t.host.conn.user}@{t.host.conn.host}")]
    if not chosen:
        raise DeployError(f"--host {only} is not one of the hosts ({', '.join(t.host.name for t in targets)})",
                          hint="give one of them, or -H it")
    return chosen


class Words(Argument):
    """A task's last positional argument, which takes every word after it (fab flask db upgrade).

    Invoke has no variadic positional argument: its parser feeds a positional
    one while its value is None. This one says None while the parser reads
    the task's words, and gives them all once the parser wraps the task up.
    """

    @property
    def value(self):
        frame = sys._getframe(1)
        while frame is not None:
            if frame.f_code.co_name == "complete_context":  # the parser is done with the task
                return self._value or []
            if frame.f_code.co_name == "handle":            # the parser is reading a word
                return None
            frame = frame.f_back
        return self._value or []

    @value.setter
    def value(self, word) -> None:
        self.set_value(word)

    def set_value(self, value, cast: bool = True) -> None:
        self.raw_value = value
        self._value = (self._value or []) + [value]


class WordsTask(Task):
    """A Task whose argument `words` is Words."""

    def get_arguments(self, ignore_unknown_help=None):
        return [Words(names=arg.names, kind=list, positional=True, help=arg.help) if arg.name == "words" else arg
                for arg in super().get_arguments(ignore_unknown_help)]


def fleet_task(*, name: str | None = None, help: dict | None = None):
    """A fab task whose body runs once, over every host of the invocation.

    The body takes an Invocation and the task's options. Expected failures
    end as one clear line and exit 1, not a traceback; SIGTERM is treated
    like Ctrl-C, so the failure path unlocks the hosts; with --json the
    result is printed whatever happens.
    """
    def decorate(body):
        task_name = name or body.__name__.replace("_", "-")
        sig = inspect.signature(body)
        defaults = {p.name: p.default for p in sig.parameters.values()}

        def run(c, conns: list, **options) -> None:
            previous = signal.signal(signal.SIGTERM, interrupt)
            invocation = None
            error = None
            try:
                common = {k: options.get(k, defaults.get(k)) for k in ("quiet", "json", "parallel", "dry_run")
                          if k in defaults}
                invocation = Invocation(c, conns, options.get("stage"), **common)
                body(invocation, **options)
            except DeployError as exc:
                error = exc
                if os.environ.get("FABDEPLOY_DEBUG"):
                    raise
                raise Exit(f"fabdeploy: {exc}", code=1) from None
            finally:
                signal.signal(signal.SIGTERM, previous)
                if invocation is not None:
                    invocation.close()
                    if invocation.json and task_name in ("deploy", "rollback"):
                        result = invocation.printer.result(task_name, invocation.hosts,
                                                           invocation.runner.errors, error)
                        print(jsonlib.dumps(result, indent=2), flush=True)

        @functools.wraps(body)
        def per_host(c, **options):
            if isinstance(c, Connection):  # under -H: keep the Connection for the run at the end
                _collected.setdefault(task_name, {"conns": [], "options": options})["conns"].append(c)
            else:
                run(c, [], **options)

        def all_hosts(c):
            entry = _collected.pop(task_name, None)
            if entry:
                run(c, entry["conns"], **entry["options"])

        params = list(sig.parameters.values())
        per_host.__signature__ = sig.replace(parameters=[inspect.Parameter("c", inspect.Parameter.POSITIONAL_ONLY),
                                                         *params[1:]])
        del per_host.__wrapped__
        all_hosts.__name__ = f"{body.__name__}_all"
        kind = WordsTask if "words" in sig.parameters else Task
        positional = [p.name for p in params[1:] if p.default is inspect.Parameter.empty or p.name == "words"]
        return kind(per_host, name=task_name, help=help or {}, post=[Task(all_hosts)], positional=positional)
    return decorate


def parse_batch(batch, hosts: int) -> int:
    """--batch 2 switches two hosts at a time; --batch 25% a quarter of them."""
    text = str(batch or 0).strip()
    if text.endswith("%"):
        share = float(text[:-1])
        if not 0 < share <= 100:
            raise DeployError(f"--batch {text} must be a percentage from 1% to 100%")
        return max(1, int(hosts * share / 100))
    if not text.isdigit():
        raise DeployError(f"--batch must be a host count or a percentage, not {text!r}")
    return int(text)


# -- deploy and rollback --------------------------------------------------------

@fleet_task(help={
    "stage": STAGE_HELP,
    "force": "deploy even if the same wheel is already current",
    "dry-run": "print what would be done; change nothing",
    "batch": "switch this many hosts (or this percentage, e.g. 25%) at a time; default all",
    "json": JSON_HELP,
    "parallel": "work on at most this many hosts at once (default 10)",
    "quiet": "print only the outcome",
})
def deploy(run: Invocation, force=False, dry_run=False, batch="0", parallel=10, quiet=False, stage=None,
           json=False):
    """Build the wheel, install it as a new release, and switch to it when healthy."""
    source = release_source(run.settings)
    name = release_name() if run.settings.version_from != "git" else vcs.release_name(release_name(), source)
    targets = run.targets(release=name, secret_key=secret.new_key(), force=force, source=source)
    resolver = appenv.Resolver()
    for t in targets:  # read here, before the build and before any host: a missing secret changes nothing
        t.app_env = resolver.app_env(t.settings)
    fleet.before_build(targets, run.printer)
    wheel = start_build(Path(run.settings.project_dir))  # while the hosts connect and lock
    for t in targets:
        t.building = wheel
    fleet.deploy(targets, run.runner, run.printer, batch=parse_batch(batch, len(targets)))


def release_source(settings: Settings) -> vcs.Source | None:
    """The commit the release is built from (version_from: git needs one); a dirty tree is said."""
    project = Path(settings.project_dir)
    source = vcs.required(project) if settings.version_from == "git" else vcs.source(project)
    if source is not None and source.dirty:
        print(vcs.warning(source, project), file=sys.stderr, flush=True)
    return source


@fleet_task(help={
    "stage": STAGE_HELP,
    "release": "the release to return to (default: the one before current)",
    "restore-db": "also put back the database backup taken before the current release's migration (asks)",
    "yes": "with --restore-db: do not ask (CI)",
    "json": JSON_HELP,
    "parallel": "work on at most this many hosts at once (default 10)",
    "quiet": "print only the outcome",
})
def rollback(run: Invocation, release=None, restore_db=False, yes=False, parallel=10, quiet=False, stage=None,
             json=False):
    """Switch back to the previous release, or to --release NAME; with --restore-db, its database too."""
    ask = asker(yes, "--restore-db") if restore_db else None
    fleet.rollback(run.targets(release=release or "", action="rollback"), run.runner, run.printer, restore=ask)


def asker(yes: bool, option: str):
    """--yes, or a question on the terminal; without a terminal (CI) it fails before anything connects."""
    if yes:
        return lambda question: True
    if not sys.stdin.isatty():
        raise DeployError(f"{option} overwrites the database and asks first, but there is no terminal to ask on",
                          hint="pass --yes to go ahead without asking")

    def ask(question: str) -> bool:
        return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")
    return ask


# -- the small tasks: one host after another ---------------------------------

@fleet_task(help={"stage": STAGE_HELP})
def releases(run: Invocation, stage=None):
    """List the releases on each host: the current one marked, failed ones flagged."""
    def show(t):
        hostinfo.read(t)
        print(f"{t.host.name} ({t.layout.root}), * = current")
        print(hostinfo.release_table(t) if t.releases else "  no releases yet")
    run.one_by_one(show)


@fleet_task(help={"stage": STAGE_HELP})
def unlock(run: Invocation, stage=None):
    """Remove a deploy lock left behind, e.g. by a deploy that was killed."""
    def remove(t):
        hostinfo.read(t)
        print(hostinfo.remove_lock(t))
    run.one_by_one(remove)


@fleet_task(name="rotate-secret", help={"stage": STAGE_HELP})
def rotate_secret(run: Invocation, stage=None):
    """Replace SECRET_KEY; the old key stays a fallback, so sessions survive."""
    def rotate(t):
        hostinfo.rotate(t)
        print(f"{t.host.name}: new SECRET_KEY in place; the old one stays in SECRET_KEY_FALLBACKS")
    run.one_by_one(rotate, secret_key=secret.new_key(), action="rotate-secret")  # every host signs alike


@fleet_task(help={"stage": STAGE_HELP, "dry-run": "print the steps' commands; change nothing",
                  "replace-sudo": "remove the deploy user's other sudo rights (else provision refuses)"})
def provision(run: Invocation, stage=None, dry_run=False, replace_sudo=False):
    """Prepare a fresh server (as root): packages, the deploy user, root's site and units, narrow sudo.

    On a host whose `hosts` entry has `role: database`: PostgreSQL for the app (see database.py).
    """
    targets = run.targets(databases=True)
    resolver = appenv.Resolver()
    urls = {t: appenv.DatabaseUrl.parse(resolver.value(t.settings, "DATABASE_URL") or "")
            for t in targets if t.settings.role == "database"}  # read before any host is touched
    for t in targets:
        try:
            if t in urls:
                hostinfo.provision_database(t, urls[t])
            else:
                hostinfo.provision(t, replace_sudo)
        except DeployError as exc:
            raise exc.on(t.host.name)


@fleet_task(help={"stage": STAGE_HELP, "json": "one JSON object per host"})
def status(run: Invocation, stage=None, json=False):
    """Show each host's current release, its age and version, the service, health and lock."""
    def show(t):
        info = hostinfo.status(t)
        print(jsonlib.dumps(info) if run.json else hostinfo.status_text(info), flush=True)
    run.one_by_one(show)


@fleet_task(help={"stage": STAGE_HELP, "follow": "keep printing new lines (Ctrl-C stops)",
                  "lines": "how many lines to show first (default 50)",
                  "access": "nginx's access log of the app instead (upstream=- where nginx answered)"})
def logs(run: Invocation, stage=None, follow=False, lines=50, access=False):
    """Show the app's log (the server's errors, with the app's tracebacks) on each host."""
    run.one_by_one(lambda t: hostinfo.logs(t, int(lines), follow, access))


# -- the app's settings, secrets and data (issue 14) ---------------------------

@fleet_task(help={"stage": STAGE_HELP})
def config(run: Invocation, stage=None):
    """List the app's env and secrets: each name and where its value comes from, never a value."""
    print("\n".join(appenv.config_lines(run.settings)))


@fleet_task(name="db-backups", help={"stage": STAGE_HELP})
def db_backups(run: Invocation, stage=None):
    """List the database backups taken before each migration (* the current release's)."""
    def show(t):
        hostinfo.read(t)
        print(f"{t.host.name} ({t.layout.backups}), * = before the current release's migration")
        print(hostinfo.backup_table(t) if t.facts.backups else "  no backups")
    run.one_by_one(show)


@fleet_task(name="db-restore", help={"stage": STAGE_HELP, "backup": "the backup to put back (see fab db-backups)",
                                     "yes": "do not ask (CI)"})
def db_restore(run: Invocation, backup, yes=False, stage=None):
    """Put a database backup back (the database as it is becomes a backup first), after asking."""
    ask = asker(yes, "db-restore")
    hosts = ph.database_hosts(run.targets(action="db-restore"))
    try:
        for t in hosts:
            try:
                hostinfo.lock_for_restore(t, backup)
            except DeployError as exc:
                raise exc.on(t.host.name)
        if not ask(f"Put back backup {backup} on {', '.join(t.host.name for t in hosts)}? What was written "
                   f"since it was taken is lost (the database as it is now is kept as a backup)."):
            raise DeployError("not confirmed: nothing was restored")
        for t in hosts:
            print(hostinfo.restore(t, backup), flush=True)
    finally:
        for t in hosts:
            ph.release_lock(t)


# -- the app's commands on the servers (issue 15) --------------------------------------------

HOST_HELP = "only this host (user@host, or host) of those the task would run on"


@fleet_task(name="flask", help={"stage": STAGE_HELP, "host": HOST_HELP,
                                "words": "the flask command and its arguments, e.g. create-admin alice"})
def flask_command(run: Invocation, words=None, host=None, stage=None):
    """Run flask --app <wsgi> WORDS in the current release on each host (or --host)."""
    run.one_by_one(lambda t: commands.flask(t, list(words or ())), only=host)


@fleet_task(help={"stage": STAGE_HELP, "host": HOST_HELP})
def shell(run: Invocation, host=None, stage=None):
    """Open flask shell in the current release, interactively (one host: --host with several)."""
    targets = pick(run.targets(), host)
    if len(targets) != 1:
        raise DeployError(f"fab shell opens one shell, and there are {len(targets)} hosts",
                          hint="name one with --host")
    try:
        commands.shell(targets[0])
    except DeployError as exc:
        raise exc.on(targets[0].host.name)


@fleet_task(name="run", help={"stage": STAGE_HELP, "host": HOST_HELP,
                              "command": "a shell command line, quoted as one argument"})
def run_command(run: Invocation, command, host=None, stage=None):
    """Run a shell command in the current release's environment on each host (or --host)."""
    run.one_by_one(lambda t: commands.run(t, command), only=host)
