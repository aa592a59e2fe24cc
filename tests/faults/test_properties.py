"""Property: whatever fails, times out or is interrupted, a workflow ends completed or
resumable, and once resumed to completion every stage's work happened exactly once.

Random user-defined machines (1-5 stages) run on a FakeClock with autojump and a
MemoryStore, so a 10 s stage timeout costs microseconds. Each stage follows a random
script per execution: succeed, fail transiently, hang past its timeout, or stop the
workflow from inside (``Runtime.request_shutdown`` or ``Runtime.cancel``). The handler
records its effect, keyed by workflow and stage, only when it completes its work.
"""

from __future__ import annotations

import asyncio
import tempfile
from typing import Any

from fault_flows import DEGRADING, PROP_FLOWS, PROPERTY_EFFECTS, PROPERTY_LEDGER
from hypothesis import given, settings
from hypothesis import strategies as st

from reliability import FakeClock, MemoryStore, Runtime, WorkflowConfiguration, WorkflowResult
from reliability._state import RESUMABLE

STEPS = st.sampled_from(["ok", "transient", "timeout", "shutdown", "cancel"])
PROJECT = tempfile.gettempdir()  # nothing is written there: the store is in memory
CONFIG = WorkflowConfiguration(enable_health_checks=False, enable_monitoring=False,
                               retry_base_delay=1.0, retry_max_delay=8.0)


@st.composite
def machines(draw: st.DrawFn) -> tuple[int, dict[str, list[str]]]:
    stage_count = draw(st.integers(min_value=1, max_value=5))
    plan = {f"s{i}": draw(st.lists(STEPS, max_size=4)) for i in range(stage_count)}
    return stage_count, plan


async def _until_completed(stage_count: int, plan: dict[str, list[str]]
                           ) -> tuple[WorkflowResult, list[str], MemoryStore]:
    """Run, then resume in a fresh runtime (a new process, as far as the engine knows)
    until completed; every intermediate status must be resumable."""
    store, clock = MemoryStore(), FakeClock()
    result: WorkflowResult | None = None
    statuses: list[str] = []
    for _ in range(40):
        async with Runtime(CONFIG, PROJECT, store=store, clock=clock,
                           configure_logs=False) as runtime, clock.autojump():
            if result is None:
                result = await runtime.run(PROP_FLOWS[stage_count], context={"plan": plan})
            else:
                result = await runtime.resume(result.workflow_id)
        statuses.append(result.status)
        if result.status == "completed":
            return result, statuses, store
        assert result.status in RESUMABLE, (result.status, result.error)
    raise AssertionError(f"never completed: {statuses}")


@settings(max_examples=60, deadline=None, database=None)
@given(machines())
def test_random_machines_end_resumable_and_resume_to_exactly_once_effects(
        machine: tuple[int, dict[str, list[str]]]) -> None:
    """Any mix of transient failures, timeouts, shutdowns and cancels: every run ends
    completed or resumable; resumed to the end, each stage's effect happened exactly once."""
    stage_count, plan = machine
    result, statuses, store = asyncio.run(_until_completed(stage_count, plan))

    names = [f"s{i}" for i in range(stage_count)]
    effects = PROPERTY_EFFECTS.pop(result.workflow_id)
    entered = PROPERTY_LEDGER.pop(result.workflow_id)
    assert dict(effects) == dict.fromkeys(names, 1)
    assert all(entered[n] >= 1 for n in names)
    state: dict[str, Any] = asyncio.run(store.load(result.workflow_id)).state
    assert state["completed_stages"] == names
    assert all(result.outputs[f"{n}_output"] == n.upper() for n in names)
    stops = sum(step in ("shutdown", "cancel") for steps in plan.values() for step in steps)
    assert statuses.count("interrupted") <= stops


async def _stop_while_deciding() -> tuple[WorkflowResult, int, WorkflowResult, int]:
    store, clock = MemoryStore(), FakeClock()
    async with Runtime(CONFIG, PROJECT, store=store, clock=clock,
                       configure_logs=False) as runtime:
        async def stop_now(*_: object) -> None:  # an async error handler: an await point
            runtime.request_shutdown()

        runtime.register_error_handler(stop_now)
        async with clock.autojump():
            first = await runtime.run(PROP_FLOWS[1], context={"plan": {"s0": ["transient"]}})
    effects_after_stop = PROPERTY_EFFECTS.get(first.workflow_id, {}).get("s0", 0)
    async with Runtime(CONFIG, PROJECT, store=store, clock=clock,
                       configure_logs=False) as runtime, clock.autojump():
        resumed = await runtime.resume(first.workflow_id)
    effects = PROPERTY_EFFECTS.pop(first.workflow_id)["s0"]
    PROPERTY_LEDGER.pop(first.workflow_id)
    return first, effects_after_stop, resumed, effects


def test_shutdown_asked_between_attempts_stops_before_the_next_attempt() -> None:
    """A shutdown asked while the engine decides on a failure (nothing to cancel then)
    stops the workflow before the retry, so the retry's effect is not made and then
    repeated on resume."""
    first, effects_after_stop, resumed, effects = asyncio.run(_stop_while_deciding())
    assert first.status == "interrupted"
    assert effects_after_stop == 0
    assert resumed.status == "completed"
    assert effects == 1


async def _degrade_then_interrupt() -> tuple[WorkflowResult, WorkflowResult]:
    store, clock = MemoryStore(), FakeClock()
    plan = {"s1": ["fatal"], "s2": ["shutdown"]}
    async with Runtime(CONFIG, PROJECT, store=store, clock=clock,
                       configure_logs=False) as runtime, clock.autojump():
        first = await runtime.run(DEGRADING, context={"plan": plan})
    async with Runtime(CONFIG, PROJECT, store=store, clock=clock,
                       configure_logs=False) as runtime, clock.autojump():
        return first, await runtime.resume(first.workflow_id)


def test_workflow_with_a_degraded_stage_resumes_after_the_last_completed_one() -> None:
    """A non-critical stage that degraded is not 'completed'; an interruption after it
    still resumes (at the stage that was interrupted), and nothing runs twice."""
    first, resumed = asyncio.run(_degrade_then_interrupt())
    assert first.status == "interrupted"
    assert resumed.status == "completed", resumed.error
    assert resumed.resumed_from == "s2"
    effects = PROPERTY_EFFECTS.pop(first.workflow_id)
    PROPERTY_LEDGER.pop(first.workflow_id)
    assert dict(effects) == {"s0": 1, "s2": 1}  # s1 degraded: skipped, never completed
