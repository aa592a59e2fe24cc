"""Waking many parked workflows at once: batched store calls, entries kept until done."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from wait_workflows import (
    GATED,
    GATED_FLOW,
    RUNS,
    SLEEP_FLOW,
    WAIT_FLOW,
    quiet_config,
    run_gated,
)

from machines import StageContext, StageSpec, WorkflowDefinition
from reliability import FakeClock, FileStore, MemoryStore, Runtime
from reliability._store import Claim, LoadedState, ParkedEntry


class CountingStore(MemoryStore):
    """A MemoryStore that counts the calls the waker makes."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    async def load(self, workflow_id: str) -> LoadedState:
        self.calls["load"] += 1
        return await super().load(workflow_id)

    async def load_many(self, workflow_ids: list[str]) -> dict[str, Any]:
        self.calls["load_many"] += 1
        self.calls["load"] -= len(workflow_ids)  # its loads are not single ones
        return await super().load_many(workflow_ids)

    async def claim_many(self, workflow_ids: Any) -> tuple[list[Claim], list[str]]:
        self.calls["claim_many"] += 1
        return await super().claim_many(workflow_ids)

    async def signals_ready(self, wanted: list[tuple[str, str, int]]) -> list[str]:
        self.calls["signals_ready"] += 1
        return await super().signals_ready(wanted)

    async def read_signal(self, workflow_id: str, name: str, index: int) -> bytes | None:
        self.calls["read_signal"] += 1
        return await super().read_signal(workflow_id, name, index)

    async def unpark(self, entry: ParkedEntry) -> None:
        self.calls["unpark"] += 1
        await super().unpark(entry)

    async def unpark_many(self, entries: list[ParkedEntry]) -> None:
        self.calls["unpark_many"] += 1
        self.calls["unpark"] -= len(entries)
        await super().unpark_many(entries)


async def park_signal_waits(rt: Runtime, store: CountingStore, count: int, *,
                            signalled: int = 0, payload: bytes = b"",
                            **context: Any) -> list[str]:
    """``count`` WAIT_FLOW workflows parked for "go"; the first ``signalled`` of them get
    ``payload`` stored without a wake (as another process would send it)."""
    parked = await asyncio.gather(*(rt.run(WAIT_FLOW, context=context)
                                    for _ in range(count)))
    assert {r.status for r in parked} == {"waiting"}
    ids = [r.workflow_id for r in parked]
    for workflow_id in ids[:signalled]:
        await store.send_signal(workflow_id, "go", payload)
    return ids


async def test_many_due_wake_with_a_few_store_calls_not_one_each() -> None:
    """300 sleepers due at once: one claim call, one state read and one unpark call wake
    them all (not a claim, a load and an unpark each), and each completes once."""
    store = CountingStore()
    clock = FakeClock()
    async with Runtime(quiet_config(), store=store, clock=clock) as rt:
        parked = await asyncio.gather(*(rt.run(SLEEP_FLOW, context={"seconds": 10.0})
                                        for _ in range(300)))
        assert {r.status for r in parked} == {"waiting"}
        store.calls.clear()
        clock.advance(10.0)
        woken = await rt.settle_woken()
        calls = dict(store.calls)
        left = dict(store.parked_entries)
    assert sorted(r.workflow_id for r in woken) == sorted(r.workflow_id for r in parked)
    assert {r.status for r in woken} == {"completed"}
    assert calls.get("claim_many") == 1 and calls.get("load_many") == 1, calls
    assert calls.get("load", 0) == 0 and calls.get("unpark", 0) == 0, calls
    assert 1 <= calls.get("unpark_many", 0) <= 3, calls
    assert left == {}
    for result in woken:
        assert RUNS[result.workflow_id].count("finish") == 1


async def test_signalled_ones_not_yet_due_are_looked_up_together() -> None:
    """50 signal waits woken at once before their deadline (as other processes' notices
    do) cost one signal lookup: those whose signal is stored run, the others stay parked."""
    store = CountingStore()
    async with Runtime(quiet_config(), store=store, clock=FakeClock()) as rt:
        ids = await park_signal_waits(rt, store, 50, signalled=20, payload=b"1")
        await rt.settle_woken()
        store.calls.clear()
        assert sum(rt.waker.wake(workflow_id) for workflow_id in ids) == 50
        woken = await rt.settle_woken()
        calls = dict(store.calls)
        assert rt.waker.parked_count == 30
    assert sorted(r.workflow_id for r in woken) == sorted(ids[:20])
    assert calls.get("signals_ready") == 1, calls
    assert sorted(store.parked_entries) == sorted(ids[20:])


