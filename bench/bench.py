"""fabdeploy against the hand-written baseline fabfile, on throwaway loopback hosts.

One process drives both tools through the real `fab` CLI, alternating them
run by run, and prints medians and ratios. Run it with `./dev bench`.
`--rtt` puts a delaying relay (harness/relay.py) in front of the host's sshd
and runs every scenario at each round-trip time; `--backends` times a
code-change redeploy per build backend with fabdeploy as a user installs it;
`--peers` times pyinfra and Ansible doing the baseline's job (bench/peers/);
`--fleet-rtt` runs the fleet with each host behind a relay of its own;
`--static` serves a static file from nginx and from gunicorn, side by side.
"""
from __future__ import annotations

import argparse
import hashlib
import http.client
import itertools
import json
import os
import platform
import shutil
import statistics
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import ExitStack, contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness.local_host import LocalHost, free_port  # noqa: E402
from harness.project import FAB, Project, traversable_tmpdir  # noqa: E402
from harness.relay import Relay, trust_relay  # noqa: E402

SETTLE = 1.0  # seconds between timed runs
PEERS = ROOT / "bench" / "peers"

TARGETS = {  # scenario: (largest fabdeploy/baseline ratio allowed, or an absolute limit in s)
    "first deploy": ("ratio", 1.0),
    "code-change redeploy": ("ratio", 0.25),
    "no-change redeploy": ("ratio", 0.10),
    "rollback": ("seconds", 1.0),  # on a direct connection (or RTT 0) only
}
ROUND_TRIPS = {"code-change redeploy": 10, "rollback": 7}  # at most, connect included, at RTT > 0
BACKEND_RATIO = 0.25  # code-change redeploy vs the baseline, for every build backend
PEER_RATIO = 0.25  # code-change redeploy vs the fastest of pyinfra and Ansible
FLEET_RATIO = 2.0  # N hosts vs 1 host at the same RTT > 0


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal"))) // 1024 // 1024
    return (f"{os.cpu_count()} cores ({cpu}), {mem} GiB, Linux {platform.release()}, "
            f"Python {platform.python_version()}")


@contextmanager
def throwaway_host(prefix: str):
    """A LocalHost in a directory of its own, stopped and removed after."""
    workdir = traversable_tmpdir(prefix)
    try:
        with LocalHost(workdir) as host:
            yield host
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@contextmanager
def distance(host: LocalHost, rtt: int | None, known_hosts: Path | None = None):
    """A relay at `rtt` ms in front of the host's sshd, its address trusted; None: direct."""
    if rtt is None:
        yield None
        return
    with Relay(host.ssh_port, delay_ms=rtt / 2) as relay:
        trust_relay(host, relay, known_hosts)
        yield relay


def alternate(tools: tuple[str, ...], n: int) -> tuple[str, ...]:
    """The tools in turn, the first one different on every run: none always goes first."""
    k = n % len(tools)
    return tools[k:] + tools[:k]


