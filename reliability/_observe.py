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
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._health import HealthStatus, parse_status

if TYPE_CHECKING:
    from ._runtime import Runtime
    from ._state import WorkflowRun

__all__ = ["DURATION_BUCKETS", "LAG_BUCKETS", "LIVE_LIMIT", "SAVE_BUCKETS", "WORKFLOW_EVENTS",
           "Histogram", "LivePublisher", "RuntimeFile", "SaveSampler", "Telemetry",
           "health_level", "live_publisher", "runtime_directory"]

# Seconds. Stages run from milliseconds (tests, no-op stages) to hours (agents).
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0)
SAVE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
LAG_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
WORKFLOW_EVENTS = ("started", "finished", "retry", "watchdog", "held")  # none per stage
LIVE_LIMIT = 1000  # running workflows described in the runtime file
_RECENT = 200  # breaker transitions and watchdog events kept for the dashboard
_SERIES = 600  # health samples kept (10 minutes at one a second)


def runtime_directory(runtime: Runtime) -> Path:
    """Where running processes publish their live view: beside the workflows' states."""
    return runtime.resolve_path(runtime.config.state_directory) / ".runtime"


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


_FAST, _SLOW = 0.8, 1.2  # as _analytics.stage_status grades a stage against its baseline
_GRADE_NAMES = ("fast", "normal", "slow")


class _StageCounts:
    """One stage's duration histograms by outcome and its completed attempts' grades."""

    __slots__ = ("completed", "grades", "histograms")

    def __init__(self) -> None:
        self.histograms: dict[str, Histogram] = {}
        self.completed: Histogram | None = None  # histograms["completed"], looked up once
        self.grades = [0, 0, 0]  # fast, normal, slow


