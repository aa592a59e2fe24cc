"""Workers sharing workflows through PostgreSQL: store selection, submit/serve/result,
fencing in the engine, the submit/worker/migrate commands, and real worker processes
killed (SIGKILL), paused past their lease (SIGSTOP) and stopped (SIGTERM)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from cluster_workflows import EFFECTS, NOTED, TINY, read_effects
from dev_helpers import (
    AGENT_COMMAND,
    PROMPTS,
    assert_one_marked_commit,
    assert_worktree_removed,
    bare_branches,
    forge_records,
    git,
    make_example_repo,
)
from postgres_server import PostgresServer, fetch_rows

from machines.development import marker_for
from reliability import Runtime, WorkflowConfiguration
from reliability._cli import main
from reliability._postgres import PostgresStore
from reliability._state import WorkflowRun
from reliability._store import FileStore

ROOT = Path(__file__).resolve().parent.parent
EFFECTS_PATH = "tests.cluster_workflows:EFFECTS"
TINY_PATH = "tests.cluster_workflows:TINY"
NOTED_PATH = "tests.cluster_workflows:NOTED"


def _config(url: str = "", **settings: Any) -> WorkflowConfiguration:
    return WorkflowConfiguration(store_url=url, enable_health_checks=False,
                                 enable_monitoring=False, **settings)


def _sync_rows(url: str, query: str, *args: Any) -> list[Any]:
    return asyncio.run(fetch_rows(url, query, *args))


def _wait_until(check: Callable[[], bool], what: str, limit: float = 90.0) -> None:
    """Poll for an event (a row, a file); the limit only turns a hang into a failure."""
    end = time.monotonic() + limit
    while not check():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


async def _until(check: Callable[[], bool]) -> None:
    """Poll for an event written by another task or process (a file, a record)."""
    while not check():  # noqa: ASYNC110 (files and other processes have no events)
        await asyncio.sleep(0.02)


# --------------------------------------------------------------------------- selection


def test_store_url_selects_the_store(tmp_path: Path, postgres_url: str) -> None:
    """No store_url keeps the file store; a postgresql:// URL selects PostgresStore with
    the configured lease."""
    assert isinstance(Runtime(_config(), tmp_path).store, FileStore)
    runtime = Runtime(_config(postgres_url, lease_seconds=7), tmp_path)
    assert isinstance(runtime.store, PostgresStore)
    assert runtime.store.lease_seconds == 7


def test_store_url_password_is_masked_everywhere(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """The store URL's password is masked in redacted settings, in --help, and in the one
    line a command prints when the database cannot be reached."""
    url = "postgresql://alice:Sup3rSecretPw@127.0.0.1:1/nowhere"
    config = _config(url)
    assert "Sup3rSecretPw" not in json.dumps(config.redacted())
    assert "Sup3rSecretPw" in config.secret_values()
    with pytest.raises(SystemExit):
        main(["worker", "--help"])
    code = main(["list", "--store", url, "--project-root", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code != 0 and "127.0.0.1:1" in err
    assert "Sup3rSecretPw" not in out + err
    code = main(["migrate", "--store", url])
    out, err = capsys.readouterr()
    assert code != 0 and "Sup3rSecretPw" not in out + err


def test_environment_selects_the_store(monkeypatch: pytest.MonkeyPatch) -> None:
    """WORKFLOW_STORE_URL and WORKFLOW_LEASE_SECONDS are read like other settings; a URL
    that is not postgresql:// is refused, masked."""
    from reliability import load_configuration
    monkeypatch.setenv("WORKFLOW_STORE_URL", "postgresql://u:pw1234@h/db")
    monkeypatch.setenv("WORKFLOW_LEASE_SECONDS", "2.5")
    config = load_configuration()
    assert config.store_url == "postgresql://u:pw1234@h/db" and config.lease_seconds == 2.5
    monkeypatch.setenv("WORKFLOW_STORE_URL", "mysql://u:pw1234@h/db")
    with pytest.raises(Exception, match="store_url") as refused:
        load_configuration()
    assert "pw1234" not in str(refused.value)