class Bench:
    """Both tools' projects on one host (and the peers', if asked), and the timings."""

    def __init__(self, host: LocalHost, workdir: Path, fab: str = FAB):
        self.host = host
        self.ours = Project(workdir / "ours" / "guestbook", host, fab=fab)
        self.base = Project(workdir / "baseline" / "guestbook", host, fab=fab)
        shutil.copy(ROOT / "bench" / "baseline_fabfile.py", self.base.path)
        base_port = host.http_port + 1
        while not port_free(base_port):
            base_port += 1
        self.base_url = f"http://127.0.0.1:{base_port}/"
        config = json.loads((self.base.path / "fabric.yaml").read_text())
        config["baseline"] = {"app_dir": f"{host.home}/baseline/guestbook", "port": base_port,
                              "site_path": str(host.site_dir / "baseline.conf"),
                              "nginx_test": host.settings("x")["proxy"]["test_command"],
                              "nginx_reload": host.settings("x")["proxy"]["reload_command"]}
        (self.base.path / "fabric.yaml").write_text(json.dumps(config, indent=2))
        self.peers: dict[str, Peer] = {}
        self.relay: Relay | None = None
        self.rtt: int | None = None  # None: a direct connection, no relay
        # (rtt, scenario): tool: seconds, and round trips the relay counted
        self.times: dict[tuple[int | None, str], dict[str, list[float]]] = {}
        self.trips: dict[tuple[int | None, str], dict[str, list[int]]] = {}
        self.local_cache = workdir / "local-cache"
        self.version = 0

    def at(self, relay: Relay | None, rtt: int | None) -> None:
        """Reach the host through `relay` (None: directly) from now on."""
        self.relay, self.rtt = relay, rtt

    @property
    def hosts(self) -> str:
        return self.relay.host_string(self.host) if self.relay else self.host.host_string

    def invoke(self, tool: str, *args: str) -> None:
        """One run of a tool (deploy, or fabdeploy's rollback) through the current connection."""
        if tool in self.peers:
            self.peers[tool].deploy(self.relay.port if self.relay else self.host.ssh_port)
            return
        project = self.ours if tool == "fabdeploy" else self.base
        argv = args if tool == "fabdeploy" else ("-c", "baseline_fabfile", *args)
        project.fab(*argv, hosts=self.hosts, env={"XDG_CACHE_HOME": str(self.local_cache)})

    def timed(self, scenario: str, tool: str, *args: str) -> None:
        # Each run starts on a settled host: the run before may still be working in the
        # background (the baseline's HUP restarts its workers; fabdeploy's cleanup deletes).
        time.sleep(SETTLE)
        if self.relay:
            self.relay.wait_idle()  # the last run's connections end a delay after it did
            self.relay.reset()
        started = time.monotonic()
        self.invoke(tool, *args)
        elapsed = time.monotonic() - started
        key = (self.rtt, scenario)
        self.times.setdefault(key, {}).setdefault(tool, []).append(elapsed)
        if self.relay:
            self.relay.wait_idle()
            self.trips.setdefault(key, {}).setdefault(tool, []).append(self.relay.round_trips())
        if args == ("deploy",):
            self.check_served(tool)

    def url(self, tool: str) -> str:
        if tool in self.peers:
            return f"http://127.0.0.1:{self.peers[tool].data['port']}/"
        return self.host.url if tool == "fabdeploy" else self.base_url

    def check_served(self, tool: str, timeout: float = 15) -> None:
        """The tool did the job: its nginx site serves the current code (untimed; a HUP takes a moment)."""
        expected = f"Hello, change {self.version} 1.0.{self.version}:"
        deadline, body = time.monotonic() + timeout, ""
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url(tool), timeout=5) as response:
                    body = response.read().decode()
            except OSError as exc:
                body = str(exc)
            if body.startswith(expected):
                return
            time.sleep(0.1)
        raise AssertionError(f"{tool} deployed, but {self.url(tool)} answers {body!r}, not {expected!r}...")

    def projects(self) -> list[Project]:
        return [self.ours, self.base, *(peer.project for peer in self.peers.values())]

    def change_code(self) -> None:
        self.version += 1
        for project in self.projects():
            project.set_version(f"1.0.{self.version}", greeting=f"Hello, change {self.version}")

    def use_backend(self, backend: str) -> None:
        """Build both tools' copies of the app with another backend."""
        for project in self.projects():
            pyproject = project.path / "pyproject.toml"
            pyproject.write_text(pyproject_for(pyproject.read_text(), backend))

    def wipe_server(self) -> None:
        """A fresh server for both tools: no app, no caches, nothing running."""
        self.wait_for_uv_fetch()
        self.host.run_as_user(
            "for p in ~/srv/guestbook/shared/run/*.pid ~/baseline/guestbook/gunicorn.pid; do"
            ' [ -f "$p" ] && kill "$(cat "$p")"; done; sleep 0.5; rm -rf ~/srv ~/baseline ~/.cache',
            check=False)
        shutil.rmtree(self.local_cache, ignore_errors=True)

    def wait_for_uv_fetch(self, timeout: float = 120) -> None:
        """Let fabdeploy's background fetch of uv finish, so it competes with nothing."""
        lock = self.host.home / ".cache" / "fabdeploy" / "tools.lock"
        deadline = time.monotonic() + timeout
        while lock.exists() and time.monotonic() < deadline:
            time.sleep(0.2)

    def run(self, runs: int) -> None:
        tools = ("fabdeploy", "baseline")
        for n in range(runs):
            for tool in alternate(tools, n):
                self.wipe_server()
                self.change_code()
                self.timed("first deploy", tool, "deploy")
        # Both tools deployed, caches warm, as on a server in use.
        self.warm_up(tools)
        self.code_changes(runs, tools)
        for n in range(runs):
            for tool in alternate(tools, n):
                self.timed("no-change redeploy", tool, "deploy")
        newest = current_release(self.ours)
        for n in range(runs):
            self.timed("rollback", "fabdeploy", "rollback")
            self.invoke("fabdeploy", "rollback", "--release", newest)

    def warm_up(self, tools: tuple[str, ...]) -> None:
        """One untimed deploy of each tool: deployed, caches warm, as on a server in use."""
        self.wait_for_uv_fetch()
        self.change_code()
        for tool in tools:
            self.invoke(tool, "deploy")

    def code_changes(self, runs: int, tools: tuple[str, ...]) -> None:
        for n in range(runs):
            self.change_code()
            for tool in alternate(tools, n):
                self.timed("code-change redeploy", tool, "deploy")


