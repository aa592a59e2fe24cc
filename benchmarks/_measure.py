"""Measuring instruments: loop lag ticker, timed store saves, percentiles, memory.

They wrap the library from outside (a ticker task, an instance attribute over
``store.save``) so the library carries no benchmark code.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import statistics
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import psutil

__all__ = ["CallTimer", "FutureTimer", "LagMonitor", "idle_wake_penalty", "lag_monitor",
           "median", "peak_rss", "percentile", "rss_bytes", "settle"]


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile; 0.0 for no values (a figure with nothing to time)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else 0.0


class LagMonitor:
    """A task that sleeps ``interval`` seconds and records how late each wake-up was.

    The overshoot is how long some other callback held the loop: what every workflow's
    timer, socket read and watchdog waited on top of its own work.
    """

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.lags: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(self.interval)
            self.lags.append(max(0.0, time.perf_counter() - before - self.interval))

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._tick(), name="lag-monitor")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def p99_ms(self) -> float:
        return percentile(self.lags, 0.99) * 1000

    def max_ms(self) -> float:
        return max(self.lags, default=0.0) * 1000


@contextlib.asynccontextmanager
async def lag_monitor(interval: float = 0.01) -> AsyncIterator[LagMonitor]:
    monitor = LagMonitor(interval)
    monitor.start()
    try:
        yield monitor
    finally:
        await monitor.stop()


class PeakRss:
    """The process's RSS read every ``interval`` by a thread (not the loop, whose time is
    being measured) while the block runs; ``growth`` is the peak less the reading before."""

    def __init__(self, interval: float) -> None:
        self._interval = interval
        self._stop = threading.Event()
        self.before = rss_bytes()
        self.peak = self.before
        self._thread = threading.Thread(target=self._sample, name="peak-rss", daemon=True)

    @property
    def growth(self) -> int:
        return max(self.peak - self.before, 0)

    def _sample(self) -> None:
        process = psutil.Process()
        while not self._stop.wait(self._interval):
            self.peak = max(self.peak, process.memory_info().rss)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


@contextlib.asynccontextmanager
async def peak_rss(interval: float = 0.05) -> AsyncIterator[PeakRss]:
    sampler = PeakRss(interval)
    sampler.start()
    try:
        yield sampler
    finally:
        sampler.stop()


class _Latencies:
    def __init__(self) -> None:
        self.latencies: list[float] = []

    def p50_ms(self) -> float:
        return percentile(self.latencies, 0.50) * 1000

    def p99_ms(self) -> float:
        return percentile(self.latencies, 0.99) * 1000

    def total(self) -> float:
        return sum(self.latencies)


class CallTimer(_Latencies):
    """Times every call of one async method of one object by shadowing the bound method."""

    def __init__(self, target: Any, method: str) -> None:
        super().__init__()
        self._inner: Callable[..., Awaitable[Any]] = getattr(target, method)
        setattr(target, method, self._timed)

    async def _timed(self, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return await self._inner(*args, **kwargs)
        finally:
            self.latencies.append(time.perf_counter() - started)


class FutureTimer(_Latencies):
    """Times a method that returns a future: from the call until the future is done.

    For ``store.save_nowait`` (every save goes through it, awaited or not) each latency
    runs from the call until the write is durable. With ``sample_every=n`` only every
    n-th call is timed: a done-callback per save is ~5 % of a durable transition's cost,
    which timing all of them would take from the rate measured in the same run.
    """

    def __init__(self, target: Any, method: str, *, sample_every: int = 1) -> None:
        super().__init__()
        self._submit: Callable[..., asyncio.Future[Any]] = getattr(target, method)
        self._sample_every = sample_every
        self._calls = 0
        setattr(target, method, self._timed)

    def _timed(self, *args: Any, **kwargs: Any) -> asyncio.Future[Any]:
        self._calls += 1
        if self._calls % self._sample_every:
            return self._submit(*args, **kwargs)
        started = time.perf_counter()
        future = self._submit(*args, **kwargs)
        if future.done():  # durable already (MemoryStore): not a loop iteration later
            self.latencies.append(time.perf_counter() - started)
        else:
            future.add_done_callback(
                lambda _: self.latencies.append(time.perf_counter() - started))
        return future


def rss_bytes() -> int:
    return int(psutil.Process().memory_info().rss)


QUIET_CPU_PERCENT = 20.0  # the whole machine's, over half a second
SETTLE_LIMIT = 20.0  # seconds: a machine never this quiet is measured as it is


def settle(*, wait_idle: bool = True) -> None:
    """Start each figure on a quiet machine: garbage collected twice, the previous
    figure's files written back (``sync``) and the CPUs idle again.

    Without the last two, the kernel's writeback and block discards of the previous
    figure's tens of thousands of files took a core from the next one: the same FileStore
    case measured 8.5k then 17k transitions/s in one process, its loop thread on a CPU
    48 % then 87 % of the time.

    ``wait_idle=False`` (``--no-wait-idle``) only collects garbage: for the tests, which
    check the harness's output and not its numbers, on a machine that is never idle
    (waiting there took up to ``SETTLE_LIMIT`` per figure).
    """
    gc.collect()
    gc.collect()
    if not wait_idle:
        return
    os.sync()
    deadline = time.monotonic() + SETTLE_LIMIT
    while psutil.cpu_percent(interval=0.5) > QUIET_CPU_PERCENT and time.monotonic() < deadline:
        pass


def _bookkeeping_like_work() -> int:
    """~25 us (here) of the kind of work a stage's bookkeeping does: build a state and
    encode it."""
    history = [{"stage": f"s{i}", "duration": i / 7, "attempts": 1, "status": "completed"}
               for i in range(19)]
    state = {"workflow_id": "wf-0123456789ab", "stages": [h["stage"] for h in history],
             "monitoring_state": {"stage_history": history, "errors": []}}
    return len(json.dumps(state, sort_keys=True))


def idle_wake_penalty(idle: float, samples: int = 50) -> tuple[float, float]:
    """Median seconds of the same work run back to back, and right after ``idle`` seconds
    of sleep. Where an idle CPU halts (a virtual machine's vCPU, deep C-states) the second
    is slower (1.6-3.9x on the machine the README reports), as caches and predictors are
    refilled: a cost every stage's bookkeeping pays after its handler's I/O, which only
    doing less work reduces."""
    hot: list[float] = []
    after_idle: list[float] = []
    for _ in range(samples):
        _bookkeeping_like_work()
        started = time.perf_counter()
        _bookkeeping_like_work()
        hot.append(time.perf_counter() - started)
        time.sleep(idle)
        started = time.perf_counter()
        _bookkeeping_like_work()
        after_idle.append(time.perf_counter() - started)
    return median(hot), median(after_idle)
