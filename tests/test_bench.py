"""Issue 5: the benchmark runs, and reports every scenario. It asserts no times."""
import re
import subprocess
import sys

import pytest

from harness.project import ROOT

pytestmark = pytest.mark.host

NUMBER = r"\d+\.\d\d"


def test_the_benchmark_runs_every_scenario_and_prints_ratios(tmp_path):
    report = tmp_path / "bench.md"
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "bench.py"), "--runs", "1",
                             "--fleet", "1,2", "--write", str(report)],
                            cwd=ROOT, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    for scenario in ("first deploy", "code-change redeploy", "no-change redeploy"):
        row = rf"^\| {scenario} \| {NUMBER} \| {NUMBER} \| {NUMBER} \| ratio <= {NUMBER} \| (yes|NO) \|$"
        assert re.search(row, result.stdout, re.M), (scenario, result.stdout)
    assert re.search(rf"^\| rollback \| {NUMBER} \| - \| - \| < 1 s \| (yes|NO) \|$", result.stdout, re.M)
    for hosts in (1, 2):
        assert re.search(rf"^\| {hosts} \| {NUMBER} \| {NUMBER} \|$", result.stdout, re.M), result.stdout
    assert report.read_text().count("|") > 20 and "Machine: " in report.read_text()