def test_migrate_command(postgres_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`migrate` applies the schema once; a second run applies nothing."""
    assert main(["migrate", "--store", postgres_url, "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["applied"] and first["version"] == first["applied"][-1]
    assert main(["migrate", "--store", postgres_url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"applied": [], "version": first["version"]}


# --------------------------------------------------------------------------- Python API


async def test_submit_serve_result_on_postgres(tmp_path: Path, postgres_url: str) -> None:
    """Workflows submitted in one runtime are run by another's serve() and their results
    are awaited from a third, each from its own connection."""
    async with Runtime(_config(postgres_url), tmp_path) as submitter:
        ids = [await submitter.submit(EFFECTS, context={"n": n}) for n in range(6)]
        assert {r["status"] for r in await submitter.list_workflows()} == {"pending"}
        async with Runtime(_config(postgres_url, lease_seconds=2), tmp_path) as worker:
            serving = asyncio.ensure_future(worker.serve(concurrency=3, exit_when_idle=True))
            async with Runtime(_config(postgres_url), tmp_path) as waiter:
                results = [await waiter.result(i, timeout=60) for i in ids]
            assert await serving == 6
    assert [r.status for r in results] == ["completed"] * 6
    assert results[0].outputs["three_by"] == os.getpid()


async def test_an_idle_worker_is_woken_by_notifies_and_a_shutdown_not_by_polls(
        tmp_path: Path, postgres_url: str) -> None:
    """With an hour between fallback polls, an idle worker still runs a workflow submitted
    elsewhere at once (NOTIFY), and a shutdown ends its wait at once."""
    async with Runtime(_config(postgres_url), tmp_path) as worker, \
            Runtime(_config(postgres_url), tmp_path / "other") as client:
        store = worker.store
        assert isinstance(store, PostgresStore)
        store.poll_interval = 3600.0
        looks: list[int] = []
        claim_next = store.claim_next

        async def counted(*args: Any, **kwargs: Any) -> Any:
            claimed = await claim_next(*args, **kwargs)
            looks.append(len(claimed))
            return claimed

        store.claim_next = counted  # type: ignore[method-assign]
        serving = asyncio.ensure_future(worker.serve(concurrency=2))
        await _until(lambda: bool(looks) and store._listener is not None)
        workflow_id = await client.submit(TINY)
        result = await asyncio.wait_for(client.result(workflow_id), 60)  # bounds a hang
        assert result.status == "completed"
        assert 1 in looks  # claimed when the NOTIFY came, not at a poll an hour away
        worker.request_shutdown()
        assert await asyncio.wait_for(serving, 60) == 1  # the limit only bounds a hang


async def test_result_times_out(tmp_path: Path, postgres_url: str) -> None:
    """result() of a workflow nobody runs raises TimeoutError after its timeout."""
    async with Runtime(_config(postgres_url), tmp_path) as runtime:
        workflow_id = await runtime.submit(TINY)
        with pytest.raises(TimeoutError, match="pending"):
            await runtime.result(workflow_id, timeout=0.3)


async def test_submit_and_serve_on_the_file_store(tmp_path: Path) -> None:
    """Without a store URL, submit saves a pending workflow and serve runs it (one host)."""
    async with Runtime(_config(), tmp_path) as runtime:
        ids = [await runtime.submit(TINY) for _ in range(3)]
        assert await runtime.serve(concurrency=2, exit_when_idle=True) == 3
        assert {(await runtime.result(i, timeout=5)).status for i in ids} == {"completed"}


async def test_run_workflow_on_postgres(tmp_path: Path, postgres_url: str) -> None:
    """run() against the PostgreSQL store runs in this process as with the file store,
    and leaves no queue entry for workers."""
    async with Runtime(_config(postgres_url), tmp_path) as runtime:
        result = await runtime.run(EFFECTS)
    assert result.status == "completed"
    rows = await fetch_rows(postgres_url, "SELECT status, queue, owner FROM workflows")
    assert [tuple(r) for r in rows] == [("completed", None, None)]


async def test_diagnostics_of_a_stored_workflow_from_any_runtime(tmp_path: Path,
                                                                  postgres_url: str) -> None:
    """A runtime that did not run a workflow describes it from the database through
    workflow_diagnostics(); the synchronous call says to use that instead."""
    async with Runtime(_config(postgres_url), tmp_path) as runner:
        workflow_id = await runner.submit(NOTED, context={"note": "hello"})
        assert await runner.serve(concurrency=1, exit_when_idle=True) == 1
    async with Runtime(_config(postgres_url), tmp_path) as other:
        with pytest.raises(Exception, match="workflow_diagnostics"):
            other.get_workflow_diagnostics(workflow_id)
        diagnostics = await other.workflow_diagnostics(workflow_id)
    assert diagnostics["status"] == "completed" and not diagnostics["running_here"]
    assert diagnostics["completed_stages"] == ["first", "second"]
    assert diagnostics["outputs"] == {"note": "hello"}
    assert diagnostics["state_source"].endswith(f"#workflows/{workflow_id}")


# --------------------------------------------------------------------------- fencing


async def test_a_refused_write_stops_the_workflow_at_once(tmp_path: Path,
                                                          postgres_url: str,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    """When another worker takes the workflow, the first one's next write is refused: its
    handler is cancelled and nothing more is applied for it."""
    monkeypatch.setenv("CLUSTER_EFFECTS", str(tmp_path))
    monkeypatch.setenv("CLUSTER_STAGE_SECONDS", "0.3")
    async with Runtime(_config(postgres_url, lease_seconds=30), tmp_path) as runtime:
        workflow_id = await runtime.submit(EFFECTS)
        serving = asyncio.ensure_future(runtime.serve(concurrency=1))
        store = runtime.store
        assert isinstance(store, PostgresStore)
        await _until(lambda: any(r[0] == "done" and r[2] == "one"
                                 for r in read_effects(tmp_path)))
        # Another worker takes it over (as after this one's lease ran out).
        taken = (await fetch_rows(postgres_url, "UPDATE workflows SET owner = 'thief', "
                             "epoch = epoch + 1 RETURNING now() AS at"))[0]["at"]
        await _until(lambda: runtime.live(workflow_id) is None)
        runtime.request_shutdown()
        await serving
    effects = read_effects(tmp_path)
    assert not [e for e in effects if e[2] == "three"]  # it went no further here
    applied = await fetch_rows(postgres_url, "SELECT count(*) FROM workflow_writes WHERE "
                               "owner = $1 AND applied AND kind = 'save' AND at >= $2",
                               store.worker_id, taken)
    refused = await fetch_rows(postgres_url, "SELECT count(*) FROM workflow_writes WHERE "
                               "owner = $1 AND NOT applied", store.worker_id)
    assert applied[0][0] == 0 and refused[0][0] >= 1


async def test_no_stage_starts_while_the_lease_may_be_lost(tmp_path: Path,
                                                           postgres_url: str,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    """A worker that has not renewed for half its lease starts no stage until it renews."""
    monkeypatch.setenv("CLUSTER_EFFECTS", str(tmp_path))
    async with Runtime(_config(postgres_url, lease_seconds=30), tmp_path) as runtime:
        store = runtime.store
        assert isinstance(store, PostgresStore)
        store._renewed_at -= 20  # as if the last renewal was 20 s ago (> half the lease)
        workflow_id = await runtime.submit(EFFECTS)
        claims = await store.claim_next(1)
        task = asyncio.ensure_future(runtime.execute_prepared(
            *runtime.prepare_resume(claims[0][1]), claim=claims[0][0]))  # type: ignore[misc]
        for _ in range(20):
            await asyncio.sleep(0.02)
        assert read_effects(tmp_path) == [] and not task.done()
        await store.renew()
        result = await task
    assert result.status == "completed" and result.workflow_id == workflow_id


async def test_cancel_from_another_runtime_stops_a_running_workflow(
        tmp_path: Path, postgres_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`cancel` of a workflow running on a worker elsewhere is seen at the worker's next
    renewal: it stops and ends cancelled, not resumed by any worker."""
    monkeypatch.setenv("CLUSTER_EFFECTS", str(tmp_path))
    monkeypatch.setenv("CLUSTER_STAGE_SECONDS", "30")
    async with Runtime(_config(postgres_url, lease_seconds=1.5), tmp_path) as worker:
        workflow_id = await worker.submit(EFFECTS)
        serving = asyncio.ensure_future(worker.serve(concurrency=1))
        await _until(lambda: bool(read_effects(tmp_path)))
        canceller = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "reliability", "cancel", workflow_id, "--store",
            postgres_url, "--project-root", str(tmp_path), "--json", cwd=ROOT,
            env=_env(tmp_path), stdout=asyncio.subprocess.PIPE)
        out, _ = await canceller.communicate()
        assert canceller.returncode == 0
        result = await worker.result(workflow_id, timeout=30)
        worker.request_shutdown()
        await serving
    assert result.status == "cancelled"
    assert json.loads(out)["cancelled"] is True
    assert not [e for e in read_effects(tmp_path) if e[0] == "done"]


