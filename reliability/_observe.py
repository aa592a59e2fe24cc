"""What a runtime is doing, counted cheaply on its loop, for metrics and the dashboard.

One ``Telemetry`` per runtime listens to the runtime's events (``Runtime.add_listener``
for workflow events, ``Runtime.add_runtime_listener`` for breakers, dependency calls, loop
lag and health) and keeps plain counters: a dict increment per event, no locks, no label
lookups. The Prometheus collector (``_metrics.py``) and the dashboard's runtime file read
them when asked, so the hot path pays for counting only, never for formatting (the issue's
budget: at most 2 % of the throughput benchmark).

Only label values that are bounded go into the counters: definition and stage names,
outcomes, categories, dependency names. Workflow IDs are kept only for workflows running
now (the dashboard's live view), never as a label.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import os
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._analytics import stage_status
from ._health import HealthStatus, parse_status

if TYPE_CHECKING:
    from ._runtime import Runtime
    from ._state import WorkflowRun

__all__ = ["DURATION_BUCKETS", "LAG_BUCKETS", "SAVE_BUCKETS", "Histogram", "Telemetry",
           "health_level"]

# Seconds. Stages run from milliseconds (tests, no-op stages) to hours (agents).
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0)
SAVE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
LAG_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_RECENT = 200  # breaker transitions and watchdog events kept for the dashboard
_SERIES = 600  # health samples kept (10 minutes at one a second)


def health_level(status: str | HealthStatus) -> int:
    """0 healthy, 1 warning (WARNING, DEGRADED), 2 critical (CRITICAL, FAILED)."""
    parsed = status if isinstance(status, HealthStatus) else parse_status(str(status))
    if parsed is HealthStatus.HEALTHY:
        return 0
    return 2 if parsed in (HealthStatus.CRITICAL, HealthStatus.FAILED) else 1


class Histogram:
    """Cumulative-at-read bucket counts for one label set: ``observe`` is a bisect and two
    additions."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, int]]:
        """``[(le, count), ...]`` as Prometheus exposes buckets, ending with ``+Inf``."""
        total, out = 0, []
        for bound, count in zip((*map(_le, self.bounds), "+Inf"), self.counts, strict=True):
            total += count
            out.append((bound, total))
        return out

    @property
    def count(self) -> int:
        return sum(self.counts)


def _le(bound: float) -> str:
    return repr(float(bound))


class _LiveView:
    """What the dashboard shows of one workflow running now (never persisted)."""

    __slots__ = ("attempt", "definition", "events", "stage", "stage_began", "stage_started",
                 "waiting")

    def __init__(self, definition: str) -> None:
        self.definition = definition
        self.stage: str | None = None
        self.attempt = 0
        self.stage_started = 0.0  # wall time
        self.stage_began = 0.0  # the runtime clock's monotonic time
        self.waiting: dict[str, Any] | None = None  # a retry wait or admission hold
        self.events: list[dict[str, Any]] = []  # warnings, timeouts, retries: wall times


