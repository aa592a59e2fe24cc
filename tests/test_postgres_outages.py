"""The PostgreSQL store through lost connections and server restarts: nothing acknowledged
is lost, nothing is refused wrongly, outages are logged once each way, time is the Clock's."""

from __future__ import annotations

import asyncio
import functools
import logging
import struct
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import orjson
import pytest
from postgres_server import PostgresServer

from reliability._clock import FakeClock
from reliability._errors import FencedError, StateCorruptedError
from reliability._postgres import PostgresStore

pytestmark = pytest.mark.timeout(180)


def _state(workflow_id: str, revision: int = 1, status: str = "running") -> dict[str, Any]:
    return {"workflow_id": workflow_id, "revision": revision, "status": status,
            "definition": "tests.workflows_for_tests:NOOP", "progress_data": {"n": revision}}


def _id(n: int) -> str:
    return f"workflow-20250101-000000-{n:08x}"


async def _fetch(url: str, query: str, *args: Any) -> list[asyncpg.Record]:
    connection = await asyncpg.connect(url)
    try:
        return list(await connection.fetch(query, *args))
    finally:
        await connection.close()


async def _until(condition: Callable[[], bool], what: str, limit: float = 60.0) -> None:
    """Wait for ``condition`` (an event, checked often); ``limit`` only bounds a hang."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        await asyncio.sleep(0.005)


class _RoundTrips:
    """Counts one client connection's round trips: each message that asks the server to
    answer and be ready again (Sync of the extended protocol, or a simple Query)."""

    _PRE_STARTUP = (80877103, 80877104)  # SSLRequest, GSSENCRequest: no type byte either

    def __init__(self) -> None:
        self._buffer = b""
        self._started = False
        self.count = 0

    def feed(self, data: bytes) -> None:
        self._buffer += data
        while True:
            if not self._started:  # untyped: length, then a protocol code
                if len(self._buffer) < 8:
                    return
                length, code = struct.unpack("!II", self._buffer[:8])
                if len(self._buffer) < length:
                    return
                self._buffer = self._buffer[length:]
                self._started = code not in self._PRE_STARTUP
                continue
            if len(self._buffer) < 5:
                return
            kind, length = self._buffer[:1], struct.unpack("!I", self._buffer[1:5])[0]
            if len(self._buffer) < 1 + length:
                return
            self._buffer = self._buffer[1 + length:]
            if kind in (b"S", b"Q"):
                self.count += 1


class _Proxy:
    """A TCP proxy in front of the server that can lose a reply or go down, and counts
    its clients' round trips."""

    def __init__(self, url: str) -> None:
        self._target = urlsplit(url)
        self._url = url
        self._server: asyncio.Server | None = None
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._drop_commit: asyncio.Event | None = None
        self._drop_marker = b"COMMIT;\x00"
        self._counters: list[_RoundTrips] = []
        self.refusing = False
        self.port = 0

    @property
    def round_trips(self) -> int:
        """Round trips of every client connection so far."""
        return sum(c.count for c in self._counters)

    async def start(self) -> _Proxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        netloc = self._target.netloc.rsplit("@", 1)[0] + f"@127.0.0.1:{self.port}"
        return urlunsplit(self._target._replace(netloc=netloc))

    def lose_reply_of_next_commit(self, marker: bytes = b"COMMIT;\x00") -> asyncio.Event:
        """The next message with ``marker`` in it (a COMMIT, or a statement's parameter)
        reaches the server; then both sides are cut before its reply."""
        self._drop_commit = asyncio.Event()
        self._drop_marker = marker
        return self._drop_commit

    def down(self) -> None:
        self.refusing = True
        for pair in list(self._pairs):
            self._cut(pair)

    def up(self) -> None:
        self.refusing = False

    def _cut(self, pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter]) -> None:
        self._pairs.discard(pair)
        for writer in pair:
            writer.transport.abort()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            writer.transport.abort()
            return
        try:
            upstream_reader, upstream = await asyncio.open_connection(
                self._target.hostname, self._target.port)
        except OSError:
            writer.transport.abort()
            return
        pair = (writer, upstream)
        self._pairs.add(pair)
        counter = _RoundTrips()
        self._counters.append(counter)

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter,
                       from_client: bool) -> None:
            try:
                while data := await source.read(65536):
                    if from_client:
                        counter.feed(data)
                    sink.write(data)
                    await sink.drain()
                    # asyncpg sends a transaction's COMMIT as a simple query of its own.
                    if (from_client and self._drop_commit is not None
                            and self._drop_marker in data):
                        dropped, self._drop_commit = self._drop_commit, None
                        self._cut(pair)
                        dropped.set()
                        return
            except (ConnectionError, OSError):
                pass
            finally:
                self._cut(pair)

        await asyncio.gather(pipe(reader, upstream, True), pipe(upstream_reader, writer, False))

    async def close(self) -> None:
        self.down()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@pytest.fixture
