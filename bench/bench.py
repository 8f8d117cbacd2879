"""fabdeploy against the hand-written baseline fabfile, on throwaway loopback hosts.

One process drives both tools through the real `fab` CLI, alternating them
run by run, and prints medians and ratios. Run it with `./dev bench`.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness.local_host import LocalHost  # noqa: E402
from harness.project import Project, traversable_tmpdir  # noqa: E402

SETTLE = 1.0  # seconds between timed runs

TARGETS = {  # scenario: (largest fabdeploy/baseline ratio allowed, or an absolute limit in s)
    "first deploy": ("ratio", 1.0),
    "code-change redeploy": ("ratio", 1 / 3),
    "no-change redeploy": ("ratio", 1 / 5),
    "rollback": ("seconds", 1.0),
}


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal"))) // 1024 // 1024
    return (f"{os.cpu_count()} cores ({cpu}), {mem} GiB, Linux {platform.release()}, "
            f"Python {platform.python_version()}")


class Bench:
    """Both tools' projects on one host, and the timings."""

    def __init__(self, host: LocalHost, workdir: Path):
        self.host = host
        self.ours = Project(workdir / "ours" / "guestbook", host)
        self.base = Project(workdir / "baseline" / "guestbook", host)
        shutil.copy(ROOT / "bench" / "baseline_fabfile.py", self.base.path)
        base_port = host.http_port + 1
        while not port_free(base_port):
            base_port += 1
        self.base_url = f"http://127.0.0.1:{base_port}/"
        import json
        config = json.loads((self.base.path / "fabric.yaml").read_text())
        config["baseline"] = {"app_dir": f"{host.home}/baseline/guestbook", "port": base_port,
                              "site_path": str(host.site_dir / "baseline.conf"),
                              "nginx_test": host.settings("x")["nginx"]["test_command"],
                              "nginx_reload": host.settings("x")["nginx"]["reload_command"]}
        (self.base.path / "fabric.yaml").write_text(json.dumps(config, indent=2))
        self.times: dict[str, dict[str, list[float]]] = {}
        self.local_cache = workdir / "local-cache"
        self.version = 0

    def timed(self, scenario: str, tool: str, *args: str, env: dict | None = None) -> None:
        project = self.ours if tool == "fabdeploy" else self.base
        argv = args if tool == "fabdeploy" else ("-c", "baseline_fabfile", *args)
        env = {"XDG_CACHE_HOME": str(self.local_cache), **(env or {})}
        # Each run starts on a settled host: the run before may still be working in the
        # background (the baseline's HUP restarts its workers; fabdeploy's cleanup deletes).
        time.sleep(SETTLE)
        started = time.monotonic()
        project.fab(*argv, env=env)
        self.times.setdefault(scenario, {}).setdefault(tool, []).append(time.monotonic() - started)

    def change_code(self) -> None:
        self.version += 1
        for project in (self.ours, self.base):
            project.set_version(f"1.0.{self.version}", greeting=f"Hello, change {self.version}")

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
            for tool in tools if n % 2 == 0 else tools[::-1]:
                self.wipe_server()
                self.change_code()
                self.timed("first deploy", tool, "deploy")
        # Both tools deployed, caches warm, as on a server in use.
        self.wait_for_uv_fetch()
        self.change_code()
        self.ours.fab("deploy")
        self.base.fab("-c", "baseline_fabfile", "deploy")
        for n in range(runs):
            self.change_code()
            for tool in tools if n % 2 == 0 else tools[::-1]:
                self.timed("code-change redeploy", tool, "deploy")
        for n in range(runs):
            for tool in tools if n % 2 == 0 else tools[::-1]:
                self.timed("no-change redeploy", tool, "deploy")
        newest = current_release(self.ours)
        for n in range(runs):
            self.timed("rollback", "fabdeploy", "rollback")
            self.ours.fab("rollback", "--release", newest)


def current_release(project: Project) -> str:
    return (project.deploy_to / "current").readlink().name


def port_free(port: int) -> bool:
    import socket
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def fleet(sizes: list[int], runs: int, workdir: Path) -> dict[int, list[float]]:
    """A code-change deploy to N hosts at once, for each N."""
    results: dict[int, list[float]] = {}
    with ExitStack() as stack:
        hosts = [stack.enter_context(LocalHost(traversable_tmpdir("fabdeploy-bench-fleet-")))
                 for _ in range(max(sizes))]
        share_login(hosts, workdir)
        for size in sizes:
            group = hosts[:size]
            project = Project(workdir / f"fleet-{size}" / "guestbook", group[0])
            # Each throwaway host has its own nginx: per-host settings say where.
            project.configure(known_hosts=str(workdir / "known_hosts"), hosts=[
                {"host": h.host_string, "nginx": h.settings("guestbook")["nginx"]} for h in group])
            env = {"XDG_CACHE_HOME": str(workdir / "fleet-cache")}
            project.fab("deploy", "--parallel", str(size), hosts="", env=env)  # first deploy, untimed
            for n in range(runs):
                project.set_version(f"2.{size}.{n}", greeting=f"Fleet {size} run {n}")
                started = time.monotonic()
                project.fab("deploy", "--parallel", str(size), hosts="", env=env, timeout=900)
                results.setdefault(size, []).append(time.monotonic() - started)
    return results


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


def median(values: list[float]) -> float:
    return statistics.median(values)


def report(bench: Bench, fleet_times: dict[int, list[float]], runs: int) -> str:
    lines = [f"Machine: {machine()}", f"Runs per scenario: {runs} (tools alternated run by run)"]
    if bench:
        lines += ["", "| scenario | fabdeploy (median s) | baseline (median s) | ratio | target | met |",
                  "|---|---|---|---|---|---|"]
    for scenario, (kind, limit) in (TARGETS.items() if bench else ()):
        ours = median(bench.times[scenario]["fabdeploy"])
        base_times = bench.times[scenario].get("baseline")
        base = median(base_times) if base_times else None
        ratio = ours / base if base else None
        if kind == "ratio":
            met, target = ratio <= limit, f"ratio <= {limit:.2f}"
        else:
            met, target = ours < limit, f"< {limit:.0f} s"
        lines.append(f"| {scenario} | {ours:.2f} | {f'{base:.2f}' if base else '-'} | "
                     f"{f'{ratio:.2f}' if ratio else '-'} | {target} | {'yes' if met else 'NO'} |")
    if fleet_times:
        one = median(fleet_times[min(fleet_times)])
        lines += ["", "| hosts | code-change deploy (median s) | time / time for 1 host |", "|---|---|---|"]
        for size, values in sorted(fleet_times.items()):
            lines.append(f"| {size} | {median(values):.2f} | {median(values) / one:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5, help="0: the fleet scenario only")
    parser.add_argument("--fleet", default="1,5,20", help="host counts for the parallel scenario")
    parser.add_argument("--write", help="also write the report to this Markdown file")
    args = parser.parse_args(argv)
    sizes = [int(n) for n in args.fleet.split(",") if n]
    workdir = traversable_tmpdir("fabdeploy-bench-")
    try:
        bench = None
        if args.runs:
            with LocalHost(traversable_tmpdir("fabdeploy-bench-host-")) as host:
                bench = Bench(host, workdir)
                bench.run(args.runs)
        fleet_times = fleet(sizes, max(1, args.runs // 2), workdir) if sizes else {}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    text = report(bench, fleet_times, args.runs)
    print(text)
    if args.write:
        Path(args.write).write_text("# Benchmarks\n\nWritten by `./dev bench --write`.\n\n" + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
