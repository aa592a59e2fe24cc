"""Figure 4: the cost of ``await rt.perform_health_check()``.

The sampler reuses a reading for a second, so most calls in a burst are cheap; the
"fresh sample" case defeats that cache with a clock that jumps an hour per reading, so
each call pays for the psutil syscalls.
"""

from __future__ import annotations

import asyncio
import time

from reliability import SystemClock

from ._measure import median, percentile, settle
from ._plan import Plan
from ._results import Figure, Target
from ._workloads import configuration, runtime

__all__ = ["measure_health"]


class _StaleClock(SystemClock):
    """Monotonic time that jumps an hour per read, so no cached reading is ever fresh."""

    __slots__ = ("_skew",)

    def __init__(self) -> None:
        self._skew = 0.0

    def monotonic(self) -> float:
        self._skew += 3600.0
        return time.monotonic() + self._skew


async def _timings(plan: Plan, calls: int, clock: SystemClock) -> list[float]:
    root = plan.fresh_root("health")
    async with runtime(root, configuration(health=True), clock=clock) as rt:
        await rt.perform_health_check()  # warm-up: first psutil call primes its baselines
        timings = []
        for _ in range(calls):
            started = time.perf_counter()
            await rt.perform_health_check()
            timings.append(time.perf_counter() - started)
    return timings


def measure_health(plan: Plan) -> Figure:
    calls = plan.health_calls
    figure = Figure("health", f"Health check: {calls} calls of rt.perform_health_check()")
    target = (Target("p99", "<=", 5.0, "<= 5 ms"),)
    for key, label, clock in (("cached", "reading reused (within 1 s)", SystemClock()),
                              ("fresh", "fresh psutil reading every call", _StaleClock())):
        settle(wait_idle=plan.wait_idle)
        timings = asyncio.run(_timings(plan, calls, clock))
        figure.row(key, label, targets=target).add(
            "median", median(timings) * 1000, "ms").add(
            "p99", percentile(timings, 0.99) * 1000, "ms").add(
            "max", max(timings) * 1000, "ms")
    return figure
