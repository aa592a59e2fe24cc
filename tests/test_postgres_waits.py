"""Durable waits on PostgreSQL: parked workflows woken by signals from other processes,
deadlines on the database's clock honoured at the next worker's start, each wake claimed by
one worker, parking fenced, bad signals refused."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from postgres_server import fetch_rows
from wait_workflows import GATED, GATED_FLOW, RUNS, SLEEP_FLOW, WAIT_FLOW, run_gated

from reliability import (
    Runtime,
    SignalRefusedError,
    SystemClock,
    WorkflowConfiguration,
    WorkflowNotFoundError,
    WorkflowResult,
)
from reliability._errors import FencedError
from reliability._postgres import PostgresStore
from reliability._state import PENDING

ROOT = Path(__file__).resolve().parent.parent


def _config(url: str) -> WorkflowConfiguration:
    return WorkflowConfiguration(store_url=url, enable_health_checks=False,
                                 enable_monitoring=False, log_level="WARNING",
                                 tune_interpreter=False)


async def _until(check: Callable[[], Awaitable[bool]]) -> None:
    """Poll for an event another process or the database's clock brings (no event to
    wait on); the test's own timeout turns a hang into a failure."""
    while not await check():  # noqa: ASYNC110 (rows of other processes have no events)
        await asyncio.sleep(0.05)


async def _cli(*args: str) -> tuple[int, str, str]:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "reliability", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_a_signal_from_another_process_wakes_the_parked_workflow(
        tmp_path: Path, postgres_url: str) -> None:
    """Parked: claimed by nobody, its entry in the index; ``workflow-manager signal`` in
    another process NOTIFYs the runtime, which claims it, runs the stage again with the
    payload, and drops the entry once it completed."""
    async with Runtime(_config(postgres_url), tmp_path) as rt:
        assert isinstance(rt.store, PostgresStore)
        rt.store.poll_interval = 3600.0  # only the NOTIFY can wake it within the test
        parked = await rt.run(WAIT_FLOW)
        workflow_id = parked.workflow_id
        assert parked.status == "waiting"

        async def released() -> bool:  # its claim's release is committed soon after
            rows = await fetch_rows(postgres_url, "SELECT status FROM workflows WHERE "
                                             "workflow_id = $1 AND owner IS NULL", workflow_id)
            return [row["status"] for row in rows] == ["waiting"]

        await asyncio.wait_for(_until(released), 60)
        assert len(await fetch_rows(postgres_url, "SELECT 1 FROM workflow_parked")) == 1
        code, out, err = await _cli("signal", workflow_id, "go", "--data",
                                    json.dumps({"from": "cli"}), "--store", postgres_url,
                                    "--project-root", str(tmp_path))
        assert code == 0, err
        assert "sent" in out
        ended = await asyncio.wait_for(rt.result(workflow_id), 60)
        woken = await rt.settle_woken()
    assert ended.status == "completed"
    assert [r.outputs["payload"] for r in woken] == [{"from": "cli"}]
    assert RUNS[workflow_id] == ["prepare", "await", "await", "signalled", "finish"]
    assert await fetch_rows(postgres_url, "SELECT 1 FROM workflow_parked") == []
    assert await fetch_rows(postgres_url, "SELECT 1 FROM workflow_wait_signals") == []


async def _parked_until_due(tmp_path: Path, postgres_url: str) -> WorkflowResult:
    """One workflow parked for 1 s by a runtime that then closed, returned once the
    database's clock has passed its deadline."""
    async with Runtime(_config(postgres_url), tmp_path) as rt:
        # Not rt.run: its waker would wake it here if this runtime outlived the deadline.
        parked = await rt.execute_prepared(
            WAIT_FLOW, rt.new_run(WAIT_FLOW, {"timeout": 1.0}, None), PENDING)
    assert parked.status == "waiting"

    async def due() -> bool:
        return bool(await fetch_rows(postgres_url, "SELECT 1 FROM workflow_parked "
                                     "WHERE due_at <= now()"))

    await asyncio.wait_for(_until(due), 60)
    return parked


