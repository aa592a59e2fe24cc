"""Durable waits: parking, signals, deadlines across restarts, and refused signals."""

from __future__ import annotations

import asyncio
import functools
import gc
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from wait_workflows import RUNS, SLEEP_FLOW, WAIT_FLOW, effect_lines, quiet_config

from reliability import (
    FakeClock,
    FileStore,
    InvalidWorkflowIdError,
    MemoryStore,
    Runtime,
    SignalRefusedError,
    WorkflowNotFoundError,
)
from reliability._engine import LiveWorkflow
from reliability._state import WorkflowRun

ROOT = Path(__file__).resolve().parent.parent


def _file_store(root: Path) -> FileStore:
    return FileStore(root / ".github/workflow-states", root / ".github/workflow-checkpoints")


async def test_a_signal_sent_before_the_wait_is_returned_at_once() -> None:
    """A signal stored before the wait begins is returned without parking."""
    store = MemoryStore()
    async with Runtime(quiet_config(), store=store, clock=FakeClock()) as rt:
        workflow_id = await rt.register(WAIT_FLOW)
        await rt.signal(workflow_id, "go", {"n": 1})
        result = await rt.resume(workflow_id)
    assert result.status == "completed"
    assert result.outputs["payload"] == {"n": 1}
    assert RUNS[workflow_id] == ["prepare", "await", "signalled", "finish"]


async def test_a_parked_workflow_holds_nothing_and_a_signal_wakes_it_once() -> None:
    """Parked: status waiting, not live, not remembered; the signal reruns only its stage."""
    store = MemoryStore()
    async with Runtime(quiet_config(), store=store, clock=FakeClock()) as rt:
        result = await rt.run(WAIT_FLOW)
        workflow_id = result.workflow_id
        assert (result.status, result.success) == ("waiting", False)
        assert rt.live(workflow_id) is None and workflow_id not in rt._finished
        assert [r["workflow_id"] for r in await rt.list_workflows("waiting")] == [workflow_id]
        assert await rt.settle_woken() == []  # its check for a signal came while parking
        await rt.signal(workflow_id, "go", "yes")
        woken = await rt.settle_woken()
    assert [r.status for r in woken] == ["completed"]
    assert woken[0].outputs["payload"] == "yes"
    assert RUNS[workflow_id] == ["prepare", "await", "await", "signalled", "finish"]


async def test_sleep_durably_parks_until_its_time_then_returns() -> None:
    """A durable sleep parks; the timer on the runtime's clock wakes it at its time."""
    clock = FakeClock()
    async with Runtime(quiet_config(), store=MemoryStore(), clock=clock) as rt:
        result = await rt.run(SLEEP_FLOW, context={"seconds": 100.0})
        assert result.status == "waiting"
        clock.advance(99.0)
        assert await rt.settle_woken() == []
        clock.advance(1.0)
        woken = await rt.settle_woken()
    assert [r.status for r in woken] == ["completed"]
    assert woken[0].outputs["slept_until"] >= clock.time() - 0.001


async def test_a_deadline_that_passed_while_nothing_ran_fires_at_the_next_start(
        tmp_path: Path) -> None:
    """Parked on disk with a 100 s deadline; a runtime opened 200 s later wakes it."""
    clock = FakeClock(wall_start=1_700_000_000.0)
    async with Runtime(quiet_config(), tmp_path, store=_file_store(tmp_path),
                       clock=clock) as rt:
        parked = await rt.run(WAIT_FLOW, context={"timeout": 100.0})
    assert parked.status == "waiting"
    later = FakeClock(wall_start=1_700_000_200.0)
    async with Runtime(quiet_config(), tmp_path, store=_file_store(tmp_path),
                       clock=later) as rt:
        assert await rt.wake_due() == 1
        woken = await rt.settle_woken()
        diagnostics = rt.get_workflow_diagnostics(parked.workflow_id)
    assert [r.status for r in woken] == ["completed"]
    assert woken[0].outputs["payload"] == "timed out"
    assert diagnostics["waiting_for"] is None


async def test_diagnostics_say_what_a_parked_workflow_waits_for(tmp_path: Path) -> None:
    """Diagnostics of a parked workflow name the signal, the stage and the deadline."""
    clock = FakeClock(wall_start=1_700_000_000.0)
    async with Runtime(quiet_config(), tmp_path, store=_file_store(tmp_path),
                       clock=clock) as rt:
        parked = await rt.run(WAIT_FLOW, context={"timeout": 50.0})
        await rt.store.list_states()  # the files catch up with the journal
        diagnostics = rt.get_workflow_diagnostics(parked.workflow_id)
    assert diagnostics["status"] == "waiting"
    assert diagnostics["waiting_for"] == {"stage": "await_go", "signal": "go",
                                          "until": 1_700_000_050.0}
    assert "signal 'go'" in parked.recovery_recommendations[0]