# --------------------------------------------------------------------------- processes


def _env(effects: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "CLUSTER_EFFECTS": str(effects),
            "WORKFLOW_ENABLE_HEALTH_CHECKS": "false", **extra}


def _worker(url: str, root: Path, effects: Path, *args: str, log: Path | None = None,
            **extra: str) -> subprocess.Popen[bytes]:
    """A worker process; its stderr (the log) goes to ``log`` if given, else to a pipe."""
    with contextlib.ExitStack() as files:
        stderr = files.enter_context(log.open("wb")) if log is not None else subprocess.PIPE
        return subprocess.Popen(
            # One process each: these tests signal and kill the worker that runs stages.
            [sys.executable, "-m", "reliability", "worker", "--processes", "1", "--store", url,
             "--project-root", str(root), "--log-level", "WARNING", *args], cwd=ROOT,
            env=_env(effects, **{"WORKFLOW_LEASE_SECONDS": "1.5", **extra}),
            stdout=subprocess.PIPE, stderr=stderr)


def _submit(url: str, root: Path, definition: str, count: int, *args: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-m", "reliability", "submit", "--definition", definition,
         "--count", str(count), "--store", url, "--project-root", str(root), "--json", *args],
        cwd=ROOT, env=_env(root), capture_output=True, check=True)
    ids: list[str] = json.loads(done.stdout)["workflow_ids"]
    return ids


