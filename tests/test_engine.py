"""The engine: stages run in order, outputs merge, failures are classified and decided.

Timing runs on the project's FakeClock (``autojump``) with a MemoryStore, so every wait
is asserted at its exact virtual time. Handlers are scripted per test: ``SCRIPT[stage]``
says what a stage does on each attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from itertools import islice
from pathlib import Path
from typing import Any

import parking
import pytest

from machines import StageContext, StageSpec, WorkflowDefinition, WorkflowStage
from reliability import (
    ConfigurationError,
    CriticalError,
    FakeClock,
    FileStore,
    MemoryStore,
    RateLimitedError,
    ResourceError,
    RetryPolicy,
    Runtime,
    TransientError,
    WorkflowConfiguration,
    WorkflowError,
)
from reliability._retry import backoff_delays
from reliability._store import decode_document

Script = Callable[[StageContext], Awaitable[Mapping[str, Any] | None]]
SCRIPT: dict[str, Script] = {}
CALLS: list[tuple[str, int, float]] = []  # (stage, attempt, virtual time at start)


async def scripted(ctx: StageContext) -> Mapping[str, Any] | None:
    CALLS.append((ctx.stage, ctx.attempt, ctx.clock.monotonic()))
    step = SCRIPT.get(ctx.stage)
    return None if step is None else await step(ctx)


@pytest.fixture(autouse=True)
def _fresh_script() -> None:
    SCRIPT.clear()
    CALLS.clear()


def calls_of(stage: str) -> list[tuple[int, float]]:
    return [(attempt, at) for name, attempt, at in CALLS if name == stage]


FIVE = ("checkout", "configure", "compile", "link", "ship")
FIVE_STAGE_FLOW = WorkflowDefinition("five", [StageSpec(stage=s, handler=scripted)
                                              for s in FIVE])
ONE_STAGE_FLOW = WorkflowDefinition("one", [StageSpec(stage="work", handler=scripted)])
RECOVERING_FLOW = WorkflowDefinition(
    "recovering", [StageSpec(stage="work", handler=scripted, recovery_actions=("clear_cache",))],
    recovery_actions={"clear_cache": lambda ctx, error: _note_recovery(ctx, error)})
DEGRADING_FLOW = WorkflowDefinition(
    "degrading", [StageSpec(stage="lint", handler=scripted, critical=False),
                  StageSpec(stage="release", handler=scripted)])
NINETEEN_FLOW = WorkflowDefinition(
    "nineteen", [StageSpec(stage=s, handler=scripted) for s in list(WorkflowStage)[:19]])
PARKING_FLOW = WorkflowDefinition(
    "parking", [StageSpec(stage="prepare", handler=scripted),
                StageSpec(stage="wait", handler=scripted),
                StageSpec(stage="finish", handler=scripted)])
RECOVERED: list[str] = []


async def _note_recovery(ctx: StageContext, error: BaseException | None) -> None:
    RECOVERED.append(f"{ctx.stage}: {type(error).__name__}")


def settings(**changes: Any) -> WorkflowConfiguration:
    return WorkflowConfiguration(**{"enable_health_checks": False, **changes})


@contextlib.asynccontextmanager
async def fake_runtime(tmp_path: Path, **changes: Any) -> AsyncIterator[Runtime]:
    """A runtime on a FakeClock that jumps whenever every task waits, with a MemoryStore."""
    clock = FakeClock()
    async with clock.autojump(), Runtime(settings(**changes), tmp_path, clock=clock,
                                         store=MemoryStore(), configure_logs=False) as runtime:
        yield runtime


def stored(runtime: Runtime, workflow_id: str) -> dict[str, Any]:
    assert isinstance(runtime.store, MemoryStore)
    return decode_document(runtime.store.documents[workflow_id], workflow_id)


def fail_until(attempt: int, error: Callable[[], Exception],
               result: Mapping[str, Any] | None = None) -> Script:
    """A script that raises ``error()`` on attempts before ``attempt``, then succeeds."""
    async def step(ctx: StageContext) -> Mapping[str, Any] | None:
        if ctx.attempt < attempt:
            raise error()
        return result
    return step


class TestCompletion:
    async def test_five_stage_machine_completes_and_merges_outputs(self, tmp_path: Path) -> None:
        """Each stage sees every earlier output in ctx.context; all land in result.outputs."""
        seen: dict[str, dict[str, Any]] = {}

        def produce(index: int) -> Script:
            async def step(ctx: StageContext) -> Mapping[str, Any]:
                seen[ctx.stage] = dict(ctx.context)
                return {f"out_{index}": index * 10}
            return step

        for index, stage in enumerate(FIVE):
            SCRIPT[stage] = produce(index)
        async with fake_runtime(tmp_path) as runtime:
            result = await runtime.run(FIVE_STAGE_FLOW, context={"repo": "r"})
        assert result.success and result.status == "completed"
        assert result.current_stage == "completed"
        assert result.outputs == {f"out_{i}": i * 10 for i in range(5)}
        assert seen["checkout"] == {"repo": "r"}
        assert seen["ship"] == {"repo": "r", "out_0": 0, "out_1": 10, "out_2": 20, "out_3": 30}
        assert [stage for stage, _, _ in CALLS] == list(FIVE)

    async def test_state_file_validates_and_matches_the_result(self, tmp_path: Path) -> None:
        """state.json carries schema version and checksum, status, stages and progress_data."""
        for index, stage in enumerate(FIVE):
            SCRIPT[stage] = fail_until(1, TransientError, {stage: index})
        config = settings(enable_monitoring=False)
        async with Runtime(config, tmp_path, configure_logs=False) as runtime:
            result = await runtime.run(FIVE_STAGE_FLOW, context={"ticket": 7})
        path = tmp_path / ".github/workflow-states" / result.workflow_id / "state.json"
        raw = path.read_bytes()
        assert raw.startswith(b'{"schema_version":1,"checksum":"sha256:')
        state = decode_document(raw, str(path))
        assert state["workflow_id"] == result.workflow_id
        assert state["status"] == "completed"
        assert state["completed_stages"] == list(FIVE)
        assert state["progress_data"] == {stage: i for i, stage in enumerate(FIVE)}
        assert state["context"] == {"ticket": 7, **state["progress_data"]}
        assert state["definition"] == "test_engine:FIVE_STAGE_FLOW"
        history = state["monitoring_state"]["stage_history"]
        assert [(e["stage"], e["status"], e["attempts"]) for e in history] == [
            (s, "completed", 1) for s in FIVE]
        checkpoints = tmp_path / ".github/workflow-checkpoints"
        # checkpoint_frequency 5: the fifth stage's checkpoint, then the final one.
        assert sorted(p.name for p in checkpoints.iterdir()) == [
            f"{result.workflow_id}_checkpoint_final.json",
            f"{result.workflow_id}_checkpoint_ship.json"]

    async def test_result_dict_has_the_spec_shape(self, tmp_path: Path) -> None:
        """to_dict() flattens outputs beside the spec's keys and keeps the metrics report."""
        SCRIPT["work"] = fail_until(1, TransientError, {"pr_number": 12})
        async with fake_runtime(tmp_path) as runtime:
            result = await runtime.run(ONE_STAGE_FLOW)
        data = result.to_dict()
        assert data["pr_number"] == 12 and data["outputs"] == {"pr_number": 12}
        assert data["success"] is True and data["status"] == "completed"
        assert {"performance_score", "performance_grade", "error_rate", "recovery_rate",
                "stage_performance"} <= set(data["reliability_metrics"])

    async def test_handler_returning_a_non_mapping_fails_clearly(self, tmp_path: Path) -> None:
        """A handler that returns a list fails the workflow with a TypeError naming the stage."""
        async def bad(ctx: StageContext) -> Any:
            return [1, 2]
        SCRIPT["work"] = bad
        async with fake_runtime(tmp_path) as runtime:
            result = await runtime.run(ONE_STAGE_FLOW)
        assert result.status == "failed"
        assert result.error is not None and "stage 'work' handler returned list" in result.error


