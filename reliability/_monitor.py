"""Runtime-level watchers: event-loop lag, health checks during long stages, admission control.

One ``RuntimeMonitor`` per runtime owns three cheap things:

- ``LoopLagMonitor``: a task on the loop measures how late it wakes (the loop's lag, kept
  as a p99 over the last minute), and a watchdog *thread* notices when those wake-ups stop
  and samples the loop thread's stack to name the stage handler that blocks it.
- ``periodic_health_checks``: one task that runs a health check for every workflow whose
  current stage has run longer than ``health_check_interval`` (and again each interval).
- ``AdmissionGate``: while system health is CRITICAL, new workflows wait before starting;
  those already running go on. It re-checks on the runtime's clock until health recovers.
"""

from __future__ import annotations

import asyncio
import bisect
import functools
import inspect
import sys
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass
from types import CodeType, FrameType
from typing import TYPE_CHECKING, Any

from ._clock import Clock
from ._health import HealthStatus
from ._logging import logger, workflow_id_var

if TYPE_CHECKING:
    from ._engine import LiveWorkflow
    from ._host import MonitorHost
    from ._state import WorkflowRun

__all__ = ["ADMISSION_RECHECK_SECONDS", "LAG_WARNING_SECONDS", "AdmissionGate", "Blocker",
           "LoopLagMonitor", "RuntimeMonitor", "find_blocker", "handler_name",
           "periodic_health_checks"]

LAG_WARNING_SECONDS = 0.25  # a stall this long is logged, naming what blocked the loop
ADMISSION_RECHECK_SECONDS = 5.0
_TICK_SECONDS = 0.1
_WATCHDOG_SECONDS = 0.05
_WINDOW_TICKS = 600  # one minute of samples at one tick per 0.1 s
_STILL_BLOCKED_SECONDS = 5.0  # report a stall while it lasts, in case it never ends
_HEALTH_FRESH_SECONDS = 1.0  # one admission check answers every start within this window


# --------------------------------------------------------------------------- blockers


@dataclass(frozen=True, slots=True)
class Blocker:
    """What the loop's thread was running during a stall, and the heartbeat it stalled at."""

    description: str
    workflow_id: str | None
    beat: float


def _unwrapped(handler: object) -> object:
    target = inspect.unwrap(handler) if callable(handler) else handler
    while isinstance(target, functools.partial):
        target = target.func
    return getattr(target, "__func__", target)  # a bound method's function


def handler_code(handler: object) -> CodeType | None:
    """The code object a stage handler runs, so a stack frame can be matched to it."""
    target = _unwrapped(handler)
    code = getattr(target, "__code__", None)
    if code is None and callable(target):  # a callable object: its __call__ runs
        code = getattr(type(target).__call__, "__code__", None)
    return code if isinstance(code, CodeType) else None


def handler_name(handler: object) -> str:
    """``module:qualname`` of a handler, as people find it in their code."""
    target = _unwrapped(handler)
    module = getattr(target, "__module__", None) or "?"
    name = getattr(target, "__qualname__", None) or type(target).__qualname__
    return f"{module}:{name}"


def _where(frame: FrameType) -> str:
    code = frame.f_code
    module = frame.f_globals.get("__name__", "?")
    return f"{module}:{code.co_qualname} ({code.co_filename}:{frame.f_lineno})"


def find_blocker(frame: FrameType, task: asyncio.Task[Any] | None, lives: Iterable[LiveWorkflow],
                 beat: float) -> Blocker:
    """Name the stage handler on the stack that starts at ``frame`` (innermost first).

    Workflows of one definition share handler code; the one whose task was running
    (``task``) is named, else the first found in a handler.
    """
    by_code: dict[CodeType, list[LiveWorkflow]] = {}
    for live in lives:
        spec = live.stage_spec
        if live.in_handler and spec is not None:
            code = handler_code(spec.handler)
            if code is not None:
                by_code.setdefault(code, []).append(live)
    innermost = frame
    current: FrameType | None = frame
    while current is not None:
        candidates = by_code.get(current.f_code)
        if candidates:
            live = next((c for c in candidates if c.task is task), candidates[0])
            spec = live.stage_spec
            assert spec is not None
            inside = "" if current is innermost else f", in {_where(innermost)}"
            return Blocker(f"handler {handler_name(spec.handler)} (stage {spec.name} of "
                           f"workflow {live.run.workflow_id}){inside}",
                           live.run.workflow_id, beat)
        current = current.f_back
    return Blocker(f"{_where(innermost)}, outside any stage handler", None, beat)


# --------------------------------------------------------------------------- loop lag


