"""Figure 2: durable stage transitions per second, with checkpoint latency and loop lag.

Stages do no I/O (``await asyncio.sleep(0)``), so the rate is the runtime's own cost.
Reference rows separate the layers: bare asyncio (the ceiling), the shared state
machine's triggers alone, the runtime on MemoryStore (engine cost), then on FileStore
(engine + disk).
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from pathlib import Path

from reliability import FileStore, MemoryStore, Runtime, Store, new_workflow_id
from reliability._state import WorkflowRun  # the engine's model type, for the triggers-only row

from ._measure import FutureTimer, lag_monitor, peak_rss, percentile, settle
from ._overhead import _file_logging
from ._plan import Plan
from ._results import Figure, Row, Target
from ._workloads import FLOW, STAGES, bare_step, configuration, run_bare, run_many, runtime

__all__ = ["RuntimeRun", "measure_throughput", "run_runtime_case"]

SAVE_SAMPLE = 10  # checkpoint latency is timed on every 10th save (see FutureTimer)


@dataclass(frozen=True, slots=True)
class RuntimeRun:
    """What one timed runtime batch measured."""

    seconds: float
    rate: float
    save_p50_ms: float
    save_p99_ms: float
    lag_p99_ms: float
    lag_max_ms: float
    loop_cpu: float  # the loop thread's CPU time over the wall time: < 1 means it waited
    close_seconds: float  # closing the runtime: FileStore writes the remaining state files
    rss_per_workflow: float  # bytes: the process's peak RSS over the run, less before, / count


def _store(kind: str) -> Store | None:
    # None lets the Runtime build its default FileStore at the configured paths.
    return MemoryStore() if kind == "memory" else None


async def run_runtime_case(plan: Plan, kind: str, count: int, *,
                           metrics: bool = False, defaults: bool = False) -> RuntimeRun:
    """``count`` workflows of FLOW on a runtime with ``kind`` ("file" or "memory") store;
    with ``metrics``, Prometheus metrics attached (counted, not scraped); with
    ``defaults``, the configuration's defaults (monitoring and health checks on, INFO
    records to the daily log file) instead of every optional feature off and WARNING."""
    root = plan.fresh_root(f"throughput-{kind}-{count}")
    config = (configuration(persistence=True, health=True, monitoring=True, log_level="INFO")
              if defaults else configuration(persistence=True))
    with _file_logging(root / "logs", defaults):
        async with runtime(root, config, store=_store(kind)) as rt:
            _require_store(rt, kind)
            saves = FutureTimer(rt.store, "save_nowait", sample_every=SAVE_SAMPLE)
            if metrics:  # after the timer: its sampler keeps the timer's wrapper in place
                from reliability._metrics import RuntimeMetrics

                RuntimeMetrics(rt)
            async with lag_monitor() as lag, peak_rss() as rss:
                started, cpu = time.perf_counter(), time.thread_time()
                await run_many(rt, FLOW, count)
                seconds = time.perf_counter() - started
                cpu = time.thread_time() - cpu
            closing = time.perf_counter()
    return RuntimeRun(seconds, count * STAGES / seconds, saves.p50_ms(), saves.p99_ms(),
                      lag.p99_ms(), lag.max_ms(), cpu / seconds,
                      time.perf_counter() - closing, rss.growth / count)


def _require_store(rt: Runtime, kind: str) -> None:
    expected = MemoryStore if kind == "memory" else FileStore
    if not isinstance(rt.store, expected):
        raise RuntimeError(f"expected a {expected.__name__}, got {type(rt.store).__name__}")


async def _triggers_only(count: int) -> float:
    """Seconds for ``count`` concurrent runs through FLOW's shared machine, triggers only."""

    async def one() -> None:
        run = WorkflowRun(new_workflow_id(time.time()), definition_name=FLOW.name,
                          definition_path=FLOW.import_path, context={}, prompt_file=None,
                          created_at=time.time())
        FLOW.attach(run, "pending")
        try:
            for _ in range(STAGES + 1):  # pending -> s0 ... s18 -> completed
                await FLOW.advance(run)
        finally:
            FLOW.detach(run)

    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(count)))
    return time.perf_counter() - started


