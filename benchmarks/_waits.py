"""Figure `waits`: durable waits. What a parked workflow costs, how fast parked ones wake.

N workflows (10,000 in the full suite) park in their first stage, on ``ctx.wait_for_signal``
or ``ctx.sleep_durably``, on a FileStore. Measured:

- memory per parked workflow in the runtime that parked them (tracemalloc and RSS, two
  passes: tracing inflates RSS), in a runtime opened on the store before it has loaded any
  (nothing may be held per workflow), and once that runtime has re-armed them all;
- time to wake N due workflows: at the next start (a runtime opened after their deadline,
  ``wake_due()`` reads the parked index) and in process (the waker's timer on a fake
  clock), until every woken stage has started again and until all completed;
- signal-to-stage-start latency with N parked: ``rt.signal`` on one workflow at a time
  until its waiting stage runs again (in-process signals; another process's signal is
  seen at the runtime's next notice scan, every ``poll_seconds``).

Workflows park in batches (``_BATCH``), as they would over time: the RSS figure is then
what stays per parked workflow, not the allocator's peak for N stages running at once.
"""

from __future__ import annotations

import asyncio
import time
import tracemalloc
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from machines import StageContext, StageSpec, WorkflowDefinition
from reliability import FakeClock, FileStore, Runtime, SignalTimeout

from ._measure import percentile, rss_bytes, settle
from ._plan import Plan
from ._results import Figure, Target
from ._workloads import configuration

__all__ = ["SLEEP_FLOW", "WAIT_FLOW", "measure_waits"]

_BATCH = 500
_WAIT_SECONDS = 3600.0
_SLEEP_SECONDS = 60.0


class _Probe:
    """Counts entries into the waiting stage; one workflow's entry can be awaited."""

    def __init__(self) -> None:
        self.expected = 0
        self.entered = 0
        self.all_in = asyncio.Event()
        self.watch: dict[str, asyncio.Future[float]] = {}

    def reset(self, expected: int) -> None:
        self.expected, self.entered = expected, 0
        self.all_in = asyncio.Event()
        self.watch.clear()

    def enter(self, workflow_id: str) -> None:
        now = time.perf_counter()
        self.entered += 1
        if self.entered >= self.expected:
            self.all_in.set()
        waiter = self.watch.pop(workflow_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(now)


_PROBE = _Probe()


async def wait_go(ctx: StageContext) -> Mapping[str, Any]:
    _PROBE.enter(ctx.workflow_id)
    try:
        payload = await ctx.wait_for_signal("go", timeout_seconds=_WAIT_SECONDS)
    except SignalTimeout:
        payload = None
    return {"payload": payload}


async def nap(ctx: StageContext) -> None:
    _PROBE.enter(ctx.workflow_id)
    await ctx.sleep_durably(_SLEEP_SECONDS)


async def done(ctx: StageContext) -> None:
    return None


WAIT_FLOW = WorkflowDefinition("WAIT_FLOW", [
    StageSpec(stage="wait_go", handler=wait_go, max_retries=0),
    StageSpec(stage="done", handler=done),
], import_path_hint="benchmarks._waits:WAIT_FLOW")
SLEEP_FLOW = WorkflowDefinition("SLEEP_FLOW", [
    StageSpec(stage="nap", handler=nap),
    StageSpec(stage="done", handler=done),
], import_path_hint="benchmarks._waits:SLEEP_FLOW")


def _store(root: Path) -> FileStore:
    return FileStore(root / ".github/workflow-states", root / ".github/workflow-checkpoints")


def _runtime(root: Path, clock: FakeClock | None = None) -> Runtime:
    return Runtime(configuration(persistence=True), project_root=root, store=_store(root),
                   clock=clock, configure_logs=False)


async def _park(rt: Runtime, flow: WorkflowDefinition, count: int) -> list[str]:
    """Park ``count`` workflows, ``_BATCH`` at a time; their IDs."""
    ids: list[str] = []
    while len(ids) < count:
        batch = min(_BATCH, count - len(ids))
        results = await asyncio.gather(*(rt.run(flow) for _ in range(batch)))
        wrong = [r for r in results if r.status != "waiting"]
        if wrong:
            raise RuntimeError(f"{len(wrong)} workflows ended {wrong[0].status}, not waiting: "
                               f"{wrong[0].error}")
        ids.extend(r.workflow_id for r in results)
    return ids


async def _warm(rt: Runtime) -> None:
    """One batch parked, signalled and finished: imports, caches, the writer, arenas."""
    for workflow_id in await _park(rt, WAIT_FLOW, min(_BATCH, 100)):
        await rt.signal(workflow_id, "go")
    await rt.settle_woken()
    rt._finished.clear()


async def _parked_memory(root: Path, count: int, traced: bool) -> float:
    """Bytes per parked workflow in the runtime that parked them."""
    async with _runtime(root) as rt:
        await _warm(rt)
        settle(wait_idle=False)
        if traced:
            tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0] if traced else rss_bytes()
        await _park(rt, WAIT_FLOW, count)
        settle(wait_idle=False)
        after = tracemalloc.get_traced_memory()[0] if traced else rss_bytes()
        if traced:
            tracemalloc.stop()
        if rt.waker.parked_count != count:
            raise RuntimeError(f"{rt.waker.parked_count} parked, expected {count}")
    return (after - before) / count


