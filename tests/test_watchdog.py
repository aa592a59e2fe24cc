"""The watchdog around every handler: warning threshold, timeout, heartbeat, then retry.

Everything runs on a FakeClock with ``autojump``: a stage that "hangs" for an hour costs
microseconds, and every warning, timeout and retry is asserted at its exact virtual time.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from machines import StageContext, StageSpec, WorkflowDefinition, WorkflowStage
from reliability import FakeClock, MemoryStore, Runtime, WorkflowConfiguration
from reliability._logging import logger as runtime_logger
from reliability._store import decode_document

CALLS: list[tuple[str, int, float]] = []
HANG_ON: set[int] = set()  # attempts of "build" that sleep past the timeout


@pytest.fixture(autouse=True)
def _reset() -> None:
    CALLS.clear()
    HANG_ON.clear()


async def fetch(ctx: StageContext) -> dict[str, Any]:
    CALLS.append((ctx.stage, ctx.attempt, ctx.clock.monotonic()))
    return {"fetched": True}


async def build(ctx: StageContext) -> dict[str, Any]:
    CALLS.append((ctx.stage, ctx.attempt, ctx.clock.monotonic()))
    if ctx.attempt in HANG_ON or 0 in HANG_ON:
        await ctx.sleep(3600)
    return {"built": ctx.attempt}


async def poll(ctx: StageContext) -> None:
    """Heartbeat once a second for ``beats`` seconds, then go quiet for an hour."""
    CALLS.append((ctx.stage, ctx.attempt, ctx.clock.monotonic()))
    for _ in range(int(ctx.context["beats"])):
        ctx.heartbeat()
        await ctx.sleep(1)
    if ctx.context.get("then_quiet", True):
        await ctx.sleep(3600)


async def report(ctx: StageContext) -> None:
    """Report progress every 4 s for 40 s: progress counts as a heartbeat."""
    for step in range(10):
        ctx.progress(step / 10, f"step {step}")
        await ctx.sleep(4)


BUILD_FLOW = WorkflowDefinition(
    "build", [StageSpec(stage="fetch", handler=fetch),
              StageSpec(stage="build", handler=build, timeout_seconds=10,
                        warning_threshold_seconds=4)])
TIMED_OUT_FLOW = WorkflowDefinition(
    "build-once", [StageSpec(stage="fetch", handler=fetch),
                   StageSpec(stage="build", handler=build, timeout_seconds=10,
                             warning_threshold_seconds=4, max_retries=1)])
HEARTBEAT_FLOW = WorkflowDefinition(
    "heartbeat", [StageSpec(stage="poll", handler=poll, timeout_seconds=100,
                            heartbeat_timeout_seconds=5, max_retries=0)])
PROGRESS_FLOW = WorkflowDefinition(
    "progress", [StageSpec(stage="report", handler=report, timeout_seconds=100,
                           heartbeat_timeout_seconds=5)])
DEFAULT_TIMING_FLOW = WorkflowDefinition(
    "default-timing", [StageSpec(stage=WorkflowStage.INITIALIZATION, handler=build,
                                 max_retries=0)])


class Records(logging.Handler):
    """Keeps (level, message, virtual time) of every runtime log record."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(logging.DEBUG)
        self.clock = clock
        self.seen: list[tuple[str, str, float]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append((record.levelname, record.getMessage(), self.clock.monotonic()))

    def at(self, level: str) -> list[tuple[str, float]]:
        return [(message, at) for name, message, at in self.seen if name == level]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def records(clock: FakeClock) -> Iterator[Records]:
    handler = Records(clock)
    runtime_logger.addHandler(handler)
    previous = runtime_logger.level
    runtime_logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        runtime_logger.removeHandler(handler)
        runtime_logger.setLevel(previous)


@contextlib.asynccontextmanager
async def fake_runtime(tmp_path: Path, clock: FakeClock, store: MemoryStore | None = None,
                       **changes: Any) -> AsyncIterator[Runtime]:
    config = WorkflowConfiguration(**{"enable_health_checks": False, **changes})
    async with clock.autojump(), Runtime(config, tmp_path, clock=clock,
                                         store=store or MemoryStore(),
                                         configure_logs=False) as runtime:
        yield runtime


class TestTimeout:
    async def test_warning_then_timeout_then_retry_then_success(
            self, tmp_path: Path, clock: FakeClock, records: Records) -> None:
        """Attempt 1 warns at t=4, is cancelled at t=10; attempt 2 starts at t=10 and succeeds."""
        HANG_ON.add(1)
        async with fake_runtime(tmp_path, clock) as runtime:
            result = await runtime.run(BUILD_FLOW)
        assert result.success and result.outputs == {"fetched": True, "built": 2}
        assert CALLS == [("fetch", 1, 0.0), ("build", 1, 0.0), ("build", 2, 10.0)]
        assert clock.monotonic() == 10.0
        assert records.at("WARNING")[0] == (
            "Stage build still running after 4.0s (warning threshold 4.0s, timeout in 6.0s)", 4.0)
        assert ("Stage build timed out after 10.0s (timeout); cancelling it", 10.0) in (
            records.at("ERROR"))
        assert ("Stage build attempt 1 failed (transient): stage 'build' ran past its timeout "
                "of 10s", 10.0) in records.at("WARNING")
        assert result.reliability_metrics["stage_performance"]["build"]["attempts"] == 2

    async def test_fast_stage_neither_warns_nor_times_out(
            self, tmp_path: Path, clock: FakeClock, records: Records) -> None:
        """A stage that finishes in time logs no warning and leaves no timer behind."""
        async with fake_runtime(tmp_path, clock) as runtime:
            result = await runtime.run(BUILD_FLOW)
        assert result.success and clock.monotonic() == 0.0
        assert records.at("WARNING") == [] and records.at("ERROR") == []
        assert clock.next_deadline() is None

    async def test_exhausted_timeouts_end_timed_out_with_state_kept(
            self, tmp_path: Path, clock: FakeClock) -> None:
        """Two timeouts with max_retries=1: status timed_out at t=20, completed stages kept."""
        HANG_ON.add(0)
        store = MemoryStore()
        async with fake_runtime(tmp_path, clock, store) as runtime:
            result = await runtime.run(TIMED_OUT_FLOW)
        assert result.status == "timed_out" and not result.success
        assert result.error == "StageTimeoutError: stage 'build' ran past its timeout of 10s"
        assert result.error_category == "transient"
        assert "timeout" in result.recovery_recommendations[0]
        assert [(s, a, t) for s, a, t in CALLS if s == "build"] == [("build", 1, 0.0),
                                                                     ("build", 2, 10.0)]
        assert clock.monotonic() == 20.0
        state = decode_document(store.documents[result.workflow_id], "memory")
        assert state["status"] == "timed_out" and state["current_stage"] == "build"
        assert state["completed_stages"] == ["fetch"]
        assert state["progress_data"] == {"fetched": True}

    async def test_timed_out_workflow_resumes_at_the_stage_that_timed_out(
            self, tmp_path: Path, clock: FakeClock) -> None:
        """Resuming a timed_out workflow re-runs only the stage that timed out."""
        HANG_ON.add(0)
        store = MemoryStore()
        async with fake_runtime(tmp_path, clock, store) as runtime:
            first = await runtime.run(TIMED_OUT_FLOW)
        HANG_ON.clear()
        async with fake_runtime(tmp_path, clock, store) as runtime:
            resumed = await runtime.resume(first.workflow_id)
        assert resumed.status == "completed" and resumed.resumed_from == "build"
        assert resumed.outputs == {"fetched": True, "built": 1}
        assert [s for s, _, _ in CALLS] == ["fetch", "build", "build", "build"]

    async def test_default_timing_is_scaled_by_timeout_multiplier(
            self, tmp_path: Path, clock: FakeClock, records: Records) -> None:
        """initialization's spec timing (warn 60 s, timeout 120 s) x 1.5 fires at t=90 and t=180."""
        HANG_ON.add(0)
        async with fake_runtime(tmp_path, clock, timeout_multiplier=1.5) as runtime:
            result = await runtime.run(DEFAULT_TIMING_FLOW)
        assert result.status == "timed_out"
        assert clock.monotonic() == 180.0
        assert records.at("WARNING")[0][1] == 90.0
        assert result.error == ("StageTimeoutError: stage 'initialization' ran past its "
                                "timeout of 180s")

    async def test_explicit_timing_is_not_scaled(
            self, tmp_path: Path, clock: FakeClock) -> None:
        """A StageSpec's own timeout_seconds is used exactly, whatever the multiplier."""
        HANG_ON.add(0)
        async with fake_runtime(tmp_path, clock, timeout_multiplier=3.0) as runtime:
            result = await runtime.run(TIMED_OUT_FLOW)
        assert result.status == "timed_out" and clock.monotonic() == 20.0


class TestHeartbeat:
    async def test_silent_stage_times_out_on_its_heartbeat(
            self, tmp_path: Path, clock: FakeClock) -> None:
        """Beats at t=0,1,2 then silence: the heartbeat timeout (5 s) fires at t=7, not t=100."""
        async with fake_runtime(tmp_path, clock) as runtime:
            result = await runtime.run(HEARTBEAT_FLOW, context={"beats": 3})
        assert result.status == "timed_out"
        assert clock.monotonic() == 7.0
        assert result.error == "StageTimeoutError: stage 'poll' sent no heartbeat within 5s"

    async def test_regular_heartbeats_keep_a_long_stage_alive(
            self, tmp_path: Path, clock: FakeClock) -> None:
        """Beating every second for 30 s outlives a 5 s heartbeat timeout."""
        async with fake_runtime(tmp_path, clock) as runtime:
            result = await runtime.run(HEARTBEAT_FLOW, context={"beats": 30,
                                                                "then_quiet": False})
        assert result.success and clock.monotonic() == 30.0

    async def test_progress_reports_count_as_heartbeats(
            self, tmp_path: Path, clock: FakeClock) -> None:
        """ctx.progress() every 4 s keeps a stage with a 5 s heartbeat timeout alive."""
        events: list[tuple[float, str]] = []
        async with fake_runtime(tmp_path, clock) as runtime:
            runtime.add_listener(lambda event, run, **data: events.append(
                (data["fraction"], data["message"])) if event == "progress" else None)
            result = await runtime.run(PROGRESS_FLOW)
        assert result.success and clock.monotonic() == 40.0
        assert events[0] == (0.0, "step 0") and events[-1] == (0.9, "step 9")

    async def test_heartbeat_never_outlives_the_hard_timeout(
            self, tmp_path: Path, clock: FakeClock) -> None:
        """A stage beating forever is still stopped at its timeout (t=100)."""
        async with fake_runtime(tmp_path, clock) as runtime:
            result = await runtime.run(HEARTBEAT_FLOW, context={"beats": 1000})
        assert result.status == "timed_out" and clock.monotonic() == 100.0
        assert result.error == "StageTimeoutError: stage 'poll' ran past its timeout of 100s"


# ------------------------------------------------------------ one timer for every watchdog


def _watchdogs(clock: FakeClock, *, keep_idle_timer: bool = False,
               ) -> tuple[Any, list[tuple[float, str]], dict[str, Any]]:
    from reliability._engine import LiveWorkflow, _Watchdogs
    from reliability._state import WorkflowRun

    fired: list[tuple[float, str]] = []
    lives = {}
    for name in ("a", "b", "c"):
        run = WorkflowRun(f"workflow-20240115-142315-a7b{name}", definition_name="flow",
                          definition_path=None, context={}, prompt_file=None, created_at=0.0)
        lives[name] = LiveWorkflow(run)
    names = {id(live): name for name, live in lives.items()}
    watchdogs = _Watchdogs(clock, lambda live: fired.append((clock.monotonic(),
                                                             names[id(live)])),
                           keep_idle_timer=keep_idle_timer)
    return watchdogs, fired, lives


def _live_timers(clock: FakeClock) -> int:
    return sum(not timer.cancelled for _, _, timer in clock._timers)


def test_one_clock_timer_calls_every_watchdog_back_at_its_exact_time() -> None:
    """Watchdogs armed at different times share one clock timer, and each is called
    back at its own due time; one disarmed before is never called."""
    clock = FakeClock()
    watchdogs, fired, lives = _watchdogs(clock)
    watchdogs.arm(lives["a"], 5.0, 0.0)
    watchdogs.arm(lives["b"], 3.0, 0.0)  # earlier: the timer moves to it
    watchdogs.arm(lives["c"], 4.0, 0.0)
    assert _live_timers(clock) == 1
    watchdogs.disarm(lives["c"])
    clock.advance(10.0)
    assert fired == [(3.0, "b"), (5.0, "a")]
    assert lives["a"].timer is None and lives["b"].timer is None


def test_a_watchdog_armed_again_replaces_its_entry_and_none_left_leaves_no_timer() -> None:
    """Re-arming a workflow moves its call back (once, not twice); on a fake clock,
    disarming the last one leaves no clock timer (nothing for autojump to jump to)."""
    clock = FakeClock()
    watchdogs, fired, lives = _watchdogs(clock)
    watchdogs.arm(lives["a"], 2.0, 0.0)
    watchdogs.arm(lives["a"], 7.0, 0.0)
    clock.advance(5.0)
    assert fired == []
    clock.advance(5.0)
    assert fired == [(7.0, "a")]
    watchdogs.arm(lives["b"], 20.0, clock.monotonic())
    watchdogs.disarm(lives["b"])
    assert clock.next_deadline() is None


def test_disarmed_entries_are_dropped_once_they_outnumber_armed_ones() -> None:
    """Stages far shorter than their timeout leave disarmed entries: the heap is rebuilt
    before they pile up, while the armed one still fires on time."""
    clock = FakeClock()
    watchdogs, fired, lives = _watchdogs(clock)
    watchdogs.arm(lives["a"], 1_000.0, 0.0)
    for index in range(1_000):
        watchdogs.arm(lives["b"], 500.0 + index, 0.0)
        watchdogs.disarm(lives["b"])
    assert len(watchdogs._heap) <= 2 * 64 + 2
    clock.advance(2_000.0)
    assert fired == [(1_000.0, "a")]


async def test_on_the_system_clock_one_timer_serves_stages_armed_one_at_a_time() -> None:
    """Handlers that return at once arm and disarm their watchdogs one at a time: the
    clock timer stays set across them (not one timer per stage), wakes once finding
    nothing due, and a later watchdog still fires at its own time."""
    clock = FakeClock()
    watchdogs, fired, lives = _watchdogs(clock, keep_idle_timer=True)
    for stage in range(100):
        watchdogs.arm(lives["a"], 300.0 + stage * 0.001, 0.0)
        watchdogs.disarm(lives["a"])
    assert len(clock._timers) == 1 and _live_timers(clock) == 1
    watchdogs.arm(lives["b"], 500.0, 0.0)
    clock.advance(1_000.0)
    assert fired == [(500.0, "b")]
    assert clock.next_deadline() is None


def test_a_runtime_used_by_a_second_event_loop_still_times_stages_out(tmp_path: Path) -> None:
    """The watchdogs' timer kept on the system clock belongs to the loop that set it: a
    runtime run again by a later asyncio.run still cancels a stage at its timeout."""
    import asyncio
    import time

    hang = asyncio.Event  # the second run's stage waits on one nobody sets
    behaviour: list[str] = ["return"]

    async def stage(ctx: StageContext) -> None:
        if behaviour[0] == "hang":
            await hang().wait()

    flow = WorkflowDefinition("rerun", [StageSpec("only", stage, timeout_seconds=0.2)])
    runtime = Runtime(WorkflowConfiguration(enable_persistence=False, max_retries=0),
                      project_root=tmp_path, configure_logs=False, handle_signals=False)

    async def once() -> str:
        # The bound only ends a failure sooner than pytest's timeout would.
        result = await asyncio.wait_for(runtime.run(flow), 30.0)
        return result.status

    # The first run leaves its loop's timer set 0.2 s after its stage began...
    assert asyncio.run(once()) == "completed"
    time.sleep(0.3)  # ...and the second stage's due time comes after it
    behaviour[0] = "hang"
    assert asyncio.run(once()) == "timed_out"
