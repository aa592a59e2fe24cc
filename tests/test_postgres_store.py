"""The PostgreSQL store against a real server: durability, group commit, claims, fencing."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from reliability._errors import (
    DatabaseUnavailableError,
    FencedError,
    SchemaVersionError,
    WorkflowLockedError,
)
from reliability._postgres import PostgresStore, latest_version, migrate, parse_url
from reliability._postgres._schema import migrations

ROOT = Path(__file__).resolve().parent.parent


def _state(workflow_id: str, revision: int = 1, status: str = "running",
           **extra: Any) -> dict[str, Any]:
    return {"workflow_id": workflow_id, "revision": revision, "status": status,
            "definition": "tests.workflows_for_tests:NOOP", "progress_data": extra}


def _id(n: int) -> str:
    return f"workflow-20250101-000000-{n:08x}"


@pytest.fixture
async def store(postgres_url: str) -> AsyncIterator[PostgresStore]:
    store = PostgresStore(postgres_url, lease_seconds=30)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


async def _fetch(url: str, query: str, *args: Any) -> list[asyncpg.Record]:
    connection = await asyncpg.connect(url)
    try:
        return list(await connection.fetch(query, *args))
    finally:
        await connection.close()


async def test_save_and_load_round_trip(store: PostgresStore, postgres_url: str) -> None:
    """A claimed workflow's saved state and its stage checkpoint read back as written."""
    workflow_id = _id(1)
    claim = await store.claim(workflow_id)
    state = _state(workflow_id, 3, answer={"n": 1, "text": "é ✓"}, numbers=[1.5, 2])
    await store.save(workflow_id, lambda: state, checkpoint_stage="plan")
    assert (await store.load(workflow_id)).state == state
    assert (await store.checkpoint(workflow_id, "plan")).state == state
    later = _state(workflow_id, 4, status="completed")
    await store.save(workflow_id, lambda: later)
    assert [s.state for s in await store.list_states({"completed"})] == [later]
    assert await store.list_states({"running"}) == []
    claim.release()
    await store.close()
    reopened = PostgresStore(postgres_url)
    await reopened.open()
    try:
        assert (await reopened.load(workflow_id)).state == later
    finally:
        await reopened.close()


async def test_many_saves_are_few_commits(store: PostgresStore, postgres_url: str) -> None:
    """Saves asked for together are committed in as few transactions as the batch cap
    allows (group commit)."""
    ids = [_id(n) for n in range(300)]
    claims, refused = await store.claim_many(ids)
    assert len(claims) == 300 and not refused
    before = store.batches_committed
    futures = [store.save_nowait(w, lambda w=w: _state(w, 2), checkpoint_stage="s1")
               for w in ids]
    await asyncio.gather(*futures)
    assert store.batches_committed - before == -(-300 // store.batch_rows)
    rows = await _fetch(postgres_url, "SELECT count(*) AS n FROM workflow_checkpoints")
    assert rows[0]["n"] == 300


async def test_lanes_send_batch_after_batch_in_their_own_tasks(store: PostgresStore) -> None:
    """Committing batch after batch creates no task: a lane sends its next batch from its
    own task (a new task per batch costs a turn of a busy loop before it is sent)."""
    ids = [_id(n) for n in range(5)]
    await store.claim_many(ids)
    await asyncio.gather(*(store.save_nowait(w, lambda w=w: _state(w, 2)) for w in ids))
    loop = asyncio.get_running_loop()
    created: list[str] = []

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **options: Any) -> asyncio.Task[Any]:
        created.append(getattr(coro, "__qualname__", repr(coro)))
        return asyncio.Task(coro, loop=loop, **options)

    before = store.batches_committed
    loop.set_task_factory(factory)
    try:
        for revision in range(3, 13):
            await asyncio.gather(*(store.save_nowait(w, lambda w=w, r=revision: _state(w, r))
                                   for w in ids))
    finally:
        loop.set_task_factory(None)
    assert store.batches_committed - before >= 10
    assert created == []


async def _until(condition: Callable[[], bool]) -> None:
    """Until ``condition`` holds (a task of this loop makes it so)."""
    while not condition():  # noqa: ASYNC110 (the committer's state has no event)
        await asyncio.sleep(0.001)