class Telemetry:
    """Counters of one runtime's workflows, stages, breakers, checkpoints and loop.

    ``attach(runtime)`` subscribes it; everything else reads its fields. All of it runs on
    the runtime's loop thread except ``snapshot``/collection, which copy under the GIL.
    """

    def __init__(self) -> None:
        # The runtime's clock once attached (a fake clock in tests): wall times for people,
        # monotonic ones for durations.
        self._now: Callable[[], float] = time.time
        self._monotonic: Callable[[], float] = time.monotonic
        self.started: dict[str, int] = {}
        self.finished: dict[tuple[str, str], int] = {}
        self.workflow_seconds: dict[tuple[str, str], Histogram] = {}
        self.stage_seconds: dict[tuple[str, str, str], Histogram] = {}
        self.retries: dict[tuple[str, str, str], int] = {}
        self.watchdog: dict[tuple[str, str, str], int] = {}
        self.grades: dict[tuple[str, str, str], int] = {}
        self.breaker_states: dict[str, str] = {}
        self.breaker_transitions: deque[dict[str, Any]] = deque(maxlen=_RECENT)
        self.dependency_calls: dict[tuple[str, str], int] = {}
        self.checkpoint_seconds = Histogram(SAVE_BUCKETS)
        self.loop_lag_seconds = Histogram(LAG_BUCKETS)
        self.health: dict[str, int] = {}
        self.health_series: deque[dict[str, Any]] = deque(maxlen=_SERIES)
        self.live: dict[str, _LiveView] = {}
        self._began: dict[str, float] = {}  # workflow ID -> monotonic start, while running
        self._runtime: Runtime | None = None

    # ------------------------------------------------------------------ wiring

    def attach(self, runtime: Runtime) -> Telemetry:
        """Listen to ``runtime``'s events, and time its store's durable saves."""
        self._runtime = runtime
        self._now, self._monotonic = runtime.clock.time, runtime.clock.monotonic
        runtime.add_listener(self.on_event)
        runtime.add_runtime_listener(self.on_runtime_event)
        for name, breaker in runtime.breakers.items():
            self.breaker_states[name] = breaker.state
        _time_saves(runtime.store, self.checkpoint_seconds)
        return self

    # ------------------------------------------------------------------ workflow events

    def on_event(self, event: str, run: WorkflowRun, **data: Any) -> None:
        """A ``Runtime.add_listener`` listener; the stage events come first: most frequent."""
        if event == "stage":
            view = self.live.get(run.workflow_id)
            if view is not None:
                view.stage, view.attempt = data["stage"], data["attempt"]
                view.stage_started = self._now()
                view.stage_began = self._monotonic()
                view.waiting = None
        elif event == "stage_end":
            entry: Mapping[str, Any] = data["entry"]
            definition, stage, status = run.definition_name, entry["stage"], entry["status"]
            duration = float(entry["duration"])
            key = (definition, stage, status)
            histogram = self.stage_seconds.get(key)
            if histogram is None:
                histogram = self.stage_seconds[key] = Histogram(DURATION_BUCKETS)
            histogram.observe(duration)
            if status == "completed":
                baseline = float(entry.get("baseline") or 0.0)
                grade = stage_status(duration / baseline if baseline > 0 else 0.0)
                grade_key = (definition, stage, grade)
                self.grades[grade_key] = self.grades.get(grade_key, 0) + 1
        elif event == "retry":
            self._on_retry(run, data)
        elif event == "watchdog":
            self._on_watchdog(run, data)
        elif event == "started":
            self._on_started(run)
        elif event == "finished":
            self._on_finished(run)
        elif event == "held":
            view = self.live.get(run.workflow_id)
            if view is None:
                view = self.live[run.workflow_id] = _LiveView(run.definition_name)
            view.waiting = {"kind": "health", "status": data.get("status"),
                            "since": self._now()}

    def _on_started(self, run: WorkflowRun) -> None:
        name = run.definition_name
        self.started[name] = self.started.get(name, 0) + 1
        self._began[run.workflow_id] = self._monotonic()
        view = self.live.get(run.workflow_id)
        if view is None:
            self.live[run.workflow_id] = _LiveView(name)
        else:
            view.waiting = None  # held for health, now admitted

    def _on_finished(self, run: WorkflowRun) -> None:
        key = (run.definition_name, run.status)
        self.finished[key] = self.finished.get(key, 0) + 1
        began = self._began.pop(run.workflow_id, None)
        self.live.pop(run.workflow_id, None)
        if began is not None:
            histogram = self.workflow_seconds.get(key)
            if histogram is None:
                histogram = self.workflow_seconds[key] = Histogram(DURATION_BUCKETS)
            histogram.observe(self._monotonic() - began)

    def _on_retry(self, run: WorkflowRun, data: Mapping[str, Any]) -> None:
        stage = data["stage"]
        category = str(run.errors[-1].get("category")) if run.errors else "unknown"
        key = (run.definition_name, stage, category)
        self.retries[key] = self.retries.get(key, 0) + 1
        view = self.live.get(run.workflow_id)
        now = self._now()
        if view is not None:
            histogram_key = (run.definition_name, stage, "retried")
            histogram = self.stage_seconds.get(histogram_key)
            if histogram is None:
                histogram = self.stage_seconds[histogram_key] = Histogram(DURATION_BUCKETS)
            histogram.observe(max(0.0, self._monotonic() - view.stage_began))
            delay = float(data.get("delay") or 0.0)
            view.waiting = {"kind": "retry", "stage": stage, "attempt": data["attempt"] + 1,
                            "since": now, "until": now + delay, "category": category}
            _keep(view.events, {"kind": "retry", "stage": stage, "attempt": data["attempt"],
                                "at": now, "delay": delay, "category": category})

    def _on_watchdog(self, run: WorkflowRun, data: Mapping[str, Any]) -> None:
        stage, level = data["stage"], data["level"]
        key = (run.definition_name, stage, level)
        self.watchdog[key] = self.watchdog.get(key, 0) + 1
        view = self.live.get(run.workflow_id)
        if view is not None:
            _keep(view.events, {"kind": level, "stage": stage, "attempt": view.attempt,
                                "at": self._now()})

    # ------------------------------------------------------------------ runtime events

    def on_runtime_event(self, event: str, **data: Any) -> None:
        """A ``Runtime.add_runtime_listener`` listener."""
        if event == "dependency_call":
            key = (data["dependency"], data["outcome"])
            self.dependency_calls[key] = self.dependency_calls.get(key, 0) + 1
        elif event == "loop_lag":
            self.loop_lag_seconds.observe(data["seconds"])
        elif event == "breaker":
            name, state = data["dependency"], data["state"]
            previous = self.breaker_states.get(name, "closed")
            self.breaker_states[name] = state
            self.breaker_transitions.append({"dependency": name, "from": previous,
                                             "to": state, "at": self._now()})
        elif event == "health":
            self._on_health(data)

    def _on_health(self, data: Mapping[str, Any]) -> None:
        check = data["check"]
        self.health["system"] = health_level(check.status)
        for name, answer in (check.custom or {}).items():
            self.health[str(name)] = health_level(str(answer.get("status", "HEALTHY")))

    def sample_resources(self, cpu: float, memory: float, disk: float,
                         loop_lag_ms: float | None) -> None:
        """One point of the dashboard's resource series (the publisher samples each second)."""
        self.health_series.append({"at": self._now(), "cpu": cpu, "memory": memory,
                                   "disk": disk, "loop_lag_ms": loop_lag_ms})

    # ------------------------------------------------------------------ reading

    def current(self) -> dict[tuple[str, str], int]:
        """``(definition, state) -> count`` of workflows in this process now."""
        counts: dict[tuple[str, str], int] = {}
        for view in list(self.live.values()):
            waiting = view.waiting
            state = "running" if waiting is None else (
                "waiting_retry" if waiting["kind"] == "retry" else "held")
            key = (view.definition, state)
            counts[key] = counts.get(key, 0) + 1
        return counts

    def snapshot(self) -> dict[str, Any]:
        """The runtime's live picture as JSON: what the dashboard reads from the runtime file."""
        runtime = self._runtime
        breakers = {}
        if runtime is not None:
            breakers = {name: b.snapshot() for name, b in list(runtime.breakers.items())}
        return {
            "pid": os.getpid(),
            "at": self._now(),
            "breakers": breakers,
            "breaker_transitions": list(self.breaker_transitions),
            "health": dict(self.health),
            "series": list(self.health_series),
            "loop_lag_ms": runtime.loop_lag_ms if runtime is not None else None,
            "workflows": {
                workflow_id: {"definition": v.definition, "stage": v.stage,
                              "attempt": v.attempt, "stage_started": v.stage_started,
                              "waiting": v.waiting, "events": list(v.events)}
                for workflow_id, v in list(self.live.items())},
        }


