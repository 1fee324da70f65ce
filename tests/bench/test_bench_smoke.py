"""The benchmark suite runs: every scenario once, with tiny counts, so that it cannot rot unnoticed.

The numbers of a smoke run mean nothing (a few requests each, on whatever else the machine is doing);
what is checked is that every scenario measures, every goal is reported as met or missed, and the
report is written.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GOALS = 14


@pytest.mark.slow
def test_every_scenario_runs_and_the_report_has_every_goal(tmp_path: Path) -> None:
    out = tmp_path / "benchmarks.md"
    log = tmp_path / "bench.log"
    with open(log, "w") as output:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench", "--smoke", "--out", str(out)], cwd=ROOT, stdout=output, stderr=output
        )
        try:
            returncode = proc.wait(timeout=360)
        except subprocess.TimeoutExpired:
            proc.terminate()  # the suite stops its servers on SIGTERM
            proc.wait(60)
            pytest.fail(f"the smoke run took more than 360 s:\n{log.read_text()[-3000:]}")
    assert returncode == 0, log.read_text()[-5000:]
    report = out.read_text()
    for title in (
        "## Overhead: one request at a time",
        "## Concurrency: sdgate at 64x64",
        "## Payload: what a client receives",
        "## Peers: the same model, machine and load",
        "## Memory: sdgate's resident set size",
        "## Switching models: one client at 64x64",
        "## Switching LoRAs: one client at 64x64",
        "## Previews: what a live preview costs",
        "## Image inputs: 8 clients at 64x64",
        "## Run after run: the last 1 run",  # a smoke run is not recorded: this run alone
        "## GPU",
    ):
        assert title in report
    goals = report.split("## Goals", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in goals.splitlines() if line.endswith(("| met |", "| **missed** |"))]
    assert len(rows) == GOALS, goals
    for system in ("| sdgate", "| plain |", "| litserve |", "| bare pipeline, batch 8 |"):
        assert system in report
    assert "python -m bench --smoke --out" in report


def test_a_partial_run_names_the_scenarios_it_knows() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--only", "nonsense"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    known = "overhead, concurrency, payload, peers, memory, switching, previews, inputs"
    assert f"unknown scenario nonsense; choose from {known}" in proc.stderr
