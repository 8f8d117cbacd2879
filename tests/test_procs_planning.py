"""Fast tests of what decides hooks, processes, timers, remote commands and release identity (issue 15)."""
import dataclasses
import re
import subprocess
from pathlib import Path

import pytest

from fabdeploy import helper, hooks, ns, plan, processes, provisioning, render
from fabdeploy import phases as ph
from fabdeploy import vcs
from fabdeploy.errors import DeployError
from fabdeploy.layout import Layout
from fabdeploy.settings import Hook, Timer, resolve

EXAMPLE = Path(__file__).resolve().parent.parent / "example"
ROOT = "/srv/guestbook"
LAYOUT = Layout(ROOT)
R = "20260102-030405-006"


def settings(**given):
    return resolve(given, EXAMPLE)


# -- settings ----------------------------------------------------------------------------------

@pytest.mark.parametrize("given, read", [
    ({"hooks": {"before_switch": {"remote": "flask smoke-test"}}},
     lambda s: s.hooks == (Hook("before_switch", "remote", "flask smoke-test"),)),
    ({"hooks": {"after_deploy": [{"local": ["a", "b"]}, {"remote": "c"}]}},
     lambda s: [(h.where, h.command) for h in s.hooks] == [("local", "a"), ("local", "b"), ("remote", "c")]),
    ({"processes": {"worker": "celery -A app worker --loglevel=info", "rq": "rq worker high 'low prio'"}},
     lambda s: list(s.processes) == ["worker", "rq"]),
    ({"timers": {"cleanup": {"command": "cleanup --days 30", "on_calendar": "*-*-* 03:00:00"}}},
     lambda s: s.timers == (Timer("cleanup", ("cleanup", "--days", "30"), "*-*-* 03:00:00"),)),
    ({"version_from": "git"}, lambda s: s.version_from == "git"),
    ({}, lambda s: (s.hooks, s.processes, s.timers, s.version_from) == ((), {}, (), "wheel")),
])
def test_good_values_are_kept(given, read):
    assert read(settings(**given))


BAD = [
    ("hooks.befor_switch", {"hooks": {"befor_switch": []}}),
    ("hooks.before_switch[0]", {"hooks": {"before_switch": ["echo hi"]}}),
    ("hooks.before_switch[0]", {"hooks": {"before_switch": [{"somewhere": "x"}]}}),
    ("hooks.before_build[0]", {"hooks": {"before_build": [{"remote": "make assets"}]}}),
    ("hooks.after_deploy[0].local", {"hooks": {"after_deploy": {"local": "a\nb"}}}),
    ("hooks.failed[0].remote", {"hooks": {"failed": {"remote": ""}}}),
    ("hooks", {"hooks": "echo"}),
    ("processes", {"processes": ["worker"]}),
    ("processes.Worker", {"processes": {"Worker": "celery worker"}}),
    ("processes.app", {"processes": {"app": "celery worker"}}),
    ("processes.w/x", {"processes": {"w/x": "celery worker"}}),
    ("processes.worker", {"processes": {"worker": "celery worker && rm -rf /"}}),
    ("processes.worker", {"processes": {"worker": "a | b"}}),
    ("processes.worker", {"processes": {"worker": "run 'unclosed"}}),
    ("processes.worker", {"processes": {"worker": "a\nb"}}),
    ("timers.t", {"timers": {"t": "cleanup"}}),
    ("timers.t", {"timers": {"t": {"command": "cleanup"}}}),
    ("timers.t.command", {"timers": {"t": {"command": "", "on_calendar": "daily"}}}),
    ("timers.t.on_calendar", {"timers": {"t": {"command": "x", "on_calendar": "daily\nExecStart=/bin/sh"}}}),
    ("timers.t.on_calendar", {"timers": {"t": {"command": "x", "on_calendar": "%n daily"}}}),
    ("timers.worker", {"processes": {"worker": "w"}, "timers": {"worker": {"command": "x", "on_calendar": "daily"}}}),
    ("version_from", {"version_from": "svn"}),
]


@pytest.mark.parametrize("key, given", BAD, ids=[f"{k}-{i}" for i, (k, _) in enumerate(BAD)])
def test_a_bad_value_is_refused_at_load_naming_its_key(key, given):
    with pytest.raises(DeployError) as err:
        settings(**given)
    assert err.value.line().startswith((f"setting 'fabdeploy.{key}", f"unknown setting 'fabdeploy.{key}'")), \
        err.value.line()


