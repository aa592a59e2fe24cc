"""``python -m benchmarks durable``: what the file store's durable write path costs.

The throughput case (``count`` workflows of 19 no-op stages, strict durability, WARNING
logs) on the FileStore and on the MemoryStore, alternately, one line each: the loop
thread's CPU per transition (the file store's minus the memory store's is the durable
part on the loop: encoding, batches, pipe writes, answers, futures), the writer
process's CPU per transition over the run (journal appends, syncs; read with psutil
before the store closes), the close (the writer writes the state files it held back)
with the writer's CPU spent in it, the bytes handed to the writer per transition, and
the files the writer wrote per workflow (state and checkpoint files: each one created,
~50-200 us of kernel time here, and a count the machine's load does not move while the
writer keeps up).

Under ``valgrind --tool=callgrind --collect-atstart=no --toggle-collect='_operator_call*'``
the measured runs alone are counted (each is called through ``operator.call``): the
loop's instructions, which the machine's load does not move. The writer is a child
process valgrind does not follow, so it runs (and is measured) natively.
"""

from __future__ import annotations

import argparse
import asyncio
import operator
import os
import resource
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from reliability import FileStore, MemoryStore, Store

from ._measure import settle
from ._workloads import FLOW, STAGES, configuration, run_many, runtime

__all__ = ["DurableCost", "main", "measure_durable"]


@dataclass(frozen=True, slots=True)
class DurableCost:
    """One run's costs; CPU figures in seconds, over ``transitions``."""

    store: str
    transitions: int
    seconds: float
    loop_cpu: float  # the event loop thread
    process_cpu: float  # every thread of this process
    writer_user: float  # the writer process over the run (0 for the memory store)
    writer_system: float
    writer_journal: float  # of which its main thread (journal appends and syncs)
    close_seconds: float
    close_writer_cpu: float  # the writer's CPU from the end of the run to its exit
    bytes_sent: int  # frames handed to the writer
    batches: int
    files_written: int  # state and checkpoint files, run and close
    workflows: int

    def per_transition_us(self, seconds: float) -> float:
        return seconds / self.transitions * 1e6

    def line(self) -> str:
        us = self.per_transition_us
        text = (f"{self.store:6} {self.transitions / self.seconds:8,.0f} transitions/s; per "
                f"transition: loop {us(self.loop_cpu):5.1f} us, process "
                f"{us(self.process_cpu):5.1f} us")
        if self.store == "file":
            text += (f", writer {us(self.writer_user + self.writer_system):5.1f} us (user "
                     f"{us(self.writer_user):.1f}, system {us(self.writer_system):.1f}; journal "
                     f"thread {us(self.writer_journal):.1f}), "
                     f"{self.bytes_sent / self.transitions:,.0f} bytes, "
                     f"{self.transitions / max(self.batches, 1):.1f} per batch, "
                     f"{self.files_written / self.workflows:.1f} files per workflow; close "
                     f"{self.close_seconds:.1f} s, writer CPU in it "
                     f"{self.close_writer_cpu:.1f} s")
        return text + f" (load average {os.getloadavg()[0]:.1f})"


def _main_thread_cpu(process: psutil.Process | None) -> float:
    """The CPU of ``process``'s main thread (its thread ID is its process ID)."""
    if process is None:
        return 0.0
    for thread in process.threads():
        if thread.id == process.pid:
            return float(thread.user_time + thread.system_time)
    return 0.0


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


async def _run(root: Path, kind: str, count: int) -> DurableCost:
    store: Store | None = MemoryStore() if kind == "memory" else None
    children = _children_cpu()
    async with runtime(root, configuration(persistence=True), store=store) as rt:
        writer = psutil.Process(rt.store.writer_pid) if isinstance(rt.store, FileStore) \
            and rt.store.writer_pid is not None else None
        before = writer.cpu_times() if writer is not None else None
        journal = _main_thread_cpu(writer)
        started, loop_cpu, process_cpu = time.perf_counter(), time.thread_time(), \
            time.process_time()
        await run_many(rt, FLOW, count)
        seconds = time.perf_counter() - started
        loop_cpu = time.thread_time() - loop_cpu
        process_cpu = time.process_time() - process_cpu
        after = writer.cpu_times() if writer is not None else None
        journal = _main_thread_cpu(writer) - journal
        file_store = rt.store if isinstance(rt.store, FileStore) else None
        bytes_sent = file_store.bytes_sent if file_store is not None else 0
        batches = file_store.batches_written if file_store is not None else 0
        closing = time.perf_counter()
    close_seconds = time.perf_counter() - closing
    files = file_store.files_written if file_store is not None else 0
    user = system = close_cpu = 0.0
    if before is not None and after is not None:
        user, system = after.user - before.user, after.system - before.system
        # The writer is reaped as the store closes: its whole life is in RUSAGE_CHILDREN.
        close_cpu = _children_cpu() - children - (after.user + after.system)
    return DurableCost(kind, count * STAGES, seconds, loop_cpu, process_cpu, user, system,
                       journal, close_seconds, max(close_cpu, 0.0), bytes_sent, batches,
                       files, count)


def measure_durable(root: Path, kind: str, count: int) -> DurableCost:
    """One run, called through ``operator.call`` (see the module's docstring)."""
    result: DurableCost = operator.call(asyncio.run, _run(root, kind, count))
    return result


def main(argv: list[str] | None = None, *, prog: str = "python -m benchmarks durable") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--workflows", type=int, default=10_000, metavar="N")
    parser.add_argument("--runs", type=int, default=1, metavar="N",
                        help="pairs of runs (file then memory, then memory then file, ...)")
    parser.add_argument("--store", choices=("both", "file", "memory"), default="both")
    parser.add_argument("--scratch", type=Path, metavar="DIR")
    parser.add_argument("--no-wait-idle", dest="wait_idle", action="store_false",
                        help="start each run at once instead of waiting for idle CPUs")
    args = parser.parse_args(argv)
    if args.workflows < 1 or args.runs < 1:
        parser.error("--workflows and --runs must be >= 1")
    kinds = ("file", "memory") if args.store == "both" else (args.store,)
    with tempfile.TemporaryDirectory(prefix="wm-durable-", dir=args.scratch) as scratch:
        # A few workflows first: imports and first-call caches stay out of the runs.
        asyncio.run(_run(Path(scratch) / "warm-up", kinds[0], 5))
        for index in range(args.runs):
            for kind in (kinds if index % 2 == 0 else kinds[::-1]):
                settle(wait_idle=args.wait_idle)
                cost = measure_durable(Path(scratch) / f"{kind}-{index}", kind,
                                       args.workflows)
                print(cost.line(), flush=True)
    return 0
