"""An Engine without a Runtime: built on a small fake host and a MemoryStore, on a FakeClock.

Also pins that the workflow's state machine is the one record of where it is: the engine
reads the stage to run from ``run.state``, every ending is a machine state reached by a
transition, and a move the machine does not allow raises.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import parking
import pytest

from machines import StageContext, StageSpec, WorkflowDefinition
from reliability import (
    Breaker,
    FakeClock,
    InvalidTransitionError,
    MemoryStore,
    RateLimitedError,
    ResourceError,
    WorkflowConfiguration,
)
from reliability._engine import Engine, LiveWorkflow
from reliability._host import EngineHost, ErrorHandler, Listener
from reliability._state import WorkflowRun
from reliability._turns import Turns

T = TypeVar("T")
IDS = itertools.count(1)
CALLS: list[tuple[str, int, float]] = []  # (stage, attempt, virtual time), in order
STATES: list[str] = []  # the run's machine state as each handler started
PARKED: list[str] = []  # workflows whose handler waits forever


class FakeHost:
    """Exactly what an Engine needs of its host; records the events it emits."""

    def __init__(self, clock: FakeClock, store: MemoryStore) -> None:
        self.clock = clock
        self.config = WorkflowConfiguration(enable_health_checks=False,
                                            enable_monitoring=False)
        self.project_root = Path(".")
        self.persistence = True
        self.store = store
        self.turns = Turns()
        self.error_handlers: list[ErrorHandler] = []
        self.breakers: dict[str, Breaker] = {}
        self.events: list[tuple[str, str, Any]] = []
        self.tasks: set[asyncio.Task[Any]] = set()

    def breaker(self, name: str) -> Breaker:
        return self.breakers.setdefault(name, Breaker(name, failure_threshold=5,
                                                      recovery_timeout=60.0, clock=self.clock))

    async def guarded_call(self, name: str, call: Callable[[], Awaitable[T]]) -> T:
        return await call()

    async def shared(self, key: str, factory: Callable[[], Awaitable[T]]) -> T:
        return await factory()

    async def stage_health_check(self, run: WorkflowRun, reason: str) -> None:
        self.events.append(("health", run.workflow_id, reason))

    def emit(self, event: str, run: WorkflowRun, **data: Any) -> None:
        self.events.append((event, run.workflow_id, data.get("stage")))

    def listeners(self, event: str) -> Sequence[Listener]:
        return [self.emit]  # it records every event

    def spawn(self, coroutine: Coroutine[Any, Any, Any], name: str) -> None:
        task = asyncio.get_running_loop().create_task(coroutine, name=name)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


def typed(host: FakeHost) -> EngineHost:
    """The fake, as the protocol it must satisfy (mypy checks this line if run on tests)."""
    return host


async def record(ctx: StageContext) -> Mapping[str, Any]:
    CALLS.append((ctx.stage, ctx.attempt, ctx.clock.monotonic()))
    models = [m for m in THREE._machine.models if m.workflow_id == ctx.workflow_id]
    if models:  # a run of THREE: note where its machine is
        STATES.append(models[0].state)
    return {ctx.stage: ctx.attempt}


async def rate_limited_once(ctx: StageContext) -> Mapping[str, Any]:
    if ctx.attempt == 1:
        CALLS.append((ctx.stage, ctx.attempt, ctx.clock.monotonic()))
        raise RateLimitedError("slow down", retry_after=2.5)
    return await record(ctx)


async def short_of_memory_once(ctx: StageContext) -> Mapping[str, Any]:
    if ctx.attempt == 1:
        raise ResourceError("out of memory")
    return await record(ctx)


async def sleeps_past_timeout(ctx: StageContext) -> None:
    CALLS.append((ctx.stage, ctx.attempt, ctx.clock.monotonic()))
    await ctx.sleep(100.0)


async def parks(ctx: StageContext) -> None:
    PARKED.append(ctx.workflow_id)
    await asyncio.Event().wait()


THREE = WorkflowDefinition("three", [StageSpec(stage="fetch", handler=record),
                                     StageSpec(stage="build", handler=record),
                                     StageSpec(stage="ship", handler=record)])
RETRYING = WorkflowDefinition("retrying", [StageSpec(stage="call", handler=rate_limited_once)])
RECOVERING = WorkflowDefinition("recovering", [
    StageSpec(stage="heavy", handler=short_of_memory_once, recovery_actions=())])
TIMING_OUT = WorkflowDefinition("timing-out", [
    StageSpec(stage="prepare", handler=record),
    StageSpec(stage="slow", handler=sleeps_past_timeout, timeout_seconds=5.0, max_retries=0)])
PARKING = WorkflowDefinition("parking", [StageSpec(stage="wait", handler=parks)])


@pytest.fixture(autouse=True)
def _fresh() -> None:
    CALLS.clear()
    STATES.clear()
    PARKED.clear()


@pytest.fixture
async def host() -> AsyncIterator[FakeHost]:
    clock = FakeClock()
    store = MemoryStore()
    await store.open()
    async with clock.autojump():
        yield FakeHost(clock, store)
    await store.close()


def new_run(definition: WorkflowDefinition, host: FakeHost) -> WorkflowRun:
    return WorkflowRun(f"workflow-20240101-000000-{next(IDS):012x}",
                       definition_name=definition.name, definition_path=None,
                       context={"input": 1}, prompt_file=None, created_at=host.clock.time())


async def drive(definition: WorkflowDefinition, host: FakeHost, run: WorkflowRun | None = None,
                at: str = "pending") -> WorkflowRun:
    run = run or new_run(definition, host)
    await Engine(typed(host), definition).execute(LiveWorkflow(run), at)
    return run


async def stored_status(host: FakeHost, run: WorkflowRun) -> str:
    return str((await host.store.load(run.workflow_id)).state["status"])


class TestEngineWithoutRuntime:
    async def test_a_workflow_runs_every_stage_and_ends_completed(self, host: FakeHost) -> None:
        """Stages run in order, outputs merge, the end is stored, and the run leaves the machine."""
        run = await drive(THREE, host)
        assert [c[0] for c in CALLS] == ["fetch", "build", "ship"]
        assert run.status == "completed" and run.state == "completed"
        assert run.outputs == {"fetch": 1, "build": 1, "ship": 1}
        assert run.completed_stages == ["fetch", "build", "ship"]
        assert await stored_status(host, run) == "completed"
        assert [e[2] for e in host.events if e[0] == "stage"] == ["fetch", "build", "ship"]
        assert THREE._machine.models == []

    async def test_a_rate_limited_stage_is_retried_after_the_servers_wait(
            self, host: FakeHost) -> None:
        """Attempt 2 starts exactly retry_after (2.5 s) of virtual time after attempt 1."""
        run = await drive(RETRYING, host)
        assert CALLS == [("call", 1, 0.0), ("call", 2, 2.5)]
        assert run.status == "completed" and run.retry_count == 1
        assert ("retry", run.workflow_id, "call") in host.events

    async def test_built_in_recovery_uses_the_host_through_the_stage_context(
            self, host: FakeHost) -> None:
        """A resource error runs check_system_health (a health reading on the host) before
        the retry succeeds."""
        run = await drive(RECOVERING, host)
        assert run.status == "completed" and run.recovery_attempts == 1
        assert ("health", run.workflow_id, "recovery in heavy") in host.events
        assert [c[:2] for c in CALLS] == [("heavy", 2)]

    async def test_a_stage_past_its_timeout_is_stopped_and_the_run_timed_out(
            self, host: FakeHost) -> None:
        """The watchdog cancels the handler at 5 s on the fake clock; the machine ends
        in timed_out, which is also the stored status."""
        run = await drive(TIMING_OUT, host)
        assert run.status == "timed_out" and run.state == "timed_out"
        assert host.clock.monotonic() == pytest.approx(5.0)
        assert run.current_stage == "slow" and run.completed_stages == ["prepare"]
        assert run.error is not None and "StageTimeoutError" in run.error
        assert await stored_status(host, run) == "timed_out"

    async def test_a_stop_inside_a_handler_ends_interrupted_by_a_transition(
            self, host: FakeHost) -> None:
        """live.stop() cancels a parked handler; the run's machine state is interrupted."""
        run = new_run(PARKING, host)
        live = LiveWorkflow(run)
        task = asyncio.create_task(Engine(typed(host), PARKING).execute(live))
        await parking.until_parked(PARKED, 1)
        assert live.in_handler
        live.stop("cancel")
        await task
        assert run.status == "interrupted" and run.state == "interrupted"
        assert PARKING._machine.models == []


