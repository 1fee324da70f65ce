"""The report: tables as text for the terminal and as Markdown for ``docs/benchmarks.md``."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.outcome import Goal, Outcome, Table

GPU_RESULTS = Path(__file__).resolve().parent / "results" / "gpu.md"
HISTORY = Path(__file__).resolve().parent / "results" / "cpu-runs.jsonl"
"""Every full run's goals, one JSON line each, appended by ``python -m bench``: the report shows the last three."""
SHOWN_RUNS = 3
PROFILE_NOTES = Path(__file__).resolve().parent / "results" / "profile.md"
"""Where the time goes, from profiles of the server under the benchmark's load (written by hand, kept beside the
numbers): included in the report as it is."""
_PACKAGES = ("torch", "diffusers", "transformers", "fastapi", "uvicorn", "litserve", "httpx")


@dataclass
class Machine:
    """Where the numbers come from."""

    cpu: str
    cores: int
    memory_gib: float
    python: str
    system: str
    torch_threads: int
    packages: dict[str, str] = field(default_factory=dict)

    @classmethod
    def describe(cls, torch_threads: int) -> Machine:
        return cls(
            cpu=_cpu_model(),
            cores=len(os.sched_getaffinity(0)),
            memory_gib=_memory_gib(),
            python=platform.python_version(),
            system=f"{platform.system()} {platform.release()} ({platform.machine()})",
            torch_threads=torch_threads,
            packages={name: _version(name) for name in _PACKAGES},
        )

    def lines(self) -> list[str]:
        versions = ", ".join(f"{name} {version}" for name, version in self.packages.items())
        return [
            f"- CPU: {self.cpu}, {self.cores} cores available to the run, {self.memory_gib:.0f} GiB memory",
            f"- {self.system}, Python {self.python}",
            f"- {versions}",
            f"- torch threads: {self.torch_threads} (torch's default) in every server and in the in-process pipeline "
            "(sdgate: `SDGATE_TORCH_THREADS`)",
            "- OpenMP: every system with the same settings",
        ]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"


@dataclass(frozen=True)
class CpuSnapshot:
    """Busy and total CPU seconds of the whole machine (``/proc/stat``) at one moment."""

    busy_s: float
    total_s: float

    @classmethod
    def now(cls) -> CpuSnapshot:
        ticks = os.sysconf("SC_CLK_TCK")
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        except (OSError, ValueError, IndexError):
            return cls(0.0, 0.0)
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        total = sum(fields[:8])
        return cls((total - idle) / ticks, total / ticks)


def others_share(before: CpuSnapshot, after: CpuSnapshot, ours_s: float) -> float:
    """Share of the machine's CPU that processes outside this run used between two snapshots."""
    total = after.total_s - before.total_s
    if total <= 0:
        return float("nan")
    return max(0.0, (after.busy_s - before.busy_s - ours_s) / total)


# -- text ----------------------------------------------------------------------------------------


def text_table(table: Table) -> str:
    """A table aligned for the terminal."""
    cells = [table.columns, *table.rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(table.columns))]
    lines = [table.title, "-" * len(table.title)]
    for n, row in enumerate(cells):
        lines.append(
            "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        )
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def goals_table(goals: list[Goal]) -> Table:
    table = Table("Goals", ["goal", "target", "measured", "result"])
    for g in goals:
        table.rows.append([g.what, g.target, g.measured, "met" if g.met else "MISSED"])
    return table


# -- markdown ------------------------------------------------------------------------------------


def _md_table(table: Table) -> list[str]:
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "|".join("---" for _ in table.columns) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in table.rows]
    return lines


@dataclass
class RunInfo:
    """How and where the run happened."""

    command: str
    machine: Machine
    started: datetime
    seconds: float
    load_before: str
    load_after: str
    others_cpu: float
    """Share of the machine's CPU that processes outside the run used meanwhile (0..1)."""


def run_entry(goals: list[Goal], run: RunInfo) -> dict[str, Any]:
    """This run as a line of :data:`HISTORY`."""
    return {
        "started": run.started.strftime("%Y-%m-%d %H:%M UTC"),
        "minutes": round(run.seconds / 60, 1),
        "commit": _commit(),
        "others_cpu": round(run.others_cpu, 3),
        "goals": [{"what": g.what, "target": g.target, "measured": g.measured, "met": g.met} for g in goals],
    }


def read_history(path: Path = HISTORY) -> list[dict[str, Any]]:
    """The recorded runs, oldest first (none when the file is missing)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_history(entry: dict[str, Any], path: Path = HISTORY) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(entry, ensure_ascii=False) + "\n")


_OUTPUTS = (":(exclude)docs/benchmarks.md", ":(exclude)bench/results/cpu-runs.jsonl")


def _commit() -> str:
    """The checkout's commit, ``-dirty`` when the tree has changes (``unknown`` outside git)."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        # What the runs themselves write (the report, the history) does not make the tree another one.
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", *_OUTPUTS],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def history_section(runs: list[dict[str, Any]]) -> list[str]:
    """The last runs side by side: each goal's measure and result in each (Markdown lines)."""
    shown = runs[-SHOWN_RUNS:]
    out = [
        f"## Run after run: the last {len(shown)} {'run' if len(shown) == 1 else 'runs'}",
        "",
        "Each full `make bench` appends its goals to `bench/results/cpu-runs.jsonl`; here are the last "
        f"{SHOWN_RUNS}, oldest first (the tables below are the newest run's). A goal counts as met run after run "
        "when it is met in every column.",
        "",
        "| goal | " + " | ".join(f"{r['started']} ({r['commit']})" for r in shown) + " |",
        "|---|" + "---|" * len(shown),
    ]
    names: list[str] = []
    for r in shown:
        names += [str(g["what"]) for g in r["goals"] if g["what"] not in names]
    for name in names:
        cells = []
        for r in shown:
            goal = next((g for g in r["goals"] if g["what"] == name), None)
            cells.append("" if goal is None else f"{goal['measured']} {'met' if goal['met'] else '**missed**'}")
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    totals = []
    for r in shown:
        goals = r["goals"]
        totals.append(f"{sum(bool(g['met']) for g in goals)} of {len(goals)}")
    out.append("| **met** | " + " | ".join(totals) + " |")
    out.append("| other processes' CPU | " + " | ".join(f"{float(r['others_cpu']):.0%}" for r in shown) + " |")
    return out


