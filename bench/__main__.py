"""``python -m bench``: run the suite, print the tables, write ``docs/benchmarks.md``.

python -m bench                          # everything; rewrites docs/benchmarks.md (about 8 minutes)
python -m bench --only overhead,peers    # some scenarios; prints only, unless --out is given
python -m bench --smoke --out /tmp/b.md  # every scenario once with tiny counts (the test suite's check)
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from bench import report, servers
from bench.context import FULL, SMOKE, Context
from bench.outcome import Outcome
from bench.scenarios import SCENARIOS, servers_for

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--only", help=f"Comma-separated scenarios to run (default: all of {', '.join(SCENARIOS)}).")
    parser.add_argument("--smoke", action="store_true", help="Tiny counts: checks that every scenario runs.")
    parser.add_argument(
        "--out",
        type=Path,
        help="Where to write the Markdown report (default: docs/benchmarks.md for a full run of every scenario, "
        "nowhere otherwise).",
    )
    args = parser.parse_args(argv)
    chosen = [s.strip() for s in args.only.split(",")] if args.only else list(SCENARIOS)
    unknown = [s for s in chosen if s not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    args.scenarios = chosen
    if args.out is None and not args.smoke and args.only is None:
        args.out = DOC
    return args


def run(argv: list[str] | None = None) -> dict[str, Outcome]:
    """Run the chosen scenarios; print each table as it is done; write the report when asked."""
    args = parse_args(argv)
    budget = SMOKE if args.smoke else FULL
    started, t0 = report.utc_now(), time.perf_counter()
    load_before, cpu_before = report.load_average(), report.CpuSnapshot.now()
    outcomes: dict[str, Outcome] = {}
    # Imported here, not at the top, so that --help is quick.
    import torch

    with tempfile.TemporaryDirectory(prefix="sdgate-bench-") as tmp, servers.Fleet() as fleet:
        work = Path(tmp)
        # 1. the model, built once; every server and the in-process pipeline load this copy
        models_dir = work / "models"
        model_dir = servers.tiny_model_dir(models_dir)
        log_dir = work / "logs"
        log_dir.mkdir()
        # torch's default thread count is every system's
        ctx = Context(models_dir, model_dir, log_dir, budget, fleet, torch.get_num_threads())
        # 2. the servers, all started at once so that their models load in parallel (and with the in-process one)
        ctx.launch(servers_for(args.scenarios, budget), wait=False)
        ctx.bare  # noqa: B018 - load the in-process pipeline while the servers load theirs
        fleet.wait_ready()
        _say(f"servers ready after {time.perf_counter() - t0:.0f} s")
        # 3. the scenarios
        for name in args.scenarios:
            s0 = time.perf_counter()
            outcomes[name] = SCENARIOS[name](ctx)
            for table in outcomes[name].tables:
                _say("\n" + report.text_table(table))
            _say(f"({name}: {time.perf_counter() - s0:.0f} s)")
        ours_s = fleet.cpu_seconds() + sum(os.times()[:2])
    seconds = time.perf_counter() - t0
    others = report.others_share(cpu_before, report.CpuSnapshot.now(), ours_s)
    goals = [g for o in outcomes.values() for g in o.goals]
    _say("\n" + report.text_table(report.goals_table(goals)))
    _say(f"\ntotal {seconds:.0f} s; processes outside the run used {others:.0%} of the machine's CPU meanwhile")
    if others > 0.10:
        _say(
            "WARNING: the machine was busy with other work; these numbers are not reliable, run again when it is quiet"
        )
    if args.out is not None:
        info = report.RunInfo(
            command=report.command_line(),
            machine=report.Machine.describe(ctx.torch_threads),
            started=started,
            seconds=seconds,
            load_before=load_before,
            load_after=report.load_average(),
            others_cpu=others,
        )
        # A full run of every scenario is recorded: the report shows it beside the runs before it.
        history = None
        if not args.smoke and args.only is None:
            report.append_history(report.run_entry(goals, info))
            history = report.read_history()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report.markdown(outcomes, info, history))
        _say(f"wrote {args.out}")
    return outcomes


def _say(text: str) -> None:
    print(text, flush=True)


def _terminated(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the context managers: every server is stopped


def main() -> None:
    signal.signal(signal.SIGTERM, _terminated)
    try:
        run()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
