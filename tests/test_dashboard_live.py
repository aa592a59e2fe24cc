"""The live view across hosts: with the PostgreSQL store each worker publishes what it runs
as its row of ``workflow_live`` (a write per period, never per stage), a dashboard on any
host reads every worker's, and a worker killed without a word stops showing running
workflows once its lease ran out; the dashboard's and the runtimes' metrics label a
definition alike."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("starlette")
pytest.importorskip("asyncpg")

import httpx
from prometheus_client.parser import text_string_to_metric_families

from machines import StageContext, StageSpec, WorkflowDefinition
from reliability import MemoryStore, Runtime, WorkflowConfiguration
from reliability._dashboard import create_app, start_server
from reliability._metrics import RuntimeMetrics
from reliability._observe import Telemetry, live_publisher
from reliability._postgres import PostgresStore
from reliability._postgres._live import DatabaseLiveView, read_live_views

ROOT = Path(__file__).resolve().parent.parent
LIVE_PATH = "tests.dashboard_workflows:LIVE"


def _config(url: str = "", **settings: Any) -> WorkflowConfiguration:
    return WorkflowConfiguration(store_url=url, enable_health_checks=False,
                                 enable_monitoring=False, **settings)


async def _until(check: Callable[[], Any], what: str, limit: float = 90.0) -> Any:
    """Poll for what another task or process writes (a row, a view); the limit only turns a
    hang into a failure."""
    end = time.monotonic() + limit
    while not (found := check()):
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)
    return found


# --------------------------------------------------------------------------- metrics


async def noted(ctx: StageContext) -> dict[str, Any]:
    return {"noted": True}


# Bound to a module-level name: its import path ("test_dashboard_live:NAMED") is not its
# name ("named"), which is what the stored rows carry as "definition".
NAMED = WorkflowDefinition("named", [StageSpec("note", noted)])


def _workflow_labels(text: str, family: str) -> set[str]:
    return {sample.labels["workflow"] for metric in text_string_to_metric_families(text)
            if metric.name == family for sample in metric.samples}


async def test_the_dashboard_and_the_runtime_label_a_definition_alike(tmp_path: Path) -> None:
    """One definition is one ``workflow`` label value: its name, in the runtime's metrics
    and in the dashboard's /metrics (not its import path there)."""
    async with Runtime(_config(), tmp_path, store=MemoryStore(),
                       configure_logs=False) as runtime:
        metrics = RuntimeMetrics(runtime)
        server = await start_server(create_app(runtime, poll_interval=0.05), "127.0.0.1", 0,
                                    handle_signals=False)
        try:
            result = await runtime.run(NAMED)
            assert result.status == "completed"
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
                text = ""
                while 'state="completed"' not in text:  # the dashboard's next poll
                    text = (await client.get("/metrics")).text
                    await asyncio.sleep(0.02)
        finally:
            await server.stop()
        ours = metrics.exposition().decode()
    assert _workflow_labels(text, "workflow_manager_workflows_current") == {"named"}
    assert _workflow_labels(ours, "workflow_manager_workflows_finished") == {"named"}
    assert _workflow_labels(ours, "workflow_manager_stage_duration_seconds") == {"named"}


# --------------------------------------------------------------------------- in process


