"""The report's record of runs: every full run appends its goals, the report shows the last three."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from bench import report
from bench.outcome import Goal


def _run(minute: int) -> report.RunInfo:
    machine = report.Machine("cpu", 2, 24.0, "3.11", "Linux", 2)
    started = datetime(2026, 12, 3, 15, minute, tzinfo=UTC)
    return report.RunInfo("make bench", machine, started, 420.0, "1 / 1 / 1", "2 / 2 / 2", 0.04)


def test_each_run_is_appended_and_the_last_three_are_shown_goal_by_goal(tmp_path: Path) -> None:
    history = tmp_path / "runs.jsonl"
    for minute, overhead in enumerate(("1.09", "1.04", "1.06", "1.05")):
        goals = [
            Goal("Overhead at 64x64", "≤ 1.05", overhead, float(overhead) <= 1.05),
            Goal("Batching on / off", "≥ 2.00", "3.7", True),
        ]
        if minute == 3:
            goals.append(Goal("A goal added later", "≥ 1", "2", True))
        report.append_history(report.run_entry(goals, _run(minute)), history)

    runs = report.read_history(history)
    assert [r["goals"][0]["measured"] for r in runs] == ["1.09", "1.04", "1.06", "1.05"]
    lines = report.history_section(runs)
    text = "\n".join(lines)
    assert lines[0] == "## Run after run: the last 3 runs"
    assert "15:00 UTC" not in text  # the oldest of four is left out
    assert "| Overhead at 64x64 | 1.04 met | 1.06 **missed** | 1.05 met |" in lines
    assert "| A goal added later |  |  | 2 met |" in lines
    assert "| **met** | 2 of 2 | 1 of 2 | 3 of 3 |" in lines
    assert "| other processes' CPU | 4% | 4% | 4% |" in lines


def test_a_missing_history_is_no_runs(tmp_path: Path) -> None:
    assert report.read_history(tmp_path / "none.jsonl") == []