@pytest.fixture
def workers() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.send_signal(signal.SIGCONT)
            process.kill()
        process.communicate()


def _statuses(url: str) -> dict[str, int]:
    rows = _sync_rows(url, "SELECT status, count(*) AS n FROM workflows GROUP BY status")
    return {r["status"]: r["n"] for r in rows}


def test_a_killed_worker_s_workflows_complete_elsewhere_once(
        tmp_path: Path, postgres_url: str, workers: list[subprocess.Popen[bytes]]) -> None:
    """3 workers, 300 queued workflows, one SIGKILLed mid-run: all complete, no stage
    completes twice, and only the stages in flight in the killed worker ran again."""
    effects = tmp_path / "effects"
    effects.mkdir()
    ids = _submit(postgres_url, tmp_path, EFFECTS_PATH, 300)
    for _ in range(3):
        workers.append(_worker(postgres_url, tmp_path, effects, "--concurrency", "20",
                               "--exit-when-idle", CLUSTER_STAGE_SECONDS="0.02"))
    victim = workers[0]
    _wait_until(lambda: sum(1 for e in read_effects(effects) if e[0] == "done"
                            and e[3] == victim.pid) >= 30, "the victim to complete stages")
    victim.kill()
    for process in workers[1:]:
        assert process.wait(timeout=120) == 0, process.communicate()
    assert _statuses(postgres_url) == {"completed": 300}
    # Each stage's completion is recorded once per workflow (durable, in the database).
    for row in _sync_rows(postgres_url, "SELECT state FROM workflows"):
        state = json.loads(row["state"])
        history = [e["stage"] for e in state["monitoring_state"]["stage_history"]
                   if e["status"] == "completed"]
        assert state["completed_stages"] == history == ["one", "two", "three"], state
    rows = read_effects(effects)
    assert {(e[1], e[2]) for e in rows if e[0] == "done"} == {
        (i, s) for i in ids for s in ("one", "two", "three")}
    starts: dict[tuple[str, str], int] = {}
    for e in rows:
        if e[0] == "start":
            starts[(e[1], e[2])] = starts.get((e[1], e[2]), 0) + 1
    reran = {key for key, n in starts.items() if n > 1}
    victim_started = {(e[1], e[2]) for e in rows if e[0] == "start" and e[3] == victim.pid}
    # Only stages the victim had in flight ran again, each once more, at most its
    # concurrency of them.
    assert reran <= victim_started
    assert max(starts.values()) <= 2 and len(reran) <= 20
    assert set(ids) == {e[1] for e in rows}


def test_a_paused_worker_loses_its_workflows_and_writes_nothing_more(
        tmp_path: Path, postgres_url: str, workers: list[subprocess.Popen[bytes]]) -> None:
    """SIGSTOP a worker past its lease, another takes its workflows; after SIGCONT it
    writes nothing more for them (the audit table) and starts no stage."""
    effects = tmp_path / "effects"
    effects.mkdir()
    _submit(postgres_url, tmp_path, EFFECTS_PATH, 20)
    paused = _worker(postgres_url, tmp_path, effects, "--concurrency", "20",
                     CLUSTER_STAGE_SECONDS="0.5")
    workers.append(paused)
    _wait_until(lambda: len({e[1] for e in read_effects(effects)}) == 20,
                "the first worker to start all 20")
    paused.send_signal(signal.SIGSTOP)
    stopped_at = time.monotonic()
    owner = _sync_rows(postgres_url, "SELECT DISTINCT owner FROM workflows")[0]["owner"]
    other = _worker(postgres_url, tmp_path, effects, "--concurrency", "20",
                    "--exit-when-idle", CLUSTER_STAGE_SECONDS="0.05")
    workers.append(other)
    assert other.wait(timeout=120) == 0, other.communicate()
    assert _statuses(postgres_url) == {"completed": 20}
    lost_at = _sync_rows(postgres_url, "SELECT max(at) AS at FROM workflow_writes "
                                       "WHERE kind = 'requeue'")[0]["at"]
    continued = time.monotonic()
    paused.send_signal(signal.SIGCONT)
    # It notices at its next renewal; wait for its refusals or its re-registration.
    _wait_until(lambda: bool(_sync_rows(
        postgres_url, "SELECT 1 FROM workflow_workers WHERE worker_id = $1", owner)),
        "the paused worker to renew again")
    paused.send_signal(signal.SIGTERM)
    assert paused.wait(timeout=60) in (0, 130)
    applied_after = _sync_rows(
        postgres_url, "SELECT count(*) AS n FROM workflow_writes WHERE owner = $1 AND "
                      "applied AND at > $2 AND kind <> 'requeue'", owner, lost_at)
    assert applied_after[0]["n"] == 0
    late_starts = [e for e in read_effects(effects)
                   if e[0] == "start" and e[3] == paused.pid and e[4] > stopped_at]
    assert late_starts == [], f"started after losing the lease: {late_starts}"
    assert continued > stopped_at


