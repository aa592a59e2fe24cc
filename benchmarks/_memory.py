"""Figure 3: bytes per in-flight workflow, all parked inside their first stage.

Two passes, because tracing inflates RSS: one reads RSS only, one reads tracemalloc
(Python allocations only, the figure the target is about). A bare asyncio task parked on
the same gate is the floor any runtime pays.
"""

from __future__ import annotations

import asyncio
import tracemalloc
from collections.abc import Callable, Coroutine
from typing import Any

from ._measure import rss_bytes, settle
from ._plan import Plan
from ._results import Figure, Target
from ._workloads import PARKED_FLOW, Gate, configuration, install_gate, remove_gate, runtime

__all__ = ["measure_memory"]

_DRAIN_SECONDS = 0.5  # lets queued "stage started" writes reach disk: measure steady state


def _reading(plan: Plan, traced: bool) -> int:
    settle(wait_idle=plan.wait_idle)
    return tracemalloc.get_traced_memory()[0] if traced else rss_bytes()


def _start(plan: Plan, traced: bool) -> int:
    if traced:
        tracemalloc.start()
    return _reading(plan, traced)


def _finish(plan: Plan, traced: bool) -> int:
    after = _reading(plan, traced)
    if traced:
        # Stopped before the workflows wind down: tracing makes every allocation slower.
        tracemalloc.stop()
    return after


async def _bare(plan: Plan, count: int, traced: bool) -> float:
    gate = Gate(count)
    before = _start(plan, traced)
    tasks = [asyncio.create_task(gate.enter()) for _ in range(count)]
    await gate.all_in.wait()
    after = _finish(plan, traced)
    gate.release()
    await asyncio.gather(*tasks)
    return (after - before) / count


async def _runtime(plan: Plan, count: int, traced: bool) -> float:
    gate = install_gate("park", Gate(count))
    try:
        root = plan.fresh_root("memory")
        async with runtime(root, configuration(persistence=True)) as rt:
            before = _start(plan, traced)
            tasks = [asyncio.create_task(rt.run(PARKED_FLOW)) for _ in range(count)]
            await gate.all_in.wait()
            await asyncio.sleep(_DRAIN_SECONDS)
            after = _finish(plan, traced)
            # Interrupting is one write per workflow; finishing would be 18 stages more.
            rt.request_shutdown()
            await asyncio.gather(*tasks)
    finally:
        remove_gate("park")
    return (after - before) / count


def _per_workflow(measure: Callable[[bool], Coroutine[Any, Any, float]]) -> tuple[float, float]:
    """(RSS bytes, traced bytes) per workflow, from two separate passes."""
    return asyncio.run(measure(False)), asyncio.run(measure(True))


def measure_memory(plan: Plan) -> Figure:
    count = plan.workflows
    figure = Figure("memory", f"Memory per in-flight workflow: {count} workflows parked "
                              "in stage 1 (empty context)")
    rss, traced = _per_workflow(lambda traced: _bare(plan, count, traced))
    figure.row("bare", "bare asyncio task parked on an Event").add(
        "tracemalloc", traced, "B").add("rss", rss, "B")
    rss, traced = _per_workflow(lambda traced: _runtime(plan, count, traced))
    figure.row("runtime", "runtime + FileStore (persistence on)",
               targets=(Target("tracemalloc", "<=", 20 * 1024, "<= 20 KiB"),)).add(
        "tracemalloc", traced, "B").add("rss", rss, "B")
    figure.notes.append("RSS is a delta in a process that already ran other figures, so "
                        "freed arenas it reuses make it an underestimate; tracemalloc counts "
                        "Python allocations only (not the kernel's per-fd lock state)")
    return figure