async def proxy(postgres_url: str) -> AsyncIterator[_Proxy]:
    proxy = await _Proxy(postgres_url).start()
    try:
        yield proxy
    finally:
        await proxy.close()


def _outage_lines(caplog: pytest.LogCaptureFixture) -> tuple[int, int]:
    messages = [r.getMessage() for r in caplog.records]
    return (sum("unreachable" in m for m in messages),
            sum("reachable again" in m for m in messages))


async def test_a_group_commit_is_one_round_trip(proxy: _Proxy, postgres_url: str) -> None:
    """A batch of many workflows' saves, checkpoints and a release costs one round trip to
    the server (idempotency mark, fenced writes, audit and release in one statement)."""
    store = PostgresStore(proxy.url, lease_seconds=600)  # no heartbeat during the test
    await store.open()
    try:
        ids = [_id(n) for n in range(1, 11)]
        claims, _ = await store.claim_many(ids)
        # Once, so the statement is prepared on the lane's connection.
        await asyncio.gather(*(store.save_nowait(w, functools.partial(_state, w, 2))
                               for w in ids))
        before, batches = proxy.round_trips, store.batches_committed
        saves = [store.save_nowait(w, functools.partial(_state, w, 3), checkpoint_stage="s")
                 for w in ids]
        claims[0].release()
        await asyncio.gather(*saves)
        await store._flush()
        assert store.batches_committed - batches == 1
        assert proxy.round_trips - before == 1
    finally:
        await store.close()
    writes = await _fetch(postgres_url, "SELECT kind, count(*) AS n FROM workflow_writes "
                                        "GROUP BY kind ORDER BY kind")
    assert [(w["kind"], w["n"]) for w in writes] == [
        ("claim", 10), ("release", 10), ("save", 20)]


async def test_a_commit_whose_reply_was_lost_is_not_sent_again(
        proxy: _Proxy, postgres_url: str) -> None:
    """A batch (a save and its claim's release) that committed but lost its reply is
    acknowledged on the retry, not refused, and written once."""
    store = PostgresStore(proxy.url, lease_seconds=30)
    await store.open()
    try:
        workflow_id = _id(1)
        claim = await store.claim(workflow_id)
        # The batch is one statement (no COMMIT of its own): cut when its state is sent.
        lost = proxy.lose_reply_of_next_commit(b'"status":"completed"')
        state = _state(workflow_id, 2, status="completed")
        saved = store.save_nowait(workflow_id, lambda: state, checkpoint_stage="plan")
        claim.release()  # the same batch: after it, a second send of the save is refused
        await saved
        assert lost.is_set()
        assert store.reachable
    finally:
        await store.close()
    [row] = await _fetch(postgres_url, "SELECT state, owner, epoch FROM workflows "
                                       "WHERE workflow_id = $1", workflow_id)
    assert (row["owner"], row["epoch"]) == (None, 1)
    assert orjson.loads(row["state"]) == state
    writes = await _fetch(postgres_url, "SELECT kind, applied FROM workflow_writes WHERE "
                                        "workflow_id = $1 ORDER BY id", workflow_id)
    assert [(w["kind"], w["applied"]) for w in writes] == [
        ("claim", True), ("save", True), ("release", True)]