async def test_a_deadline_passed_while_no_worker_ran_fires_at_the_next_start(
        tmp_path: Path, postgres_url: str) -> None:
    """Parked for 1 s, then no runtime open; once the database's clock passed the
    deadline, the next runtime's start wakes it (and the stage times out its wait)."""
    parked = await _parked_until_due(tmp_path, postgres_url)
    async with Runtime(_config(postgres_url), tmp_path) as rt:
        assert await rt.wake_due() == 1
        woken = await rt.settle_woken()
    assert [(r.workflow_id, r.status) for r in woken] == [(parked.workflow_id, "completed")]
    assert woken[0].outputs["payload"] == "timed out"


class _LaggingClock(SystemClock):
    """A worker's wall clock an hour behind the database's (timers run in real time)."""

    __slots__ = ()

    def time(self) -> float:
        return super().time() - 3600.0


async def test_a_worker_whose_clock_lags_runs_what_the_database_finds_due(
        tmp_path: Path, postgres_url: str) -> None:
    """Due on the database's clock, woken by a worker whose own clock is an hour behind:
    its stage runs on (the wait times out), not parked again for the hour."""
    parked = await _parked_until_due(tmp_path, postgres_url)
    lagging = _LaggingClock()
    async with Runtime(_config(postgres_url), tmp_path, clock=lagging,
                       store=PostgresStore(postgres_url, clock=lagging)) as rt:
        assert await rt.wake_due() == 1
        woken = await rt.settle_woken()
    assert [(r.workflow_id, r.status) for r in woken] == [(parked.workflow_id, "completed")]
    assert woken[0].outputs["payload"] == "timed out"
    assert await fetch_rows(postgres_url, "SELECT 1 FROM workflow_parked") == []


async def test_a_worker_wakes_due_workflows_within_its_concurrency(
        tmp_path: Path, postgres_url: str) -> None:
    """5 sleepers due when a worker (``serve(concurrency=2)``) starts: it claims only as
    many as it has free slots, so at most 2 run at once; the others are claimed as slots
    free, and all 5 complete."""
    async with Runtime(_config(postgres_url), tmp_path) as rt:
        parked = await asyncio.gather(*(
            rt.execute_prepared(GATED_FLOW, rt.new_run(GATED_FLOW, {"seconds": 0.5}, None),
                                PENDING) for _ in range(5)))
    assert {r.status for r in parked} == {"waiting"}

    async def all_due() -> bool:
        rows = await fetch_rows(postgres_url, "SELECT 1 FROM workflow_parked WHERE due_at <= now()")
        return len(rows) == 5

    await asyncio.wait_for(_until(all_due), 60)
    GATED.reset()
    async with Runtime(_config(postgres_url), tmp_path) as rt:
        serving = asyncio.ensure_future(rt.serve(concurrency=2))
        await run_gated(rt, 5, 2)
        woken = await rt.settle_woken()
        rt.request_shutdown()
        await serving
    assert sorted(r.workflow_id for r in woken) == sorted(r.workflow_id for r in parked)
    assert {r.status for r in woken} == {"completed"}
    assert GATED.most == 2


async def test_two_workers_wake_each_due_workflow_once(tmp_path: Path,
                                                       postgres_url: str) -> None:
    """20 due sleepers, two runtimes (two workers) starting at once: each workflow is
    claimed by one of them (SKIP LOCKED) and completes once."""
    async with Runtime(_config(postgres_url), tmp_path) as rt:
        # Not rt.run: its waker would wake them here once due, before the two start.
        parked = await asyncio.gather(*(
            rt.execute_prepared(SLEEP_FLOW, rt.new_run(SLEEP_FLOW, {"seconds": 0.5}, None),
                                PENDING) for _ in range(20)))
    assert {r.status for r in parked} == {"waiting"}

    async def all_due() -> bool:
        rows = await fetch_rows(postgres_url, "SELECT 1 FROM workflow_parked WHERE due_at <= now()")
        return len(rows) == 20

    await asyncio.wait_for(_until(all_due), 60)
    async with Runtime(_config(postgres_url), tmp_path) as one, \
            Runtime(_config(postgres_url), tmp_path) as two:
        await asyncio.gather(one.wake_due(), two.wake_due())
        results = [*await one.settle_woken(), *await two.settle_woken()]
    assert sorted(r.workflow_id for r in results) == sorted(r.workflow_id for r in parked)
    assert {r.status for r in results} == {"completed"}
    for result in parked:
        assert RUNS[result.workflow_id].count("finish") == 1
    claims = await fetch_rows(postgres_url, "SELECT workflow_id, count(*) AS n FROM "
                              "workflow_writes WHERE kind = 'claim' GROUP BY workflow_id")
    assert {row["n"] for row in claims} == {2}  # the first run's claim, one wake's