async def test_capped_batches_in_parallel_keep_each_workflow_s_order(
        postgres_url: str) -> None:
    """Batches go out on several lanes at once, but never two with one workflow's writes
    (a later write or its release could overtake an earlier); a flush waits for batches
    in flight, not only for those queued."""
    store = PostgresStore(postgres_url, batch_rows=2, commit_lanes=3, pool_size=4)
    await store.open()
    gate = asyncio.Event()
    commit = store._commit

    async def held(batch: Any) -> dict[str, BaseException]:
        await gate.wait()
        return await commit(batch)

    store._commit = held  # type: ignore[method-assign]
    ids = [_id(n) for n in range(4)]
    try:
        claims, _ = await store.claim_many(ids)
        first = [store.save_nowait(w, lambda w=w: _state(w, 1)) for w in ids]
        await _until(lambda: len(store._sending) == 2)  # 4 writes, 2 rows a batch
        in_flight = asyncio.ensure_future(store._flush())  # nothing queued, 2 batches sent
        await asyncio.sleep(0)  # it starts waiting before anything more is queued
        second = [store.save_nowait(w, lambda w=w: _state(w, 2)) for w in ids]
        for claim in claims:
            claim.release()
        flushed = asyncio.ensure_future(store._flush())
        for _ in range(20):
            await asyncio.sleep(0)
        # A lane is free, yet nothing more went out: every workflow has a write in flight.
        assert len(store._sending) == 2
        assert not in_flight.done() and not flushed.done()
        gate.set()
        await in_flight
        assert all(f.done() for f in first)
        await flushed
        assert all(f.done() for f in first + second)
        await asyncio.gather(*first, *second)
    finally:
        gate.set()
        await store.close()
    rows = await _fetch(postgres_url, "SELECT workflow_id, revision, owner FROM workflows")
    assert {(r["revision"], r["owner"]) for r in rows} == {(2, None)}
    writes = await _fetch(postgres_url, "SELECT workflow_id, kind, revision, applied FROM "
                                        "workflow_writes WHERE kind <> 'claim' ORDER BY id")
    for workflow_id in ids:
        mine = [(w["kind"], w["revision"], w["applied"]) for w in writes
                if w["workflow_id"] == workflow_id]
        assert mine == [("save", 1, True), ("save", 2, True), ("release", None, True)]


async def test_a_workflow_is_claimed_once_among_tasks_and_stores(postgres_url: str) -> None:
    """Concurrent claims by two stores' tasks grant each workflow to exactly one of them."""
    stores = [PostgresStore(postgres_url) for _ in range(2)]
    for s in stores:
        await s.open()
    try:
        ids = [_id(n) for n in range(50)]
        results = await asyncio.gather(*(s.claim_many(ids) for s in stores for _ in range(3)))
        granted = [c.workflow_id for claims, _ in results for c in claims]
        assert sorted(granted) == sorted(ids)
        with pytest.raises(WorkflowLockedError):
            await stores[0].claim(ids[0]) if ids[0] in stores[1]._epochs else \
                await stores[1].claim(ids[0])
    finally:
        for s in stores:
            await s.close()


_WORKER = textwrap.dedent("""
    import asyncio, json, sys
    from reliability._postgres import PostgresStore

    async def main():
        store = PostgresStore(sys.argv[1])
        await store.open()
        mine = []
        while True:
            claimed = await store.claim_next(7, queue="q")
            if not claimed:
                break
            for claim, loaded in claimed:
                mine.append([claim.workflow_id, claim.epoch])
                done = {**loaded.state, "status": "completed"}
                await store.save(claim.workflow_id, lambda: done)
                claim.release()
        await store.close()
        print(json.dumps(mine))

    asyncio.run(main())
""")


async def test_queued_workflows_are_claimed_once_by_processes(store: PostgresStore,
                                                              postgres_url: str) -> None:
    """Three processes draining one queue claim every workflow exactly once (SKIP LOCKED)."""
    ids = [_id(n) for n in range(400)]
    await store.enqueue([_state(w, status="pending") for w in ids], queue="q")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    workers = [await asyncio.create_subprocess_exec(
        sys.executable, "-c", _WORKER, postgres_url, env=env,
        stdout=asyncio.subprocess.PIPE) for _ in range(3)]
    outputs = [json.loads((await w.communicate())[0]) for w in workers]
    assert all(w.returncode == 0 for w in workers)
    claimed = [tuple(pair) for output in outputs for pair in output]
    assert sorted(w for w, _ in claimed) == sorted(ids)
    assert {epoch for _, epoch in claimed} == {1}
    rows = await _fetch(postgres_url, "SELECT count(*) AS n FROM workflow_writes "
                                      "WHERE kind = 'claim'")
    assert rows[0]["n"] == 400