def test_the_stage_is_known_to_every_hosts_settings():
    s = resolve({"stages": {"production": {"hosts": [{"host": "deploy@web2", "keep_releases": 3}]}}},
                EXAMPLE, "production")
    assert s.stage == "production"
    assert s.for_host("deploy", "web2", None).stage == "production"


# -- hooks -------------------------------------------------------------------------------------

def test_hook_variables():
    env = hooks.variables("after_deploy", R, ["deploy@a", "deploy@b"], ["R0", "R1"], "prod", host="deploy@a")
    assert env == {"FABDEPLOY_HOOK": "after_deploy", "FABDEPLOY_RELEASE": R, "FABDEPLOY_HOSTS": "deploy@a,deploy@b",
                   "FABDEPLOY_PREVIOUS": "R0,R1", "FABDEPLOY_STAGE": "prod", "FABDEPLOY_HOST": "deploy@a"}
    assert hooks.variables("before_build", R, [], None, None)["FABDEPLOY_PREVIOUS"] == ""


def test_local_at_says_where_the_deploy_must_come_back_between_phases():
    s = settings(hooks={"before_switch": {"local": "x"}, "after_switch": {"remote": "y"}})
    assert hooks.local_at(s, "before_switch") and not hooks.local_at(s, "after_switch")
    assert hooks.remote_at(s, "after_switch") and not hooks.remote_at(s, "before_switch")


def test_a_remote_hook_runs_in_the_releases_environment_with_its_variables():
    s = settings(hooks={"before_switch": {"remote": "flask smoke && echo ok"}})
    [op] = hooks.remote_ops(s, LAYOUT, R, "before_switch", {"FABDEPLOY_RELEASE": R})
    env = f"{ROOT}/releases/{R}/env"  # the release's env and secrets, as its server has them
    assert op.cmd == (f"cd {ROOT}/releases/{R} && {{ [ ! -f {env} ] || . {env}; }} && unset PORT && export PATH={ROOT}/releases/{R}/venv/bin:\"$PATH\""
                      f" && export FLASK_APP='guestbook:create_app()' && flask smoke && echo ok")
    assert op.env == {"FABDEPLOY_RELEASE": R} and "nothing was switched" in op.hint
    [bare] = hooks.remote_ops(s, LAYOUT, None, "before_switch", {})
    assert bare.cmd == f"cd {ROOT} && flask smoke && echo ok"


def test_hook_steps_are_declared_where_the_readme_says():
    names = lambda steps: [s.name for s in steps]
    assert names(ph.START)[-2:] == ["start", "before_switch"]
    assert names(ph.FINISH) == ["cleanup", "after_deploy", "unlock"]
    assert names(ph.AFTER_SWITCH) == ["after_switch"] and names(ph.AFTER_ROLLBACK) == ["after_rollback"]


def test_a_local_hook_gets_the_variables_and_a_failure_is_one_line(tmp_path):
    s = settings(hooks={"after_deploy": [{"local": "echo \"$FABDEPLOY_RELEASE\" > out"}, {"local": "exit 4"}]})
    s = dataclasses.replace(s, base_dir=tmp_path)  # local hooks run where the fabfile is
    with pytest.raises(DeployError) as err:
        hooks.run_local(s, "after_deploy", {"FABDEPLOY_RELEASE": R})
    assert (tmp_path / "out").read_text() == f"{R}\n"
    assert err.value.line() == ("local: after_deploy hook 'exit 4' failed (exit 4)"
                                " (the release is live: nothing was undone)")


# -- processes -------------------------------------------------------------------------------------

WORKERS = {"processes": {"worker": "celery -A app worker"},
           "timers": {"cleanup": {"command": "cleanup --days 30", "on_calendar": "daily"}}}