def pyproject_for(text: str, backend: str) -> str:
    """The example's pyproject.toml (setuptools) with `backend` as its build backend instead."""
    systems = {"setuptools": ('["setuptools>=64"]', "setuptools.build_meta"),
               "flit_core": ('["flit_core>=3.4,<5"]', "flit_core.buildapi"),
               "hatchling": ('["hatchling"]', "hatchling.build")}
    requires, api = systems[backend]
    project = text[text.index("[project]"):]
    if backend != "setuptools":  # flit_core and hatchling find the package by its name
        project = project[:project.index("[tool.setuptools]")].rstrip() + "\n"
    return f'[build-system]\nrequires = {requires}\nbuild-backend = "{api}"\n\n{project}'


class Peer:
    """pyinfra or Ansible deploying its own copy of the app to the host, with bench/peers/'s files."""

    DEPLOY = {"pyinfra": "pyinfra_deploy.py", "ansible": "ansible_deploy.yml"}

    def __init__(self, tool: str, host: LocalHost, workdir: Path, venv: Path):
        self.tool, self.host, self.venv = tool, host, venv
        self.project = Project(workdir / tool / "guestbook", host)
        shutil.copy(PEERS / self.DEPLOY[tool], self.project.path)
        self.control_dir = workdir / tool / "cp"  # Ansible's shared SSH connections
        self.home = workdir / tool / "home"  # Ansible's own files, none in ~/.ansible
        port = free_port()
        app_dir = f"{host.home}/peers/{tool}/guestbook"
        nginx = host.settings("x")["proxy"]
        self.data = {"app_dir": app_dir, "port": port, "site_path": str(host.site_dir / f"peer-{tool}.conf"),
                     "nginx_test": nginx["test_command"], "nginx_reload": nginx["reload_command"]}

    def deploy(self, ssh_port: int) -> None:
        """One deploy through `ssh_port` (the host's sshd, or a relay in front of it)."""
        write = self.pyinfra_inventory if self.tool == "pyinfra" else self.ansible_inventory
        argv, env = write(ssh_port)
        try:
            result = subprocess.run(argv, cwd=self.project.path, capture_output=True, text=True,
                                    stdin=subprocess.DEVNULL, timeout=600, env={**os.environ, **env})
        finally:
            self.close_connections()
        if result.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited {result.returncode}\n"
                                 f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}")

    def pyinfra_inventory(self, ssh_port: int) -> tuple[list[str], dict]:
        data = {"ssh_port": ssh_port, "ssh_user": self.host.user, "ssh_key": str(self.host.key_file),
                "ssh_known_hosts_file": str(self.host.known_hosts), "ssh_strict_host_key_checking": "yes",
                **self.data}
        (self.project.path / "inventory.py").write_text(f"hosts = [({self.host.host!r}, {data!r})]\n")
        return [str(self.venv / "bin" / "pyinfra"), "-y", "inventory.py", self.DEPLOY["pyinfra"]], {}

    def ansible_inventory(self, ssh_port: int) -> tuple[list[str], dict]:
        known = f"-o UserKnownHostsFile={self.host.known_hosts} -o StrictHostKeyChecking=yes"
        variables = {"ansible_host": self.host.host, "ansible_port": ssh_port, "ansible_user": self.host.user,
                     "ansible_ssh_private_key_file": str(self.host.key_file),
                     "ansible_ssh_common_args": known, **self.data}
        inventory = {"app": {"hosts": {"guestbook": variables}}}  # JSON is YAML: no quoting rules to get wrong
        (self.project.path / "inventory.yml").write_text(json.dumps(inventory, indent=2))
        self.control_dir.mkdir(parents=True, exist_ok=True)
        env = {"ANSIBLE_CONFIG": str(PEERS / "ansible.cfg"), "ANSIBLE_HOME": str(self.home),
               "ANSIBLE_SSH_CONTROL_PATH_DIR": str(self.control_dir)}
        return [str(self.venv / "bin" / "ansible-playbook"), "-i", "inventory.yml", self.DEPLOY["ansible"]], env

    def close_connections(self) -> None:
        """End Ansible's shared SSH connection: the next run connects afresh, as `fab` does."""
        if self.control_dir.is_dir():
            for socket_path in self.control_dir.iterdir():
                subprocess.run(["ssh", "-O", "exit", "-o", f"ControlPath={socket_path}", "peer"],
                               capture_output=True, stdin=subprocess.DEVNULL, timeout=30)