class TestTransientRetries:
    async def test_transient_error_is_retried_until_it_succeeds(self, tmp_path: Path) -> None:
        """Three transient failures, then success; each wait is within its jittered bound."""
        SCRIPT["work"] = fail_until(4, lambda: TransientError("502 from upstream"), {"ok": 1})
        async with fake_runtime(tmp_path, max_retries=3, retry_base_delay=1.0) as runtime:
            result = await runtime.run(ONE_STAGE_FLOW)
        assert result.status == "completed" and result.outputs == {"ok": 1}
        times = [at for _, at in calls_of("work")]
        assert [attempt for attempt, _ in calls_of("work")] == [1, 2, 3, 4]
        waits = [later - earlier for earlier, later in itertools.pairwise(times)]
        for retry, wait in enumerate(waits):
            assert 0.0 <= wait < 1.0 * 2 ** retry  # full jitter of base * 2**retry
        state = stored(runtime, result.workflow_id)
        assert state["monitoring_state"]["retry_count"] == 3
        assert state["monitoring_state"]["error_count"] == 3

    async def test_backoff_waits_are_exactly_the_policys_delays(
            self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """With a seeded random source the waits equal backoff_delays() to the last digit."""
        monkeypatch.setattr("reliability._engine.backoff_delays",
                            functools.partial(backoff_delays, rng=random.Random(42)))
        SCRIPT["work"] = fail_until(4, TransientError)
        async with fake_runtime(tmp_path, max_retries=3, retry_base_delay=2.0) as runtime:
            await runtime.run(ONE_STAGE_FLOW)
            end = runtime.clock.monotonic()
        expected = list(islice(backoff_delays(RetryPolicy(base_delay=2.0), random.Random(42)), 3))
        times = [at for _, at in calls_of("work")]
        assert times == [0.0, expected[0], expected[0] + expected[1], sum(expected)]
        assert end == sum(expected)

    async def test_rate_limited_error_waits_exactly_retry_after(self, tmp_path: Path) -> None:
        """RateLimitedError(retry_after=2) is retried after exactly 2 virtual seconds."""
        SCRIPT["work"] = fail_until(2, lambda: RateLimitedError("429", retry_after=2))
        async with fake_runtime(tmp_path) as runtime:
            result = await runtime.run(ONE_STAGE_FLOW)
        assert result.success
        assert calls_of("work") == [(1, 0.0), (2, 2.0)]

    async def test_retries_run_out_and_the_workflow_fails(self, tmp_path: Path) -> None:
        """With max_retries=2 a stage that always fails transiently runs 3 times, then fails."""
        SCRIPT["work"] = fail_until(99, lambda: TransientError("still down"))
        async with fake_runtime(tmp_path, max_retries=2) as runtime:
            result = await runtime.run(ONE_STAGE_FLOW)
        assert result.status == "failed" and result.error_category == "transient"
        assert result.error == "TransientError: still down"
        assert len(calls_of("work")) == 3
        assert "resume" in result.recovery_recommendations[0]

    async def test_stage_max_retries_overrides_the_configuration(self, tmp_path: Path) -> None:
        """A StageSpec's max_retries=0 means one attempt even if the config allows more."""
        flow = WorkflowDefinition("strict", [StageSpec(stage="work", handler=scripted,
                                                       max_retries=0)])
        SCRIPT["work"] = fail_until(99, TransientError)
        async with fake_runtime(tmp_path, max_retries=5) as runtime:
            result = await runtime.run(flow)
        assert result.status == "failed" and len(calls_of("work")) == 1

    async def test_wait_past_the_retry_budget_is_not_started(self, tmp_path: Path) -> None:
        """A server wait of 60 s with a 30 s budget fails now, noting the exhausted budget."""
        SCRIPT["work"] = fail_until(99, lambda: RateLimitedError("slow down", retry_after=60))
        async with fake_runtime(tmp_path, retry_budget_seconds=30) as runtime:
            result = await runtime.run(ONE_STAGE_FLOW)
            end = runtime.clock.monotonic()
        assert result.status == "failed"
        assert calls_of("work") == [(1, 0.0)] and end == 0.0

    async def test_resource_error_runs_recovery_then_retries(self, tmp_path: Path) -> None:
        """A ResourceError runs the stage's recovery action before the retry."""
        RECOVERED.clear()
        SCRIPT["work"] = fail_until(2, lambda: ResourceError("disk full"))
        async with fake_runtime(tmp_path) as runtime:
            result = await runtime.run(RECOVERING_FLOW)
        assert result.success
        assert RECOVERED == ["work: ResourceError"]
        assert result.reliability_metrics["recovery_rate"] == 1.0


class TestFailFast:
    async def test_configuration_error_fails_at_once_with_its_message(
            self, tmp_path: Path) -> None:
        """A ConfigurationError is not retried: one attempt, its message in the result."""
        SCRIPT["work"] = fail_until(
            99, lambda: ConfigurationError("test_command is empty: set it in config.json"))
        async with fake_runtime(tmp_path, max_retries=3) as runtime:
            result = await runtime.run(ONE_STAGE_FLOW)
            end = runtime.clock.monotonic()
        assert result.status == "failed" and not result.success
        assert result.error == "ConfigurationError: test_command is empty: set it in config.json"
        assert result.error_category == "configuration"
        assert calls_of("work") == [(1, 0.0)] and end == 0.0
        assert "Fix the setting" in result.recovery_recommendations[0]

    async def test_builtin_value_error_counts_as_configuration(self, tmp_path: Path) -> None:
        """A plain ValueError from a handler is a configuration problem: one attempt."""
        SCRIPT["work"] = fail_until(99, lambda: ValueError("bad input"))
        async with fake_runtime(tmp_path) as runtime:
            result = await runtime.run(ONE_STAGE_FLOW)
        assert result.error_category == "configuration" and len(calls_of("work")) == 1

    async def test_critical_error_stops_with_state_kept(self, tmp_path: Path) -> None:
        """A CriticalError fails at once; the stored state keeps the completed stages."""
        SCRIPT["link"] = fail_until(99, lambda: CriticalError("repository in unknown state"))
        async with fake_runtime(tmp_path) as runtime:
            result = await runtime.run(FIVE_STAGE_FLOW)
            state = stored(runtime, result.workflow_id)
        assert result.status == "failed" and result.error_category == "critical"
        assert len(calls_of("link")) == 1
        assert state["status"] == "failed"
        assert state["completed_stages"] == ["checkout", "configure", "compile"]


class TestDegradation:
    async def test_non_critical_stage_failure_degrades(self, tmp_path: Path) -> None:
        """A failing non-critical stage is recorded 'degraded' and the workflow completes."""
        SCRIPT["lint"] = fail_until(99, lambda: ConfigurationError("linter not installed"))
        SCRIPT["release"] = fail_until(1, TransientError, {"released": True})
        async with fake_runtime(tmp_path) as runtime:
            result = await runtime.run(DEGRADING_FLOW)
            state = stored(runtime, result.workflow_id)
        assert result.success and result.status == "completed"
        assert result.outputs == {"released": True}
        history = state["monitoring_state"]["stage_history"]
        assert [(e["stage"], e["status"]) for e in history] == [("lint", "degraded"),
                                                                ("release", "completed")]
        assert state["completed_stages"] == ["release"]
        assert result.reliability_metrics["stage_performance"]["lint"]["status"] == "degraded"

    async def test_non_critical_stage_degrades_after_retries_run_out(
            self, tmp_path: Path) -> None:
        """Transient failures of a non-critical stage are retried first, then it degrades."""
        SCRIPT["lint"] = fail_until(99, TransientError)
        async with fake_runtime(tmp_path, max_retries=2) as runtime:
            result = await runtime.run(DEGRADING_FLOW)
        assert result.success and len(calls_of("lint")) == 3


class TestCustomErrorHandlers:
    async def test_wait_and_retry_waits_exactly_the_given_delay(self, tmp_path: Path) -> None:
        """An error handler answering wait_and_retry with delay 30 retries at exactly t=30."""
        seen: list[tuple[str, str, str]] = []

        def handler(workflow_id: str, error: BaseException, stage: str,
                    context: dict[str, Any]) -> dict[str, Any]:
            seen.append((workflow_id, type(error).__name__, stage))
            return {"strategy": "wait_and_retry", "delay": 30}

        SCRIPT["work"] = fail_until(2, TransientError)
        async with fake_runtime(tmp_path) as runtime:
            runtime.register_error_handler(handler)
            result = await runtime.run(ONE_STAGE_FLOW)
        assert result.success
        assert calls_of("work") == [(1, 0.0), (2, 30.0)]
        assert seen == [(result.workflow_id, "TransientError", "work")]

    async def test_async_handler_may_fail_a_transient_error_at_once(
            self, tmp_path: Path) -> None:
        """An awaitable answer {'strategy': 'fail'} stops retries of a transient error."""
        async def handler(*args: Any) -> dict[str, Any]:
            return {"strategy": "fail"}

        SCRIPT["work"] = fail_until(99, TransientError)
        async with fake_runtime(tmp_path) as runtime:
            runtime.register_error_handler(handler)
            result = await runtime.run(ONE_STAGE_FLOW)
        assert result.status == "failed" and len(calls_of("work")) == 1

    async def test_handler_answering_none_keeps_default_handling(self, tmp_path: Path) -> None:
        """An error handler returning None leaves the default retry policy in charge."""
        SCRIPT["work"] = fail_until(2, lambda: RateLimitedError("429", retry_after=5))
        async with fake_runtime(tmp_path) as runtime:
            runtime.register_error_handler(lambda *args: None)
            result = await runtime.run(ONE_STAGE_FLOW)
        assert result.success and calls_of("work") == [(1, 0.0), (2, 5.0)]


async def park(ctx: StageContext) -> None:
    """Wait forever on an event nobody sets (no timers: the fake clock never moves)."""
    PARKED.append(ctx.workflow_id)
    await asyncio.Event().wait()


PARKED: list[str] = []


async def until_parked(count: int) -> None:
    await parking.until_parked(PARKED, count)


class TestCancellation:
    @pytest.fixture(autouse=True)
    def _reset_parked(self) -> None:
        PARKED.clear()

    async def test_cancel_interrupts_a_parked_workflow_resumably(self, tmp_path: Path) -> None:
        """Runtime.cancel(id) inside a handler ends it 'interrupted', never 'failed'."""
        SCRIPT["wait"] = park
        clock = FakeClock()
        async with Runtime(settings(), tmp_path, clock=clock, store=MemoryStore(),
                           configure_logs=False) as runtime:
            task = asyncio.create_task(runtime.run(PARKING_FLOW))
            await until_parked(1)
            assert await runtime.cancel(PARKED[0]) is True
            result = await task
            assert result.status == "interrupted" and not result.success
            assert result.error is not None and "resumable" in result.error
            state = stored(runtime, result.workflow_id)
            assert state["status"] == "interrupted"
            assert state["completed_stages"] == ["prepare"]
            assert "resume" in result.recovery_recommendations[0]

            SCRIPT["wait"] = fail_until(1, TransientError, {"waited": True})
            resumed = await runtime.resume(result.workflow_id)
        assert resumed.status == "completed" and resumed.resumed_from == "wait"
        assert resumed.outputs == {"waited": True}
        assert [s for s, _, _ in CALLS] == ["prepare", "wait", "wait", "finish"]
        assert clock.monotonic() == 0.0

    async def test_request_shutdown_interrupts_every_workflow(self, tmp_path: Path) -> None:
        """request_shutdown() leaves every running workflow 'interrupted' and resumable."""
        SCRIPT["wait"] = park
        async with Runtime(settings(), tmp_path, clock=FakeClock(), store=MemoryStore(),
                           configure_logs=False) as runtime:
            tasks = [asyncio.create_task(runtime.run(PARKING_FLOW)) for _ in range(5)]
            await until_parked(5)
            runtime.request_shutdown()
            results = await asyncio.gather(*tasks)
            assert {r.status for r in results} == {"interrupted"}
            with pytest.raises(WorkflowError, match="shutting down"):
                await runtime.run(PARKING_FLOW)
            states = await runtime.store.list_states({"interrupted"})
        assert sorted(s.state["workflow_id"] for s in states) == sorted(
            r.workflow_id for r in results)

        SCRIPT["wait"] = fail_until(1, TransientError)
        store = runtime.store
        async with Runtime(settings(), tmp_path, clock=FakeClock(), store=store,
                           configure_logs=False) as fresh:
            resumed = await fresh.resume_all()
        assert sorted(r.workflow_id for r in resumed) == sorted(r.workflow_id for r in results)
        assert {r.status for r in resumed} == {"completed"}

    async def test_cancel_of_an_unknown_workflow_returns_false(self, tmp_path: Path) -> None:
        """cancel() of a well-formed ID that is not running here says so with False."""
        async with fake_runtime(tmp_path) as runtime:
            assert await runtime.cancel("workflow-20240115-142315-a7b3") is False

    async def test_outside_cancellation_leaves_the_workflow_interrupted(
            self, tmp_path: Path) -> None:
        """Cancelling the caller's task propagates CancelledError; the state is 'interrupted'."""
        SCRIPT["wait"] = park
        async with Runtime(settings(), tmp_path, clock=FakeClock(), store=MemoryStore(),
                           configure_logs=False) as runtime:
            task = asyncio.create_task(runtime.run(PARKING_FLOW))
            await until_parked(1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert stored(runtime, PARKED[0])["status"] == "interrupted"


class TestScale:
    async def test_a_thousand_nineteen_stage_workflows_complete_in_one_loop(
            self, tmp_path: Path) -> None:
        """1,000 concurrent workflows of 19 trivial stages all complete on a FileStore."""
        config = settings(enable_monitoring=False)
        async with Runtime(config, tmp_path, configure_logs=False) as runtime:
            results = await asyncio.gather(*(runtime.run(NINETEEN_FLOW) for _ in range(1000)))
            assert isinstance(runtime.store, FileStore)
        assert {r.status for r in results} == {"completed"}
        assert len({r.workflow_id for r in results}) == 1000
        assert len(CALLS) == 19 * 1000
        assert NINETEEN_FLOW._machine.models == []
        async with Runtime(config, tmp_path, configure_logs=False) as reader:
            states = await reader.store.list_states()
        assert len(states) == 1000
        assert all(s.state["status"] == "completed" and len(s.state["completed_stages"]) == 19
                   for s in states)


class TestOverlappedDurability:
    async def test_every_stage_is_recorded_and_the_end_is_durable(self, tmp_path: Path) -> None:
        """durability="overlapped" on a FileStore: each stage's record reaches the journal
        (the next stage does not wait for it), and the final state is on disk at the end."""
        config = settings(enable_monitoring=False, durability="overlapped")
        async with Runtime(config, tmp_path, configure_logs=False) as runtime:
            results = await asyncio.gather(*(runtime.run(NINETEEN_FLOW) for _ in range(50)))
        assert {r.status for r in results} == {"completed"}
        async with Runtime(config, tmp_path, configure_logs=False) as reader:
            states = {s.state["workflow_id"]: s.state for s in await reader.store.list_states()}
        assert set(states) == {r.workflow_id for r in results}
        stages = [s.value for s in list(WorkflowStage)[:19]]
        for state in states.values():
            assert state["completed_stages"] == stages
            assert [h["stage"] for h in state["monitoring_state"]["stage_history"]] == stages

    async def test_a_failed_write_surfaces_at_the_next_stage_boundary(
            self, tmp_path: Path) -> None:
        """A stage's record that could not be written fails the workflow one stage later,
        with the storage error, rather than being lost silently."""
        config = settings(enable_monitoring=False, durability="overlapped")
        async with Runtime(config, tmp_path, configure_logs=False) as runtime:
            store = runtime.store
            failing = ResourceError("cannot write journal: No space left on device")
            real = store.save_nowait
            writes = 0

            def save_nowait(*args: Any, **kwargs: Any) -> asyncio.Future[None]:
                nonlocal writes
                writes += 1
                if writes == 3:  # the second stage's completion
                    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                    future.set_exception(failing)
                    return future
                return real(*args, **kwargs)

            store.save_nowait = save_nowait  # type: ignore[method-assign]
            with pytest.raises(ResourceError, match="No space left"):
                await runtime.run(FIVE_STAGE_FLOW)
        assert [name for name, _, _ in CALLS] == ["checkout", "configure", "compile"]


class TestListenersAddedLater:
    async def test_listeners_added_after_a_run_hear_every_stage(self, tmp_path: Path) -> None:
        """A listener added after the engine ran unheard still hears stage and stage_end."""
        heard: list[tuple[str, str]] = []
        only_ends: list[str] = []
        async with fake_runtime(tmp_path) as runtime:
            assert (await runtime.run(FIVE_STAGE_FLOW)).status == "completed"
            runtime.add_listener(lambda event, run, **data: heard.append(
                (event, data.get("stage") or data.get("entry", {}).get("stage", ""))))
            runtime.add_listener(lambda event, run, **data: only_ends.append(
                data["entry"]["stage"]), events=["stage_end"])
            assert (await runtime.run(FIVE_STAGE_FLOW)).status == "completed"
        stages = list(FIVE)
        assert [stage for event, stage in heard if event == "stage"] == stages
        assert [stage for event, stage in heard if event == "stage_end"] == stages
        assert only_ends == stages