def test_a_server_crash_under_two_workers_loses_nothing_acknowledged(
        tmp_path: Path, own_server: PostgresServer,
        workers: list[subprocess.Popen[bytes]]) -> None:
    """pg_ctl stop -m immediate while 2 worker processes run 100 workflows, past their
    lease, then start: all complete, none is left running or owned; no acknowledged stage
    completion is lost (no stage starts again once the next one started: in strict mode a
    start is the proof its predecessor committed); while the server is down each worker
    starts at most the stages whose predecessors committed just before, and logs the
    outage once each way (one outage: one change to unreachable, one back)."""
    url = own_server.url
    effects = tmp_path / "effects"
    effects.mkdir()
    ids = _submit(url, tmp_path, EFFECTS_PATH, 100)
    logs = [tmp_path / f"worker-{n}.log" for n in range(2)]
    for log in logs:
        workers.append(_worker(url, tmp_path, effects, "--concurrency", "10",
                               "--exit-when-idle", log=log, CLUSTER_STAGE_SECONDS="0.02",
                               WORKFLOW_DURABILITY="strict"))
    pids = {process.pid for process in workers}
    _wait_until(lambda: all(sum(e[0] == "done" and e[3] == pid for e in read_effects(effects))
                            >= 20 for pid in pids), "stages to complete in both workers")
    own_server.stop("immediate")
    down_at = time.monotonic()
    _wait_until(lambda: all("unreachable" in log.read_text() for log in logs),
                "both workers to see the server gone")
    # Down for longer than the lease (1.5 s): whichever worker comes back first may find
    # the other dead and re-queue its workflows. (Only the outage's length; nothing
    # asserted depends on it.)
    time.sleep(2)
    up_at = time.monotonic()
    own_server.start()
    for process, log in zip(workers, logs, strict=True):
        assert process.wait(timeout=180) == 0, log.read_text()
    rows = _sync_rows(url, "SELECT workflow_id, status, owner, state FROM workflows")
    assert {r["workflow_id"] for r in rows} == set(ids)
    assert {(r["status"], r["owner"]) for r in rows} == {("completed", None)}
    for row in rows:
        state = json.loads(row["state"])
        history = [e["stage"] for e in state["monitoring_state"]["stage_history"]
                   if e["status"] == "completed"]
        assert state["completed_stages"] == history == ["one", "two", "three"], state
    effects_rows = read_effects(effects)
    stages = ("one", "two", "three")
    for workflow_id in ids:
        starts = {stage: [e[4] for e in effects_rows if e[0] == "start"
                          and e[1] == workflow_id and e[2] == stage] for stage in stages}
        for earlier, later in itertools.pairwise(stages):
            assert starts[later], (workflow_id, later)
            assert max(starts[earlier]) < min(starts[later]), (
                f"{workflow_id}: {earlier} ran again after {later} started")
    during = [e for e in effects_rows if e[0] == "start" and down_at < e[4] < up_at]
    per_workflow = [e[1] for e in during]
    assert len(per_workflow) == len(set(per_workflow)) and len(during) <= 20, during
    for log in logs:
        text = log.read_text()
        # One outage, one state change each way: round trips that straddle its start
        # or end (a commit that raced the crash, a retry failing after the recovery)
        # do not flip the state again.
        states = re.findall(r"unreachable|reachable again", text)
        assert states == ["unreachable", "reachable again"], text
        assert own_server.password not in text