async def test_a_lost_reply_keeps_the_refusals_of_its_batch(
        proxy: _Proxy, postgres_url: str) -> None:
    """A retried batch that had committed reports the writes refused then, and only those."""
    store = PostgresStore(proxy.url, lease_seconds=30)
    await store.open()
    try:
        kept, taken = _id(1), _id(2)
        await store.claim(kept)
        await store.claim(taken)
        # Another worker took one over (as after this one was found dead).
        await _fetch(postgres_url, "UPDATE workflows SET owner = 'another', epoch = epoch + 1 "
                                   "WHERE workflow_id = $1", taken)
        lost = proxy.lose_reply_of_next_commit(b'"revision":2,"status"')  # the batch's
        first = store.save_nowait(kept, lambda: _state(kept, 2))
        second = store.save_nowait(taken, lambda: _state(taken, 2))
        await first
        with pytest.raises(FencedError, match="no longer owns it"):
            await second
        assert lost.is_set()
        assert store.epoch_of(taken) is None and store.epoch_of(kept) == 1
    finally:
        await store.close()
    writes = await _fetch(postgres_url, "SELECT workflow_id, applied FROM workflow_writes "
                                        "WHERE kind = 'save' ORDER BY id")
    assert [(w["workflow_id"], w["applied"]) for w in writes] in (
        [(kept, True), (taken, False)], [(taken, False), (kept, True)])


async def test_a_claim_whose_reply_was_lost_is_given_back(
        proxy: _Proxy, postgres_url: str) -> None:
    """A claim that committed but lost its reply is unknown to the store; its next claim
    first gives it back with a new epoch (audited), so no workflow stays held by a live
    worker that will never run it."""
    store = PostgresStore(proxy.url, lease_seconds=30)
    await store.open()
    query = "SELECT owner, epoch FROM workflows WHERE workflow_id = $1"
    try:
        orphan, other = _id(1), _id(2)
        lost = proxy.lose_reply_of_next_commit()
        with pytest.raises((asyncpg.PostgresConnectionError, asyncpg.InterfaceError, OSError)):
            await store.claim(orphan)
        assert lost.is_set() and store.epoch_of(orphan) is None
        [row] = await _fetch(postgres_url, query, orphan)
        assert (row["owner"], row["epoch"]) == (store.worker_id, 1)  # it did commit
        await store.claim(other)
        [row] = await _fetch(postgres_url, query, orphan)
        assert (row["owner"], row["epoch"]) == (None, 2)
        assert (await store.claim(orphan)).epoch == 3
    finally:
        await store.close()
    writes = await _fetch(postgres_url, "SELECT kind, epoch FROM workflow_writes WHERE "
                                        "workflow_id = $1 ORDER BY id", orphan)
    assert [(w["kind"], w["epoch"]) for w in writes] == [
        ("claim", 1), ("requeue", 2), ("claim", 3), ("release", 3)]


