"""``python -m benchmarks.metrics_cost``: what Prometheus metrics cost per stage, counted in
CPU instructions (callgrind), not timed.

Timed A/B runs on a shared 2-core machine move by more than the 2 % budget from one run
to the next. Instructions executed are deterministic: each case (``python -m benchmarks
case``, metrics off or on) runs under ``valgrind --tool=callgrind`` at two sizes, and the
difference between the sizes divided by the stages it adds is the marginal cost of one
stage, without the process's start, imports and the runtime's open and close (which
``--metrics on`` makes larger by importing prometheus_client once). The ratio of on to off
is the share of the loop's work metrics add; throughput on one loop is bounded by that
work, so it is the throughput cost. ``PYTHONHASHSEED=0`` keeps dict and set layouts equal
between runs. Only the event loop's process is counted (the file store's writer is a
child process, not traced): that is the process whose CPU bounds throughput.

One part of the metrics is timed, not counted per stage: one durable save per
``SAVE_SAMPLE_SECONDS`` (0.1 s) is wrapped to time it. Under callgrind the process runs
~50x slower, so that period would sample ~50x more saves per stage than at full speed;
the counted runs stretch the period by ``--slowdown`` (default 50) to sample as many
saves per stage as a native run does.

Each run takes about a minute per 250 workflows on an idle machine (callgrind).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from ._workloads import STAGES

ROOT = Path(__file__).resolve().parent.parent
_COLLECTED = re.compile(r"Collected\s*:\s*(\d+)")


_CHILD = ("import sys, reliability._observe as o; o.SAVE_SAMPLE_SECONDS *= float(sys.argv[1]); "
          "from benchmarks._cli import main; raise SystemExit(main(sys.argv[2:]))")


def instructions(store: str, workflows: int, metrics: str, slowdown: float) -> int:
    """Instructions the case's process executed, start to end, under callgrind."""
    command = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
               sys.executable, "-c", _CHILD, str(slowdown), "case", "--store", store,
               "--workflows", str(workflows), "--no-wait-idle", "--metrics", metrics]
    environment = {**os.environ, "PYTHONHASHSEED": "0", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, env=environment, capture_output=True, text=True, cwd=ROOT,
                          check=False)
    found = _COLLECTED.search(done.stderr)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"callgrind run failed ({done.returncode}): {done.stderr[-2000:]}")
    return int(found.group(1))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.metrics_cost",
                                     description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--store", choices=("file", "memory"), default="file")
    parser.add_argument("--sizes", type=int, nargs=2, default=(250, 750), metavar="N",
                        help="the two batch sizes whose difference is measured")
    parser.add_argument("--slowdown", type=float, default=50.0, metavar="X",
                        help="how much slower the case runs under callgrind: the save "
                             "sampling period is stretched by it (default: 50)")
    args = parser.parse_args(argv)
    small, large = sorted(args.sizes)
    if small < 1 or large == small:
        parser.error("--sizes takes two different positive numbers")
    added = (large - small) * STAGES
    per_stage = {}
    for metrics in ("off", "on"):
        counts = [instructions(args.store, size, metrics, args.slowdown)
                  for size in (small, large)]
        per_stage[metrics] = (counts[1] - counts[0]) / added
        print(f"{args.store} metrics {metrics}: {counts[0]:,} instructions at {small} "
              f"workflows, {counts[1]:,} at {large}: {per_stage[metrics]:,.0f} per stage",
              flush=True)
    cost = per_stage["on"] / per_stage["off"] - 1
    print(f"metrics cost per stage: {per_stage['on'] - per_stage['off']:+,.0f} instructions "
          f"({cost:+.2%})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
