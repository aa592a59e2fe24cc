"""Command line: ``python -m benchmarks [run options] | compare OLD NEW | profile | case |
stagecost | durable | processes | parts``."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import importlib.metadata
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psutil
from rich.console import Console

from ._cores import measure_cores
from ._endtoend import measure_end_to_end
from ._healthcheck import measure_health
from ._measure import settle
from ._memory import measure_memory
from ._overhead import measure_overhead
from ._peer import dbos_version, measure_peer
from ._plan import Plan
from ._profile import print_profile, profile_throughput
from ._report import compare_files, print_figures, to_document, write_json
from ._results import Figure
from ._resume import measure_resume
from ._sidebyside import RevisionError, measure_side_by_side
from ._stagecost import measure_stage_cost
from ._throughput import measure_throughput, run_runtime_case
from ._waits import measure_waits

__all__ = ["FIGURES", "main"]

Measure = Callable[[Plan], Figure]
# Display order is the numbering. Memory runs first so its RSS delta is taken
# before other figures have grown the heap; the peer runs last because DBOS leaves
# threads and a global registry behind.
FIGURES: dict[str, Measure] = {
    "overhead": measure_overhead,
    "throughput": measure_throughput,
    "memory": measure_memory,
    "health": measure_health,
    "resume": measure_resume,
    "waits": measure_waits,
    "end_to_end": measure_end_to_end,
    "cores": measure_cores,
    "peer": measure_peer,
}
_RUN_ORDER = ("memory", "overhead", "throughput", "health", "resume", "waits", "end_to_end",
              "cores", "peer")
_TITLES = {
    "overhead": "Overhead vs bare asyncio", "throughput": "Throughput",
    "memory": "Memory per in-flight workflow", "health": "Health check cost",
    "resume": "Resume interrupted workflows", "waits": "Durable waits",
    "end_to_end": "End to end: example prompts",
    "cores": "Every core: batch --processes 2",
    "peer": "Peer: DBOS on SQLite",
}
_SKIPPED_WHEN_QUICK = {"end_to_end": "skipped in --quick: it runs real git, agent and test "
                                    "commands (run without --quick, or --only end_to_end)"}


def _run_parser(prog: str) -> argparse.ArgumentParser:
    examples = ("--quick", "--json bench-results/full.json", "compare old.json new.json",
                "--before HEAD~1 --only overhead,throughput,cores",
                "case --store file --workflows 10000 --runs 2")
    parser = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Measure the runtime against its performance targets (listed in "
                    "benchmarks/README.md). Other "
                    "commands: 'compare OLD.json NEW.json', 'profile [--store file|memory]', "
                    "'case [--store file|memory] [--workflows N] [--runs N]', "
                    "'stagecost [--engine] [--workflows N] [--runs N]', "
                    "'durable [--workflows N] [--runs N]', 'processes', "
                    "'parts [--samples N]' (what a stage's parts cost on this machine alone).",
        epilog="examples:\n" + "\n".join(f"  {prog} {example}" for example in examples))
    parser.add_argument("--quick", action="store_true",
                        help="a small version that runs in seconds (100 workflows)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write results here")
    parser.add_argument("--workflows", type=int, metavar="N",
                        help="the big N: throughput at N/10 and N, memory, resume "
                             "(default 10000; 100 with --quick)")
    parser.add_argument("--overhead-workflows", type=int, metavar="N",
                        help="concurrent workflows in the overhead figure (default 100)")
    parser.add_argument("--peer-workflows", type=int, metavar="N",
                        help="workflows in the DBOS comparison (default 200)")
    parser.add_argument("--repeats", type=int, metavar="N", help="overhead rounds (default 5)")
    parser.add_argument("--only", metavar="NAMES",
                        help="comma-separated figures to run: " + ", ".join(FIGURES))
    parser.add_argument("--scratch", type=Path, metavar="DIR",
                        help="where workflows' files go (default: a temporary directory); "
                             "put it on the disk you want measured")
    parser.add_argument("--before", metavar="REV",
                        help="also measure the code of git revision REV (a commit, branch "
                             "or tag of this checkout), each figure alternately in REV's "
                             "and this checkout's code, and print the two side by side; "
                             "--json FILE then also writes REV's to FILE.before.json")
    _add_no_wait_idle(parser)
    return parser


def _add_no_wait_idle(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-wait-idle", dest="wait_idle", action="store_false",
                        help="start each figure at once instead of waiting (up to 20 s) for "
                             "idle CPUs and a written-back disk: for tests on a busy machine; "
                             "the numbers are then not comparable")


def _passed_on(args: argparse.Namespace) -> list[str]:
    """The run options a side-by-side run gives each figure's own run."""
    options = ["--quick"] if args.quick else []
    for flag, value in (("--workflows", args.workflows),
                        ("--overhead-workflows", args.overhead_workflows),
                        ("--peer-workflows", args.peer_workflows), ("--repeats", args.repeats),
                        ("--scratch", args.scratch)):
        if value is not None:
            options += [flag, str(value)]
    return options if args.wait_idle else [*options, "--no-wait-idle"]