async def test_a_server_restart_loses_nothing_acknowledged(
        own_server: PostgresServer, caplog: pytest.LogCaptureFixture) -> None:
    """pg_ctl stop -m immediate amid a stream of commits, then start: every acknowledged
    save is in the database, none was refused, one log line each way."""
    caplog.set_level(logging.WARNING)
    store = PostgresStore(own_server.url, lease_seconds=30)
    await store.open()
    ids = [_id(100 + n) for n in range(20)]
    acknowledged = dict.fromkeys(ids, 0)
    errors: list[BaseException] = []
    stop = asyncio.Event()

    async def writer(workflow_id: str) -> None:
        revision = 0
        while not stop.is_set():
            revision += 1
            try:
                await store.save(workflow_id, functools.partial(_state, workflow_id, revision),
                                 checkpoint_stage=f"stage-{revision % 19}")
            except Exception as error:
                errors.append(error)
                return
            acknowledged[workflow_id] = revision

    try:
        claims, refused = await store.claim_many(ids)
        assert refused == []
        tasks = [asyncio.create_task(writer(w)) for w in ids]
        await _until(lambda: min(acknowledged.values()) >= 5, "commits flow")
        await asyncio.to_thread(own_server.stop, "immediate")
        await _until(lambda: not store.reachable, "the store saw the server go")
        before = dict(acknowledged)
        await asyncio.to_thread(own_server.start)
        await _until(lambda: all(acknowledged[w] >= before[w] + 5 for w in ids) or bool(errors),
                     "every workflow commits again")
        stop.set()
        await asyncio.gather(*tasks)
        assert errors == []
        assert store.reachable
        rows = await _fetch(own_server.url, "SELECT workflow_id, revision, owner FROM workflows "
                                            "WHERE workflow_id = ANY($1::text[])", ids)
        assert {r["workflow_id"]: r["revision"] for r in rows} == acknowledged
        assert {r["owner"] for r in rows} == {store.worker_id}
        assert _outage_lines(caplog) == (1, 1)
        for claim in claims:
            claim.release()
    finally:
        await store.close()


async def test_commit_retries_and_the_heartbeat_wait_on_the_given_clock(
        proxy: _Proxy) -> None:
    """With a fake clock, a failed commit is retried and the lease renewed only when the
    clock moves; the lease is not valid once half of it passed unrenewed."""
    clock = FakeClock()
    # A long lease: a heartbeat sleeping in real time would not come round in this test.
    store = PostgresStore(proxy.url, lease_seconds=300, clock=clock)
    await store.open()
    try:
        workflow_id = _id(7)
        await store.claim(workflow_id)
        proxy.down()
        saved = store.save_nowait(workflow_id, lambda: _state(workflow_id, 2))
        # The heartbeat sleeps until 100; the committer's backoff is far sooner.
        await _until(lambda: (clock.next_deadline() or 100.0) < 100.0,
                     "the committer waits on the clock")
        assert not store.reachable and store.lease_valid
        clock.advance(160)  # the heartbeat's turn passes: it fails too
        assert not store.lease_valid  # 160 s unrenewed: more than half of 300
        assert not saved.done()
        proxy.up()
        while not (saved.done() and store.lease_valid):
            await _until(lambda: clock.next_deadline() is not None
                         or (saved.done() and store.lease_valid), "a retry waits on the clock")
            deadline = clock.next_deadline()
            if deadline is not None and not (saved.done() and store.lease_valid):
                clock.advance(deadline - clock.monotonic())
        await saved
        assert store.reachable
    finally:
        proxy.up()
        await store.close()


async def test_a_state_of_another_format_is_refused(postgres_url: str) -> None:
    """A row whose state is of a schema version this code does not read is refused on
    load, as the file store refuses such a document."""
    store = PostgresStore(postgres_url)
    await store.open()
    try:
        workflow_id = _id(9)
        await store.claim(workflow_id)
        await store.save(workflow_id, lambda: _state(workflow_id))
        assert (await store.load(workflow_id)).state == _state(workflow_id)
        await _fetch(postgres_url, "UPDATE workflows SET schema_version = 99")
        with pytest.raises(StateCorruptedError, match="schema version 99"):
            await store.load(workflow_id)
        [listed] = await store.list_states()
        assert listed.state["status"] == "corrupted" and "schema version 99" in listed.problems[0]
        await _fetch(postgres_url, "UPDATE workflows SET schema_version = 1, state = $1::json",
                     '{"workflow_id": "workflow-20250101-000000-00000001"}')
        with pytest.raises(StateCorruptedError, match="belongs to"):
            await store.load(workflow_id)
    finally:
        await store.close()