def test_sigterm_gives_claims_back_and_exits_130(
        tmp_path: Path, postgres_url: str, workers: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM stops a worker's stages at their boundary, gives its claims back (another
    worker takes them at once, before any lease runs out) and exits 130."""
    effects = tmp_path / "effects"
    effects.mkdir()
    _submit(postgres_url, tmp_path, EFFECTS_PATH, 5)
    first = _worker(postgres_url, tmp_path, effects, "--concurrency", "5",
                    CLUSTER_STAGE_SECONDS="0.3", WORKFLOW_LEASE_SECONDS="600")
    workers.append(first)
    _wait_until(lambda: len({e[1] for e in read_effects(effects)}) == 5, "5 started")
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=60) == 130
    rows = _sync_rows(postgres_url, "SELECT status, owner FROM workflows")
    assert {r["status"] for r in rows} == {"interrupted"} and {r["owner"] for r in rows} == {
        None}
    second = _worker(postgres_url, tmp_path, effects, "--exit-when-idle",
                     CLUSTER_STAGE_SECONDS="0", WORKFLOW_LEASE_SECONDS="600")
    workers.append(second)
    assert second.wait(timeout=60) == 0
    assert _statuses(postgres_url) == {"completed": 5}


def test_diagnostics_and_bundle_commands_read_the_database_and_hide_the_password(
        tmp_path: Path, postgres_url: str, workers: list[subprocess.Popen[bytes]],
        capsys: pytest.CaptureFixture[str]) -> None:
    """`diagnostics --json`, `diagnostics` and `bundle` of a workflow a worker process ran
    read its state and each stage's checkpoint from the database, and never show the
    database password, not even where the workflow's own outputs carry the URL."""
    password = urlsplit(postgres_url).password
    assert password
    [workflow_id] = _submit(postgres_url, tmp_path, NOTED_PATH, 1,
                            "--context", json.dumps({"note": f"see {postgres_url}"}))
    workers.append(_worker(postgres_url, tmp_path, tmp_path, "--exit-when-idle"))
    assert workers[0].wait(timeout=120) == 0, workers[0].communicate()
    common = ["--store", postgres_url, "--project-root", str(tmp_path)]
    assert main(["diagnostics", workflow_id, *common, "--json"]) == 0
    out, err = capsys.readouterr()
    diagnostics = json.loads(out)
    assert diagnostics["status"] == "completed"
    assert diagnostics["completed_stages"] == ["first", "second"]
    assert diagnostics["outputs"]["note"].startswith("see postgresql://")
    assert password not in out + err
    assert main(["diagnostics", workflow_id, *common]) == 0
    out, err = capsys.readouterr()
    assert workflow_id in out and "completed" in out and password not in out + err
    assert main(["bundle", workflow_id, *common, "--json"]) == 0
    out, err = capsys.readouterr()
    bundle_path = Path(json.loads(out)["bundle"])
    text = bundle_path.read_text()
    assert password not in out + err + text
    bundle = json.loads(text)
    assert bundle["workflow_diagnostics"]["completed_stages"] == ["first", "second"]
    sources = list(bundle["state_files"])
    assert [s.rsplit("#", 1)[1] for s in sources] == [
        f"workflows/{workflow_id}", f"workflows/{workflow_id}/first",
        f"workflows/{workflow_id}/final"]
    assert bundle["state_files"][sources[1]]["completed_stages"] == ["first"]
    assert bundle["configuration"]["store_url"].count("***") == 1


def test_development_workflows_through_two_workers_one_killed(
        tmp_path: Path, postgres_url: str, workers: list[subprocess.Popen[bytes]]) -> None:
    """The development workflow on the local forge, 3 prompts submitted to 2 workers; the
    one running them is SIGKILLed once the first issue exists: the other finishes them all
    with one issue, one branch, one marked commit and one pull request per workflow."""
    repo = make_example_repo(tmp_path / "repo")
    done = subprocess.run(
        [sys.executable, "-m", "reliability", "submit", *map(str, PROMPTS), "--store",
         postgres_url, "--project-root", str(repo), "--json"],
        cwd=ROOT, env=_env(tmp_path), capture_output=True, check=True)
    ids = json.loads(done.stdout)["workflow_ids"]
    settings = {"WORKFLOW_AGENT_COMMAND": AGENT_COMMAND, "WORKFLOW_FORGE": "local",
                "WORKFLOW_RETRY_BASE_DELAY": "0.01", "WORKFLOW_RETRY_MAX_DELAY": "0.5",
                "WORKFLOW_LEASE_SECONDS": "3"}
    victim = _worker(postgres_url, repo, tmp_path, "--concurrency", "3",
                     log=tmp_path / "victim.log", **settings)
    workers.append(victim)
    owned = "SELECT count(*) AS n FROM workflows WHERE owner IS NOT NULL"
    _wait_until(lambda: _sync_rows(postgres_url, owned)[0]["n"] == 3, "the first to claim all")
    survivor = _worker(postgres_url, repo, tmp_path, "--concurrency", "3", "--exit-when-idle",
                       log=tmp_path / "survivor.log", **settings)
    workers.append(survivor)
    _wait_until(lambda: (repo / ".github" / "workflow-forge" / "issues" / "1.json").exists(),
                "the first issue")
    victim.kill()
    assert survivor.wait(timeout=150) == 0, (tmp_path / "survivor.log").read_text()[-3000:]
    rows = _sync_rows(postgres_url, "SELECT workflow_id, status, epoch, state FROM workflows")
    assert {r["workflow_id"] for r in rows} == set(ids)
    assert {r["status"] for r in rows} == {"completed"}
    assert max(r["epoch"] for r in rows) >= 2  # the survivor took over from the victim
    issues, pulls = forge_records(repo, "issues"), forge_records(repo, "pulls")
    assert len(issues) == len(pulls) == 3
    bare = repo / ".github" / "workflow-forge" / "remote.git"
    branches = bare_branches(bare)
    main = git(repo, "rev-parse", "main")
    outputs = {r["workflow_id"]: WorkflowRun.from_state(json.loads(r["state"])).outputs
               for r in rows}
    assert set(branches) == {out["branch_name"] for out in outputs.values()}
    for workflow_id, out in outputs.items():
        marker = marker_for(workflow_id)
        assert [i["number"] for i in issues if marker in i["body"]] == [out["issue_number"]]
        mine = [p for p in pulls if p["head_branch"] == out["branch_name"]]
        assert [p["number"] for p in mine] == [out["pr_number"]]
        assert mine[0]["head_sha"] == out["commit_sha"] == branches[out["branch_name"]]
        assert_one_marked_commit(bare, out["branch_name"], workflow_id, main)
        assert_worktree_removed(repo, out["worktree"])