class LoopLagMonitor:
    """Measures the event loop's lag and names the stage handler that blocks it.

    Invariant: the loop only ever does O(window) work per tick; every stack sample is
    taken by the watchdog thread, which never waits on the loop. The warning for a stall
    is logged when the loop wakes again, with the stall's full duration; a stall longer
    than 5 s is also reported while it lasts, in case it never ends.
    """

    def __init__(self, lives: Callable[[], list[LiveWorkflow]], *,
                 threshold: float = LAG_WARNING_SECONDS, tick: float = _TICK_SECONDS,
                 on_sample: Callable[[float], None] | None = None,
                 on_lag: Callable[[float], None] | None = None) -> None:
        self._lives = lives
        self._on_lag = on_lag  # each lag measured, in seconds (the metrics' histogram)
        self._threshold = threshold
        self._tick = tick
        self._on_sample = on_sample
        self._lags: deque[float] = deque(maxlen=_WINDOW_TICKS)
        self._sorted: list[float] = []
        self._beat = time.monotonic()
        self._blocker: Blocker | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._tick_started = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    @property
    def p99_ms(self) -> float:
        """The 99th percentile of the lags measured over the last minute, in milliseconds."""
        if not self._sorted:
            return 0.0
        index = min(len(self._sorted) - 1, round(0.99 * (len(self._sorted) - 1)))
        return round(self._sorted[index] * 1000.0, 1)

    def start(self) -> None:
        """Start the ticker on the running loop and the watchdog thread."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._schedule_tick(time.monotonic())
        self._thread = threading.Thread(target=self._watch, name="loop-watchdog", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Stop both, reporting a stall that has just ended; returns once the thread ended."""
        self._stopping.set()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._measure(time.monotonic())
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    def _schedule_tick(self, now: float) -> None:
        # A timer callback, not a task: it runs the moment the loop is free again, even
        # if the loop was blocked before a task could take its first step.
        self._beat = self._tick_started = now
        assert self._loop is not None
        self._timer = self._loop.call_later(self._tick, self._on_tick)

    def _on_tick(self) -> None:
        now = time.monotonic()
        self._measure(now)
        self._schedule_tick(now)

    def _measure(self, now: float) -> None:
        lag = max(0.0, now - self._tick_started - self._tick)
        self._record(lag)
        if lag >= self._threshold:
            self._report(lag, self._beat)

    def _record(self, lag: float) -> None:
        if len(self._lags) == self._lags.maxlen:
            oldest = self._lags[0]
            del self._sorted[bisect.bisect_left(self._sorted, oldest)]
        self._lags.append(lag)
        bisect.insort(self._sorted, lag)
        if self._on_sample is not None:
            self._on_sample(self.p99_ms)
        if self._on_lag is not None:
            self._on_lag(lag)

    def _report(self, stall: float, beat_before: float) -> None:
        blocker, self._blocker = self._blocker, None
        if blocker is None or blocker.beat != beat_before:
            logger.warning("Event loop blocked for %.1fs by code the watchdog could not "
                           "sample (the stall was shorter than its period)", stall)
            return
        extra = {"workflow_id": blocker.workflow_id} if blocker.workflow_id else {}
        logger.warning("Event loop blocked for %.1fs by %s; blocking code belongs in "
                       "asyncio.to_thread or a subprocess", stall, blocker.description,
                       extra=extra)

    def _watch(self) -> None:
        reported_beat: float | None = None
        while not self._stopping.wait(_WATCHDOG_SECONDS):
            try:
                reported_beat = self._sample_if_stalled(reported_beat)
            except Exception:  # the watchdog must outlive any surprise in a stack walk
                logger.debug("Loop watchdog sample failed", exc_info=True)

    def _sample_if_stalled(self, reported_beat: float | None) -> float | None:
        beat = self._beat
        silent = time.monotonic() - beat - self._tick
        loop = self._loop
        if silent < self._threshold / 2 or loop is None or not loop.is_running():
            return reported_beat
        frame = sys._current_frames().get(self._loop_thread)
        if frame is None:
            return reported_beat
        try:
            blocker = find_blocker(frame, asyncio.current_task(loop), self._lives(), beat)
        finally:
            del frame  # a frame keeps every local of the blocked code alive
        kept = self._blocker
        if kept is None or kept.beat != beat or kept.workflow_id is None:
            self._blocker = blocker
        if silent >= _STILL_BLOCKED_SECONDS and reported_beat != beat:
            logger.warning("Event loop blocked for %.1fs so far by %s", silent,
                           blocker.description)
            return beat
        return reported_beat


# --------------------------------------------------------------------------- health


async def periodic_health_checks(host: MonitorHost) -> None:
    """Forever: health-check each workflow whose stage has run past the interval.

    One task for the whole runtime; it wakes four times per interval, so a long stage is
    checked within a quarter interval of each interval passing.
    """
    interval = host.config.health_check_interval
    clock = host.clock
    last_checked: dict[str, float] = {}
    while True:
        await clock.sleep(interval / 4)
        now = clock.monotonic()
        running = set()
        for live in host.live_workflows():
            workflow_id = live.run.workflow_id
            running.add(workflow_id)
            since = max(live.stage_started, last_checked.get(workflow_id, float("-inf")))
            if live.in_handler and now - since >= interval:
                last_checked[workflow_id] = now
                stage = live.stage_spec.name if live.stage_spec else str(live.run.current_stage)
                host.spawn(_check_long_stage(host, live.run, stage), f"health-{workflow_id}")
        for workflow_id in [w for w in last_checked if w not in running]:
            del last_checked[workflow_id]