def markdown(outcomes: dict[str, Outcome], run: RunInfo, history: list[dict[str, Any]] | None = None) -> str:
    """The whole of ``docs/benchmarks.md``; ``history``: the recorded runs, this one last (default: this one)."""
    goals = [g for o in outcomes.values() for g in o.goals]
    met = sum(g.met for g in goals)
    runs = history if history is not None else [run_entry(goals, run)]
    out = [
        "# Benchmarks",
        "",
        "<!-- Generated by `python -m bench` (bench/); do not edit by hand. -->",
        "",
        "sdgate against the model called directly in process, and against the ways people serve Stable "
        "Diffusion today: same machine, same model, same load. The suite starts every server itself on a "
        "loopback port and stops it afterwards.",
        "",
        "```sh",
        run.command,
        "```",
        "",
        f"Run on {run.started.strftime('%Y-%m-%d %H:%M UTC')}, {run.seconds / 60:.1f} minutes. Load average "
        f"(1/5/15 min) before: {run.load_before}; after: {run.load_after}. Processes outside the run used "
        f"{run.others_cpu:.0%} of the machine's CPU meanwhile.",
        "",
        *run.machine.lines(),
        *(
            [
                "",
                f"**Warning: other processes took {run.others_cpu:.0%} of the CPU during this run; its numbers, "
                "ratios included, are not reliable. Run it again on a quiet machine.**",
            ]
            if run.others_cpu > 0.10
            else []
        ),
        "",
        "## How it measures",
        "",
        "- Model: the built-in `tiny` pipeline (`SDGATE_MODEL=tiny`: CLIP text encoder, UNet, VAE, Euler "
        "scheduler, small random weights), float32 on the CPU, 4 steps, guidance 7.5, unless a table says "
        "otherwise. It is built once; every server and the in-process pipeline load that same directory.",
        "- sdgate: `sdgate serve` with its defaults, plus `SDGATE_MODEL=tiny`, `SDGATE_DEVICE=cpu`, a fresh "
        "`SDGATE_DATA_DIR`, `SDGATE_QUEUE_SIZE=10000` and `SDGATE_SYNC_TIMEOUT=600` (so that no load meets a 429 "
        "or a 202; on loopback there are no API keys and so no rate limit), and `SDGATE_TORCH_THREADS` set to "
        f"torch's default ({run.machine.torch_threads}), the thread count of every other system here. Every "
        "request is a durable job: SQLite record, JPEG encoded, image and sidecar stored on disk, URL returned.",
        "- Load: closed-loop clients in the benchmark process: each sends its next request when the previous "
        "one is answered. Throughput is `clients / mean latency` (Little's law) over the requests started in "
        "the measurement window, after a warm-up; p50/p95 are over the same requests.",
        "- The clients speak HTTP/1.1 on kept-alive connections through `bench/wire.py`, about 0.2 ms of CPU "
        "per request, the same for every system. Runs before 2026-12-03 used `httpx.AsyncClient`, which costs "
        "1.4-1.8 ms per request on the same two cores: that CPU was taken from whichever server it measured, "
        "most from the ones that answer fastest. Ratios of runs before and after that change do not compare.",
        "- Only ratios within one run count: absolute numbers on a shared two-core machine drift by ±25% from "
        "run to run. The systems being compared take turns in short interleaved rounds, the order reversed "
        "every other round; during a turn every other server is paused (SIGSTOP), because an idle server is "
        "not always idle (LitServe's loops poll, about a fifth of a core).",
        "",
        "## Goals",
        "",
        f"{met} of {len(goals)} met in this run.",
        "",
        "| goal | target | measured | result |",
        "|---|---|---|---|",
    ]
    out += [f"| {g.what} | {g.target} | {g.measured} | {'met' if g.met else '**missed**'} |" for g in goals]
    missed = [g for g in goals if not g.met and g.why_missed]
    if missed:
        out += ["", "Why the missed ones were missed:", ""]
        out += [f"- **{g.what}**: {g.why_missed}" for g in missed]
    out += ["", *history_section(runs)]
    if PROFILE_NOTES.is_file():
        out += ["", PROFILE_NOTES.read_text().rstrip()]
    for outcome in outcomes.values():
        for table in outcome.tables:
            out += ["", f"## {table.title}", "", *_md_table(table)]
            if table.note:
                out += ["", table.note]
    out += ["", "## GPU", ""]
    if GPU_RESULTS.is_file():
        out.append(GPU_RESULTS.read_text().rstrip())
    else:
        out.append("No GPU run is recorded (`bench/results/gpu.md` does not exist); every figure above is CPU-only.")
    return "\n".join(out) + "\n"


def utc_now() -> datetime:
    return datetime.now(UTC)


def command_line() -> str:
    """How this run was started, as a command to paste."""
    args = " ".join(sys.argv[1:])
    return f"python -m bench {args}".rstrip() if args else "make bench    # or: .venv/bin/python -m bench"