def test_claim_stress_every_epoch_claimed_once(
        tmp_path: Path, postgres_url: str, workers: list[subprocess.Popen[bytes]]) -> None:
    """4 workers, 2,000 tiny workflows: all complete, each (workflow, epoch) claimed once."""
    _submit(postgres_url, tmp_path, TINY_PATH, 2000)
    for _ in range(4):
        workers.append(_worker(postgres_url, tmp_path, tmp_path, "--concurrency", "50",
                               "--exit-when-idle"))
    for process in workers:
        assert process.wait(timeout=180) == 0, process.communicate()
    assert _statuses(postgres_url) == {"completed": 2000}
    duplicates = _sync_rows(postgres_url, "SELECT workflow_id, epoch FROM workflow_writes "
                                          "WHERE kind = 'claim' GROUP BY 1, 2 HAVING count(*) > 1")
    assert duplicates == []
    claims = _sync_rows(postgres_url, "SELECT count(DISTINCT owner) AS owners, count(*) AS n "
                                      "FROM workflow_writes WHERE kind = 'claim'")[0]
    assert claims["n"] >= 2000 and claims["owners"] >= 2


def test_cluster_benchmark_runs_workers_and_reports_every_figure(
        postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """benchmarks.cluster with 1 and 2 worker processes on a small batch: every workflow
    completes and each row has its rate, its commit percentiles and each worker's count."""
    from benchmarks._cluster import main as bench
    monkeypatch.setenv("WORKFLOW_TEST_POSTGRES_URL", postgres_url)
    out = tmp_path / "cluster.json"
    assert bench(["--workers", "1,2", "--workflows", "40", "--concurrency", "10",
                  "--dbos-workflows", "", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["cluster"]
    assert [r["workers"] for r in rows] == [1, 2]
    for row in rows:
        assert sum(row["per_worker"]) == 40 and len(row["per_worker"]) == row["workers"]
        assert row["transitions"] == 40 * 19 and row["transitions_per_s"] > 0
        assert 0 < row["commit_p50_ms"] <= row["commit_p99_ms"] and row["batches"] >= 1
        # The test server's user is a superuser: the server's side is timed too.
        assert row["server_commit_mean_ms"] > 0 and row["wal_syncs"] >= 1


def test_cluster_benchmark_latency_run_is_paced_and_probed(
        postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """benchmarks.cluster --latency-at queues workflows at the offered rate while one
    worker runs (the run lasts at least the queueing schedule) and --probe splits its
    commits into every part, each with p50 <= p99."""
    from benchmarks._cluster import main as bench
    monkeypatch.setenv("WORKFLOW_TEST_POSTGRES_URL", postgres_url)
    out = tmp_path / "latency.json"
    assert bench(["--workers", "", "--workflows", "40", "--concurrency", "10",
                  "--saturated-rate", "400", "--latency-at", "0.5", "--probe",
                  "--dbos-workflows", "", "--json", str(out)]) == 0
    [row] = json.loads(out.read_text())["latency"]
    assert row["offered_per_s"] == 200 and sum(row["per_worker"]) == 40
    # The last of 40 is queued 39 / (200 / 19) s after the first (the pacing's schedule;
    # the first may be late by the time of its own insert, hence 0.9).
    assert row["queued_seconds"] >= 39 / (200 / 19) * 0.9
    assert 0 < row["loop_busy"] < 1
    [probe] = row["probe"]
    assert probe["sampled_batches"] >= 1
    parts = {k: v for k, v in probe.items()
             if isinstance(v, list) and k not in ("slowest", "lane_pids")}
    assert {"a_wait_for_batch", "b_encode", "c_round_trip", "c2_server_function",
            "d_loop_after_reply", "save_to_woken"} <= set(parts)
    assert all(p50 <= p99 for p50, p99 in parts.values())
    assert parts["c_round_trip"][0] > 0 and parts["c2_server_function"][0] > 0
    assert parts["b_encode_cpu"][0] > 0


def test_cluster_benchmark_probe_lists_the_slowest_commits_and_the_server_side(
        postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """benchmarks.cluster --probe lists the slowest 1 % of the commits one by one with
    their parts, the collector's pauses and the loop's lag, and the run reports the
    server's counters (bgwriter, WAL, tables) and its log lines of the run."""
    from benchmarks._cluster import main as bench
    monkeypatch.setenv("WORKFLOW_TEST_POSTGRES_URL", postgres_url)
    out = tmp_path / "latency.json"
    assert bench(["--workers", "1", "--workflows", "40", "--concurrency", "10", "--probe",
                  "--dbos-workflows", "", "--json", str(out)]) == 0
    [row] = json.loads(out.read_text())["cluster"]
    [probe] = row["probe"]
    slowest = probe["slowest"]
    assert len(slowest) == max(1, probe["sampled_batches"] // 100)
    for commit in slowest:
        parts = [commit[k] for k in ("b_encode", "c1_to_server", "c2_server_function",
                                     "c3_sync_reply_and_socket", "d1_task_resumed",
                                     "d2_waiters_resolved", "d3_waiters_woken")]
        # The parts are consecutive: they add up to the commit (rounded to 0.01 ms each).
        assert abs(sum(parts) - commit["total"]) < 0.1 and commit["total"] > 0
        assert commit["server"] == [] or set(commit["server"]) <= {
            "checkpoint", "autovacuum", "lock_wait"}
    assert [commit["total"] for commit in slowest] == sorted(
        (commit["total"] for commit in slowest), reverse=True)
    # The slowest are the tail: none faster than the sampled commits' p99.
    assert slowest[-1]["total"] >= probe["commit_taken_to_woken"][1] - 0.01
    assert set(probe["gc"]) == {"gen0", "gen1", "gen2"}
    assert sum(g["count"] for g in probe["gc"].values()) >= 1  # 40 workflows allocate
    assert 0 <= probe["loop_lag"][0] <= probe["loop_lag"][1]
    counters = row["server"]["counters"]
    assert counters["wal"]["wal_records"] > 0 and counters["tables"]["workflows"]["n_tup_upd"] > 0
    assert isinstance(row["server"]["log"], list)
    assert len(probe["lane_pids"]) >= 1 and isinstance(probe["lock_waits"], dict)


def test_lock_waits_are_told_apart_by_who_waited_and_for_what() -> None:
    """The server's logged lock waits count per commit lane or other session and per
    lock (a shared object's, a table's extension), each with its total wait."""
    from benchmarks._cluster import _lock_waits
    log = [{"line": "UTC [7] LOG:  process 7 acquired AccessExclusiveLock on object 0 of "
                    "class 1262 of database 0 after 9.5 ms"},
           {"line": "UTC [7] LOG:  process 7 still waiting for AccessExclusiveLock on "
                    "object 0 of class 1262 of database 0 after 5.0 ms"},
           {"line": "UTC [8] LOG:  process 8 acquired ExclusiveLock on extension of "
                    "relation 16434 of database 16384 after 6.5 ms"},
           {"line": "UTC [9] LOG:  process 9 acquired AccessExclusiveLock on object 0 of "
                    "class 1262 of database 0 after 20.0 ms"},
           {"line": "UTC [7] LOG:  process 7 acquired AccessExclusiveLock on object 0 of "
                    "class 1262 of database 0 after 5.5 ms"},
           {"line": "UTC [] LOG:  checkpoint complete: wrote 3 buffers"}]
    assert _lock_waits(log, {7, 8}) == {"lanes_object": [2, 15.0],
                                        "lanes_extension": [1, 6.5],
                                        "others_object": [1, 20.0]}


def test_the_notify_lock_benchmark_alternates_both_kinds_of_commit(
        postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """benchmarks.cluster --notify-ab commits with a NOTIFY in each transaction (each one
    heard by its listener) and without (none heard), the order alternating by round."""
    from benchmarks._cluster import main as bench
    monkeypatch.setenv("WORKFLOW_TEST_POSTGRES_URL", postgres_url)
    out = tmp_path / "notify.json"
    assert bench(["--notify-ab", "2", "--notify-seconds", "0.5", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["notify_ab"]
    assert [(r["round"], r["notify"]) for r in rows] == [(0, True), (0, False),
                                                          (1, False), (1, True)]
    for row in rows:
        assert row["heard"] == (row["commits"] if row["notify"] else 0)
        assert row["commits_per_s"] > 0 and 0 < row["p50_ms"] <= row["p99_ms"]