class Telemetry:
    """Counters of one runtime's workflows, stages, breakers, checkpoints and loop.

    ``attach(runtime)`` subscribes it to the few events that are not per stage (start,
    end, retry, watchdog, health hold). Stage durations and grades are folded from each
    workflow's own stage history, which the engine keeps anyway: when it ends, and for
    running workflows whenever the counters are read (a scrape, the runtime file). So a
    stage costs the runtime nothing more with metrics on. Folding is under a lock because
    a scrape reads from the metrics server's thread.
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
        # Per definition, per stage: its histograms by outcome and its grade counts (the
        # same histograms as stage_seconds), so folding a history entry builds no key.
        self._stages: dict[str, dict[str, _StageCounts]] = {}
        self.breaker_states: dict[str, str] = {}
        self.breaker_transitions: deque[dict[str, Any]] = deque(maxlen=_RECENT)
        self.dependency_calls: dict[tuple[str, str], int] = {}
        self.checkpoint_seconds = Histogram(SAVE_BUCKETS)
        self.loop_lag_seconds = Histogram(LAG_BUCKETS)
        self.health: dict[str, int] = {}
        self.health_series: deque[dict[str, Any]] = deque(maxlen=_SERIES)
        # Running workflows: [run, start (monotonic), history entries already folded]
        self._running: dict[str, list[Any]] = {}
        self._waiting: dict[str, dict[str, Any]] = {}  # retry waits and health holds
        self._events: dict[str, list[dict[str, Any]]] = {}  # warnings, timeouts, retries
        self._fold_lock = threading.Lock()
        self._runtime: Runtime | None = None
        self.on_change: Callable[[], None] | None = None  # a breaker moved: publish now

    # ------------------------------------------------------------------ wiring

    def attach(self, runtime: Runtime) -> Telemetry:
        """Listen to ``runtime``'s events, and sample its store's durable saves."""
        self._runtime = runtime
        self._now, self._monotonic = runtime.clock.time, runtime.clock.monotonic
        runtime.add_listener(self.on_event, events=WORKFLOW_EVENTS)
        runtime.add_runtime_listener(self.on_runtime_event)
        for name, breaker in runtime.breakers.items():
            self.breaker_states[name] = breaker.state
        with contextlib.suppress(RuntimeError):  # no running loop: saves are not timed
            SaveSampler(runtime.store, self.checkpoint_seconds).start()
        return self

    # ------------------------------------------------------------------ workflow events

    def on_event(self, event: str, run: WorkflowRun, **data: Any) -> None:
        """A ``Runtime.add_listener`` listener for ``WORKFLOW_EVENTS``."""
        if event == "started":
            name = run.definition_name
            self.started[name] = self.started.get(name, 0) + 1
            self._running[run.workflow_id] = [run, self._monotonic(), len(run.stage_history)]
            self._waiting.pop(run.workflow_id, None)  # held for health, now admitted
        elif event == "finished":
            self._on_finished(run)
        elif event == "retry":
            self._on_retry(run, data)
        elif event == "watchdog":
            self._on_watchdog(run, data)
        elif event == "held":
            self._waiting[run.workflow_id] = {"kind": "health", "status": data.get("status"),
                                              "since": self._now(),
                                              "definition": run.definition_name}

    def _on_finished(self, run: WorkflowRun) -> None:
        key = (run.definition_name, run.status)
        self.finished[key] = self.finished.get(key, 0) + 1
        entry = self._running.get(run.workflow_id)
        with self._fold_lock:
            if entry is not None:
                self._fold(entry)
                del self._running[run.workflow_id]
        self._waiting.pop(run.workflow_id, None)
        self._events.pop(run.workflow_id, None)
        if entry is not None:
            histogram = self.workflow_seconds.get(key)
            if histogram is None:
                histogram = self.workflow_seconds[key] = Histogram(DURATION_BUCKETS)
            histogram.observe(self._monotonic() - entry[1])

    def _fold(self, entry: list[Any]) -> None:
        """Count the stage history entries of ``entry``'s run not counted yet.

        Every stage of every workflow passes here once, so this loop is what metrics cost
        per stage (benchmarks.metrics_cost counts it): no key tuple, method call or
        function call per entry but ``bisect``; a workflow's stages find their counters
        in one dict per definition."""
        run, _, done = entry
        history = run.stage_history
        if len(history) <= done:
            return
        stages = self._stages.get(run.definition_name)
        if stages is None:
            stages = self._stages[run.definition_name] = {}
        bounds, bisect_left = DURATION_BUCKETS, bisect.bisect_left
        for item in history[done:]:
            stage, duration = item["stage"], item["duration"]
            counts = stages.get(stage)
            if counts is None:
                counts = stages[stage] = _StageCounts()
            if item["status"] == "completed":  # nearly every entry: no lookup by outcome
                histogram = counts.completed
                if histogram is None:
                    histogram = self._stage_histogram(run.definition_name, stage,
                                                      "completed")
                # stage_status(): fast under 0.8 of the baseline, slow over 1.2, and fast
                # without a baseline.
                baseline = item.get("baseline")
                ratio = duration / baseline if baseline and baseline > 0 else 0.0
                counts.grades[0 if ratio < _FAST else 2 if ratio > _SLOW else 1] += 1
            else:
                histogram = counts.histograms.get(item["status"])
                if histogram is None:
                    histogram = self._stage_histogram(run.definition_name, stage,
                                                      item["status"])
            histogram.counts[bisect_left(bounds, duration)] += 1
            histogram.sum += duration
        entry[2] = len(history)

    def _stage_histogram(self, definition: str, stage: str, status: str) -> Histogram:
        """The duration histogram of ``stage``'s attempts that ended ``status``."""
        counts = self._stages.setdefault(definition, {}).setdefault(stage, _StageCounts())
        histogram = counts.histograms.get(status)
        if histogram is None:
            histogram = counts.histograms[status] = Histogram(DURATION_BUCKETS)
            self.stage_seconds[(definition, stage, status)] = histogram
            if status == "completed":
                counts.completed = histogram
        return histogram

    @property
    def grades(self) -> dict[tuple[str, str, str], int]:
        """``(definition, stage, grade) -> count`` of completed stages graded against their
        baseline (fast, normal, slow)."""
        found = {}
        for definition, stages in list(self._stages.items()):
            for stage, counts in list(stages.items()):
                for name, count in zip(_GRADE_NAMES, counts.grades, strict=True):
                    if count:
                        found[(definition, stage, name)] = count
        return found

    def fold_running(self) -> None:
        """Count the stages running workflows have finished so far (before reading)."""
        with self._fold_lock:
            for entry in list(self._running.values()):
                self._fold(entry)

    def _on_retry(self, run: WorkflowRun, data: Mapping[str, Any]) -> None:
        stage = data["stage"]
        error = run.errors[-1] if run.errors else {}
        category = str(error.get("category") or "unknown")
        definition = run.definition_name
        key = (definition, stage, category)
        self.retries[key] = self.retries.get(key, 0) + 1
        began, failed = error.get("started_at"), error.get("at")
        if isinstance(began, (int, float)) and isinstance(failed, (int, float)):
            with self._fold_lock:
                self._stage_histogram(definition, stage, "retried").observe(
                    max(0.0, failed - began))
        now = self._now()
        delay = float(data.get("delay") or 0.0)
        self._waiting[run.workflow_id] = {
            "kind": "retry", "stage": stage, "attempt": data["attempt"] + 1, "since": now,
            "until": now + delay, "category": category, "definition": definition}
        _keep(self._events.setdefault(run.workflow_id, []), {
            "kind": "retry", "stage": stage, "attempt": data["attempt"], "at": now,
            "delay": delay, "category": category})

    def _on_watchdog(self, run: WorkflowRun, data: Mapping[str, Any]) -> None:
        stage, level = data["stage"], data["level"]
        key = (run.definition_name, stage, level)
        self.watchdog[key] = self.watchdog.get(key, 0) + 1
        _keep(self._events.setdefault(run.workflow_id, []), {
            "kind": level, "stage": stage, "attempt": run.attempt, "at": self._now()})

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
            if self.on_change is not None:
                self.on_change()
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
        """``(definition, state) -> count`` of workflows in this process now: ``running``,
        ``waiting_retry`` (between attempts) or ``held`` (waiting for health to start)."""
        counts: dict[tuple[str, str], int] = {}
        waiting = dict(self._waiting)
        for workflow_id, entry in list(self._running.items()):
            kind = (waiting.get(workflow_id) or {}).get("kind")
            key = (entry[0].definition_name, "waiting_retry" if kind == "retry" and (
                waiting[workflow_id]["attempt"] > entry[0].attempt) else "running")
            counts[key] = counts.get(key, 0) + 1
        for workflow_id, view in waiting.items():
            if view["kind"] == "health" and workflow_id not in self._running:
                key = (str(view["definition"]), "held")
                counts[key] = counts.get(key, 0) + 1
        return counts

    def snapshot(self, limit: int = LIVE_LIMIT,
                 watched: Iterable[str] = ()) -> dict[str, Any]:
        """The runtime's live picture as JSON: what the dashboard reads from the runtime file
        (at most ``limit`` running workflows; the whole record of those ``watched``)."""
        runtime = self._runtime
        breakers = {}
        workflows: dict[str, Any] = {}
        if runtime is not None:
            breakers = {name: b.snapshot() for name, b in list(runtime.breakers.items())}
            now, monotonic = self._now(), self._monotonic()
            for workflow_id in runtime.running[:limit]:
                live = runtime.live(workflow_id)
                if live is None:
                    continue
                run = live.run
                waiting = self._waiting.get(workflow_id)
                if waiting is not None and waiting.get("kind") == "retry" and (
                        waiting["attempt"] <= run.attempt):
                    waiting = None  # the retry has started
                workflows[workflow_id] = {
                    "definition": run.definition_path or run.definition_name,
                    "definition_name": run.definition_name,
                    "prompt_file": run.prompt_file or run.context.get("prompt_file"),
                    "created_at": run.created_at, "updated_at": run.updated_at,
                    "stage": run.current_stage,
                    "attempt": run.attempt,
                    "stage_started": now - (monotonic - live.stage_started),
                    "in_handler": live.in_handler, "progress": live.progress,
                    "waiting": waiting, "events": list(self._events.get(workflow_id, ()))}
        states = {}
        if runtime is not None:
            for workflow_id in watched:
                live = runtime.live(workflow_id)
                if live is not None:
                    states[workflow_id] = live_state(live.run)
        return {
            "pid": os.getpid(),
            "at": self._now(),
            "states": states,
            "breakers": breakers,
            "breaker_transitions": list(self.breaker_transitions),
            "health": dict(self.health),
            "series": list(self.health_series),
            "loop_lag_ms": runtime.loop_lag_ms if runtime is not None else None,
            "running": len(self._running),
            "workflows": workflows,
        }