async def _open_cost(root: Path) -> int:
    """Traced bytes held by a runtime just opened on ``root``, before it runs anything."""
    settle(wait_idle=False)
    before = tracemalloc.get_traced_memory()[0]
    async with _runtime(root):
        settle(wait_idle=False)
        return tracemalloc.get_traced_memory()[0] - before


async def _opened(root: Path, empty: Path, count: int) -> tuple[float, float]:
    """Traced bytes per parked workflow of a runtime opened on ``root`` (none loaded yet;
    less what opening one on the empty ``empty`` holds), and once ``wake_due()`` re-armed
    them all (nothing is due: the deadlines are an hour off)."""
    tracemalloc.start()
    try:
        await _open_cost(empty)  # the first open of a store pays for imports and caches
        fixed = await _open_cost(empty)
        settle(wait_idle=False)
        before = tracemalloc.get_traced_memory()[0]
        async with _runtime(root) as rt:
            settle(wait_idle=False)
            opened = tracemalloc.get_traced_memory()[0]
            if await rt.wake_due() != 0:
                raise RuntimeError("a workflow woke before its deadline")
            settle(wait_idle=False)
            armed = tracemalloc.get_traced_memory()[0]
            if rt.waker.parked_count != count:
                raise RuntimeError(f"{rt.waker.parked_count} re-armed, expected {count}")
    finally:
        tracemalloc.stop()
    return (opened - before - fixed) / count, (armed - opened) / count


