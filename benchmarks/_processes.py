"""Every core: ``workflow-manager batch --processes N`` on a loop-bound batch.

``python -m benchmarks processes [--workflows 4000] [--processes 1,2] [--rounds 3]
[--concurrency 1000] [--json FILE]`` runs, for each round and each process count (the
order alternates between rounds, so a change in the machine's load hits both alike), the
command line as a user does: ``batch`` of N prompt files through ``NOOP19`` (19 no-op
stages; strict durability, file store, health checks and monitoring off, WARNING logs, as
in the single-process throughput figure) in a fresh project directory. It reports durable
stage transitions/s over the batch's run (the report's ``run_seconds``: from the first
workflow's start to the last one's end; registration, child start-up and closing
excluded), the command's wall time, the CPU time of all its processes (parent, children,
writers: barely moved by the machine's load, unlike the rates) and the load average beside
each; then the median per process count and the ratio to one process.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from machines import StageContext, StageSpec, WorkflowDefinition

ROOT = Path(__file__).resolve().parent.parent
DEFINITION = "benchmarks._processes:NOOP19"


async def _noop(ctx: StageContext) -> None:
    return None


NOOP19 = WorkflowDefinition("noop19", [StageSpec(f"stage_{i:02d}", _noop) for i in range(19)])


def batch_run(processes: int, workflows: int, concurrency: int) -> dict[str, Any]:
    """One ``batch --processes`` of ``workflows`` no-op workflows in a fresh directory."""
    with tempfile.TemporaryDirectory(prefix="bench-processes-") as directory:
        root = Path(directory)
        prompts = root / "prompts"
        prompts.mkdir()
        for n in range(workflows):
            (prompts / f"p{n:06d}.md").write_text(f"# p{n}\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith("WORKFLOW_")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        load = os.getloadavg()[0]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "reliability", "batch", str(prompts), "--definition",
             DEFINITION, "--processes", str(processes), "--concurrency", str(concurrency),
             "--json", "--log-level", "WARNING", "--durability", "strict",
             "--no-enable-health-checks", "--no-enable-monitoring",
             "--project-root", str(root)],
            cwd=ROOT, env=env, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"batch --processes {processes} failed ({done.returncode}): "
                           f"{done.stderr[-2000:]}")
    report = json.loads(done.stdout)
    completed = report["counts"].get("completed", 0)
    if completed != workflows:
        raise RuntimeError(f"{completed} of {workflows} workflows completed")
    transitions = workflows * len(NOOP19.stages)
    return {"processes": processes, "workflows": workflows, "concurrency": concurrency,
            "transitions": transitions, "run_seconds": report["run_seconds"],
            # The loops' processes' CPU over the run, per transition: what a quiet machine
            # with a core per process turns into the rate (the writers' is apart).
            "loop_cpu_us_per_transition": report["run_cpu_seconds"] / transitions * 1e6,
            "transitions_per_s": transitions / report["run_seconds"],
            "wall_seconds": wall, "load_average": load,
            # Every process of the command (parent, children, writers), reaped: a measure
            # the machine's load barely moves, unlike the rates.
            "cpu_seconds": (after.ru_utime + after.ru_stime) - (before.ru_utime
                                                                + before.ru_stime)}


def main(argv: list[str] | None = None, *, prog: str = "python -m benchmarks processes") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--workflows", type=int, default=4000)
    parser.add_argument("--processes", default="1,2", help="comma-separated process counts")
    parser.add_argument("--rounds", type=int, default=3,
                        help="paired rounds (each runs every process count once)")
    parser.add_argument("--concurrency", type=int, default=1000,
                        help="the batch's --concurrency (shared by its processes)")
    parser.add_argument("--json", type=Path, help="also write the runs and medians here")
    args = parser.parse_args(argv)
    counts = [int(x) for x in args.processes.split(",") if x]
    runs: list[dict[str, Any]] = []
    for round_number in range(args.rounds):
        order = counts if round_number % 2 == 0 else list(reversed(counts))
        for processes in order:
            run = batch_run(processes, args.workflows, args.concurrency)
            runs.append(run)
            print(f"round {round_number + 1}, {processes} process(es): "
                  f"{run['transitions_per_s']:8,.0f} transitions/s (run "
                  f"{run['run_seconds']:.2f} s, wall {run['wall_seconds']:.1f} s; loop "
                  f"processes' CPU {run['loop_cpu_us_per_transition']:.0f} us/transition, "
                  f"all processes' CPU {run['cpu_seconds']:.1f} s; load average "
                  f"{run['load_average']:.1f})",
                  flush=True)
    medians = {n: statistics.median(r["transitions_per_s"] for r in runs
                                    if r["processes"] == n) for n in counts}
    base = medians[counts[0]]
    for n, rate in medians.items():
        print(f"{n} process(es): median {rate:,.0f} transitions/s, "
              f"{rate / base:.2f}x {counts[0]} process(es)")
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "medians": medians,
                                         "command": " ".join(sys.argv)}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