def peers_venv() -> Path:
    """The bench's own venv with pyinfra and Ansible (bench/peers/requirements.txt), made once."""
    requirements = PEERS / "requirements.txt"
    key = hashlib.sha256(requirements.read_bytes() + sys.version.encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fabdeploy-bench"
    venv = cache / f"peers-{key}"
    if (venv / ".ready").exists():
        return venv
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", "-r", str(requirements)],
                   check=True, stdin=subprocess.DEVNULL)
    (venv / ".ready").touch()
    return venv


def user_venv(workdir: Path) -> str:
    """A fresh venv holding only fabdeploy, installed from this checkout as a user would; its `fab`.

    Python 3.11's venv brings setuptools 65 and no `wheel`, as most users have it.
    """
    source = workdir / "fabdeploy-source"  # a copy: building in the checkout would leave build/ there
    shutil.copytree(ROOT / "fabdeploy", source / "fabdeploy", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source)
    venv = workdir / "user-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", str(source)], check=True,
                   stdin=subprocess.DEVNULL)
    return str(venv / "bin" / "fab")


def current_release(project: Project) -> str:
    return (project.deploy_to / "current").readlink().name


def port_free(port: int) -> bool:
    import socket
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def fleet(sizes: list[int], runs: int, workdir: Path,
          rtts: list[int | None] = (None,)) -> dict[tuple[int | None, int], list[float]]:
    """A code-change deploy to N hosts at once, for each N, at each RTT (each host behind its relay)."""
    results: dict[tuple[int | None, int], list[float]] = {}
    versions = itertools.count()
    with ExitStack() as stack:
        hosts = [stack.enter_context(throwaway_host("fabdeploy-bench-fleet-")) for _ in range(max(sizes))]
        share_login(hosts, workdir)
        known_hosts = workdir / "known_hosts"
        env = {"XDG_CACHE_HOME": str(workdir / "fleet-cache")}
        for rtt in rtts:
            with ExitStack() as relays:
                fronts = [relays.enter_context(distance(h, rtt, known_hosts)) for h in hosts]
                for size in sizes:
                    path = workdir / f"fleet-{size}" / "guestbook"
                    new = not path.exists()
                    project = Project(path, hosts[0])
                    # Each throwaway host has its own nginx: per-host settings say where.
                    project.configure(known_hosts=str(known_hosts), hosts=[
                        {"host": relay.host_string(h) if relay else h.host_string,
                         "proxy": h.settings("guestbook")["proxy"]} for h, relay in zip(hosts[:size], fronts)])
                    if new:  # the first deploy, untimed
                        project.fab("deploy", "--parallel", str(size), hosts="", env=env, timeout=900)
                    for n in range(runs):
                        project.set_version(f"2.{size}.{next(versions)}", greeting=f"Fleet {size} run {n}")
                        started = time.monotonic()
                        project.fab("deploy", "--parallel", str(size), hosts="", env=env, timeout=900)
                        results.setdefault((rtt, size), []).append(time.monotonic() - started)
    return results