async def test_signal_waits_past_their_deadline_time_out_with_one_lookup() -> None:
    """40 signal waits woken by their deadline: one signal lookup for all of them, no read
    per woken stage; the 10 whose signal came before the wake still get its payload, the
    others time out (the handler sees SignalTimeout)."""
    store = CountingStore()
    clock = FakeClock()
    async with Runtime(quiet_config(), store=store, clock=clock) as rt:
        ids = await park_signal_waits(rt, store, 40, signalled=10, payload=b"7",
                                      timeout=10.0)
        store.calls.clear()
        clock.advance(10.0)
        woken = await rt.settle_woken()
        calls = dict(store.calls)
    payloads = {r.workflow_id: r.outputs["payload"] for r in woken}
    assert {r.status for r in woken} == {"completed"} and len(woken) == 40
    assert [payloads[i] for i in ids[:10]] == [7] * 10
    assert [payloads[i] for i in ids[10:]] == ["timed out"] * 30
    assert calls.get("signals_ready") == 1, calls
    assert calls.get("read_signal", 0) == 10, calls  # only those whose signal is there


async def test_at_the_next_start_due_signal_waits_cost_one_lookup_not_two() -> None:
    """A runtime opened after 40 signal waits' deadline: the wake looks their signals up
    once in all (the re-arm asks only about those not yet due); the 10 signalled get
    their payload, the others time out."""
    store = CountingStore()
    clock = FakeClock()
    async with Runtime(quiet_config(), store=store, clock=clock) as rt:
        ids = await park_signal_waits(rt, store, 40, timeout=10.0)
    for workflow_id in ids[:10]:  # sent while no runtime ran
        await store.send_signal(workflow_id, "go", b"3")
    store.calls.clear()
    async with Runtime(quiet_config(), store=store,
                       clock=FakeClock(wall_start=clock.time() + 60)) as rt:
        assert await rt.wake_due() == 40
        woken = await rt.settle_woken()
        calls = dict(store.calls)
    payloads = {r.workflow_id: r.outputs["payload"] for r in woken}
    assert [payloads[i] for i in ids[:10]] == [3] * 10
    assert [payloads[i] for i in ids[10:]] == ["timed out"] * 30
    assert calls.get("signals_ready") == 1, calls
    assert calls.get("read_signal", 0) == 10, calls


async def test_a_worker_runs_woken_workflows_within_its_concurrency(tmp_path: Path) -> None:
    """5 sleepers due when a worker (``serve(concurrency=2)``) opens their file store: at
    most 2 run at once, the other woken ones waiting for a slot; all 5 complete."""
    def store() -> FileStore:
        return FileStore(tmp_path / "states", tmp_path / "checkpoints")

    clock = FakeClock()
    async with Runtime(quiet_config(), tmp_path, store=store(), clock=clock) as rt:
        parked = await asyncio.gather(*(rt.run(GATED_FLOW, context={"seconds": 10.0})
                                        for _ in range(5)))
    assert {r.status for r in parked} == {"waiting"}
    GATED.reset()
    async with Runtime(quiet_config(), tmp_path, store=store(),
                       clock=FakeClock(wall_start=clock.time() + 60)) as rt:
        serving = asyncio.ensure_future(rt.serve(concurrency=2))
        await run_gated(rt, 5, 2)
        woken = await rt.settle_woken()
        rt.request_shutdown()
        assert await serving == 0  # none of its queue: all five were woken
    assert sorted(r.workflow_id for r in woken) == sorted(r.workflow_id for r in parked)
    assert {r.status for r in woken} == {"completed"}
    assert GATED.most == 2


async def nap_first_if_asked(ctx: StageContext) -> None:
    RUNS[ctx.workflow_id].append("one")
    if ctx.context.get("first"):
        await ctx.sleep_durably(10.0)


async def nap_second(ctx: StageContext) -> None:
    RUNS[ctx.workflow_id].append("two")
    await ctx.sleep_durably(10.0)


TWO_NAPS = WorkflowDefinition("two-naps", [
    StageSpec(stage="one", handler=nap_first_if_asked),
    StageSpec(stage="two", handler=nap_second),
], import_path_hint="test_waits_batch:TWO_NAPS")