async def _views_until(store: PostgresStore, publisher: DatabaseLiveView,
                       check: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """Read the views until this worker's passes ``check``, asking it to publish at once."""
    found: dict[str, Any] = {}

    async def read() -> bool:
        found.update(await read_live_views(store, {}))
        view = found.get(store.worker_id)
        return view is not None and check(view)

    end = time.monotonic() + 90
    while not await read():
        if time.monotonic() > end:
            raise AssertionError(f"no view as expected: {found}")
        publisher.wake()
        await asyncio.sleep(0.05)
    return found[store.worker_id]  # type: ignore[no-any-return]


async def test_a_worker_publishes_its_row_per_period_and_a_reader_gets_every_worker(
        tmp_path: Path, postgres_url: str) -> None:
    """A runtime on PostgreSQL publishes its view as its row (no file): its running
    workflows with their stage, its host and worker; stages write nothing (62 ran, one
    view was written); a reader is sent only views whose version moved; the stopped view
    is not alive and lists nothing running."""
    held: list[str] = []
    release = asyncio.Event()

    async def step(ctx: StageContext) -> None:
        return None

    async def hold(ctx: StageContext) -> None:
        held.append(ctx.workflow_id)
        await release.wait()

    flow = WorkflowDefinition("held", [*(StageSpec(f"s{i}", step) for i in range(30)),
                                       StageSpec("hold", hold)])
    async with Runtime(_config(postgres_url), tmp_path, configure_logs=False) as runtime:
        store = runtime.store
        assert isinstance(store, PostgresStore)
        publisher = live_publisher(Telemetry().attach(runtime), runtime, period=3600.0)
        assert isinstance(publisher, DatabaseLiveView)
        publisher.start(runtime)
        running = [asyncio.ensure_future(runtime.run(flow)) for _ in range(2)]
        await _until(lambda: len(held) == 2, "both workflows to hold")
        # Only the first view, at start: the period is an hour and no breaker moved.
        assert publisher.published <= 1
        view = await _views_until(store, publisher, lambda v: {
            w["stage"] for w in v["workflows"].values()} == {"hold"})
        assert view["alive"] is True and view["worker_id"] == store.worker_id
        assert view["host"] and view["pid"] == os.getpid()
        assert set(view["workflows"]) == set(held) == set(runtime.running)
        same = await read_live_views(store, {store.worker_id: {**view, "marker": 1}})
        assert same[store.worker_id]["marker"] == 1  # its version: not sent again
        moved = await read_live_views(store, {store.worker_id: {**view, "marker": 1,
                                                                "version": -1}})
        assert "marker" not in moved[store.worker_id]
        assert moved[store.worker_id]["workflows"] == view["workflows"]
        release.set()
        await asyncio.gather(*running)
        await publisher.stop()
        ended = (await read_live_views(store, {}))[store.worker_id]
    assert ended["alive"] is False and ended["stopped"] is True and ended["workflows"] == {}
    # The row is the view: no runtime file.
    assert await asyncio.to_thread(lambda: list(tmp_path.rglob("runtime-*.json"))) == []


# --------------------------------------------------------------------------- processes


def _env(**extra: str) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("WORKFLOW_")},
            "PYTHONPATH": str(ROOT), "WORKFLOW_ENABLE_HEALTH_CHECKS": "false", **extra}


def _submit(url: str, root: Path, count: int) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-m", "reliability", "submit", "--definition", LIVE_PATH,
         "--count", str(count), "--store", url, "--project-root", str(root), "--json"],
        cwd=ROOT, env=_env(), capture_output=True, check=True)
    ids: list[str] = json.loads(done.stdout)["workflow_ids"]
    return ids


def _worker(url: str, root: Path, log: Path) -> subprocess.Popen[bytes]:
    """A worker of two workflows at once, its lease 1.5 s; its log goes to ``log``."""
    with log.open("wb") as stderr:
        return subprocess.Popen(
            [sys.executable, "-m", "reliability", "worker", "--processes", "1", "--store", url,
             "--project-root",
             str(root), "--log-level", "WARNING", "--concurrency", "2", "--exit-when-idle"],
            cwd=ROOT, env=_env(WORKFLOW_LEASE_SECONDS="1.5"), stdout=subprocess.DEVNULL,
            stderr=stderr)


@pytest.fixture
def workers() -> Any:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait()


@contextlib.asynccontextmanager
async def _dashboard(url: str, root: Path) -> AsyncIterator[httpx.AsyncClient]:
    """The dashboard app over the database, served in this loop (as on any other host)."""
    async with Runtime(_config(url, lease_seconds=1.5), root,
                       configure_logs=False) as runtime:
        server = await start_server(create_app(runtime, poll_interval=0.1), "127.0.0.1", 0,
                                    handle_signals=False)
        client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=30)
        try:
            yield client
        finally:
            await client.aclose()
            await server.stop()


