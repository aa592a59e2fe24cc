"""Fair turns: how many workflows may start a stage in one event-loop iteration.

Why: asyncio runs every callback that is ready at the start of an iteration before it
looks at timers or sockets again. With thousands of workflows whose stages are short,
all of them become ready at once (a durable batch wakes them together), one iteration
runs a stage of each, and every timer, socket read and watchdog waits for the whole lot:
hundreds of milliseconds of loop lag at 10,000 workflows.

So a workflow asks for a turn before each stage. While fewer than ``per_iteration``
workflows have started a stage in this iteration, the turn is granted at once (no
``await``, no allocation: the unsaturated loop pays a counter). Past that, workflows
queue here in arrival order and a pump grants ``per_iteration`` of them per iteration.
The wait then happens in this queue, where it costs nothing, instead of in the loop's
ready queue, where it delays everything else.
"""

from __future__ import annotations

import asyncio
import collections
import time

__all__ = ["Turns"]

# What one busy iteration may take: well under the 10 ms loop-lag target, so a timer or
# socket is served within a few milliseconds even at 10,000 workflows.
TARGET_ITERATION_SECONDS = 0.001
# Turns per iteration adapt between these: what a turn costs varies (a stage start is
# 30-80 us of loop time; a workflow's last stage also runs its ending).
MIN_TURNS, START_TURNS, MAX_TURNS = 8, 64, 4096


class Turns:
    """Grants turns in arrival order, as many per loop iteration as fit its time budget."""

    __slots__ = ("_busy_since", "_granted", "_loop", "_per_iteration", "_pump_scheduled",
                 "_target", "_turn_cost", "_waiting")

    def __init__(self, target_iteration_seconds: float = TARGET_ITERATION_SECONDS) -> None:
        if target_iteration_seconds <= 0:
            raise ValueError("target_iteration_seconds must be > 0")
        self._target = target_iteration_seconds
        self._per_iteration = START_TURNS
        self._granted = 0
        self._waiting: collections.deque[asyncio.Future[None]] = collections.deque()
        self._pump_scheduled = False
        self._busy_since = 0.0  # when the previous pump ran, if it rescheduled itself
        self._turn_cost = 0.0  # smoothed loop seconds per granted turn
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def per_iteration(self) -> int:
        return self._per_iteration

    def take(self) -> asyncio.Future[None] | None:
        """None if the turn is granted now; otherwise a future to await for it."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._running_loop()
        if self._granted < self._per_iteration and not self._waiting:
            # Every stage of every workflow comes here: _schedule_pump, inlined.
            self._granted += 1
            if not self._pump_scheduled:
                self._pump_scheduled = True
                loop.call_soon(self._pump)
            return None
        waiter = loop.create_future()
        self._waiting.append(waiter)
        self._schedule_pump(loop)
        return waiter

    async def turn(self) -> None:
        """Wait for a turn (returns at once when the loop is not saturated)."""
        waiter = self.take()
        if waiter is not None:
            await waiter

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # a Runtime may be reused by a later asyncio.run()
            self._loop, self._granted, self._pump_scheduled = loop, 0, False
            self._busy_since = 0.0
            self._waiting.clear()
        return loop

    def _schedule_pump(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._pump_scheduled:
            self._pump_scheduled = True
            loop.call_soon(self._pump)

    def _pump(self) -> None:
        """Once per iteration while busy: a fresh allowance, spent on the queue first."""
        self._pump_scheduled = False
        self._adapt()
        self._granted = 0
        waiting = self._waiting
        while waiting and self._granted < self._per_iteration:
            waiter = waiting.popleft()
            if not waiter.done():  # its task was cancelled while it queued
                waiter.set_result(None)
                self._granted += 1
        if waiting or self._granted:
            self._schedule_pump(self._running_loop())
            # Real elapsed time on purpose (not the runtime's clock): this measures how long
            # the loop's CPU work took, which a fake clock does not model.
            self._busy_since = time.perf_counter()
        else:
            self._busy_since = 0.0

    def _adapt(self) -> None:
        """Fit the allowance to what a turn has cost lately: the last iteration's length
        over the turns granted in it, smoothed. Only back-to-back pumps count (the ready
        queue was never empty between them, so the gap is all work, no idling)."""
        if not self._busy_since or not self._granted:
            return
        cost = (time.perf_counter() - self._busy_since) / self._granted
        self._turn_cost = cost if not self._turn_cost else 0.8 * self._turn_cost + 0.2 * cost
        fitting = int(self._target / self._turn_cost)
        self._per_iteration = max(MIN_TURNS, min(MAX_TURNS, fitting))