def test_each_process_and_timer_gets_a_script_in_the_release():
    s = settings(**WORKERS)
    ops = processes.files(s, LAYOUT, R)
    assert [getattr(op, "path", None) for op in ops] == [f"{ROOT}/releases/{R}/bin", f"{ROOT}/releases/{R}/bin/worker",
                                                         f"{ROOT}/releases/{R}/bin/cleanup"]
    worker, cleanup = ops[1].text.splitlines(), ops[2].text.splitlines()
    assert worker[0] == "#!/bin/sh" and ops[1].mode == 0o755
    assert f"exec >> {ROOT}/shared/log/worker.log 2>&1" in worker
    env = f"{ROOT}/releases/{R}/env"
    assert worker[-6:] == [f"cd {ROOT}/releases/{R}", f"{{ [ ! -f {env} ] || . {env}; }}", "unset PORT", f'export PATH={ROOT}/releases/{R}/venv/bin:"$PATH"',
                           "export FLASK_APP='guestbook:create_app()'", "exec celery -A app worker"]
    assert cleanup[-1] == f"exec {ROOT}/releases/{R}/venv/bin/flask --app 'guestbook:create_app()' cleanup --days 30"
    assert processes.files(settings(), LAYOUT, R) == []


def test_processes_are_checked_running_after_the_release_starts():
    s = settings(**WORKERS)
    [systemd] = processes.check(s, LAYOUT, R, "systemd")
    assert systemd.checks == ({"name": "worker", "unit": f"guestbook.worker@{R}.service",
                               "log": f"{ROOT}/shared/log/worker.log", "marker": processes.marker(R, "worker")},)
    [pidfile] = processes.check(s, LAYOUT, R, "pidfile")
    assert pidfile.checks[0]["pid_file"] == f"{ROOT}/shared/run/procs/{R}/worker.pid"
    assert processes.check(settings(), LAYOUT, R, "systemd") == []


def test_without_systemd_processes_go_with_their_releases_server():
    s = settings(**WORKERS)
    start = plan.start_server(s, LAYOUT, R, "pidfile").cmd
    assert f"setsid {ROOT}/releases/{R}/bin/worker" in start and f"> {ROOT}/shared/run/procs/{R}/worker.pid" in start
    assert f"{ROOT}/shared/run/procs/{R}/*.pid" in plan.stop_server(s, LAYOUT, R, "pidfile").cmd
    others = plan.stop_others(s, LAYOUT, [R, "R0"], "pidfile").cmd
    assert f'[ "$n" = {R} ] && continue' in others
    # Without processes, the commands are what they were.
    assert "procs" not in plan.start_server(settings(), LAYOUT, R, "pidfile").cmd
    assert "procs" not in plan.stop_others(settings(), LAYOUT, [R], "pidfile").cmd


def test_the_timers_warning_without_systemd():
    assert processes.timer_warning(settings(**WORKERS), "pidfile") == (
        "timers need systemd: cleanup will not run on this host (provision a systemd host)")
    assert processes.timer_warning(settings(**WORKERS), "systemd") is None


HARDENING = re.compile(r"^(User|Group|UMask|UnsetEnvironment|NoNewPrivileges|PrivateTmp|ProtectSystem|"
                       r"ReadWritePaths|ProtectHome)=.*$", re.M)


def test_process_and_timer_units_have_the_web_units_hardening():
    s = settings(**WORKERS)
    web = HARDENING.findall(render.systemd_unit(s, ROOT, "deploy"))
    lines = lambda text: sorted(m.group(0) for m in HARDENING.finditer(text))
    assert lines(render.process_unit(s, ROOT, "deploy", "worker")) == lines(render.systemd_unit(s, ROOT, "deploy"))
    assert lines(render.timer_service(s, ROOT, "deploy", "cleanup")) == lines(render.systemd_unit(s, ROOT, "deploy"))
    assert len(web) == 9
    unit = render.process_unit(s, ROOT, "deploy", "worker")
    assert f"ExecStart={ROOT}/releases/%i/bin/worker" in unit and "Type=exec" in unit
    timer = render.timer_timer(s, "cleanup", "daily", "guestbook.cleanup.service")
    assert "OnCalendar=daily" in timer and "Unit=guestbook.cleanup.service" in timer
    assert f"ExecStart={ROOT}/current/bin/cleanup" in render.timer_service(s, ROOT, "deploy", "cleanup")


def test_the_record_names_processes_and_timers_only_when_there_are_some():
    plain = provisioning.registration(settings(), "deploy", False)
    assert "processes" not in plain and "timers" not in plain  # a record from before still matches
    record = provisioning.registration(settings(**WORKERS), "deploy", False)
    assert record["processes"] == ["worker"] and record["timers"] == {"cleanup": "daily"}