async def test_parking_is_fenced_by_owner_and_epoch(postgres_url: str) -> None:
    """A park by a store whose claim was taken over writes no entry, is audited as
    refused, and raises FencedError."""
    store = PostgresStore(postgres_url)
    await store.open()
    try:
        workflow_id = "workflow-20240101-000000-0000000000aa"
        claim = await store.claim(workflow_id)
        await store.park((workflow_id, 1e10, "go", 0))
        assert len(await fetch_rows(postgres_url, "SELECT 1 FROM workflow_parked")) == 1
        await fetch_rows(postgres_url, "UPDATE workflows SET epoch = epoch + 1, owner = 'other'")
        with pytest.raises(FencedError):
            await store.park((workflow_id, 2e10, "go", 0))
        claim.release()
    finally:
        await store.close()
    rows = await fetch_rows(postgres_url, "SELECT deadline FROM workflow_parked")
    assert [row["deadline"] for row in rows] == [1e10]  # the refused park changed nothing
    audit = await fetch_rows(postgres_url, "SELECT applied FROM workflow_writes "
                             "WHERE kind = 'park' ORDER BY id")
    assert [row["applied"] for row in audit] == [True, False]


async def test_signals_to_unknown_or_finished_workflows_are_refused(
        tmp_path: Path, postgres_url: str) -> None:
    """An unknown ID and a completed workflow: refused, nothing stored; the command says
    so in one line and exits 1."""
    async with Runtime(_config(postgres_url), tmp_path) as rt:
        done = await rt.run(SLEEP_FLOW, context={"seconds": 0.0})
        assert done.status == "completed"
        with pytest.raises(WorkflowNotFoundError):
            await rt.signal("workflow-20240101-000000-abcdef12", "go")
        with pytest.raises(SignalRefusedError, match="completed"):
            await rt.signal(done.workflow_id, "go")
        store = rt.store
        assert isinstance(store, PostgresStore)
        with pytest.raises(WorkflowNotFoundError):  # the table refuses one, too
            await store.send_signal("workflow-20240101-000000-abcdef12", "go", b"1")
    code, _, err = await _cli("signal", done.workflow_id, "go", "--store", postgres_url,
                              "--project-root", str(tmp_path))
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert await fetch_rows(postgres_url, "SELECT 1 FROM workflow_wait_signals") == []


def _waiting(workflow_id: str) -> dict[str, Any]:
    return {"workflow_id": workflow_id, "status": "waiting", "revision": 2,
            "wait": {"deadline": 1e10, "signal": "go", "index": 0, "stage": "s"}}


async def test_a_due_workflow_still_claimed_is_looked_at_again_until_released(
        postgres_url: str) -> None:
    """Signalled while its parking worker still holds the claim (its release not yet
    committed; no NOTIFY comes after it): another worker's wait ends anyway, and once
    the claim is given back that worker claims it."""
    parking, waking = PostgresStore(postgres_url), PostgresStore(postgres_url)
    await parking.open()
    await waking.open()
    try:
        workflow_id = "workflow-20240101-000000-0000000000bb"
        claim = await parking.claim(workflow_id)
        await parking.park((workflow_id, 1e10, "go", 0))
        await parking.save(workflow_id, lambda: _waiting(workflow_id))
        await parking.send_signal(workflow_id, "go", b"1")  # nobody listens yet
        assert await waking.claim_due(10) == []  # still claimed
        await asyncio.wait_for(waking.wait_for_due(3600.0), 60)
        claim.release()

        async def claimed() -> bool:
            return bool(await waking.claim_due(10))

        await asyncio.wait_for(_until(claimed), 60)
    finally:
        await waking.stop_waiting_for_due()
        await waking.close()
        await parking.close()