def _disk_sync_latencies(directory: Path, count: int) -> list[float]:
    """Seconds per 4 KiB append + fdatasync in ``directory``: the floor under every durable
    batch, and the part of checkpoint latency no runtime change can remove."""
    path = directory / "fdatasync-probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    latencies = []
    try:
        for _ in range(count):
            started = time.perf_counter()
            os.write(fd, b"x" * 4096)
            os.fdatasync(fd)
            latencies.append(time.perf_counter() - started)
    finally:
        os.close(fd)
        path.unlink()
    return latencies


def measure_throughput(plan: Plan) -> Figure:
    figure = Figure("throughput", f"Throughput: durable stage transitions/s ({STAGES} stages "
                                  "of sleep(0) per workflow)")
    biggest = max(plan.levels)
    syncs = _disk_sync_latencies(plan.fresh_root("disk"), 20 if plan.quick else 200)
    figure.row("disk", "disk floor: 4 KiB append + fdatasync").add(
        "p50", percentile(syncs, 0.5) * 1000, "ms").add(
        "p99", percentile(syncs, 0.99) * 1000, "ms")
    for count in plan.levels:
        settle(wait_idle=plan.wait_idle)
        seconds = asyncio.run(run_bare(count, bare_step))
        figure.row(f"bare-{count}", f"bare asyncio, {count} workflows").add(
            "rate", count * STAGES / seconds, "/s", higher_is_better=True)
        settle(wait_idle=plan.wait_idle)
        seconds = asyncio.run(_triggers_only(count))
        figure.row(f"transitions-{count}", f"state machine triggers only, {count} workflows",
                   note="attach, 20 advance triggers, detach").add(
            "rate", count * STAGES / seconds, "/s", higher_is_better=True)
    for kind in ("memory", "file"):
        for count in plan.levels:
            settle(wait_idle=plan.wait_idle)
            result = asyncio.run(run_runtime_case(plan, kind, count))
            targets = _targets(kind) if count == biggest else ()
            label = "MemoryStore" if kind == "memory" else "FileStore"
            _runtime_row(figure.row(f"{kind}-{count}", f"runtime + {label}, {count} workflows",
                                    targets=targets), result)
    settle(wait_idle=plan.wait_idle)
    result = asyncio.run(run_runtime_case(plan, "file", biggest, defaults=True))
    _runtime_row(figure.row(
        f"file-defaults-{biggest}", f"runtime + FileStore, {biggest} workflows, the "
        "configuration's defaults (monitoring, health checks, INFO records to the log file)",
        targets=(Target("rate", ">=", 30_000, ">= 30,000/s"),
                 Target("rss_per_workflow", "<=", 20 * 1024, "RSS <= 20 KiB a workflow"))),
        result)
    figure.notes.append("checkpoint latency = a store save, from the call until durable "
                        "(first record, stage completions, final state), timed on every "
                        f"{SAVE_SAMPLE}th save (timing each costs the rate ~5 %); loop lag "
                        "= overshoot of a 10 ms ticker during the run. Workflows "
                        "take fair turns, so a loop iteration starts only as many stages as "
                        "fit ~1 ms. close = closing the runtime after the run (not in the "
                        "rate): the FileStore's writer finishes the state and checkpoint "
                        "files it writes only when a CPU is idle (~0.5 ms of kernel time "
                        "per file created on this machine's disk); rss_per_workflow = the "
                        "process's peak RSS during the run (all workflows in flight at "
                        "once), less before it, per workflow")
    return figure


def _targets(kind: str) -> tuple[Target, ...]:
    if kind == "memory":  # the engine alone
        return (Target("rate", ">=", 50_000, ">= 50,000/s"),)
    return (Target("rate", ">=", 20_000, ">= 20,000/s"),
            Target("rate", ">=", 40_000, ">= 40,000/s at WARNING"),
            Target("checkpoint_p99", "<=", 20.0, "ckpt p99 <= 20 ms"),
            Target("lag_p99", "<=", 10.0, "lag p99 <= 10 ms"))


def _runtime_row(row: Row, result: RuntimeRun) -> None:
    row.add("rate", result.rate, "/s", higher_is_better=True)
    row.add("wall", result.seconds, "s")
    row.add("checkpoint_p50", result.save_p50_ms, "ms")
    row.add("checkpoint_p99", result.save_p99_ms, "ms")
    row.add("lag_p99", result.lag_p99_ms, "ms")
    row.add("lag_max", result.lag_max_ms, "ms")
    row.add("close", result.close_seconds, "s")
    row.add("rss_per_workflow", result.rss_per_workflow, "B")