STATIC_PATH = "/static/style.css"


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str):
        super().__init__("localhost", timeout=10)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.path)


def requests_per_second(connect, count: int, threads: int) -> float:
    """count GETs of STATIC_PATH from `threads` clients, each on a keep-alive connection where the
    server keeps one (gunicorn's sync workers close after every answer)."""
    errors: list[str] = []

    def client(n: int) -> None:
        conn = None
        for _ in range(n):
            conn = conn or connect()
            conn.request("GET", STATIC_PATH)
            response = conn.getresponse()
            if response.read() and response.status != 200:
                errors.append(str(response.status))
            if response.will_close:
                conn.close()
                conn = None
        if conn:
            conn.close()
    workers = [threading.Thread(target=client, args=(count // threads,)) for _ in range(threads)]
    started = time.monotonic()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    if errors:
        raise AssertionError(f"{len(errors)} requests failed, e.g. {errors[0]}")
    return count // threads * threads / (time.monotonic() - started)


def static_files(workdir: Path, rounds: int = 3, count: int = 4000, threads: int = 4) -> str:
    """One line: the example's stylesheet from nginx and from gunicorn alone, rounds alternated."""
    with throwaway_host("fabdeploy-bench-static-") as host:
        project = Project(workdir / "static" / "guestbook", host)
        project.fab("deploy")
        size = len(urllib.request.urlopen(host.url.rstrip("/") + STATIC_PATH, timeout=10).read())
        socket_path = str(project.deploy_to / "shared" / "run" / "live.sock")
        servers = {"nginx": lambda: http.client.HTTPConnection("127.0.0.1", host.http_port, timeout=10),
                   "gunicorn": lambda: UnixHTTPConnection(socket_path)}
        rates: dict[str, list[float]] = {name: [] for name in servers}
        for n in range(rounds):
            for name in alternate(tuple(servers), n):
                rates[name].append(requests_per_second(servers[name], count, threads))
    nginx, gunicorn = median(rates["nginx"]), median(rates["gunicorn"])
    return (f"Static file {STATIC_PATH} ({size} bytes), {threads} clients, median of {rounds} rounds: "
            f"nginx {nginx:.0f} req/s, gunicorn alone on its socket (2 sync workers) {gunicorn:.0f} req/s: "
            f"nginx {nginx / gunicorn:.1f}x")


def share_login(hosts: list[LocalHost], workdir: Path) -> None:
    """Let the first host's key log in everywhere, and trust every host's key."""
    public = subprocess.run(["ssh-keygen", "-y", "-f", str(hosts[0].key_file)], capture_output=True,
                            text=True, check=True).stdout
    for h in hosts[1:]:
        keys = h.home / ".ssh" / "authorized_keys"
        if keys.exists():
            with open(keys, "a") as f:
                f.write(public)
        else:
            h.run_as_user(f"printf '%s' {public!r} >> {h.workdir}/authorized_keys", check=False)
    (workdir / "known_hosts").write_text("".join(h.known_hosts.read_text() for h in hosts))


# -- the report


def median(values: list[float] | None) -> float | None:
    return statistics.median(values) if values else None


def num(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def count(value: float | None) -> str:
    """A counted number of round trips: a median of whole numbers, so .5 at most."""
    return "-" if value is None else f"{value:g}"


def rtt_label(rtt: int | None) -> str:
    return "direct" if rtt is None else str(rtt)


def round_trips_from_time(seconds: float | None, at_zero: float | None, rtt: int | None) -> float | None:
    """How many round trips the distance cost: (t(rtt) - t(0)) / rtt."""
    if not rtt or seconds is None or at_zero is None:
        return None
    return (seconds - at_zero) / (rtt / 1000)


def verdict(checks: list[tuple[str, bool]]) -> tuple[str, str]:
    """The target and met cells for a list of (target, met)."""
    if not checks:
        return "-", "-"
    return ", ".join(text for text, _ in checks), "yes" if all(ok for _, ok in checks) else "NO"


def single_host_table(bench: Bench) -> list[str]:
    """The scenarios over a direct connection (no --rtt)."""
    lines = ["| scenario | fabdeploy (median s) | baseline (median s) | ratio | target | met |",
             "|---|---|---|---|---|---|"]
    for scenario, (kind, limit) in TARGETS.items():
        ours = median(bench.times[(None, scenario)]["fabdeploy"])
        base = median(bench.times[(None, scenario)].get("baseline"))
        ratio = ours / base if base else None
        if kind == "ratio":
            met, target = ratio <= limit, f"ratio <= {limit:.2f}"
        else:
            met, target = ours < limit, f"< {limit:.0f} s"
        lines.append(f"| {scenario} | {ours:.2f} | {num(base)} | {num(ratio)} | {target} | "
                     f"{'yes' if met else 'NO'} |")
    return lines


def distance_table(bench: Bench, rtts: list[int]) -> list[str]:
    """Every scenario at every RTT, with the round trips each tool's time shows and the relay counted."""
    lines = ["| RTT (ms) | scenario | fabdeploy (median s) | baseline (median s) | ratio "
             "| fabdeploy round trips (from time) | fabdeploy round trips (counted) "
             "| baseline round trips (from time) | baseline round trips (counted) | target | met |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for rtt in rtts:
        for scenario, (kind, limit) in TARGETS.items():
            times, trips = bench.times[(rtt, scenario)], bench.trips.get((rtt, scenario), {})
            ours, base = median(times["fabdeploy"]), median(times.get("baseline"))
            zero = bench.times[(0, scenario)]
            ours_rt = round_trips_from_time(ours, median(zero["fabdeploy"]), rtt)
            base_rt = round_trips_from_time(base, median(zero.get("baseline")), rtt)
            ratio = ours / base if base else None
            checks = []
            if kind == "ratio":
                checks.append((f"ratio <= {limit:.2f}", ratio <= limit))
            elif not rtt:
                checks.append((f"< {limit:.0f} s", ours < limit))
            if rtt and scenario in ROUND_TRIPS:
                checks.append((f"round trips <= {ROUND_TRIPS[scenario]}", ours_rt <= ROUND_TRIPS[scenario]))
            target, met = verdict(checks)
            # At RTT 0 the relay cannot tell a pipelined message from an answered one: no count.
            ours_n = median(trips.get("fabdeploy")) if rtt else None
            base_n = median(trips.get("baseline")) if rtt else None
            lines.append(f"| {rtt} | {scenario} | {ours:.2f} | {num(base)} | {num(ratio)} | "
                         f"{num(ours_rt, '.1f')} | {count(ours_n)} | {num(base_rt, '.1f')} | {count(base_n)} | "
                         f"{target} | {met} |")
    return lines


def backends_table(benches: dict[str, Bench], rtts: list[int | None]) -> list[str]:
    lines = ["| RTT (ms) | build backend | fabdeploy code-change (median s) | baseline code-change (median s) "
             "| ratio | target | met |", "|---|---|---|---|---|---|---|"]
    for rtt in rtts:
        for backend, bench in benches.items():
            times = bench.times[(rtt, "code-change redeploy")]
            ours, base = median(times["fabdeploy"]), median(times["baseline"])
            target, met = verdict([(f"ratio <= {BACKEND_RATIO:.2f}", ours / base <= BACKEND_RATIO)])
            lines.append(f"| {rtt_label(rtt)} | {backend} | {ours:.2f} | {base:.2f} | {ours / base:.2f} | "
                         f"{target} | {met} |")
    return lines


def peers_table(bench: Bench, rtts: list[int | None]) -> list[str]:
    lines = ["| RTT (ms) | fabdeploy code-change (median s) | pyinfra (median s) | Ansible (median s) "
             "| ratio to the fastest peer | fabdeploy round trips (counted) | pyinfra round trips (counted) "
             "| Ansible round trips (counted) | target | met |", "|---|---|---|---|---|---|---|---|---|---|"]
    for rtt in rtts:
        key = (rtt, "peers: code-change redeploy")
        times, trips = bench.times[key], bench.trips.get(key, {})
        ours, pyinfra, ansible = (median(times[tool]) for tool in ("fabdeploy", "pyinfra", "ansible"))
        ratio = ours / min(pyinfra, ansible)
        target, met = verdict([(f"ratio <= {PEER_RATIO:.2f}", ratio <= PEER_RATIO)])
        counted = " | ".join(count(median(trips.get(tool)) if rtt else None)
                             for tool in ("fabdeploy", "pyinfra", "ansible"))
        lines.append(f"| {rtt_label(rtt)} | {ours:.2f} | {pyinfra:.2f} | {ansible:.2f} | {ratio:.2f} | "
                     f"{counted} | {target} | {met} |")
    return lines


def fleet_table(fleet_times: dict[tuple[int | None, int], list[float]]) -> list[str]:
    """Hosts against time; with --fleet-rtt, a row per RTT and size, each against 1 host at that RTT."""
    rtts = sorted({rtt for rtt, _ in fleet_times}, key=lambda r: -1 if r is None else r)
    if rtts == [None]:
        lines = ["| hosts | code-change deploy (median s) | time / time for 1 host |", "|---|---|---|"]
    else:
        lines = ["| RTT (ms) | hosts | code-change deploy (median s) | time / time for 1 host | target | met |",
                 "|---|---|---|---|---|---|"]
    for rtt in rtts:
        sizes = sorted(size for r, size in fleet_times if r == rtt)
        one = median(fleet_times[(rtt, sizes[0])])
        for size in sizes:
            seconds = median(fleet_times[(rtt, size)])
            if rtts == [None]:
                lines.append(f"| {size} | {seconds:.2f} | {seconds / one:.2f} |")
                continue
            checks = [(f"<= {FLEET_RATIO:.2f}", seconds / one <= FLEET_RATIO)] if rtt and size > sizes[0] else []
            target, met = verdict(checks)
            lines.append(f"| {rtt_label(rtt)} | {size} | {seconds:.2f} | {seconds / one:.2f} | {target} | {met} |")
    return lines


def report(bench: Bench | None, fleet_times: dict, runs: int, rtts: list[int] | None = None,
           backends: dict[str, Bench] | None = None, peers: bool = False, static: str = "") -> str:
    lines = [f"Machine: {machine()}", f"Runs per scenario: {runs} (tools alternated run by run)"]
    if static:
        lines += ["", static]
    if bench and runs:
        lines += ["", *(distance_table(bench, rtts) if rtts else single_host_table(bench))]
    if backends:
        lines += ["", "Build backends (fabdeploy from a clean venv, as a user installs it):", "",
                  *backends_table(backends, rtts or [None])]
    if peers:
        lines += ["", "Peers (the same job: a release dir, a venv, install, init-db, config.py, "
                  "gunicorn restart):", "", *peers_table(bench, rtts or [None])]
    if fleet_times:
        lines += ["", *fleet_table(fleet_times)]
    return "\n".join(lines)


def numbers(text: str) -> list[int]:
    return [int(n) for n in text.split(",") if n.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5, help="0: the fleet scenario only")
    parser.add_argument("--fleet", default="1,5,20", help="host counts for the parallel scenario")
    parser.add_argument("--rtt", default="", help="round-trip times in ms, e.g. 0,50,150: every scenario "
                        "at each, both tools through a delaying relay (0 is always added)")
    parser.add_argument("--backends", action="store_true",
                        help="a code-change redeploy per build backend (setuptools, flit_core, hatchling)")
    parser.add_argument("--peers", action="store_true",
                        help="pyinfra and Ansible doing the same job (installs them once; takes minutes)")
    parser.add_argument("--fleet-rtt", default="", help="round-trip times in ms for the fleet, each host "
                        "behind a relay of its own (default: direct)")
    parser.add_argument("--static", action="store_true",
                        help="a static file's throughput from nginx and from gunicorn, side by side")
    parser.add_argument("--write", help="also write the report to this Markdown file")
    args = parser.parse_args(argv)
    sizes = numbers(args.fleet)
    rtts = sorted({0, *numbers(args.rtt)}) if args.rtt else None
    fleet_rtts = numbers(args.fleet_rtt) or [None]
    extra_runs = max(1, args.runs)  # --backends and --peers run even with --runs 0
    workdir = traversable_tmpdir("fabdeploy-bench-")
    try:
        bench, backends = None, {}
        if args.runs or args.backends or args.peers:
            with throwaway_host("fabdeploy-bench-host-") as host:
                bench = Bench(host, workdir)
                if args.runs:
                    for rtt in rtts or [None]:
                        with distance(host, rtt) as relay:
                            bench.at(relay, rtt)
                            bench.run(args.runs)
                if args.peers:
                    run_peers(bench, rtts or [None], extra_runs, workdir / "peers")
                if args.backends:
                    backends = run_backends(host, rtts or [None], extra_runs, workdir / "backends")
        static = static_files(workdir) if args.static else ""
        fleet_times = fleet(sizes, max(1, args.runs // 2), workdir, fleet_rtts) if sizes else {}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    text = report(bench, fleet_times, args.runs, rtts, backends, args.peers, static)
    print(text)
    if args.write:
        Path(args.write).write_text("# Benchmarks\n\nWritten by `./dev bench --write`.\n\n" + text + "\n")
    return 0


def run_peers(bench: Bench, rtts: list[int | None], runs: int, workdir: Path) -> None:
    """fabdeploy, pyinfra and Ansible in turn: a code-change redeploy each, at each RTT."""
    venv = peers_venv()
    bench.peers = {tool: Peer(tool, bench.host, workdir, venv) for tool in ("pyinfra", "ansible")}
    tools = ("fabdeploy", *bench.peers)
    for rtt in rtts:
        with distance(bench.host, rtt) as relay:
            bench.at(relay, rtt)
            bench.warm_up(tools)  # the first deploy, or the server's caches back after a wipe
            for n in range(runs):
                bench.change_code()
                for tool in alternate(tools, n):
                    bench.timed("peers: code-change redeploy", tool, "deploy")


def run_backends(host: LocalHost, rtts: list[int | None], runs: int, workdir: Path) -> dict[str, Bench]:
    """Per build backend, from a clean venv: a first deploy, then code-change redeploys at each RTT."""
    benches = {}
    fab = user_venv(workdir / "user")  # one for all: a build never installs into it
    for backend in ("setuptools", "flit_core", "hatchling"):
        bench = benches[backend] = Bench(host, workdir / backend, fab=fab)
        bench.use_backend(backend)
        bench.wipe_server()
        for rtt in rtts:
            with distance(host, rtt) as relay:
                bench.at(relay, rtt)
                if rtt == rtts[0]:
                    bench.warm_up(("fabdeploy", "baseline"))
                bench.code_changes(runs, ("fabdeploy", "baseline"))
    return benches


if __name__ == "__main__":
    sys.exit(main())