def _keep(events: list[dict[str, Any]], event: dict[str, Any]) -> None:
    events.append(event)
    del events[:-50]


SAVE_SAMPLE = 16  # one durable save in this many is timed


def _time_saves(store: Any, histogram: Histogram) -> None:
    """Time durable saves (call to durable) by wrapping the store's ``save_nowait``, which
    ``save`` also goes through; any store with that method works, none is edited.

    One save in ``SAVE_SAMPLE`` is timed: a done-callback on every save cost the
    throughput benchmark ~5 %; a sample keeps the distribution and costs a counter. The
    histogram's count is therefore the number of saves timed, not of saves made.
    """
    original = getattr(store, "save_nowait", None)
    if original is None or getattr(original, "_timed", False):
        return
    monotonic = time.monotonic
    countdown = [SAVE_SAMPLE]

    def timed(workflow_id: str, snapshot: Any, **options: Any) -> asyncio.Future[None]:
        countdown[0] -= 1
        if countdown[0]:
            return original(workflow_id, snapshot, **options)  # type: ignore[no-any-return]
        countdown[0] = SAVE_SAMPLE
        began = monotonic()
        future: asyncio.Future[None] = original(workflow_id, snapshot, **options)
        future.add_done_callback(lambda _: histogram.observe(monotonic() - began))
        return future

    timed._timed = True  # type: ignore[attr-defined]
    with contextlib.suppress(AttributeError):  # a store with __slots__: not timed
        store.save_nowait = timed


class RuntimeFile:
    """Publishes a runtime's ``Telemetry.snapshot()`` to ``DIR/runtime-PID.json`` about once
    a second, so a dashboard in another process shows breakers, health and live stages.

    Written from a thread (atomic rename); the loop only builds the snapshot. Removed when
    the runtime closes.
    """

    def __init__(self, telemetry: Telemetry, directory: Path, *, period: float = 1.0) -> None:
        self._telemetry = telemetry
        self.path = directory / f"runtime-{os.getpid()}.json"
        self._period = period
        self._task: asyncio.Task[None] | None = None

    def start(self, runtime: Runtime) -> None:
        self._task = asyncio.get_running_loop().create_task(self._publish(runtime),
                                                            name="runtime-file")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(OSError):
            await asyncio.to_thread(self.path.unlink)

    async def _publish(self, runtime: Runtime) -> None:
        import orjson

        from ._health import HealthSampler

        sampler = HealthSampler(runtime.project_root, runtime.clock, min_interval=0.0)
        while True:
            sample = await asyncio.to_thread(sampler.sample)
            self._telemetry.sample_resources(sample.cpu, sample.memory, sample.disk,
                                             runtime.loop_lag_ms)
            document = orjson.dumps(self._telemetry.snapshot(), default=str)
            # A failed write: the dashboard shows the runtime as gone; the workflows go on.
            with contextlib.suppress(OSError):
                await asyncio.to_thread(_write_atomically, self.path, document)
            await asyncio.sleep(self._period)


def _write_atomically(path: Path, document: bytes) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temporary = path.with_suffix(f".{os.getpid()}.tmp")
    temporary.write_bytes(document)
    os.replace(temporary, path)