async def test_one_wake_batch_resumes_each_workflow_at_its_own_stage() -> None:
    """Workflows of one definition parked in different stages, woken in one batch: each
    runs again from its own waiting stage (what the batch resolves once is per stage)."""
    clock = FakeClock()
    async with Runtime(quiet_config(), store=MemoryStore(), clock=clock) as rt:
        parked = await asyncio.gather(*(rt.run(TWO_NAPS, context={"first": i % 2 == 0})
                                        for i in range(6)))
        assert {r.status for r in parked} == {"waiting"}
        clock.advance(10.0)
        woken = {r.workflow_id: r.status for r in await rt.settle_woken()}
    for i, result in enumerate(parked):
        if i % 2 == 0:  # woke in stage one, went on and parked in stage two
            assert RUNS[result.workflow_id] == ["one", "one", "two"]
            assert woken[result.workflow_id] == "waiting"
        else:  # woke in stage two and finished
            assert RUNS[result.workflow_id] == ["one", "two", "two"]
            assert woken[result.workflow_id] == "completed"


_GATE: dict[str, asyncio.Event] = {}


async def nap_then_hold(ctx: StageContext) -> Mapping[str, Any]:
    await ctx.sleep_durably(5.0)
    await _GATE.setdefault(ctx.workflow_id, asyncio.Event()).wait()
    return {"held": True}


async def finish(ctx: StageContext) -> None:
    return None


HOLD_FLOW = WorkflowDefinition("hold", [
    StageSpec(stage="nap", handler=nap_then_hold, timeout_seconds=3600),
    StageSpec(stage="finish", handler=finish),
], import_path_hint="test_waits_batch:HOLD_FLOW")


async def test_a_woken_workflow_keeps_its_entry_until_its_run_ends() -> None:
    """While a woken workflow runs, its parked entry stays (a crash then wakes it again,
    never leaves a waiting state unindexed); it is dropped once the run ended."""
    store = MemoryStore()
    clock = FakeClock()
    async with Runtime(quiet_config(), store=store, clock=clock) as rt:
        parked = await rt.run(HOLD_FLOW)
        workflow_id = parked.workflow_id
        gate = _GATE.setdefault(workflow_id, asyncio.Event())
        clock.advance(5.0)
        for _ in range(1000):
            if rt.live(workflow_id) is not None:
                break
            await asyncio.sleep(0)
        assert rt.live(workflow_id) is not None
        assert workflow_id in store.parked_entries
        gate.set()
        woken = await rt.settle_woken()
    assert [r.status for r in woken] == ["completed"]
    assert store.parked_entries == {}


async def test_a_wake_refused_by_another_claim_leaves_the_workflow_alone(
        tmp_path: Path) -> None:
    """A due workflow claimed elsewhere (another store on the same files) is not run
    here, and stays parked for its owner."""
    def store() -> FileStore:
        return FileStore(tmp_path / "states", tmp_path / "checkpoints")

    clock = FakeClock()
    async with Runtime(quiet_config(), tmp_path, store=store(), clock=clock) as rt:
        parked = await rt.run(SLEEP_FLOW, context={"seconds": 10.0})
    other = store()
    await other.open()
    try:
        held = await other.claim(parked.workflow_id)
        async with Runtime(quiet_config(), tmp_path, store=store(),
                           clock=FakeClock(wall_start=clock.time() + 60)) as rt:
            assert await rt.wake_due() == 1
            assert await rt.settle_woken() == []
            assert rt.waker.parked_count == 0
        held.release()
        entries = await other.parked()
    finally:
        await other.close()
    assert [e[0] for e in entries] == [parked.workflow_id]


class _Undeclared(MemoryStore):
    """A third-party store predating the capability: it has no such attribute."""

    def __getattribute__(self, name: str) -> Any:
        if name == "signals_from_other_processes":
            raise AttributeError(name)
        return super().__getattribute__(name)


class _Shared(MemoryStore):
    signals_from_other_processes = True


class _OneProcess(MemoryStore):
    """Another store of one process: what it declares counts, not its class's name."""


async def test_the_waker_watches_notices_exactly_when_the_store_says_it_is_shared() -> None:
    """The declared capability decides whether other processes' signal notices are
    watched: MemoryStore no, a store that says so yes, one that does not say yes."""
    watching = {}
    for label, store in (("memory", MemoryStore()), ("undeclared", _Undeclared()),
                         ("shared", _Shared()), ("one process", _OneProcess())):
        async with Runtime(quiet_config(), store=store, clock=FakeClock()) as rt:
            await rt.wake_due()
            watching[label] = rt.waker._notices is not None
    assert watching == {"memory": False, "undeclared": True, "shared": True,
                        "one process": False}
    assert FileStore.signals_from_other_processes is True
