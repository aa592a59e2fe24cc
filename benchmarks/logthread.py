"""``python -m benchmarks.logthread``: the logging thread's CPU per deferred record.

What ``benchmarks stagecost`` hands the logging thread, without the runtime: lists of
``log_soon`` tuples (a stage transition and a health check line per stage, one list per
hand-over) given to ``_BatchListener.handle`` in this thread, written to a daily log file
in the detailed (default) or JSON format. Two paths of the same code, run interleaved:
``direct`` (lines rendered straight from the tuples, one write per batch: what
``configure_logging``'s handlers get) and ``records`` (a ``LogRecord`` built, filtered and
formatted per line, one write each: what any user filter or handler makes it take, and
what every batch took before). CPU is this thread's (``time.thread_time``), so other
processes' load moves it less than wall time; still, compare the two in one run.
"""

from __future__ import annotations

import argparse
import logging
import queue
import tempfile
import time
from pathlib import Path

from reliability._logging import (
    DailyFileHandler,
    DetailedFormatter,
    JsonFormatter,
    _BatchListener,
    _Held,
    _InPlaceQueueHandler,
    _WorkflowIdFilter,
)

WORKFLOW_ID = "workflow-20240115-142315-a7b3"


def _batches(records: int, batch: int) -> list[_Held]:
    """``records`` deferred tuples as the loop defers them, ``batch`` per hand-over, the
    clock advancing 20 us a record (a few seconds' worth: the time prefix changes)."""
    start = time.time()
    held: list[_Held] = []
    for index in range(records):
        if index % batch == 0:
            held.append(_Held())
        created = start + index * 20e-6
        if index % 2:
            held[-1].append((created, logging.INFO,
                             "Health check completed (%s): %s (CPU: %.0f%%, Memory: %.0f%%)",
                             (f"before s{index % 19}", "HEALTHY", 12.5, 40.25), WORKFLOW_ID))
        else:
            held[-1].append((created, logging.INFO, "Stage transition: %s -> %s (duration: "
                             "%.1fs)", (f"s{index % 19}", f"s{index % 19 + 1}", 0.0125),
                             WORKFLOW_ID))
    return held


def cpu_per_record(directory: Path, *, records: int, batch: int, log_format: str,
                   direct: bool) -> float:
    """This thread's CPU seconds per record, handling ``records`` deferred records."""
    handler = DailyFileHandler(directory, drained=lambda: True)  # a flush per batch
    handler.setFormatter(JsonFormatter() if log_format == "json" else DetailedFormatter())
    front = _InPlaceQueueHandler(queue.SimpleQueue())
    front.addFilter(_WorkflowIdFilter())
    if not direct:
        front.addFilter(lambda record: True)  # a user's filter: records are needed
    listener = _BatchListener(queue.SimpleQueue(), front, handler)
    held = _batches(records, batch)
    started = time.thread_time()
    for each in held:
        listener.handle(each)
    spent = time.thread_time() - started
    handler.close()
    return spent / records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.logthread",
                                     description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=64,
                        help="records per hand-over (default 64)")
    parser.add_argument("--format", choices=["detailed", "json"], default="detailed")
    parser.add_argument("--runs", type=int, default=3, help="interleaved pairs")
    args = parser.parse_args(argv)
    figures: dict[bool, list[float]] = {True: [], False: []}
    with tempfile.TemporaryDirectory() as directory:
        for run in range(args.runs):
            for direct in (run % 2 == 0, run % 2 == 1):  # alternate which goes first
                figures[direct].append(cpu_per_record(
                    Path(directory) / f"{run}-{direct}", records=args.records,
                    batch=args.batch, log_format=args.format, direct=direct))
    for direct, name in ((False, "records"), (True, "direct")):
        shown = " / ".join(f"{seconds * 1e6:.2f}" for seconds in figures[direct])
        print(f"{name:8s} {shown} us CPU per record ({args.format}, batch {args.batch})")
    best = min(figures[False]) / min(figures[True])
    print(f"direct is {best:.1f}x cheaper (best of each)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