def _plan(args: argparse.Namespace, scratch: Path) -> Plan:
    base = (Plan.quick_plan if args.quick else Plan.full_plan)(scratch, args.workflows)
    overrides = {"overhead_workflows": args.overhead_workflows,
                 "peer_workflows": args.peer_workflows, "repeats": args.repeats}
    return dataclasses.replace(base, wait_idle=args.wait_idle,
                               **{k: v for k, v in overrides.items() if v is not None})


def _selected(only: str | None) -> list[str]:
    if not only:
        return list(FIGURES)
    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in names if n not in FIGURES]
    if unknown:
        raise SystemExit(f"unknown figure(s) {', '.join(unknown)}; choose from "
                         f"{', '.join(FIGURES)}")
    return names


def _run_figure(name: str, plan: Plan, console: Console) -> tuple[Figure, bool]:
    """Run one figure; a crash becomes a figure saying so, so the others still report."""
    if plan.quick and name in _SKIPPED_WHEN_QUICK:
        return Figure(name, _TITLES[name], skipped=_SKIPPED_WHEN_QUICK[name]), True
    console.print(f"[dim]running {name} ...[/dim]")
    scratch = plan.scratch / name
    scratch.mkdir()
    started = time.perf_counter()
    try:
        figure = FIGURES[name](dataclasses.replace(plan, scratch=scratch))
        ok = True
    except Exception as error:
        traceback.print_exc()
        figure = Figure(name, _TITLES[name], skipped=f"FAILED: {type(error).__name__}: {error}")
        ok = False
    figure.seconds = time.perf_counter() - started
    # Removed now, not at the end: tens of thousands of files left behind would make the
    # file system (and the next figure's syncs) slower.
    shutil.rmtree(scratch, ignore_errors=True)
    return figure, ok


def _filesystem(path: Path) -> str:
    """The file system type under ``path``: durability costs differ a lot between them."""
    best = ("", "?")
    for partition in psutil.disk_partitions(all=True):
        mount = partition.mountpoint
        if str(path).startswith(mount) and len(mount) > len(best[0]):
            best = (mount, partition.fstype)
    return best[1]


def _meta(plan: Plan, started_at: str) -> dict[str, Any]:
    return {
        "started_at": started_at,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "cores": os.cpu_count() or 0,
        "platform": platform.platform(),
        "scratch_filesystem": _filesystem(plan.scratch.resolve()),
        "packages": {name: _version(name) for name in ("transitions", "psutil", "dbos")},
        "plan": {"workflows": plan.workflows, "levels": list(plan.levels),
                 "overhead_workflows": plan.overhead_workflows,
                 "peer_workflows": plan.peer_workflows, "health_calls": plan.health_calls,
                 "repeats": plan.repeats, "quick": plan.quick, "wait_idle": plan.wait_idle},
        "argv": sys.argv[1:],
        # Other processes on a 2-core machine move every number; read them with this.
        "load_average_start": list(os.getloadavg()),
    }


