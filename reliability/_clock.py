"""The one place every clock read, timer and sleep goes through.

``SystemClock`` is the event loop's own clock. ``FakeClock`` is a virtual clock for tests:
time only moves when told to (``advance``) or, with ``autojump``, when every task is
blocked waiting on it, so a 30-minute timeout is tested in microseconds and at exact
virtual times.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from typing import Protocol

__all__ = ["Clock", "FakeClock", "SystemClock", "TimerHandle"]


class TimerHandle(Protocol):
    def cancel(self) -> None: ...


class Clock(Protocol):
    """What the runtime needs of time; both clocks below provide it."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back; only differences mean anything."""
        ...

    def time(self) -> float:
        """Wall-clock seconds since the epoch, for timestamps people read."""
        ...

    async def sleep(self, seconds: float) -> None: ...

    def call_later(self, seconds: float, callback: Callable[[], None]) -> TimerHandle:
        """Run ``callback`` on the event loop after ``seconds``; cancel() stops it."""
        ...


class SystemClock:
    """Real time: the running loop's monotonic clock and its timers."""

    __slots__ = ()

    # The C functions themselves, not methods that call them: the engine reads the clock
    # ~6 times per stage, and a Python frame each was ~2 % of its instructions.
    monotonic = staticmethod(time.monotonic)
    time = staticmethod(time.time)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))

    def call_later(self, seconds: float, callback: Callable[[], None]) -> TimerHandle:
        return asyncio.get_running_loop().call_later(max(0.0, seconds), callback)


class _FakeTimer:
    __slots__ = ("callback", "cancelled", "deadline")

    def __init__(self, deadline: float, callback: Callable[[], None]) -> None:
        self.deadline = deadline
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeClock:
    """A virtual clock. Invariant: ``monotonic()`` only changes inside ``advance``."""

    def __init__(self, *, start: float = 0.0, wall_start: float = 1_700_000_000.0) -> None:
        self._now = start
        self._wall_offset = wall_start - start
        self._timers: list[tuple[float, int, _FakeTimer]] = []
        self._sequence = itertools.count()

    def monotonic(self) -> float:
        return self._now

    def time(self) -> float:
        return self._now + self._wall_offset

    def call_later(self, seconds: float, callback: Callable[[], None]) -> TimerHandle:
        timer = _FakeTimer(self._now + max(0.0, seconds), callback)
        heapq.heappush(self._timers, (timer.deadline, next(self._sequence), timer))
        return timer

    async def sleep(self, seconds: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def wake() -> None:
            if not future.done():
                future.set_result(None)

        timer = self.call_later(seconds, wake)
        try:
            await future
        finally:
            timer.cancel()

    def next_deadline(self) -> float | None:
        """The virtual time of the earliest live timer, or None when there is none."""
        while self._timers and self._timers[0][2].cancelled:
            heapq.heappop(self._timers)
        return self._timers[0][0] if self._timers else None

    def advance(self, seconds: float) -> None:
        """Move time forward, firing every timer due on the way, each at its own time."""
        target = self._now + seconds
        while (deadline := self.next_deadline()) is not None and deadline <= target:
            _, _, timer = heapq.heappop(self._timers)
            self._now = max(self._now, deadline)
            timer.callback()
        self._now = target

    @asynccontextmanager
    async def autojump(self) -> AsyncIterator[FakeClock]:
        """While inside, jump to the next timer whenever no task can make progress.

        "No progress" means the loop has nothing ready to run besides this driver. Work
        that waits on threads or sockets is invisible to it, so tests on a fake clock use
        the in-memory store.
        """
        driver = asyncio.create_task(self._jump_when_idle())
        try:
            yield self
        finally:
            driver.cancel()
            with suppress(asyncio.CancelledError):
                await driver

    async def _jump_when_idle(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            # Several yields let chains of ready callbacks (task wake-ups) settle first.
            for _ in range(4):
                await asyncio.sleep(0)
            if _loop_has_ready_work(loop):
                continue
            deadline = self.next_deadline()
            if deadline is not None:
                self.advance(deadline - self._now)
            else:
                await asyncio.sleep(0.0005)


def _loop_has_ready_work(loop: asyncio.AbstractEventLoop) -> bool:
    ready = getattr(loop, "_ready", None)  # CPython's run queue; absent on other loops
    return bool(ready) if ready is not None else False