async def test_a_stale_epoch_is_fenced_off_and_audited(postgres_url: str) -> None:
    """After a worker's lease ran out and another claimed its workflow, its writes are
    refused with FencedError, change nothing, and are recorded as refused."""
    fenced: list[str] = []
    old = PostgresStore(postgres_url, on_fenced=fenced.append)
    new = PostgresStore(postgres_url)
    await old.open()
    await new.open()
    try:
        workflow_id = _id(7)
        await old.claim(workflow_id)
        await old.save(workflow_id, lambda: _state(workflow_id, 1))
        with pytest.raises(WorkflowLockedError):
            await new.claim(workflow_id)  # the old worker's lease is still valid
        # The old worker stops renewing (as if stopped); its lease runs out.
        await _fetch(postgres_url, "UPDATE workflow_workers SET lease_expires_at = now() "
                                   "- interval '1 second' WHERE worker_id = $1", old.worker_id)
        assert await new.reap() == [workflow_id]
        claim = await new.claim(workflow_id)
        assert claim.epoch == 3  # 1 (first claim), 2 (re-queued), 3 (claimed again)
        await new.save(workflow_id, lambda: _state(workflow_id, 2, by="new"))
        with pytest.raises(FencedError, match=old.worker_id):
            await old.save(workflow_id, lambda: _state(workflow_id, 9, by="old"))
        assert fenced == [workflow_id]
        with pytest.raises(FencedError):  # refused locally now, nothing sent
            await old.save(workflow_id, lambda: _state(workflow_id, 10, by="old"))
        assert (await new.load(workflow_id)).state["progress_data"] == {"by": "new"}
        audit = await _fetch(postgres_url, "SELECT owner, epoch, kind, applied FROM "
                                           "workflow_writes WHERE workflow_id = $1 ORDER BY id",
                             workflow_id)
        assert [(r["owner"] == old.worker_id, r["epoch"], r["kind"], r["applied"])
                for r in audit] == [
            (True, 1, "claim", True), (True, 1, "save", True), (True, 2, "requeue", True),
            (False, 3, "claim", True), (False, 3, "save", True), (True, 1, "save", False)]
        assert not [r for r in audit if r["owner"] == old.worker_id and r["applied"]
                    and r["kind"] == "save" and r["epoch"] != 1]
    finally:
        await old.close()
        await new.close()


async def test_a_released_workflow_is_claimable_at_once(store: PostgresStore,
                                                        postgres_url: str) -> None:
    """release() gives the workflow back after its last save, with a NOTIFY for workers."""
    ids = [_id(n) for n in range(3)]
    await store.enqueue([_state(w, status="pending") for w in ids], queue="q")
    [(claim, loaded)] = await store.claim_next(1, queue="q")
    assert loaded.state["workflow_id"] == ids[0]
    other = PostgresStore(postgres_url)
    await other.open()
    try:
        await other.wait_for_work(poll=0.01)  # listening from here on
        store.save_nowait(ids[0], lambda: _state(ids[0], 2, status="interrupted"))
        claim.release()
        assert await other.wait_for_work(poll=60)  # woken by the NOTIFY, not the poll
        again = await other.claim_next(3, queue="q")
        assert sorted(c.workflow_id for c, _ in again) == ids
        assert {c.workflow_id: c.epoch for c, _ in again}[ids[0]] == 2
    finally:
        await other.close()


_MIGRATE = textwrap.dedent("""
    import asyncio, json, sys
    import asyncpg
    from reliability._postgres import migrate

    async def main():
        connection = await asyncpg.connect(sys.argv[1])
        print(json.dumps(await migrate(connection)))
        await connection.close()

    asyncio.run(main())
""")


