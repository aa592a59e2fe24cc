"""Figure: every core. ``batch --processes 2`` against one process, on a loop-bound batch.

The runs of ``python -m benchmarks processes`` (``batch_run``: the command line as a user
runs it, in a fresh directory) for the ``json`` workload only, whose stages parse and
serialise a ~20 KB document on the event loop: the batch a second event loop should
speed up. Process counts alternate between rounds (1 2, then 2 1), so a change in the
machine's load hits both alike; the medians make the ratio the target is about. The CPU
of the writers (the store's writer processes) is reported beside it: on a machine with
as many cores as loops, it is what the loops compete with.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from ._measure import median, settle
from ._plan import Plan
from ._processes import batch_run
from ._results import Figure, Target

__all__ = ["measure_cores"]

_COUNTS = (1, 2)
_ROOT = Path(__file__).resolve().parent.parent
# The json stage's own work, timed inside the process (its start-up is not counted).
_WORK_ALONE = ("import json, sys, time\n"
               "from benchmarks._processes import API_RESPONSE\n"
               "started = time.perf_counter()\n"
               "for _ in range(int(sys.argv[1])):\n"
               "    json.dumps(json.loads(API_RESPONSE))\n"
               "print(time.perf_counter() - started)\n")


def work_alone(processes: int, calls: int) -> float:
    """Calls/s of the json stage's work alone (no runtime) in ``processes`` processes at
    once, each making ``calls``: what this machine gives a second core on this work."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(_ROOT), os.environ.get("PYTHONPATH")]))}
    children = [subprocess.Popen([sys.executable, "-c", _WORK_ALONE, str(calls)], env=env,
                                 stdout=subprocess.PIPE, text=True)
                for _ in range(processes)]
    seconds = [float(child.communicate()[0]) for child in children]
    if any(child.returncode for child in children):
        raise RuntimeError("the json work alone failed in a child process")
    return processes * calls / max(seconds)


def measure_cores(plan: Plan) -> Figure:
    workflows = 100 if plan.quick else min(plan.workflows, 2_000)
    rounds = 1 if plan.quick else 2
    figure = Figure("cores", f"Every core: batch --processes 1 and 2, {workflows} workflows "
                             "of the loop-bound 'json' workload (19 stages, each parsing and "
                             "serialising ~20 KB of JSON on the loop)")
    runs: dict[int, list[dict[str, Any]]] = {n: [] for n in _COUNTS}
    for round_number in range(rounds):
        for processes in (_COUNTS if round_number % 2 == 0 else _COUNTS[::-1]):
            settle(wait_idle=plan.wait_idle)
            # --concurrency = the batch: every workflow in flight, the processes' share even.
            runs[processes].append(batch_run(processes, workflows, workflows, "json"))
    one = median([r["transitions_per_s"] for r in runs[1]])
    for processes in _COUNTS:
        rate = median([r["transitions_per_s"] for r in runs[processes]])
        targets = (Target("ratio", ">=", 1.6, ">= 1.6x one process"),) if processes > 1 else ()
        row = figure.row(f"processes-{processes}", f"{processes} process(es)", targets=targets)
        row.add("rate", rate, "/s", higher_is_better=True)
        if processes > 1:
            row.add("ratio", rate / one, "x", higher_is_better=True)
        for role in ("loops", "writers"):
            row.add(f"{role}_cpu", median([r["cpu_by_role"].get(role, 0.0)
                                           for r in runs[processes]]), "s")
    _add_work_alone_row(figure, 200 if plan.quick else 3_000, rounds, plan.wait_idle)
    figure.notes.append(f"median of {rounds} round(s), process counts alternating; rate = "
                        "durable stage transitions/s from the first workflow's start to the "
                        "last one's end; loops_cpu / writers_cpu = CPU seconds of the event "
                        "loops' processes / the store writers over the command's life "
                        "(`python -m benchmarks processes` for more workloads and rounds); "
                        "work-alone = the stages' json work with no runtime, in 1 and 2 "
                        "processes at once: the ratio this machine's second core gives it")
    return figure


def _add_work_alone_row(figure: Figure, calls: int, rounds: int, wait_idle: bool) -> None:
    rates: dict[int, list[float]] = {n: [] for n in _COUNTS}
    for round_number in range(rounds):
        for processes in (_COUNTS if round_number % 2 == 0 else _COUNTS[::-1]):
            settle(wait_idle=wait_idle)
            rates[processes].append(work_alone(processes, calls))
    row = figure.row("work-alone", "the json work alone (no runtime), 2 processes vs 1")
    row.add("ratio", median(rates[2]) / median(rates[1]), "x", higher_is_better=True)