def test_provision_installs_the_units_and_checks_the_schedule_with_systemd():
    s = settings(**WORKERS)
    found = {step.name: step.op for step in provisioning.process_steps(s, "deploy", ROOT)}
    assert set(found) == {"process unit /etc/systemd/system/guestbook.worker@.service",
                          "timer unit /etc/systemd/system/guestbook.cleanup.service",
                          "timer /etc/systemd/system/guestbook.cleanup.timer",
                          "timer guestbook.cleanup.timer enabled", "old process and timer units"}
    assert found["timer /etc/systemd/system/guestbook.cleanup.timer"].validate == \
        "systemd-analyze calendar daily >/dev/null"


@pytest.mark.parametrize("name, good", [
    ("20260102-030405-006", True), ("20260102-030405-006-abc1234", True), ("20260102-030405-006-abc1234-dirty", True),
    ("20260102-030405-006-ABC1234", False), ("20260102-030405-006-abc12", False), ("20260102-030405-006-x", False),
    ("20260102-030405-006-abc1234;id", False), ("../20260102-030405-006", False),
])
def test_the_helper_takes_release_names_with_their_commit(name, good):
    assert bool(helper.RELEASE.match(name)) is good


def test_the_helper_names_a_releases_process_units_from_roots_record():
    reg = {"app": "guestbook", "processes": ["worker", "beat"]}
    assert helper.process_units(reg, R) == [f"guestbook.worker@{R}.service", f"guestbook.beat@{R}.service"]
    assert helper.process_units({"app": "guestbook"}, R) == []
    with pytest.raises(helper.Refused):
        helper.process_units(reg, "x; id")


# -- remote commands ---------------------------------------------------------------------------------

def test_fab_flask_takes_every_word_after_it():
    from invoke.parser import Parser, ParserContext
    parser = Parser(initial=ParserContext(), contexts=ns.to_contexts())
    parsed = parser.parse_argv(["flask", "--host", "web1", "create-admin", "alice", "db", "--directory", "m"])
    assert parsed[1].as_kwargs["words"] == ["create-admin", "alice", "db", "--directory", "m"]
    assert parsed[1].as_kwargs["host"] == "web1"
    assert parser.parse_argv(["flask"])[1].as_kwargs["words"] == []
    assert parser.parse_argv(["run", "uname -a"])[1].as_kwargs["command"] == "uname -a"


def test_fab_flask_is_the_release_venvs_flask_in_its_environment():
    s = settings()
    line = plan.in_env(s, LAYOUT, R, plan.flask_words(s, LAYOUT, R, ["create-admin", "Alice Smith"]))
    assert line.endswith(f"&& exec {ROOT}/releases/{R}/venv/bin/flask --app 'guestbook:create_app()'"
                         f" create-admin 'Alice Smith'")
    env = f"{ROOT}/releases/{R}/env"
    assert line.startswith(f"cd {ROOT}/releases/{R} && {{ [ ! -f {env} ] || . {env}; }} && unset PORT && ")


# -- release identity -----------------------------------------------------------------------------------

def git(path, *args):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args], cwd=path, check=True,
                   capture_output=True)


def test_the_source_is_the_commit_and_whether_the_tree_changed(tmp_path):
    assert vcs.source(tmp_path) is None
    with pytest.raises(DeployError, match="has no git commit"):
        vcs.required(tmp_path)
    (tmp_path / "a.py").write_text("x = 1\n")
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", ".")
    git(tmp_path, "commit", "-qm", "one")
    clean = vcs.source(tmp_path)
    assert re.fullmatch(r"[0-9a-f]{40}", clean.commit) and not clean.dirty and clean.label == clean.commit[:7]
    (tmp_path / "b.py").write_text("y = 2\n")  # untracked: it goes into the wheel all the same
    dirty = vcs.source(tmp_path)
    assert dirty.dirty and dirty.changed == ("b.py",) and dirty.label == clean.commit[:7] + "-dirty"
    assert vcs.release_name(R, dirty) == f"{R}-{clean.commit[:7]}-dirty"
    assert dirty.meta() == {"commit": clean.commit, "dirty": True}
    assert "uncommitted changes (b.py)" in vcs.warning(dirty, tmp_path)