async def _health_until(client: httpx.AsyncClient,
                        check: Callable[[dict[int, dict[str, Any]]], bool]
                        ) -> dict[int, dict[str, Any]]:
    """/api/health's processes by PID, once ``check`` passes."""
    found: dict[int, dict[str, Any]] = {}

    async def read() -> bool:
        document = (await client.get("/api/health")).json()
        found.clear()
        found.update({int(v["pid"]): v for v in document["runtimes"]})
        return check(found)

    end = time.monotonic() + 90
    while not await read():
        if time.monotonic() > end:
            summary = {pid: (v.get("alive"), _running(v)) for pid, v in found.items()}
            raise AssertionError(f"/api/health never passed its check: {summary}")
        await asyncio.sleep(0.1)
    return found


def _running(view: dict[str, Any]) -> dict[str, str]:
    return {w: v["stage"] for w, v in (view.get("workflows") or {}).items()}


async def test_two_workers_running_workflows_show_and_a_killed_one_s_leave(
        tmp_path: Path, postgres_url: str, workers: list[subprocess.Popen[bytes]]) -> None:
    """Two worker processes on the shared store, two workflows each held in their middle
    stage: the dashboard (any host: it reads only the database) shows both processes with
    their host and their running workflows in that stage, and each row names its worker.
    The one SIGKILLed is shown gone with nothing running once its lease ran out; its
    workflows run on the other once released, and all four complete."""
    import socket

    ids = _submit(postgres_url, tmp_path, 4)
    for name in ("a", "b"):
        workers.append(_worker(postgres_url, tmp_path, tmp_path / f"worker-{name}.log"))
    pids = {process.pid for process in workers}
    async with _dashboard(postgres_url, tmp_path) as client:
        views = await _health_until(client, lambda found: all(
            pid in found and list(_running(found[pid]).values()) == ["wait", "wait"]
            for pid in pids))
        assert all(views[pid]["alive"] and views[pid]["host"] == socket.gethostname()
                   for pid in pids)
        shown = {w: pid for pid in pids for w in _running(views[pid])}
        assert sorted(shown) == sorted(ids)
        page = (await client.get("/")).text
        for pid in pids:
            assert page.count(f"{socket.gethostname()} pid {pid}<") == 2
        victim, survivor = workers
        victim.send_signal(signal.SIGKILL)
        await asyncio.to_thread(victim.wait)
        views = await _health_until(client, lambda found: not found[victim.pid]["alive"])
        assert _running(views[victim.pid]) == {}
        assert _running(views[survivor.pid]) == {
            w: "wait" for w, pid in shown.items() if pid == survivor.pid}
        page = (await client.get("/")).text
        assert f"pid {victim.pid}<" not in page
        (tmp_path / "release").touch()  # the held stage ends: all four run to their end
        assert await asyncio.to_thread(survivor.wait, 120) == 0
        await _health_until(client, lambda found: not found[survivor.pid]["alive"])
        listed = (await client.get("/api/workflows")).json()["workflows"]
    assert {(row["workflow_id"], row["status"]) for row in listed} == {
        (workflow_id, "completed") for workflow_id in ids}


async def test_views_of_workers_gone_for_a_day_are_deleted_when_one_starts(
        tmp_path: Path, postgres_url: str) -> None:
    """A starting publisher deletes the rows of workers without a lease published over a
    day ago; a recent one that ended stays (the dashboard shows how it left)."""
    async with Runtime(_config(postgres_url), tmp_path, configure_logs=False) as runtime:
        store = runtime.store
        assert isinstance(store, PostgresStore)
        pool = store.require_pool()
        for worker_id, age in (("old-worker", 2 * 86_400), ("recent-worker", 3_600)):
            await pool.execute(
                "INSERT INTO workflow_live (worker_id, host, pid, view, stopped, published_at)"
                " VALUES ($1, 'elsewhere', 1, '{}', true, now() - make_interval(secs => $2))",
                worker_id, age)
        publisher = live_publisher(Telemetry().attach(runtime), runtime, period=3600.0)
        publisher.start(runtime)
        await _until(lambda: publisher.published, "the first view")
        left = {r["worker_id"] for r in await pool.fetch("SELECT worker_id FROM workflow_live")}
        await publisher.stop()
    assert left == {"recent-worker", store.worker_id}