async def test_two_processes_migrating_at_once(postgres_url: str) -> None:
    """Of two processes migrating an empty database at once, one applies every migration
    and the other waits for it, then proceeds with nothing to do."""
    from reliability._postgres._schema import MIGRATION_LOCK
    holder = await asyncpg.connect(postgres_url)
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        processes = [await asyncio.create_subprocess_exec(
            sys.executable, "-c", _MIGRATE, postgres_url, env=env,
            stdout=asyncio.subprocess.PIPE) for _ in range(2)]
        # Both wait on the lock before it is let go: they really are at it at once. Polled:
        # the server's lock table is the only place that says so.
        while await holder.fetchval(  # noqa: ASYNC110
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted") < 2:
            await asyncio.sleep(0.01)
        await holder.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
        results = sorted([json.loads((await p.communicate())[0]) for p in processes])
        assert all(p.returncode == 0 for p in processes)
        assert results == [[], list(range(1, latest_version() + 1))]
        assert await holder.fetchval("SELECT count(*) FROM workflow_schema_migrations") == \
            latest_version()
    finally:
        await holder.close()


async def test_a_database_newer_than_the_code_is_refused(postgres_url: str) -> None:
    """A schema migrated by newer code is refused with one line saying so."""
    connection = await asyncpg.connect(postgres_url)
    try:
        await migrate(connection)
        await connection.execute("INSERT INTO workflow_schema_migrations (version, name) "
                                 "VALUES (999, '0999_future.sql')")
        with pytest.raises(SchemaVersionError) as caught:
            await PostgresStore(postgres_url).open()
        assert "999" in str(caught.value) and "upgrade workflow-manager" in str(caught.value)
        assert "\n" not in str(caught.value)
    finally:
        await connection.close()


async def _migrate_up_to(connection: asyncpg.Connection, version: int) -> None:
    """The schema as code that knew migrations 1..``version`` left it."""
    await connection.execute("CREATE TABLE workflow_schema_migrations (version integer PRIMARY "
                             "KEY, name text NOT NULL, applied_at timestamptz NOT NULL "
                             "DEFAULT now())")
    for migration in migrations()[:version]:
        await connection.execute(migration.sql)
        await connection.execute("INSERT INTO workflow_schema_migrations (version, name) "
                                 "VALUES ($1, $2)", migration.version, migration.name)


async def test_states_stored_as_jsonb_survive_the_upgrade_to_json(postgres_url: str) -> None:
    """A database whose states and checkpoints were written as jsonb (schema 6) is migrated
    to json: they read back as written, and the commit function writes again."""
    workflow_id = _id(7)
    state = _state(workflow_id, 2, answer={"text": "é ✓", "n": [1, 2.5]})
    connection = await asyncpg.connect(postgres_url)
    try:
        await _migrate_up_to(connection, 6)
        await connection.execute(
            "INSERT INTO workflows (workflow_id, state, status, revision) "
            "VALUES ($1, $2::jsonb, 'running', 2)", workflow_id, json.dumps(state))
        await connection.execute(
            "INSERT INTO workflow_checkpoints (workflow_id, stage, epoch, revision, state) "
            "VALUES ($1, 'plan', 0, 2, $2::jsonb)", workflow_id, json.dumps(state))
        assert await migrate(connection) == list(range(7, latest_version() + 1))
        types = await connection.fetch(
            "SELECT table_name, data_type FROM information_schema.columns "
            "WHERE column_name = 'state' AND table_name LIKE 'workflow%' ORDER BY 1")
        assert [tuple(t) for t in types] == [("workflow_checkpoints", "json"),
                                             ("workflows", "json")]
    finally:
        await connection.close()
    store = PostgresStore(postgres_url)
    await store.open()
    try:
        assert (await store.load(workflow_id)).state == state
        assert (await store.checkpoint(workflow_id, "plan")).state == state
        claim = await store.claim(workflow_id)
        later = _state(workflow_id, 3, status="completed")
        await store.save(workflow_id, lambda: later, checkpoint_stage="test")
        assert (await store.load(workflow_id)).state == later
        claim.release()
    finally:
        await store.close()


async def test_a_state_is_stored_as_the_text_the_store_sent(store: PostgresStore,
                                                             postgres_url: str) -> None:
    """States are json, not jsonb: the server keeps the store's own text (no conversion to
    and from a binary form on every write and read), sorted keys and all."""
    workflow_id = _id(8)
    await store.claim(workflow_id)
    state = _state(workflow_id, 1, zebra=1, alpha={"b": 2, "a": 1})
    await store.save(workflow_id, lambda: state, checkpoint_stage="plan")
    expected = json.dumps(state, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    for table in ("workflows", "workflow_checkpoints"):
        [row] = await _fetch(postgres_url, f"SELECT state::text AS text FROM {table}")
        assert row["text"] == expected


async def test_a_refused_connection_names_the_server_not_the_password(
        postgres_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """Wrong port, or a server refusing more connections: one clear error naming the host,
    with the password masked there, in repr and in logs."""
    url = parse_url(postgres_url)
    password = url.secret.split(":")[2].split("@")[0]
    from postgres_server import free_port
    wrong_port = postgres_url.replace(f":{url.port}/", f":{free_port()}/")
    store = PostgresStore(wrong_port)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(DatabaseUnavailableError) as caught:
        await store.open()
    message = str(caught.value)
    assert "127.0.0.1:" in message and "***" in message and password not in message
    assert password not in repr(store) and password not in str(store.describe(_id(1)))
    # A role allowed no connection at all: the server refuses as at max_connections.
    admin = await asyncpg.connect(postgres_url)
    try:
        await admin.execute("CREATE ROLE limited LOGIN PASSWORD 'pw-Zq9-secret' "
                            "CONNECTION LIMIT 0")
    finally:
        await admin.close()
    limited = postgres_url.replace(f"workflow:{password}@", "limited:pw-Zq9-secret@")
    with pytest.raises(DatabaseUnavailableError, match="too many connections") as caught:
        await PostgresStore(limited).open()
    assert "pw-Zq9-secret" not in str(caught.value) and url.server in str(caught.value)
    assert password not in caplog.text and "pw-Zq9-secret" not in caplog.text


def test_urls_are_shown_masked() -> None:
    """Every form of the password is masked: user part, query parameter, PGPASSWORD."""
    from reliability._postgres import mask_url, scrub
    url = "postgresql://me:p%40ss@db.example:6543/app?password=other&sslmode=require"
    assert mask_url(url) == "postgresql://me:***@db.example:6543/app?password=***&sslmode=require"
    assert str(parse_url(url)) == repr(parse_url(url))[13:-2]
    assert "p@ss" not in repr(parse_url(url)) and parse_url(url).server == "db.example:6543"
    assert scrub("failed for p@ss and other", url) == "failed for *** and ***"
    os.environ["PGPASSWORD"] = "from-env"
    try:
        assert scrub("x from-env y", "postgresql://h/db") == "x *** y"
    finally:
        del os.environ["PGPASSWORD"]


def test_the_server_script_prints_a_url(tmp_path: Path) -> None:
    """`make postgres`'s script starts a server, prints its URL, and stops on SIGTERM."""
    with subprocess.Popen([sys.executable, str(ROOT / "tests" / "postgres_server.py")],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                          text=True) as process:
        try:
            assert process.stdout is not None
            lines = [process.stdout.readline() for _ in range(2)]
            assert lines[1].startswith("export WORKFLOW_STORE_URL='postgresql://"), lines
            directory = lines[0].split(" running in ")[1].split(" ")[0]
            assert Path(directory).is_dir()
        finally:
            process.terminate()
            process.wait(timeout=60)
    assert process.returncode == 0
    assert not Path(directory).exists()


async def test_the_lease_is_renewed_while_commits_and_the_pool_are_stuck(
        postgres_url: str) -> None:
    """With every commit lane waiting on a row lock held on the server and every pool
    connection taken, the heartbeat still renews the lease (its own connection), and the
    stuck commits complete once the lock goes."""
    store = PostgresStore(postgres_url, lease_seconds=6, batch_rows=1, commit_lanes=3)
    await store.open()
    blocker = await asyncpg.connect(postgres_url)
    observer = await asyncpg.connect(postgres_url)
    held: list[Any] = []
    try:
        ids = [_id(n) for n in range(4)]
        await store.claim_many(ids)
        await blocker.execute("BEGIN")
        await blocker.execute("SELECT 1 FROM workflows WHERE workflow_id = ANY($1::text[]) "
                              "FOR UPDATE", ids)
        saves = [store.save_nowait(w, lambda w=w: _state(w, 2)) for w in ids]
        await _until(lambda: len(store._sending) == 3)  # every lane has a batch out
        pool = store.require_pool()
        held = [await pool.acquire() for _ in range(store.pool_size)]
        query = "SELECT heartbeat_at FROM workflow_workers WHERE worker_id = $1"
        beats = {await observer.fetchval(query, store.worker_id)}
        for _ in range(3000):  # two renewals (every 2 s); the limit only bounds a hang
            if len(beats) == 3:
                break
            await asyncio.sleep(0.01)
            beats.add(await observer.fetchval(query, store.worker_id))
        assert len(beats) == 3, "the lease was not renewed"
        assert not any(s.done() for s in saves)  # the commits were stuck all along
        assert store.lease_valid
        await blocker.execute("ROLLBACK")
        await asyncio.gather(*saves)
    finally:
        for connection in held:
            await store.require_pool().release(connection)
        await blocker.close()
        await observer.close()
        await store.close()


async def test_a_committed_end_notifies_result_waiters(store: PostgresStore,
                                                      postgres_url: str) -> None:
    """The commit of a workflow's final state sends its ID on the result channel; a running
    state, and a final state refused by the fence, send nothing."""
    from reliability._postgres import RESULT_CHANNEL
    heard: asyncio.Queue[str] = asyncio.Queue()
    listener = await asyncpg.connect(postgres_url)
    await listener.add_listener(RESULT_CHANNEL, lambda *args: heard.put_nowait(args[3]))
    try:
        ended, running, taken = _id(1), _id(2), _id(3)
        await store.claim_many([ended, running, taken])
        await _fetch(postgres_url, "UPDATE workflows SET epoch = epoch + 1 "
                                   "WHERE workflow_id = $1", taken)
        writes = [store.save_nowait(ended, lambda: _state(ended, 2, status="completed")),
                  store.save_nowait(running, lambda: _state(running, 2)),
                  store.save_nowait(taken, lambda: _state(taken, 2, status="failed"))]
        results = await asyncio.gather(*writes, return_exceptions=True)
        assert isinstance(results[2], FencedError)
        await store.save(running, lambda: _state(running, 3, status="cancelled"))
        got = [await asyncio.wait_for(heard.get(), 60) for _ in range(2)]  # bounds a hang
        assert got == [ended, running]
        assert heard.empty()
    finally:
        await listener.close()


def _outage_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [m for m in (r.getMessage() for r in caplog.records)
            if "unreachable" in m or "reachable again" in m]


def test_one_outage_is_one_state_change_each_way(caplog: pytest.LogCaptureFixture) -> None:
    """Round trips that straddle an outage's start or end do not flip the state again: a
    commit sent before the crash that succeeds after another lane failed, and a retry
    sent during the outage that fails after the heartbeat found the server back, change
    nothing; a failure of a round trip started after the recovery is a new outage."""
    store = PostgresStore("postgresql://wf:secret@127.0.0.1:1/db")  # never opened
    caplog.set_level(logging.WARNING, logger="reliability")
    lost = ConnectionResetError("connection lost")
    before_crash = store._outage_changes  # two lanes' commits in flight
    store._mark_down(lost, before_crash)  # one lane's fails
    store._mark_up(before_crash)  # the other's reply came just before the crash
    assert not store.reachable
    during = store._outage_changes  # a retry sent while the server is down
    heartbeat = store._outage_changes
    store._mark_up(heartbeat)  # the server is back
    store._mark_down(lost, during)  # the retry's failure arrives late
    assert store.reachable
    assert len(_outage_lines(caplog)) == 2
    store._mark_down(lost, store._outage_changes)  # a round trip after the recovery
    assert not store.reachable
    lines = _outage_lines(caplog)
    assert ["reachable again" in line for line in lines] == [False, True, False]
    assert "secret" not in " ".join(lines)


async def test_a_caller_s_connection_error_is_judged_by_a_renewal(
        store: PostgresStore, caplog: pytest.LogCaptureFixture) -> None:
    """A connection error a caller reports (unreachable()) is not an outage by itself: a
    lease renewal sent then decides; with the server up, nothing is logged and the store
    stays reachable."""
    caplog.set_level(logging.WARNING, logger="reliability")
    assert store.unreachable(ConnectionResetError("a pool connection of before"))
    assert store._prober is not None
    await store._prober
    assert store.reachable
    assert _outage_lines(caplog) == []
    assert not store.unreachable(ValueError("not a connection error"))
