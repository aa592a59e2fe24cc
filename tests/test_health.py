"""Health: one cheap shared sample, admission control, periodic checks, loop-lag warnings."""

from __future__ import annotations

import asyncio
import copy
import itertools
import logging
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from workflows_for_tests import BLOCKING, LONG, TIMED

from machines import StageContext, StageSpec, WorkflowDefinition
from reliability import (
    FakeClock,
    HealthStatus,
    MemoryStore,
    Runtime,
    SystemHealthCheck,
    WorkflowConfiguration,
)
from reliability._health import HealthSampler
from reliability._logging import LOGGER_NAME
from reliability._monitor import LAG_WARNING_SECONDS


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def warnings(self) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno == logging.WARNING]


@pytest.fixture
def records() -> Iterator[_Records]:
    """Every record of the runtime's logger, whatever handlers other tests installed."""
    handler = _Records()
    runtime_logger = logging.getLogger(LOGGER_NAME)
    level = runtime_logger.level
    runtime_logger.addHandler(handler)
    runtime_logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        runtime_logger.removeHandler(handler)
        runtime_logger.setLevel(level)


def quick(**changes: Any) -> WorkflowConfiguration:
    return WorkflowConfiguration(enable_monitoring=False, **changes)


class Timeline:
    """A runtime listener recording (event, workflow, virtual time)."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.events: list[tuple[str, str, float]] = []

    def __call__(self, event: str, run: Any, **data: Any) -> None:
        self.events.append((event, run.workflow_id, self.clock.monotonic()))

    def at(self, event: str, workflow_id: str) -> float:
        return next(t for e, w, t in self.events if e == event and w == workflow_id)


class TestSampling:
    async def test_checks_share_one_nonblocking_sample(self, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
        """200 checks within a second read psutil once, and never with a blocking interval."""
        intervals: list[object] = []
        real_cpu_percent = psutil.cpu_percent

        def counting_cpu_percent(interval: object = None, percpu: bool = False) -> Any:
            intervals.append(interval)
            return real_cpu_percent(interval=None)

        monkeypatch.setattr(psutil, "cpu_percent", counting_cpu_percent)
        async with Runtime(quick(), tmp_path, store=MemoryStore(), clock=FakeClock(),
                           configure_logs=False) as runtime:
            primed = len(intervals)
            checks = [await runtime.perform_health_check() for _ in range(200)]
        assert len(intervals) - primed == 1
        assert set(intervals) == {None}
        assert all(c.status in HealthStatus for c in checks)

    async def test_checks_keep_the_loop_responsive(self, tmp_path: Path) -> None:
        """While 200 checks run, a ticker task keeps running, and no check holds the loop
        for as much of its CPU time as a stall warning needs (CPU time, not wall time: a
        loaded machine that takes the CPU away must not count as the checks' doing)."""
        ticks: list[float] = []
        done = asyncio.Event()

        async def ticker() -> None:
            while not done.is_set():
                ticks.append(time.thread_time())
                await asyncio.sleep(0)

        async def check(runtime: Runtime) -> HealthStatus:
            await asyncio.sleep(0)
            return (await runtime.perform_health_check()).status

        async with Runtime(WorkflowConfiguration(), tmp_path, store=MemoryStore(),
                           configure_logs=False) as runtime:
            ticking = asyncio.create_task(ticker())
            await asyncio.gather(*(check(runtime) for _ in range(200)))
            done.set()
            await ticking
        assert len(ticks) >= 2
        longest = max(later - earlier for earlier, later in itertools.pairwise(ticks))
        assert longest < LAG_WARNING_SECONDS


class TestAdmission:
    async def test_new_workflow_waits_while_health_is_critical(self, tmp_path: Path) -> None:
        """CRITICAL, CRITICAL, HEALTHY: held at t=0, started at the second re-check (t=10)."""
        answers = iter(["CRITICAL", "CRITICAL"])
        clock = FakeClock()
        timeline = Timeline(clock)
        async with Runtime(quick(), tmp_path, store=MemoryStore(), clock=clock,
                           configure_logs=False) as runtime:
            runtime.register_health_check(lambda _: {"status": next(answers, "HEALTHY")})
            runtime.add_listener(timeline)
            async with clock.autojump():
                result = await runtime.run(TIMED, context={"durations": {
                    "fetch": 1, "compute": 1, "store": 1}})
        assert result.status == "completed"
        assert timeline.at("held", result.workflow_id) == 0.0
        assert timeline.at("started", result.workflow_id) == 10.0

    async def test_running_workflows_go_on_while_new_ones_wait(self, tmp_path: Path) -> None:
        """Health turns CRITICAL during A: A finishes; B waits until health recovers."""
        health = {"status": "HEALTHY"}
        clock = FakeClock()
        timeline = Timeline(clock)

        async def later(delay: float, runner: Any) -> Any:
            await clock.sleep(delay)
            return await runner()

        async def recover() -> None:
            health["status"] = "HEALTHY"

        async def worsen_then_start_b() -> Any:
            health["status"] = "CRITICAL"
            return await runtime.run(TIMED, context={"durations": {
                "fetch": 1, "compute": 1, "store": 1}})

        async with Runtime(quick(), tmp_path, store=MemoryStore(), clock=clock,
                           configure_logs=False) as runtime:
            runtime.register_health_check(lambda _: dict(health))
            runtime.add_listener(timeline)
            async with clock.autojump():
                a, b, _ = await asyncio.gather(
                    runtime.run(TIMED, context={"durations": {
                        "fetch": 10, "compute": 10, "store": 10}}),
                    later(2, worsen_then_start_b), later(50, recover))
        assert (a.status, b.status) == ("completed", "completed")
        assert timeline.at("finished", a.workflow_id) == 30.0
        assert timeline.at("held", b.workflow_id) == 2.0
        assert timeline.at("started", b.workflow_id) == 52.0  # re-checks at 7, 12, ... 52


class TestPeriodicChecks:
    async def test_long_stage_is_checked_every_interval(self, tmp_path: Path) -> None:
        """A 1000 s stage with health_check_interval=100 is checked at 100, 200, 300, ..."""
        clock = FakeClock()
        checked_at: list[float] = []

        def check(workflow_id: str | None) -> dict[str, str]:
            if workflow_id is not None:
                checked_at.append(clock.monotonic())
            return {"status": "HEALTHY"}

        async with Runtime(quick(health_check_interval=100.0), tmp_path, store=MemoryStore(),
                           clock=clock, configure_logs=False) as runtime:
            runtime.register_health_check(check)
            async with clock.autojump():
                result = await runtime.run(LONG)
        assert result.status == "completed"
        assert checked_at[:3] == [100.0, 200.0, 300.0]
        assert len(checked_at) in (9, 10)  # the one at t=1000 races the stage's end


class TestLoopLag:
    async def test_blocking_handler_is_named(self, tmp_path: Path, records: _Records) -> None:
        """A handler calling time.sleep(1) is named in an 'Event loop blocked' warning, and
        the health result reports the lag."""
        config = WorkflowConfiguration(enable_health_checks=False)
        async with Runtime(config, tmp_path, store=MemoryStore(),
                           configure_logs=False) as runtime:
            result = await runtime.run(BLOCKING)
        blocked = [m for m in records.warnings() if m.startswith("Event loop blocked")]
        assert result.status == "completed"
        naming = [m for m in blocked if "handler workflows_for_tests:blocking_handler" in m]
        assert len(naming) == 1
        assert f"stage block of workflow {result.workflow_id}" in naming[0]
        assert runtime.loop_lag_ms is not None and runtime.loop_lag_ms >= 250
        check = await runtime.perform_health_check()
        assert check.loop_lag_ms == runtime.loop_lag_ms
        assert check.status is not HealthStatus.HEALTHY
        assert any("Event loop lag" in advice for advice in check.recommendations)


def test_worst_is_the_most_severe_status_in_any_order() -> None:
    """worst() ranks HEALTHY < WARNING < DEGRADED < CRITICAL < FAILED, for two statuses
    (the per-stage merge) and for any other count."""
    from reliability._health import HealthStatus, worst

    order = list(HealthStatus)
    for low_rank, low in enumerate(order):
        for high in order[low_rank:]:
            assert worst(low, high) is high and worst(high, low) is high
    assert worst() is HealthStatus.HEALTHY
    assert worst(HealthStatus.WARNING) is HealthStatus.WARNING
    assert worst(HealthStatus.HEALTHY, HealthStatus.FAILED, HealthStatus.DEGRADED) is (
        HealthStatus.FAILED)


class TestAssessedOncePerSample:
    def test_a_sample_is_assessed_once_and_a_new_one_afresh(
            self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """Within min_interval the checks share one sample and its assessment (the advice a
        fresh list each time); the next sample is assessed anew (memory full: CRITICAL)."""
        memory = [50.0]
        monkeypatch.setattr(psutil, "virtual_memory",
                            lambda: types.SimpleNamespace(percent=memory[0]))
        clock = FakeClock()
        sampler = HealthSampler(tmp_path, clock, min_interval=1.0)
        first, status, advice = sampler.assessed()
        advice.append("the caller's own")
        memory[0] = 99.0
        again, status_again, advice_again = sampler.assessed()
        assert again is first and status_again is status
        assert "the caller's own" not in advice_again
        clock.advance(1.0)
        later, status_later, advice_later = sampler.assessed()
        assert later is not first and later.memory == 99.0
        assert status_later is HealthStatus.CRITICAL
        assert "Free up memory or restart services" in advice_later


async def _checked_stage(ctx: StageContext) -> None:
    seconds = float(ctx.context.get("seconds", 0.0))
    if seconds:  # a fake clock's sleep waits for the clock to move, even for 0 s
        await ctx.sleep(seconds)


# Three stages, each health-checked before it starts.
CHECKED = WorkflowDefinition("checked", [
    StageSpec(stage=f"c{i}", handler=_checked_stage, timeout_seconds=100, health_check=True)
    for i in range(3)])


class _Heard:
    """The runtime's ``health`` events, and each finished workflow's run."""

    def __init__(self, runtime: Runtime) -> None:
        self.checks: list[SystemHealthCheck] = []
        self.runs: dict[str, Any] = {}
        runtime.add_runtime_listener(self.on_runtime_event)
        runtime.add_listener(self.on_finished, events=["finished"])

    def on_runtime_event(self, event: str, **data: Any) -> None:
        if event == "health":
            self.checks.append(data["check"])

    def on_finished(self, event: str, run: Any, **data: Any) -> None:
        self.runs[run.workflow_id] = run


class TestSharedResult:
    async def test_stages_within_one_sample_record_one_result(self, tmp_path: Path) -> None:
        """Two workflows' six stage checks within one sample record the same entry and the
        listeners hear of the result once."""
        clock = FakeClock()
        async with Runtime(quick(), tmp_path, store=MemoryStore(), clock=clock,
                           configure_logs=False) as runtime:
            heard = _Heard(runtime)
            results = await asyncio.gather(runtime.run(CHECKED), runtime.run(CHECKED))
        assert [r.status for r in results] == ["completed", "completed"]
        entries = [e for r in results for e in heard.runs[r.workflow_id].health_checks]
        assert len(entries) == 6
        assert all(entry is entries[0] for entry in entries)
        assert len(heard.checks) == 1
        assert heard.checks[0].to_dict() == entries[0]
        assert entries[0]["timestamp"] == clock.time()

    async def test_a_new_sample_or_loop_lag_makes_a_new_result(self, tmp_path: Path) -> None:
        """The same result within a sample; a changed loop lag or the next sample (after
        min_interval) builds, and tells, a new one, stamped when it was built."""
        clock = FakeClock()
        async with Runtime(quick(), tmp_path, store=MemoryStore(), clock=clock,
                           configure_logs=False) as runtime:
            heard = _Heard(runtime)
            first = await runtime.perform_health_check()
            clock.advance(0.5)
            assert await runtime.perform_health_check() is first
            runtime.loop_lag_ms = 300.0
            lagged = await runtime.perform_health_check()
            assert lagged is not first and lagged.status is not HealthStatus.HEALTHY
            assert lagged.loop_lag_ms == 300.0 and lagged.timestamp == first.timestamp + 0.5
            clock.advance(0.5)
            resampled = await runtime.perform_health_check()
            assert resampled is not lagged and resampled.timestamp == first.timestamp + 1.0
            assert await runtime.perform_health_check() is resampled
        assert heard.checks == [first, lagged, resampled]

    async def test_stages_a_sample_apart_record_new_results(self, tmp_path: Path) -> None:
        """Stages of one workflow that start a second (min_interval) apart record a new
        result each."""
        clock = FakeClock()
        async with Runtime(quick(), tmp_path, store=MemoryStore(), clock=clock,
                           configure_logs=False) as runtime:
            heard = _Heard(runtime)
            async with clock.autojump():
                result = await runtime.run(CHECKED, context={"seconds": 1.0})
        entries = heard.runs[result.workflow_id].health_checks
        assert [e["timestamp"] - entries[0]["timestamp"] for e in entries] == [0.0, 1.0, 2.0]
        assert len({id(e) for e in entries}) == 3
        assert [c.to_dict() for c in heard.checks] == entries

    async def test_a_registered_check_keeps_results_per_workflow(self, tmp_path: Path) -> None:
        """With a registered check every stage check asks it for its workflow and records
        and tells its own result (one per stage: six)."""
        clock = FakeClock()

        def per_workflow(workflow_id: str | None) -> dict[str, Any]:
            return {"status": "HEALTHY", "workflow": workflow_id}

        async with Runtime(quick(), tmp_path, store=MemoryStore(), clock=clock,
                           configure_logs=False) as runtime:
            shared = await runtime.perform_health_check()  # shared until a check registers
            runtime.register_health_check(per_workflow)
            heard = _Heard(runtime)
            results = await asyncio.gather(runtime.run(CHECKED), runtime.run(CHECKED))
        for result in results:
            entries = heard.runs[result.workflow_id].health_checks
            assert [e["custom"]["per_workflow"]["workflow"] for e in entries] == [
                result.workflow_id] * 3
        every = [e for r in results for e in heard.runs[r.workflow_id].health_checks]
        assert len({id(e) for e in every}) == 6
        assert all(c is not shared for c in heard.checks)
        # (and the admission gate's own checks, for no workflow)
        told = [c.custom["per_workflow"]["workflow"] for c in heard.checks]
        assert sorted(w for w in told if w is not None) == sorted(
            r.workflow_id for r in results for _ in range(3))

    async def test_diagnostics_hand_out_copies_of_shared_entries(self, tmp_path: Path) -> None:
        """Changing the health checks diagnostics return changes no workflow's record."""
        async with Runtime(quick(), tmp_path, store=MemoryStore(), clock=FakeClock(),
                           configure_logs=False) as runtime:
            heard = _Heard(runtime)
            result = await runtime.run(CHECKED)
            diagnostics = runtime.get_workflow_diagnostics(result.workflow_id)
        recorded = heard.runs[result.workflow_id].health_checks
        # What was recorded, whatever the machine's load made it (a busy CPU is WARNING).
        before = copy.deepcopy(recorded)
        assert len(before) == 3
        diagnostics["recent_health_checks"][0]["status"] = "changed by a caller"
        diagnostics["recent_health_checks"][1]["recommendations"].append("a caller's")
        assert recorded == before

    async def test_each_stage_check_is_logged_with_its_reason(self, tmp_path: Path,
                                                              records: _Records) -> None:
        """Every stage's check logs one line naming its stage and the status's value: at
        INFO while healthy, at WARNING once the loop lag makes it DEGRADED."""
        async with Runtime(quick(), tmp_path, store=MemoryStore(), clock=FakeClock(),
                           configure_logs=False) as runtime:
            await runtime.run(CHECKED)
            runtime.loop_lag_ms = 1500.0
            await runtime.run(CHECKED)
        logged = [(r.levelno, r.getMessage()) for r in records.records
                  if r.getMessage().startswith("Health check completed")]
        assert [(level, message.split(" (CPU")[0]) for level, message in logged] == [
            (logging.INFO, f"Health check completed (before c{i}): HEALTHY") for i in range(3)
        ] + [(logging.WARNING, f"Health check completed (before c{i}): DEGRADED")
             for i in range(3)]