async def _check_long_stage(host: MonitorHost, run: WorkflowRun, stage: str) -> None:
    token = workflow_id_var.set(run.workflow_id)
    try:
        await host.stage_health_check(run, f"during long stage {stage}")
    finally:
        workflow_id_var.reset(token)


class AdmissionGate:
    """Holds new workflows while system health is CRITICAL; running ones are not touched.

    One health check answers every workflow that starts within a second of it, so
    thousands starting at once cost one check. While CRITICAL, one task re-checks every
    ``recheck_seconds`` on the runtime's clock; held workflows start when it recovers, or
    at once when ``release()`` is called (shutdown).
    """

    def __init__(self, check: Callable[[], Awaitable[HealthStatus]], clock: Clock,
                 spawn: Callable[[Coroutine[Any, Any, Any], str], None], *,
                 recheck_seconds: float = ADMISSION_RECHECK_SECONDS) -> None:
        self._check = check
        self._clock = clock
        self._spawn = spawn
        self._recheck_seconds = recheck_seconds
        self._status = HealthStatus.HEALTHY
        self._checked_at = float("-inf")
        self._lock = asyncio.Lock()
        self._held: asyncio.Event | None = None  # set when holding ends
        self._released = False

    @property
    def holding(self) -> bool:
        return self._held is not None

    async def admit(self, on_hold: Callable[[HealthStatus], None]) -> None:
        """Return when a new workflow may start; call ``on_hold`` first if it must wait."""
        if self._released:
            return
        if self._held is None:
            status = await self._fresh_status()
            if status is not HealthStatus.CRITICAL or self._released:
                return
            if self._held is None:
                self._hold(status)
        held = self._held
        if held is None:
            return
        on_hold(self._status)
        await held.wait()

    def release(self) -> None:
        """Let every held workflow go now and hold no more (the runtime is stopping)."""
        self._released = True
        if self._held is not None:
            self._held.set()

    async def _fresh_status(self) -> HealthStatus:
        async with self._lock:
            if self._clock.monotonic() - self._checked_at >= _HEALTH_FRESH_SECONDS:
                self._status = await self._check()
                self._checked_at = self._clock.monotonic()
            return self._status

    def _hold(self, status: HealthStatus) -> None:
        self._held = asyncio.Event()
        logger.warning("System health is %s: new workflows wait until it recovers "
                       "(re-checked every %gs); running workflows continue", status,
                       self._recheck_seconds)
        self._spawn(self._recheck_until_recovered(self._held), "admission-recheck")

    async def _recheck_until_recovered(self, held: asyncio.Event) -> None:
        try:
            while not self._released:
                await self._clock.sleep(self._recheck_seconds)
                self._status = await self._check()
                self._checked_at = self._clock.monotonic()
                if self._status is not HealthStatus.CRITICAL:
                    logger.warning("System health is %s again: starting held workflows",
                                   self._status)
                    return
        finally:
            self._held = None
            held.set()


# --------------------------------------------------------------------------- together


class RuntimeMonitor:
    """The watchers of one runtime, started in ``Runtime.start`` and stopped in ``close``.

    It uses the runtime only through ``MonitorHost`` (``_host.py``).
    """

    def __init__(self, host: MonitorHost) -> None:
        self._host = host
        self.loop_lag: LoopLagMonitor | None = None
        self.admission: AdmissionGate | None = None

    def start(self) -> None:
        host = self._host
        config = host.config
        if config.enable_monitoring:
            self.loop_lag = LoopLagMonitor(host.live_workflows, on_sample=self._set_lag,
                                           on_lag=self._notify_lag)
            self.loop_lag.start()
        if config.enable_health_checks:
            host.spawn(periodic_health_checks(host), "periodic-health-checks")
            self.admission = AdmissionGate(self._health_status, host.clock, host.spawn)

    async def stop(self) -> None:
        self.release()
        if self.loop_lag is not None:
            await self.loop_lag.stop()

    def release(self) -> None:
        if self.admission is not None:
            self.admission.release()

    async def admit(self, run: WorkflowRun) -> None:
        """Wait until ``run`` may start (health not CRITICAL), telling listeners if held."""
        if self.admission is None:
            return

        def on_hold(status: HealthStatus) -> None:
            token = workflow_id_var.set(run.workflow_id)
            try:
                logger.info("Waiting for system health (%s) to recover before starting",
                            status)
            finally:
                workflow_id_var.reset(token)
            self._host.emit("held", run, status=status.value)

        await self.admission.admit(on_hold)

    def _set_lag(self, p99_ms: float) -> None:
        self._host.loop_lag_ms = p99_ms

    def _notify_lag(self, seconds: float) -> None:
        self._host.notify("loop_lag", seconds=seconds)

    async def _health_status(self) -> HealthStatus:
        return (await self._host.perform_health_check()).status