async def test_bad_signals_are_refused_and_store_nothing(tmp_path: Path) -> None:
    """Unknown, finished and invalid IDs, bad names and non-JSON payloads: errors, no file."""
    store = _file_store(tmp_path)
    async with Runtime(quiet_config(), tmp_path, store=store, clock=FakeClock()) as rt:
        done = await rt.run(SLEEP_FLOW, context={"seconds": 0.0})
        assert done.status == "completed"
        parked = await rt.run(WAIT_FLOW)
        unknown = "workflow-20240101-000000-abcdef12"
        with pytest.raises(WorkflowNotFoundError):
            await rt.signal(unknown, "go")
        with pytest.raises(SignalRefusedError, match="completed"):
            await rt.signal(done.workflow_id, "go")
        with pytest.raises(InvalidWorkflowIdError):
            await rt.signal("../../etc", "go")
        with pytest.raises(SignalRefusedError, match="not JSON"):
            await rt.signal(parked.workflow_id, "go", {1, 2})
        with pytest.raises(SignalRefusedError, match="name"):
            await rt.signal(parked.workflow_id, "../x")
    signals = tmp_path / ".github/workflow-states/_signals"
    assert not [p for p in signals.rglob("*.json")] if signals.exists() else True


def test_the_signal_command_refuses_with_one_line_and_exit_1(tmp_path: Path) -> None:
    """``workflow-manager signal`` on an unknown ID or with bad JSON: one line, exit 1."""
    cli = [sys.executable, "-m", "reliability", "signal", "--project-root", str(tmp_path)]
    unknown = subprocess.run([*cli, "workflow-20240101-000000-abcdef12", "go"],
                             capture_output=True, text=True, timeout=120)
    bad_json = subprocess.run([*cli, "workflow-20240101-000000-abcdef12", "go", "--data",
                               "{nope"], capture_output=True, text=True, timeout=120)
    for outcome in (unknown, bad_json):
        assert outcome.returncode == 1
        assert len(outcome.stderr.strip().splitlines()) == 1, outcome.stderr
    assert "not JSON" in bad_json.stderr
    assert not (tmp_path / ".github/workflow-states/_signals").exists()


async def test_a_thousand_parked_workflows_cost_no_memory_and_each_wakes_once(
        tmp_path: Path) -> None:
    """1,000 parked: RSS within 10 % of before; all signalled: each finishes once, and
    the stage before the wait never runs again."""
    process = psutil.Process()
    async with Runtime(quiet_config(), tmp_path, store=_file_store(tmp_path)) as rt:
        # A first round of 1,000 (parked, woken, finished) before measuring: imports,
        # caches, the writer and the allocator's arenas for 1,000 running at once. Parked
        # workflows must then cost nothing beyond that.
        warm = await asyncio.gather(*(rt.run(WAIT_FLOW) for _ in range(1000)))
        for result in warm:
            await rt.signal(result.workflow_id, "go")
        await rt.settle_woken()
        rt._finished.clear()
        gc.collect()
        before = process.memory_info().rss
        results = await asyncio.gather(*(rt.run(WAIT_FLOW) for _ in range(1000)))
        gc.collect()
        parked = process.memory_info().rss
        assert {r.status for r in results} == {"waiting"}
        assert rt.waker.parked_count == 1000 and not rt.running
        assert parked <= before * 1.10, (before, parked)
        # RSS alone would miss a few KiB per workflow: no run of a parked one is kept.
        ids = {r.workflow_id for r in results}
        held = [o for o in gc.get_objects()
                if isinstance(o, (WorkflowRun, LiveWorkflow)) and (
                    o.workflow_id if isinstance(o, WorkflowRun) else o.run.workflow_id) in ids]
        assert held == []
        for result in results:
            await rt.signal(result.workflow_id, "go", result.workflow_id)
        woken = await rt.settle_woken()
    assert sorted(r.workflow_id for r in woken) == sorted(r.workflow_id for r in results)
    assert {r.status for r in woken} == {"completed"}
    for result in woken:
        assert result.outputs["payload"] == result.workflow_id
        assert RUNS[result.workflow_id] == ["prepare", "await", "await", "signalled", "finish"]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}


