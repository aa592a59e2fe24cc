"""Fair turns (reliability/_turns.py) and the interpreter tuning a runtime holds."""

from __future__ import annotations

import asyncio
import gc
import sys
from pathlib import Path

import pytest

from machines import StageSpec, WorkflowDefinition
from reliability import MemoryStore, Runtime, WorkflowConfiguration
from reliability._store import WAKE_CHUNK
from reliability._tuning import (
    RUNTIME_SWITCH_INTERVAL,
    RUNTIME_THRESHOLDS,
    hold_tuning,
    release_tuning,
)
from reliability._turns import Turns


def quick_config(**changes: object) -> WorkflowConfiguration:
    return WorkflowConfiguration(**{"enable_health_checks": False, "log_level": "WARNING",
                                    **changes})  # type: ignore[arg-type]


async def test_unsaturated_loop_gets_turns_without_waiting() -> None:
    turns = Turns()
    assert all(turns.take() is None for _ in range(turns.per_iteration))
    assert turns.waiting == 0


async def test_past_the_allowance_turns_queue_and_are_granted_in_arrival_order() -> None:
    turns = Turns()
    for _ in range(turns.per_iteration):
        assert turns.take() is None
    waiters = [turns.take() for _ in range(3)]
    assert all(w is not None for w in waiters)
    assert turns.waiting == 3
    order: list[int] = []

    async def wait(index: int, waiter: asyncio.Future[None]) -> None:
        await waiter
        order.append(index)

    await asyncio.gather(*(wait(i, w) for i, w in enumerate(waiters) if w is not None))
    assert order == [0, 1, 2]
    assert turns.waiting == 0


async def test_a_cancelled_waiter_does_not_use_up_a_turn() -> None:
    turns = Turns()
    for _ in range(turns.per_iteration):
        turns.take()
    cancelled, kept = turns.take(), turns.take()
    assert cancelled is not None and kept is not None
    cancelled.cancel()
    await asyncio.wait_for(kept, timeout=5)
    assert kept.done() and not kept.cancelled()


class _IterationCounter:
    """Counts loop iterations with a callback that re-schedules itself each iteration."""

    def __init__(self) -> None:
        self.iteration = 0
        self._running = True
        asyncio.get_running_loop().call_soon(self._tick)

    def _tick(self) -> None:
        self.iteration += 1
        if self._running:
            asyncio.get_running_loop().call_soon(self._tick)

    def stop(self) -> None:
        self._running = False


async def test_a_saturated_loop_starts_a_bounded_number_of_stages_per_iteration() -> None:
    # A 0.1 ms budget: however fast the machine, far fewer than 2,000 turns fit in it.
    turns = Turns(target_iteration_seconds=0.0001)
    counter = _IterationCounter()
    started_in: dict[int, int] = {}

    async def busy_workflow() -> None:
        for _ in range(5):
            await turns.turn()
            started_in[counter.iteration] = started_in.get(counter.iteration, 0) + 1
            await asyncio.sleep(0)

    await asyncio.gather(*(busy_workflow() for _ in range(2_000)))
    counter.stop()
    assert sum(started_in.values()) == 10_000
    # The allowance adapts to what fits the time budget, but 2,000
    # ready workflows never all start a stage in the same iteration.
    assert max(started_in.values()) < 2_000
    assert len(started_in) > 10_000 // max(started_in.values())


async def test_runtime_workflows_take_turns_and_all_complete(tmp_path: Path) -> None:
    flow = WorkflowDefinition("turn_taking", [StageSpec(stage=f"s{i}", handler=_yield_once)
                                              for i in range(3)])
    async with Runtime(quick_config(), project_root=tmp_path, store=MemoryStore(),
                       configure_logs=False) as rt:
        results = await asyncio.gather(*(rt.run(flow) for _ in range(500)))
        assert rt.turns.waiting == 0
    assert {r.status for r in results} == {"completed"}


async def _yield_once(ctx: object) -> None:
    await asyncio.sleep(0)




@pytest.mark.usefixtures("cpython_defaults")
def test_tuning_replaces_cpython_defaults_while_held_and_restores_them() -> None:
    hold_tuning()
    hold_tuning()  # a second runtime in the same process
    assert gc.get_threshold() == RUNTIME_THRESHOLDS
    assert sys.getswitchinterval() == pytest.approx(RUNTIME_SWITCH_INTERVAL)
    release_tuning()
    assert gc.get_threshold() == RUNTIME_THRESHOLDS  # one holder left
    release_tuning()
    assert gc.get_threshold() == (700, 10, 10)
    assert sys.getswitchinterval() == pytest.approx(0.005)


@pytest.mark.usefixtures("cpython_defaults")
def test_tuning_leaves_thresholds_the_process_chose_itself() -> None:
    gc.set_threshold(5_000, 5, 5)
    sys.setswitchinterval(0.002)
    hold_tuning()
    try:
        assert gc.get_threshold() == (5_000, 5, 5)
        assert sys.getswitchinterval() == pytest.approx(0.002)
    finally:
        release_tuning()
    assert gc.get_threshold() == (5_000, 5, 5)
    assert sys.getswitchinterval() == pytest.approx(0.002)


@pytest.mark.usefixtures("cpython_defaults")
async def test_runtime_holds_the_tuning_only_while_open_and_only_if_configured(
        tmp_path: Path) -> None:
    async with Runtime(quick_config(tune_interpreter=True), project_root=tmp_path,
                       store=MemoryStore(), configure_logs=False):
        assert gc.get_threshold() == RUNTIME_THRESHOLDS
    assert gc.get_threshold() == (700, 10, 10)
    async with Runtime(quick_config().replace(tune_interpreter=False),
                       project_root=tmp_path, store=MemoryStore(), configure_logs=False):
        assert gc.get_threshold() == (700, 10, 10)


async def test_a_burst_of_starts_on_a_file_store_is_spread_over_iterations(
        tmp_path: Path) -> None:
    """1,000 workflows started at once: claims and first checkpoints are batched, yet no
    loop iteration runs more first stages than one batch's wake-up share."""
    counter = _IterationCounter()
    started_in: dict[int, int] = {}

    async def note_iteration(ctx: object) -> None:
        started_in[counter.iteration] = started_in.get(counter.iteration, 0) + 1

    flow = WorkflowDefinition("burst", [StageSpec(stage="only", handler=note_iteration)])
    async with Runtime(quick_config(enable_monitoring=False), project_root=tmp_path,
                       configure_logs=False) as rt:
        results = await asyncio.gather(*(rt.run(flow) for _ in range(1_000)))
    counter.stop()
    assert {r.status for r in results} == {"completed"}
    assert sum(started_in.values()) == 1_000
    # At most one durable batch's wake-up share (its first checkpoint wakes them).
    assert max(started_in.values()) <= WAKE_CHUNK
    assert len(started_in) >= 1_000 // WAKE_CHUNK