def live_state(run: WorkflowRun) -> dict[str, Any]:
    """A running workflow's record in the stored state's shape, for the dashboard (made
    without ``to_state``, which numbers each snapshot it takes)."""
    return {
        "workflow_id": run.workflow_id, "definition": run.definition_path,
        "definition_name": run.definition_name, "prompt_file": run.prompt_file,
        "status": run.status, "current_stage": run.current_stage,
        "stage_start_time": run.stage_start_time, "attempt": run.attempt,
        "completed_stages": list(run.completed_stages), "progress_data": dict(run.outputs),
        "monitoring_state": {
            "error_count": run.error_count, "retry_count": run.retry_count,
            "recovery_attempts": run.recovery_attempts,
            "recovery_successes": run.recovery_successes,
            "stage_history": list(run.stage_history), "errors": list(run.errors),
            "watchdog_events": list(run.watchdog_events)},
        "error": run.error, "error_category": run.error_category,
        "resumed_from": run.resumed_from, "created_at": run.created_at,
        "updated_at": run.updated_at,
    }


def _keep(events: list[dict[str, Any]], event: dict[str, Any]) -> None:
    events.append(event)
    del events[:-50]


SAVE_SAMPLE_SECONDS = 0.1  # at most one durable save timed per this many seconds


class SaveSampler:
    """Times one durable save (call to durable) every ``SAVE_SAMPLE_SECONDS``.

    Wrapping every save cost the throughput benchmark several per cent; instead a timer
    puts a wrapper on the store instance (``save_nowait``, which ``save`` goes through),
    and the wrapper removes itself on its first call. Saves between samples pay nothing.
    The histogram's count is the number of saves timed, not of saves made. Any store
    with ``save_nowait`` works; none is edited.
    """

    def __init__(self, store: Any, histogram: Histogram, *,
                 period: float | None = None) -> None:
        self._store = store
        self._histogram = histogram
        self._period = SAVE_SAMPLE_SECONDS if period is None else period
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._armed: Any = None

    def start(self) -> None:
        if getattr(self._store, "save_nowait", None) is not None:
            self._arm()

    def _arm(self) -> None:
        store, monotonic, histogram = self._store, time.monotonic, self._histogram
        # Another wrapper on the instance (a benchmark's timer) stays in place around ours.
        previous = vars(store).get("save_nowait") if hasattr(store, "__dict__") else None
        inner = store.save_nowait

        def timed(workflow_id: str, snapshot: Any, **options: Any) -> asyncio.Future[None]:
            if previous is not None:
                store.save_nowait = previous
            else:
                del store.save_nowait  # back to the class's method until the next sample
            self._timer = self._loop.call_later(self._period, self._arm)
            began = monotonic()
            future: asyncio.Future[None] = inner(workflow_id, snapshot, **options)
            future.add_done_callback(lambda _: histogram.observe(monotonic() - began))
            return future

        try:
            store.save_nowait = timed
        except AttributeError:  # a store with __slots__: its saves are not timed
            return
        self._armed = timed

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