def _version(name: str) -> str | None:
    if name == "dbos":
        return dbos_version()
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _run(argv: Sequence[str], prog: str) -> int:
    args = _run_parser(prog).parse_args(argv)
    names = _selected(args.only)
    console = _console()
    if args.before is not None:
        try:
            return measure_side_by_side(console, args.before,
                                        [n for n in _RUN_ORDER if n in names],
                                        _passed_on(args), args.json)
        except RevisionError as error:
            console.print(f"[red]{error}[/red]")
            return 2
    started_at = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="wm-bench-", dir=args.scratch) as scratch:
        plan = _plan(args, Path(scratch))
        meta = _meta(plan, started_at)
        results: dict[str, Figure] = {}
        all_ok = True
        for name in (n for n in _RUN_ORDER if n in names):
            results[name], ok = _run_figure(name, plan, console)
            all_ok = all_ok and ok
    meta["seconds"] = round(time.perf_counter() - began, 1)
    meta["load_average_end"] = list(os.getloadavg())
    figures = [results[name] for name in FIGURES if name in results]
    print_figures(console, meta, figures)
    if args.json is not None:
        write_json(args.json, to_document(meta, figures))
        console.print(f"results written to {args.json}")
    return 0 if all_ok else 1


def _console() -> Console:
    console = Console()
    # Piped output (CI logs, files) would otherwise wrap the tables at 80 columns.
    return console if console.is_terminal else Console(width=120)


def _compare(argv: Sequence[str], prog: str) -> int:
    parser = argparse.ArgumentParser(prog=f"{prog} compare",
                                     description="Print new/old for every figure's metrics.")
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    args = parser.parse_args(argv)
    compare_files(_console(), args.old, args.new)
    return 0


def _profile(argv: Sequence[str], prog: str) -> int:
    parser = argparse.ArgumentParser(
        prog=f"{prog} profile",
        description="cProfile the throughput case; print the top functions by tottime.")
    parser.add_argument("--store", choices=("file", "memory", "both"), default="both")
    parser.add_argument("--workflows", type=int, default=10_000, metavar="N")
    parser.add_argument("--top", type=int, default=15, metavar="N")
    parser.add_argument("--save", type=Path, metavar="PREFIX",
                        help="also dump raw stats to PREFIX-<store>.prof (for snakeviz etc.)")
    parser.add_argument("--scratch", type=Path, metavar="DIR")
    args = parser.parse_args(argv)
    console = _console()
    kinds = ("memory", "file") if args.store == "both" else (args.store,)
    with tempfile.TemporaryDirectory(prefix="wm-profile-", dir=args.scratch) as scratch:
        plan = Plan(workflows=args.workflows, scratch=Path(scratch))
        for kind in kinds:
            save = Path(f"{args.save}-{kind}.prof") if args.save else None
            result, functions, total = profile_throughput(plan, kind, args.workflows,
                                                          args.top, save)
            print_profile(console, kind, args.workflows, result, functions, total)
    return 0