async def _latencies(root: Path, count: int, samples: int) -> tuple[float, list[float]]:
    """Park ``count`` (RSS per parked workflow measured), then signal ``samples`` of them
    one at a time: seconds from ``rt.signal`` to their stage's start."""
    async with _runtime(root) as rt:
        await _warm(rt)
        settle(wait_idle=False)
        before = rss_bytes()
        ids = await _park(rt, WAIT_FLOW, count)
        settle(wait_idle=False)
        rss = (rss_bytes() - before) / count
        _PROBE.reset(len(ids) + 1)
        latencies: list[float] = []
        for workflow_id in ids[:: max(1, len(ids) // samples)][:samples]:
            entered = _PROBE.watch[workflow_id] = asyncio.get_running_loop().create_future()
            started = time.perf_counter()
            await rt.signal(workflow_id, "go")
            latencies.append(await asyncio.wait_for(entered, 60) - started)
        await rt.settle_woken()
    return rss, latencies


class _CountingExecutor(ThreadPoolExecutor):
    """The loop's default executor, counting the jobs handed to it (thread hops)."""

    def __init__(self) -> None:
        super().__init__()
        self.hops = 0

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        self.hops += 1
        return super().submit(fn, *args, **kwargs)


async def _wake_at_start(root: Path, count: int) -> tuple[float, float, int]:
    """A runtime opened after every deadline: seconds from ``wake_due()`` until every
    waiting stage started again, until all completed, and the thread hops it took (a
    deterministic measure: one per workflow before wakes were batched)."""
    clock = FakeClock(start=time.monotonic(), wall_start=time.time() + 2 * _WAIT_SECONDS)
    executor = _CountingExecutor()
    asyncio.get_running_loop().set_default_executor(executor)
    async with _runtime(root, clock) as rt:
        _PROBE.reset(count)
        executor.hops = 0
        started = time.perf_counter()
        woken = await rt.wake_due()
        await _within(_PROBE.all_in, 600)
        all_in = time.perf_counter() - started
        results = await rt.settle_woken()
        completed = time.perf_counter() - started
        hops = executor.hops
    _expect_completed(results, woken, count)
    return all_in, completed, hops


async def _wake_in_process(root: Path, count: int) -> tuple[float, float]:
    """Workflows asleep in this runtime; the clock passes their deadline: seconds until
    every one's stage started again, and until all completed."""
    clock = FakeClock(start=time.monotonic(), wall_start=time.time())
    async with _runtime(root, clock) as rt:
        await _park(rt, SLEEP_FLOW, count)
        settle(wait_idle=False)
        _PROBE.reset(count)
        started = time.perf_counter()
        clock.advance(_SLEEP_SECONDS)  # the waker's one timer fires: all are due
        await _within(_PROBE.all_in, 600)
        all_in = time.perf_counter() - started
        results = await rt.settle_woken()
        completed = time.perf_counter() - started
    _expect_completed(results, count, count)
    return all_in, completed


async def _within(event: asyncio.Event, seconds: float) -> None:
    await asyncio.wait_for(event.wait(), seconds)


def _expect_completed(results: list[Any], woken: int, count: int) -> None:
    wrong = [r for r in results if r.status != "completed"]
    if woken != count or len(results) != count or wrong:
        raise RuntimeError(f"woke {woken} of {count}; {len(results)} ended, "
                           f"{len(wrong)} not completed")


def measure_waits(plan: Plan) -> Figure:
    count = plan.workflows
    samples = min(count, 20 if plan.quick else 200)
    figure = Figure("waits", f"Durable waits: {count} workflows parked in stage 1 "
                             "(FileStore)")
    settle(wait_idle=plan.wait_idle)
    traced = asyncio.run(_parked_memory(plan.fresh_root("waits"), count, True))
    settle(wait_idle=plan.wait_idle)
    root = plan.fresh_root("waits")
    rss, latencies = asyncio.run(_latencies(root, count, samples))
    # ``root`` now holds ``count`` parked workflows (less the signalled samples) and
    # finished ones: a runtime opened on it must hold nothing for the parked ones.
    parked = count - samples
    settle(wait_idle=plan.wait_idle)
    unloaded, armed = asyncio.run(_opened(root, plan.fresh_root("waits"), parked))
    settle(wait_idle=plan.wait_idle)
    at_start = asyncio.run(_wake_at_start(root, parked))
    settle(wait_idle=plan.wait_idle)
    in_process = asyncio.run(_wake_in_process(plan.fresh_root("waits"), count))

    figure.row("parked", "memory per parked workflow, in the runtime that parked them",
               targets=(Target("tracemalloc", "<=", 1024, "<= 1 KiB"),)).add(
        "tracemalloc", traced, "B").add("rss", rss, "B")
    figure.row("unloaded", f"memory per parked workflow, {parked} on disk, in a runtime "
                           "that has loaded none",
               targets=(Target("tracemalloc", "<=", 8, "0 (<= 8 B of noise)"),)).add(
        "tracemalloc", unloaded, "B")
    figure.row("rearmed", "memory per parked workflow once that runtime re-armed them").add(
        "tracemalloc", armed, "B")
    figure.row("wake-start", f"wake {parked} due at the next start (wake_due())",
               targets=(Target("all_started", "<=", 2.0, "<= 2 s"),)).add(
        "all_started", at_start[0], "s").add("all_completed", at_start[1], "s").add(
        "rate", parked / at_start[0], "/s", higher_is_better=True).add(
        "thread_hops", at_start[2], "")
    figure.row("wake-timer", f"wake {count} due in process (the waker's timer)",
               targets=(Target("all_started", "<=", 2.0, "<= 2 s"),)).add(
        "all_started", in_process[0], "s").add("all_completed", in_process[1], "s").add(
        "rate", count / in_process[0], "/s", higher_is_better=True)
    figure.row("signal", f"signal to stage start, {count} parked, {len(latencies)} "
                         "signals one at a time").add(
        "p50", percentile(latencies, 0.5) * 1000, "ms").add(
        "p99", percentile(latencies, 0.99) * 1000, "ms")
    figure.notes.append("all_started = every woken workflow's waiting stage entered again; "
                        "a signal is synced to disk (file, directory) before rt.signal "
                        "returns, which is most of its latency; signals from another process "
                        "are seen at the next notice scan (every poll_seconds, 1 s)")
    return figure
