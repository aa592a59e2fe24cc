"""Figure 5: find and restart N interrupted workflows from disk.

Setup: N workflows block in stage 3; a shutdown request cancels them there, so each ends
``interrupted`` with stages 1-2 durable; the runtime closes. Measured: a fresh runtime's
``resume_all()`` until every workflow has started (listener event "started"), until each
is back inside stage 3 (the gate counts arrivals), and until all completed.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reliability import WorkflowResult

from ._measure import CallTimer, settle
from ._plan import Plan
from ._results import Figure, Target
from ._workloads import RESUME_FLOW, Gate, configuration, install_gate, remove_gate, runtime

__all__ = ["measure_resume"]


@dataclass(frozen=True, slots=True)
class _Timings:
    find: float
    all_started: float
    all_in_stage: float
    all_completed: float


async def _interrupt_all(root: Path, count: int) -> float:
    """Leave ``count`` interrupted workflows under ``root``; return the seconds it took."""
    gate = install_gate("resume", Gate(count))
    started = time.perf_counter()
    async with runtime(root, configuration(persistence=True)) as rt:
        tasks = [asyncio.create_task(rt.run(RESUME_FLOW)) for _ in range(count)]
        await gate.all_in.wait()
        rt.request_shutdown()
        results = await asyncio.gather(*tasks)
    _expect(results, "interrupted", count)
    return time.perf_counter() - started


def _expect(results: list[WorkflowResult], status: str, count: int) -> None:
    wrong = [r for r in results if r.status != status]
    if wrong or len(results) != count:
        raise RuntimeError(f"expected {count} workflows {status}, got {len(results)} with "
                           f"{len(wrong)} otherwise (first: {wrong[0].status if wrong else '-'})")


class _StartCounter:
    """A runtime listener: sets ``done`` once ``expected`` workflows have started."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.started = 0
        self.done = asyncio.Event()

    def __call__(self, event: str, run: Any, **data: Any) -> None:
        if event == "started":
            self.started += 1
            if self.started >= self.expected:
                self.done.set()


async def _resume_all(root: Path, count: int) -> _Timings:
    gate = install_gate("resume", Gate(count, open_now=True))
    async with runtime(root, configuration(persistence=True)) as rt:
        counter = _StartCounter(count)
        rt.add_listener(counter)
        finding = CallTimer(rt.store, "list_states")
        started = time.perf_counter()
        resuming = asyncio.create_task(rt.resume_all())
        all_started = await _elapsed(counter.done, started, resuming)
        all_in_stage = await _elapsed(gate.all_in, started, resuming)
        results = await resuming
        all_completed = time.perf_counter() - started
    _expect(results, "completed", count)
    return _Timings(finding.total(), all_started, all_in_stage, all_completed)


async def _elapsed(event: asyncio.Event, since: float, guard: asyncio.Task[Any]) -> float:
    """Seconds from ``since`` until ``event``; fails fast if ``guard`` ends first."""
    waiter = asyncio.create_task(event.wait())
    await asyncio.wait({waiter, guard}, return_when=asyncio.FIRST_COMPLETED)
    if not waiter.done():
        waiter.cancel()
        guard.result()  # raises what went wrong
        raise RuntimeError("resume_all() ended before every workflow got there")
    return time.perf_counter() - since


def measure_resume(plan: Plan) -> Figure:
    count = plan.workflows
    figure = Figure("resume", f"Resume: {count} interrupted workflows (stopped in stage 3) "
                              "from disk in a fresh runtime")
    root = plan.fresh_root("resume")
    try:
        settle(wait_idle=plan.wait_idle)
        setup = asyncio.run(_interrupt_all(root, count))
        settle(wait_idle=plan.wait_idle)
        timings = asyncio.run(_resume_all(root, count))
    finally:
        remove_gate("resume")
    figure.row("setup", "setup: run to stage 3, shut down (not part of the figure)").add(
        "wall", setup, "s")
    figure.row("resume", "resume_all()", targets=(Target("all_started", "<=", 2.0,
                                                           "all running <= 2 s"),)).add(
        "find", timings.find, "s").add(
        "all_started", timings.all_started, "s").add(
        "all_in_stage", timings.all_in_stage, "s").add(
        "all_completed", timings.all_completed, "s").add(
        "rate", count / timings.all_started, "/s", higher_is_better=True)
    figure.notes.append("find = store.list_states(); all_started = listener event "
                        "'started' for every workflow; all_in_stage = every handler of the "
                        "resumed stage entered")
    return figure