def _case(argv: Sequence[str], prog: str) -> int:
    parser = argparse.ArgumentParser(
        prog=f"{prog} case",
        description="One throughput case in this process, printed as one line per run: "
                    "for A/B comparisons, run it from two checkouts alternately.")
    parser.add_argument("--store", choices=("file", "memory"), default="file")
    parser.add_argument("--workflows", type=int, default=10_000, metavar="N")
    parser.add_argument("--runs", type=int, default=1, metavar="N")
    parser.add_argument("--scratch", type=Path, metavar="DIR")
    _add_no_wait_idle(parser)
    parser.add_argument("--metrics", choices=("off", "on", "paired"), default="off",
                        help="Prometheus metrics attached: off, on, or paired (each run "
                             "twice, so both see the same machine; off-on, then on-off, "
                             "so a drift over the runs of one process cancels out)")
    args = parser.parse_args(argv)
    if args.workflows < 1 or args.runs < 1:
        parser.error("--workflows and --runs must be >= 1")
    with tempfile.TemporaryDirectory(prefix="wm-case-", dir=args.scratch) as scratch:
        plan = Plan(workflows=args.workflows, scratch=Path(scratch), wait_idle=args.wait_idle)
        modes = {"off": (False,), "on": (True,), "paired": (False, True)}[args.metrics]
        # ABBA: later runs in one process can be slower (a larger heap, the scratch
        # directory's files): alternating the order keeps that out of the difference.
        order = [metrics for run in range(args.runs)
                 for metrics in (modes if run % 2 == 0 else modes[::-1])]
        for metrics in order:
            settle(wait_idle=plan.wait_idle)
            result = asyncio.run(run_runtime_case(plan, args.store, args.workflows,
                                                  metrics=metrics))
            label = " metrics" if metrics else ""
            print(f"{args.store}{label} {args.workflows} workflows: "
                  f"{result.rate:,.0f} transitions/s, "
                  f"checkpoint p50 {result.save_p50_ms:.1f} ms p99 {result.save_p99_ms:.1f} ms, "
                  f"loop lag p99 {result.lag_p99_ms:.1f} ms max {result.lag_max_ms:.1f} ms, "
                  f"loop thread on CPU {result.loop_cpu:.0%}, "
                  f"close {result.close_seconds:.1f} s",
                  flush=True)
    return 0


def _stagecost(argv: Sequence[str], prog: str) -> int:
    parser = argparse.ArgumentParser(
        prog=f"{prog} stagecost",
        description="The event loop thread's CPU per stage: workflows of 19 stages (one "
                    "ctx.call each), every feature on (FileStore strict, health check before "
                    "every stage, INFO records to the log file), or the engine alone "
                    "(--engine: MemoryStore, no health checks or logs). One line per run; "
                    "under valgrind --tool=callgrind the same run counts instructions.")
    parser.add_argument("--workflows", type=int, default=1_000, metavar="N")
    parser.add_argument("--runs", type=int, default=1, metavar="N")
    parser.add_argument("--engine", action="store_true", help="the engine alone")
    parser.add_argument("--scratch", type=Path, metavar="DIR")
    args = parser.parse_args(argv)
    if args.workflows < 1 or args.runs < 1:
        parser.error("--workflows and --runs must be >= 1")
    label = "engine alone" if args.engine else "every feature (strict)"
    with tempfile.TemporaryDirectory(prefix="wm-stagecost-", dir=args.scratch) as scratch:
        # A few workflows first: imports and first-call caches stay out of the runs.
        measure_stage_cost(Path(scratch) / "warm-up", 5, every_feature=not args.engine,
                           counted=False)
        for index in range(args.runs):
            cost = measure_stage_cost(Path(scratch) / str(index), args.workflows,
                                      every_feature=not args.engine)
            print(f"{label}, {args.workflows} workflows: {cost.us_per_stage:.1f} us of loop "
                  f"CPU per stage ({cost.process_us_per_stage:.1f} us for the process), "
                  f"{cost.rate:,.0f} stages/s (load average {os.getloadavg()[0]:.1f})",
                  flush=True)
    return 0


def main(argv: Sequence[str] | None = None, *, prog: str = "python -m benchmarks") -> int:
    """Run the suite, or ``compare``, ``case``, ``profile``, ``processes``, ``stagecost``,
    ``durable`` or ``parts``; ``prog`` names the command in help and errors (``workflow-manager
    bench`` forwards here)."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments and arguments[0] == "compare":
        return _compare(arguments[1:], prog)
    if arguments and arguments[0] == "case":
        return _case(arguments[1:], prog)
    if arguments and arguments[0] == "profile":
        return _profile(arguments[1:], prog)
    if arguments and arguments[0] == "processes":
        from ._processes import main as processes
        return processes(arguments[1:], prog=f"{prog} processes")
    if arguments and arguments[0] == "durable":
        from ._durable import main as durable
        return durable(arguments[1:], prog=f"{prog} durable")
    if arguments and arguments[0] == "stagecost":
        return _stagecost(arguments[1:], prog)
    if arguments and arguments[0] == "parts":
        from ._parts import main as parts
        return parts(arguments[1:], prog=f"{prog} parts")
    return _run(arguments, prog)