class TestMachineIsTheRecord:
    async def test_each_handler_runs_while_the_machine_is_at_its_stage(
            self, host: FakeHost) -> None:
        """The machine's state names the stage whose handler runs."""
        await drive(THREE, host)
        assert STATES == ["fetch", "build", "ship"]

    async def test_a_run_attached_at_a_later_stage_runs_from_there(self, host: FakeHost) -> None:
        """Resumed at "build", the engine runs build and ship only: no index of its own."""
        run = await drive(THREE, host, at="build")
        assert [c[0] for c in CALLS] == ["build", "ship"]
        assert run.status == "completed"

    async def test_a_run_attached_at_completed_runs_no_stage(self, host: FakeHost) -> None:
        """Every stage passed and only the end unsaved: the end is recorded, nothing re-runs."""
        run = await drive(THREE, host, at="completed")
        assert CALLS == []
        assert run.status == "completed" and await stored_status(host, run) == "completed"

    @pytest.mark.parametrize("outcome", ["failed", "timed_out", "cancelled", "interrupted"])
    async def test_a_run_cannot_be_put_at_an_outcome(self, host: FakeHost, outcome: str) -> None:
        """An ended workflow is resumed at a stage, never at its outcome: that raises."""
        run = new_run(THREE, host)
        with pytest.raises(InvalidTransitionError, match=f"from state '{outcome}'"):
            await drive(THREE, host, run, at=outcome)
        assert THREE._machine.models == []

    async def test_moves_the_machine_does_not_allow_raise(self, host: FakeHost) -> None:
        """Advancing past completed, or ending a workflow twice, raises a clear error."""
        run = new_run(THREE, host)
        THREE.attach(run, "ship")
        try:
            await THREE.advance(run)
            assert run.state == "completed"
            with pytest.raises(InvalidTransitionError,
                               match="cannot 'advance' from state 'completed'"):
                await THREE.advance(run)
            with pytest.raises(InvalidTransitionError,
                               match="cannot 'failed' from state 'completed'"):
                await THREE.finish(run, "failed")
        finally:
            THREE.detach(run)
        run = new_run(THREE, host)
        THREE.attach(run, "fetch")
        try:
            await THREE.finish(run, "failed")
            with pytest.raises(InvalidTransitionError, match="from state 'failed'"):
                await THREE.finish(run, "interrupted")
            assert run.state == "failed"
        finally:
            THREE.detach(run)

    async def test_finish_takes_only_outcomes(self, host: FakeHost) -> None:
        """finish("completed") or a stage name is refused: completing is advance's job."""
        run = new_run(THREE, host)
        THREE.attach(run, "build")
        try:
            for wrong in ("completed", "ship"):
                with pytest.raises(ValueError, match="is not an outcome"):
                    await THREE.finish(run, wrong)
            assert run.state == "build"
        finally:
            THREE.detach(run)