class LivePublisher:
    """Publishes a runtime's ``Telemetry.snapshot()`` about once a second, and at once when a
    breaker changes state, so a dashboard in another process (or on another host) shows
    breakers, health and live stages.

    The loop only samples and builds the snapshot; where it goes is a subclass's
    ``_put``: a file beside the states (``RuntimeFile``), or a row of the PostgreSQL store
    (``reliability._postgres._live.DatabaseLiveView``). One write per period however many
    stages ran meanwhile: the hot path never waits for it. When the runtime closes, a last
    snapshot marked ``stopped`` stays: the dashboard shows how the process left its
    breakers.
    """

    def __init__(self, telemetry: Telemetry, *, period: float = 1.0) -> None:
        self._telemetry = telemetry
        self._period = period
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._sampler: Any = None
        self.published = 0  # snapshots put (tests count them against the stages run)

    def start(self, runtime: Runtime) -> None:
        from ._health import HealthSampler

        self._sampler = HealthSampler(runtime.project_root, runtime.clock, min_interval=0.0)
        self._telemetry.on_change = self.wake
        self._task = asyncio.get_running_loop().create_task(self._publish(runtime),
                                                            name="live-view")

    def wake(self) -> None:
        """Publish now instead of at the period's end (a breaker moved)."""
        self._wake.set()

    async def stop(self) -> None:
        self._telemetry.on_change = None
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        await self._write(stopped=True)

    async def _publish(self, runtime: Runtime) -> None:
        await self._prepare()
        while True:
            sample = await asyncio.to_thread(self._sampler.sample)
            self._telemetry.sample_resources(sample.cpu, sample.memory, sample.disk,
                                             runtime.loop_lag_ms)
            await self._write()
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._period):
                    await self._wake.wait()

    async def _write(self, *, stopped: bool = False) -> None:
        import orjson

        watched = [] if stopped else await self._watched()
        snapshot = self._telemetry.snapshot(watched=watched)
        if stopped:
            snapshot["stopped"] = True
            snapshot["workflows"] = {}
        self._describe(snapshot)
        document = orjson.dumps(snapshot, default=str, option=orjson.OPT_NON_STR_KEYS)
        await self._put(document, stopped=stopped)
        self.published += 1

    # What a subclass provides.

    async def _prepare(self) -> None:
        """Before the first snapshot (remove what processes long gone left)."""

    async def _watched(self) -> list[str]:
        """Workflows a dashboard asked to see whole (their records go in the snapshot)."""
        return []

    def _describe(self, snapshot: dict[str, Any]) -> None:
        """Add what names this process where the view is read (host, worker)."""

    async def _put(self, document: bytes, *, stopped: bool) -> None:
        raise NotImplementedError