async def test_parked_workflows_survive_sigkill_and_wake_on_signal_or_deadline(
        tmp_path: Path) -> None:
    """SIGKILL while 100 are parked; a new runtime (resume --all) wakes half on their
    signal and half on their deadline, each once."""
    child = subprocess.Popen(  # noqa: ASYNC220 - the child is the process to kill
        [sys.executable, "-c", "import wait_workflows; wait_workflows.main()", "park",
         str(tmp_path), "100", "3600"], env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "parked"
        ids = [child.stdout.readline().strip() for _ in range(100)]
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
        if child.stdout is not None:
            child.stdout.close()
    clock = FakeClock(wall_start=time.time())
    async with Runtime(quiet_config(), tmp_path, store=_file_store(tmp_path),
                       clock=clock) as rt:
        assert await rt.resume_all() == []  # parked ones are not resumed: they are waited on
        for workflow_id in ids[:50]:
            await rt.signal(workflow_id, "go", "signalled")
        first = await rt.settle_woken()
        clock.advance(3601.0)
        second = await rt.settle_woken()
    assert sorted(r.workflow_id for r in first) == sorted(ids[:50])
    assert sorted(r.workflow_id for r in second) == sorted(ids[50:])
    assert {r.status for r in [*first, *second]} == {"completed"}
    assert {r.outputs["payload"] for r in first} == {"signalled"}
    assert {r.outputs["payload"] for r in second} == {"timed out"}
    for workflow_id in ids:
        assert effect_lines(tmp_path / "effects", workflow_id) == [
            "prepare", "await", "await", "signalled", "finish"]


def _waiting_state(workflow_id: str) -> dict[str, object]:
    return {"workflow_id": workflow_id, "status": "waiting", "revision": 1}


async def test_concurrent_loads_right_after_saves_all_see_the_saved_states(
        tmp_path: Path) -> None:
    """Many loads at once after many saves (10,000 woken workflows do this): each waits
    for the writer's flush, even one that another load asked for, and finds its state."""
    store = _file_store(tmp_path)
    await store.open()
    try:
        ids = [f"workflow-20240101-000000-{n:012x}" for n in range(300)]
        await asyncio.gather(*(store.save(w, functools.partial(_waiting_state, w))
                               for w in ids))
        loaded = await asyncio.gather(*(store.load(w) for w in ids))
    finally:
        await store.close()
    assert [state.state["workflow_id"] for state in loaded] == ids


def _files_of(states: Path, workflow_id: str) -> list[str]:
    """Every file under ``_signals`` that belongs to ``workflow_id``."""
    signals = states / "_signals"
    return sorted(str(p.relative_to(signals)) for p in signals.rglob("*")
                  if p.is_file() and (p.name.startswith(f"{workflow_id}~")
                                      or workflow_id in p.parts))


async def test_a_finished_workflow_s_signals_and_notices_are_removed(tmp_path: Path) -> None:
    """Woken by its signal, with another it never took: once it completes, no signal,
    notice or parked entry of it is left."""
    states = tmp_path / ".github/workflow-states"
    async with Runtime(quiet_config(), tmp_path, store=_file_store(tmp_path),
                       clock=FakeClock()) as rt:
        parked = await rt.run(WAIT_FLOW)
        await rt.signal(parked.workflow_id, "unused", 1)
        await rt.signal(parked.workflow_id, "go", 2)
        assert _files_of(states, parked.workflow_id)  # signals and notices, while it waits
        woken = await rt.settle_woken()
    assert [r.status for r in woken] == ["completed"]
    assert _files_of(states, parked.workflow_id) == []


async def test_leftovers_of_finished_workflows_are_removed_when_a_runtime_opens(
        tmp_path: Path) -> None:
    """A signal sent as a workflow ended (with its notice), and a parked entry a crash
    left for another: the next runtime that runs drops both; a waiting workflow keeps its
    signal."""
    states = tmp_path / ".github/workflow-states"
    async with Runtime(quiet_config(), tmp_path, store=_file_store(tmp_path),
                       clock=FakeClock()) as rt:
        late, crashed = [await rt.run(SLEEP_FLOW, context={"seconds": 0.0}) for _ in "ab"]
        waiting = await rt.run(WAIT_FLOW)
        await rt.signal(waiting.workflow_id, "later", 1)
        await rt.store.send_signal(late.workflow_id, "late", b"1")  # type: ignore[attr-defined]
    assert {late.status, crashed.status, waiting.status} == {"completed", "waiting"}
    (states / "_signals/_parked" / f"{crashed.workflow_id}~1.0~go~0").touch()
    assert len(_files_of(states, late.workflow_id)) == 2  # the signal, its notice
    assert len(_files_of(states, crashed.workflow_id)) == 1
    kept = _files_of(states, waiting.workflow_id)
    async with Runtime(quiet_config(), tmp_path, store=_file_store(tmp_path),
                       clock=FakeClock()) as rt:
        await rt.wake_due()
        assert await rt.settle_woken() == []
    assert _files_of(states, late.workflow_id) == []
    assert _files_of(states, crashed.workflow_id) == []
    assert _files_of(states, waiting.workflow_id) == kept


async def test_old_notices_of_this_process_expire(tmp_path: Path) -> None:
    """A notice this process sent is never taken by it; once old, the next take drops it
    (another process's is taken, and a fresh one of ours stays)."""
    from reliability._store._waits import NOTICE_SECONDS

    notices = tmp_path / ".github/workflow-states/_signals/_notices"
    notices.mkdir(parents=True)
    fresh = time.time_ns()
    old = fresh - int(NOTICE_SECONDS * 2e9)
    names = [f"workflow-20240101-000000-{n:012x}~go~{pid}~{ns}"
             for n, pid, ns in ((1, os.getpid(), old), (2, os.getpid(), fresh), (3, 1, old))]
    for name in names:
        (notices / name).touch()
    store = _file_store(tmp_path)
    await store.open()
    try:
        taken = await store.signal_notices()
    finally:
        await store.close()
    assert taken == [("workflow-20240101-000000-000000000003", "go")]
    assert sorted(p.name for p in notices.iterdir()) == [names[1]]