class RuntimeFile(LivePublisher):
    """The live view as ``DIR/runtime-PID.json``, for a dashboard on the same host.

    Written from a thread (atomic rename, mode 0600). Files of processes gone for a day are
    removed when the next one starts.
    """

    def __init__(self, telemetry: Telemetry, directory: Path, *, period: float = 1.0) -> None:
        super().__init__(telemetry, period=period)
        self.path = directory / f"runtime-{os.getpid()}.json"

    async def _prepare(self) -> None:
        await asyncio.to_thread(_remove_stale, self.path.parent)

    async def _watched(self) -> list[str]:
        return await asyncio.to_thread(_watched, self.path.parent / "watch")

    async def _put(self, document: bytes, *, stopped: bool) -> None:
        # A failed write: the dashboard shows the runtime as gone; the workflows go on.
        with contextlib.suppress(OSError):
            await asyncio.to_thread(_write_atomically, self.path, document)


def live_publisher(telemetry: Telemetry, runtime: Runtime, *,
                   period: float = 1.0) -> LivePublisher:
    """Where ``runtime`` publishes its live view: a row of its PostgreSQL store (a dashboard
    on any host reads every worker's), else a file beside the states."""
    from ._cluster import postgres

    store = postgres(runtime.store)
    if store is not None:
        from ._postgres._live import DatabaseLiveView

        return DatabaseLiveView(telemetry, store, period=period)
    return RuntimeFile(telemetry, runtime_directory(runtime), period=period)


STALE_SECONDS = 86_400.0


def _remove_stale(directory: Path) -> None:
    """Runtime files of processes that ended over a day ago."""
    now = time.time()
    with contextlib.suppress(OSError):
        for path in directory.glob("runtime-*.json"):
            with contextlib.suppress(OSError, ValueError):
                pid = int(path.stem.removeprefix("runtime-"))
                if pid != os.getpid() and now - path.stat().st_mtime > STALE_SECONDS:
                    path.unlink()


WATCH_SECONDS = 60.0  # a dashboard page asks again each time it refreshes


def _watched(directory: Path) -> list[str]:
    """Workflow IDs a dashboard viewed within WATCH_SECONDS (files named by the ID)."""
    from ._ids import validate_workflow_id

    found: list[str] = []
    now = time.time()
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return found
    for entry in entries:
        try:
            validate_workflow_id(entry.name)
            if now - entry.stat(follow_symlinks=False).st_mtime <= WATCH_SECONDS:
                found.append(entry.name)
        except (ValueError, OSError):
            continue
    return found


def _write_atomically(path: Path, document: bytes) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temporary = path.with_suffix(f".{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        view = memoryview(document)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)
    os.replace(temporary, path)
