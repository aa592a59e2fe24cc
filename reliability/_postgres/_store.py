"""``PostgresStore``: workflows shared by worker processes on many hosts through PostgreSQL.

The same ``Store`` interface as the file store, plus what workers need (``enqueue``,
``claim_next``, ``wait_for_work``). How it keeps its promises:

- Group commit (docs/architecture.md, invariant 4): saves are queued; ``commit_lanes``
  lane tasks send what is queued as batches of at most ``batch_rows`` rows, oldest first,
  a lane taking its next batch as soon as its last committed, each lane on a connection of
  its own outside the pool, never two with writes of one workflow at once (a later write
  would overtake an earlier). A batch is one statement, so one round trip: the
  ``workflow_commit`` function (migration 0004) takes every row as arrays and does the
  idempotency mark, the fenced writes, checkpoints, audit rows, releases and NOTIFYs in
  the statement's own transaction. A save's future completes when its batch committed
  (synchronous_commit on: durable).
- Claims (invariant 9): ``UPDATE ... FOR UPDATE SKIP LOCKED``; each raises the
  workflow's epoch. Every write is conditional on (owner, epoch): a write by a worker
  that lost the workflow changes nothing, is recorded as refused in ``workflow_writes``
  and fails its future with FencedError; nothing more is sent for that workflow.
- Liveness: one ``workflow_workers`` row per store, its lease renewed every third of
  ``lease_seconds`` from the database's clock, on a connection of its own: a renewal
  never waits behind commits, claims or reads. Any store deletes rows whose lease ran out
  and re-queues their workflows with a new epoch (from the pool, beside the renewals).
- Wake-up: LISTEN on a dedicated connection (channel ``workflow_work``, and for a worker
  that exits when idle ``workflow_result``), with a jittered poll of seconds as fallback,
  reconnected when lost.
- Idempotent retries: a batch whose connection broke is sent again once the server is
  reachable (backoff through the Clock, docs/architecture.md invariant 6). Each batch
  records its random ID in its lane's ``workflow_commits`` row (a lane sends one batch at a
  time), first thing in its transaction: a retry that finds its ID there knows the
  earlier commit went through (only its reply was lost) and takes that outcome instead of
  writing again, which a release in the same batch would now have refused. If the
  earlier transaction is still open on a dying backend, the retry waits on that row's
  lock until it ended either way.
- Outages: the committer, the heartbeat and the listener share one up/down state; a change
  is logged once each way, and one outage is one change each way: a round trip's outcome
  counts only if it started after the last change (one that straddles the crash or the
  recovery tells of the state before), and a caller's connection error (``unreachable``)
  is judged by a lease renewal sent then. While down, writes wait (nothing acknowledged is
  lost: a future completes only after its commit), ``lease_valid`` turns False after half
  the lease, so callers start no stage, and everything reconnects with backoff.
- States are json rows (not jsonb: the server keeps the text as sent instead of converting
  every 2-4 KB state to and from a binary form, half the server's time per row; migration
  0007) with the document format's ``schema_version`` (as the file store writes in each
  file), checked on every read, and the row's workflow ID checked against the state's.
  Not a checksum, unlike the file store's documents: what that checksum catches cannot
  happen here, or is PostgreSQL's own job. A file can be torn or half-written by a crash;
  a committed row cannot (the WAL makes a commit all or nothing). A file can be damaged
  or edited in place; a json value is parsed by the server on the way in, and damage
  below it is caught by the WAL's CRCs and the data pages' checksums (``initdb
  --data-checksums``, the default from PostgreSQL 18). Someone changing a row with SQL
  holds the database's password and could as well recompute any checksum.
- The URL's password is never shown: messages use the masked URL, driver errors pass
  through ``scrub``. Every statement is parameterized.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import secrets
import socket
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from .._clock import Clock, SystemClock
from .._errors import (
    ConfigurationError,
    DatabaseUnavailableError,
    FencedError,
    StateCorruptedError,
    WorkflowLockedError,
    WorkflowNotFoundError,
)
from .._ids import validate_workflow_id
from .._logging import logger
from .._state import TERMINAL
from .._store import SCHEMA_VERSION, Claim, LoadedState
from ._schema import migrate
from ._signals import PostgresSignals
from ._url import DatabaseURL, parse_url, scrub

if TYPE_CHECKING:
    import asyncpg

__all__ = ["RESULT_CHANNEL", "WORK_CHANNEL", "PostgresStore"]

Snapshot = Callable[[], dict[str, Any]]
WORK_CHANNEL = "workflow_work"
RESULT_CHANNEL = "workflow_result"  # payload: the ID of a workflow that ended
CLAIMABLE = ("pending", "running", "interrupted")
_RETRY_FIRST, _RETRY_MAX = 0.05, 2.0  # reconnect backoff of the committer, seconds
# Rows (writes and releases) per group commit, at most, and group commits in flight at once
# (each on a connection of its own). A commit's time grows with its rows: uncapped, one
# batch at a time, 1,000 workflows in lockstep made ~950-row commits of ~100 ms (p99
# 110-220 ms); 64 rows in 3 lanes, paired on the same server, commits in ~15 ms (p99
# 32-74 ms on a loaded 2-core machine) at the same transitions/s (benchmarks.pgstore,
# --batch-rows/--commit-lanes; benchmarks/README.md).
BATCH_ROWS = 64
COMMIT_LANES = 3

# A save by a store that holds no claim: allowed only while nobody ever claimed the
# workflow (owner NULL, epoch 0): registering it, or queueing it for workers.
_REGISTER = """
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::json[], $3::text[], $4::bigint[], $5::text[],
                         $6::text[])
        AS i(workflow_id, state, status, revision, definition, queue)),
applied AS (
    INSERT INTO workflows AS w (workflow_id, state, status, revision, definition, queue,
                                schema_version)
    SELECT *, $7 FROM input
    ON CONFLICT (workflow_id) DO UPDATE
        SET state = EXCLUDED.state, status = EXCLUDED.status, revision = EXCLUDED.revision,
            definition = EXCLUDED.definition, queue = EXCLUDED.queue,
            schema_version = EXCLUDED.schema_version, updated_at = now()
        WHERE w.owner IS NULL AND w.epoch = 0
    RETURNING w.workflow_id, w.queue),
audit AS (
    INSERT INTO workflow_writes (workflow_id, owner, epoch, revision, kind, applied)
    SELECT i.workflow_id, NULL, 0, i.revision, 'register', a.workflow_id IS NOT NULL
    FROM input i LEFT JOIN applied a ON a.workflow_id = i.workflow_id)
SELECT workflow_id, queue FROM applied
"""

# A workflow is free if nobody owns it or its owner's lease ran out (dead, not yet reaped).
_FREE = """(w.owner IS NULL OR NOT EXISTS (
    SELECT 1 FROM workflow_workers k WHERE k.worker_id = w.owner AND k.lease_expires_at > now()))"""

_CLAIM = f"""
WITH claimed AS (
    UPDATE workflows w SET owner = $1, epoch = w.epoch + 1, claimed_at = now()
    WHERE w.workflow_id = ANY($2::text[]) AND {_FREE}
    RETURNING w.workflow_id, w.epoch),
audit AS (
    INSERT INTO workflow_writes (workflow_id, owner, epoch, kind, applied)
    SELECT workflow_id, $1, epoch, 'claim', true FROM claimed)
SELECT workflow_id, epoch FROM claimed
"""

_CLAIM_NEW = """
WITH claimed AS (
    INSERT INTO workflows (workflow_id, owner, epoch, claimed_at)
    SELECT i, $1, 1, now() FROM unnest($2::text[]) AS u(i)
    ON CONFLICT (workflow_id) DO NOTHING
    RETURNING workflow_id, epoch),
audit AS (
    INSERT INTO workflow_writes (workflow_id, owner, epoch, kind, applied)
    SELECT workflow_id, $1, epoch, 'claim', true FROM claimed)
SELECT workflow_id, epoch FROM claimed
"""

_CLAIM_NEXT = """
WITH picked AS (
    SELECT workflow_id FROM workflows
    WHERE queue = $2 AND owner IS NULL AND status = ANY($4::text[])
      AND NOT (workflow_id = ANY($5::text[]))
    ORDER BY created_at, workflow_id
    LIMIT $3
    FOR UPDATE SKIP LOCKED),
claimed AS (
    UPDATE workflows w SET owner = $1, epoch = w.epoch + 1, claimed_at = now()
    FROM picked p WHERE w.workflow_id = p.workflow_id
    RETURNING w.workflow_id, w.epoch, w.state, w.schema_version),
audit AS (
    INSERT INTO workflow_writes (workflow_id, owner, epoch, kind, applied)
    SELECT workflow_id, $1, epoch, 'claim', true FROM claimed)
SELECT workflow_id, epoch, state, schema_version FROM claimed
"""

_RENEW = """
UPDATE workflow_workers
SET heartbeat_at = now(), lease_expires_at = now() + make_interval(secs => $2)
WHERE worker_id = $1
RETURNING lease_expires_at
"""

_REGISTER_WORKER = """
INSERT INTO workflow_workers (worker_id, host, pid, lease_expires_at)
VALUES ($1, $2, $3, now() + make_interval(secs => $4))
ON CONFLICT (worker_id) DO UPDATE SET lease_expires_at = EXCLUDED.lease_expires_at,
                                      heartbeat_at = now()
"""

_REAP = """
WITH dead AS (
    DELETE FROM workflow_workers WHERE lease_expires_at < now() RETURNING worker_id),
forgotten AS (
    DELETE FROM workflow_commits c USING dead d WHERE c.worker_id = d.worker_id),
requeued AS (
    UPDATE workflows w SET owner = NULL, epoch = w.epoch + 1, claimed_at = NULL
    FROM dead d WHERE w.owner = d.worker_id
    RETURNING w.workflow_id, w.epoch, w.queue, d.worker_id),
audit AS (
    INSERT INTO workflow_writes (workflow_id, owner, epoch, kind, applied)
    SELECT workflow_id, worker_id, epoch, 'requeue', true FROM requeued)
SELECT workflow_id, queue FROM requeued
"""

# Claims this worker holds in the database but not in memory: a claim whose COMMIT went
# through but whose reply was lost (the server crashed in between). Given back with a new
# epoch, as if this worker had died, so the workflow runs again elsewhere, not never.
_ORPHANS = """
WITH orphans AS (
    UPDATE workflows w SET owner = NULL, epoch = w.epoch + 1, claimed_at = NULL
    WHERE w.owner = $1 AND NOT (w.workflow_id = ANY($2::text[]))
    RETURNING w.workflow_id, w.epoch, w.queue),
audit AS (
    INSERT INTO workflow_writes (workflow_id, owner, epoch, kind, applied)
    SELECT workflow_id, $1, epoch, 'requeue', true FROM orphans)
SELECT workflow_id, queue FROM orphans
"""

# A whole group commit in one statement, so one round trip: the idempotency mark, the
# fenced writes with their checkpoints, registrations, the audit rows, the releases and
# their NOTIFYs (migration 0004, workflow_commit). Sent outside any explicit transaction:
# the statement is its own, committed (synchronous_commit on) before its reply.
_COMMIT = """
SELECT workflow_commit($1::text, $2::smallint, $3::bigint, $4::smallint,
                       $5::text[], $6::bigint[], $7::json[], $8::text[], $9::bigint[],
                       $10::text[], $11::text[],
                       $12::text[], $13::json[], $14::text[], $15::bigint[], $16::text[],
                       $17::text[], $18::bigint[], $19::text[], $20::text, $21::text[],
                       $22::text)
"""
# The same, for a batch the commit probe samples: also when the server read the statement
# and when the function returned (before the COMMIT's WAL sync), on the server's clock.
_COMMIT_TIMED = """
SELECT statement_timestamp() AS started,
       workflow_commit($1::text, $2::smallint, $3::bigint, $4::smallint,
                       $5::text[], $6::bigint[], $7::json[], $8::text[], $9::bigint[],
                       $10::text[], $11::text[],
                       $12::text[], $13::json[], $14::text[], $15::bigint[], $16::text[],
                       $17::text[], $18::bigint[], $19::text[], $20::text, $21::text[],
                       $22::text) AS refused,
       clock_timestamp() AS ended
"""


def _encode(state: dict[str, Any]) -> str:
    try:
        return orjson.dumps(state, option=orjson.OPT_SORT_KEYS, default=str).decode()
    except TypeError:  # keys that are not strings (outputs keyed by numbers)
        return orjson.dumps(state, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS,
                            default=str).decode()


def _connection_lost(error: BaseException) -> bool:
    """True for errors after which the same statement may succeed on a new connection."""
    import asyncpg
    return isinstance(error, (OSError, asyncio.TimeoutError, asyncpg.PostgresConnectionError,
                              asyncpg.InterfaceError, asyncpg.CannotConnectNowError,
                              asyncpg.exceptions.AdminShutdownError,
                              asyncpg.exceptions.CrashShutdownError,
                              asyncpg.exceptions.TooManyConnectionsError))


def _decode(text: str, schema_version: int, workflow_id: str, source: str) -> dict[str, Any]:
    """A row's state, refused (StateCorruptedError) in a format this code does not read
    or when it names another workflow than its row."""
    if schema_version != SCHEMA_VERSION:
        raise StateCorruptedError(source, f"schema version {schema_version!r} is not "
                                          f"{SCHEMA_VERSION}, which this version reads")
    state = orjson.loads(text)
    if not isinstance(state, dict):
        raise StateCorruptedError(source, "not a workflow state document")
    if state.get("workflow_id") != workflow_id:
        raise StateCorruptedError(source, f"belongs to {state.get('workflow_id')!r}, "
                                          f"not {workflow_id}")
    return state


class _PostgresClaim:
    __slots__ = ("_store", "epoch", "workflow_id")

    def __init__(self, workflow_id: str, epoch: int, store: PostgresStore) -> None:
        self.workflow_id = workflow_id
        self.epoch = epoch
        self._store: PostgresStore | None = store

    def release(self) -> None:
        store, self._store = self._store, None
        if store is not None:
            store._release(self.workflow_id, self.epoch)

    def __repr__(self) -> str:
        return f"<claim {self.workflow_id} epoch {self.epoch}>"


# workflow ID -> (encoded state or a snapshot to take at send time, checkpoint stages, the
# epoch of this store's claim when the write was asked for (None without a claim), and the
# state's status and revision when it was encoded already)
_Write = tuple[str | Snapshot, frozenset[str], int | None, str | None, int | None]


@dataclass(slots=True)
class _Batch:
    writes: dict[str, _Write] = field(default_factory=dict)
    waiters: list[tuple[str, asyncio.Future[None]]] = field(default_factory=list)
    releases: dict[str, int] = field(default_factory=dict)
    # The sequence number of each write and release when first queued (a later write of
    # the same workflow coalesces into the entry and keeps it): in increasing order, so
    # the first of each dict is the oldest; what _flush waits for.
    seqs: dict[str, int] = field(default_factory=dict)
    release_seqs: dict[str, int] = field(default_factory=dict)
    # Recorded in workflow_commits with the batch: how a retry knows it committed already.
    id: int = field(default_factory=lambda: secrets.randbits(63))
    lane: int = 0  # which of the store's commit lanes sends it (its workflow_commits row)
    trace: Any = None  # the commit probe's record of this batch, when it samples it

    def empty(self) -> bool:
        return not (self.writes or self.releases)

    def oldest(self) -> int | None:
        firsts = [next(iter(d.values())) for d in (self.seqs, self.release_seqs) if d]
        return min(firsts) if firsts else None

    def take(self, rows: int, busy: set[str]) -> _Batch:
        """Up to ``rows`` of the oldest writes and releases, moved into a batch of their
        own; none of a workflow in ``busy`` (a batch in flight has a write of it: the
        later must not overtake it), and a release only with or after its workflow's last
        queued write."""
        if len(self.writes) + len(self.releases) <= rows and busy.isdisjoint(
                self.writes) and busy.isdisjoint(self.releases):
            taken = _Batch(self.writes, self.waiters, self.releases, self.seqs,
                           self.release_seqs)
            self.writes, self.waiters, self.releases = {}, [], {}
            self.seqs, self.release_seqs = {}, {}
            return taken
        taken = _Batch()
        free = (w for w in self.writes if w not in busy) if busy else iter(self.writes)
        for workflow_id in list(itertools.islice(free, rows)):
            taken.writes[workflow_id] = self.writes.pop(workflow_id)
            taken.seqs[workflow_id] = self.seqs.pop(workflow_id)
        room = rows - len(taken.writes)
        for workflow_id in list(self.releases):
            if room <= 0:
                break
            if workflow_id not in self.writes and workflow_id not in busy:
                taken.releases[workflow_id] = self.releases.pop(workflow_id)
                taken.release_seqs[workflow_id] = self.release_seqs.pop(workflow_id)
                room -= 1
        kept: list[tuple[str, asyncio.Future[None]]] = []
        for waiter in self.waiters:
            (taken.waiters if waiter[0] in taken.writes else kept).append(waiter)
        self.waiters = kept
        return taken


class _IdleLanes:
    """Commit lanes waiting for rows. ``set`` wakes one, the one idle last (its
    connection is open and its statement prepared; a lane's first batch costs a connect
    and a prepare), and only if none is woken already: saves queued in one turn of the
    loop go in one batch, not one each. A lane that took a batch and left rows behind
    wakes the next."""

    def __init__(self) -> None:
        self._idle: list[asyncio.Future[None]] = []
        self._woken = False

    def set(self) -> None:
        if self._woken:
            return
        while self._idle:
            waiter = self._idle.pop()
            if not waiter.done():
                waiter.set_result(None)
                self._woken = True
                return

    def set_all(self) -> None:
        idle, self._idle = self._idle, []
        for waiter in idle:
            if not waiter.done():
                waiter.set_result(None)

    async def wait(self) -> None:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._idle.append(waiter)
        try:
            await waiter
        finally:
            self._woken = False
            if not waiter.done():
                self._idle.remove(waiter)


class PostgresStore(PostgresSignals):
    """Workflow states in a PostgreSQL database shared by many worker processes.

    Durable waits (signals, parked workflows, due wakes): ``PostgresSignals``.

    ``lease_seconds``: how long this store's claims outlive its last heartbeat.
    ``on_fenced(workflow_id)``: called when a write for a workflow was refused (another
    worker owns it now), so the caller stops it at once.
    ``clock``: every sleep (commit backoff, heartbeat, poll) and the lease's age go
    through it (docs/architecture.md, invariant 6); the event loop's clock by default.
    """

    def __init__(self, url: str, *, lease_seconds: float = 30.0, pool_size: int = 2,
                 worker_id: str | None = None, apply_migrations: bool = True,
                 poll_interval: float = 5.0, batch_rows: int = BATCH_ROWS,
                 commit_lanes: int = COMMIT_LANES,
                 on_fenced: Callable[[str], None] | None = None,
                 clock: Clock | None = None) -> None:
        if lease_seconds <= 0:
            raise ConfigurationError(f"lease_seconds must be positive, got {lease_seconds!r}")
        self.url: DatabaseURL = parse_url(url)
        self.lease_seconds = float(lease_seconds)
        self.pool_size = pool_size
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        self.apply_migrations = apply_migrations
        self.poll_interval = poll_interval
        self.batch_rows = max(1, batch_rows)
        self.commit_lanes = max(1, commit_lanes)
        self.on_fenced = on_fenced
        self.clock: Clock = clock or SystemClock()
        self._down_since: float | None = None  # when the server became unreachable
        # Raised at each change between reachable and unreachable. A round trip notes it
        # when it starts; its outcome changes the state only if no change came since
        # (see _mark_down).
        self._outage_changes = 0
        self._prober: asyncio.Task[None] | None = None  # a renewal asked for by unreachable()
        self._pool: asyncpg.Pool | None = None
        self._epochs: dict[str, int] = {}  # claims held: workflow ID -> epoch
        self._lost: set[str] = set()  # fenced off: nothing more is sent for these
        self._pending = _Batch()
        self._seq = 0  # of the last write or release queued
        self._flushes: list[tuple[int, asyncio.Future[None]]] = []  # (sequence, waiter)
        self._wake = _IdleLanes()
        self._committer: asyncio.Task[None] | None = None
        self._sending: list[_Batch] = []  # batches sent, not yet committed
        self._busy: set[str] = set()  # workflows with a write or release in those
        self._claiming = asyncio.Lock()  # one claim statement at a time (see _claims)
        self._claims_unsure = False  # a claim's reply was lost: see _ORPHANS
        self._heartbeat: asyncio.Task[None] | None = None
        self._reaper: asyncio.Task[None] | None = None
        # Connections of their own, outside the pool: each commit lane's (opened when the
        # lane first sends: a commit is then one statement, with no acquire or reset
        # around it) and the heartbeat's (a renewal never waits for a connection behind
        # commits, claims or reads: a lease must not run out because the worker is busy).
        self._lanes: dict[int, asyncpg.Connection] = {}
        self._beat: asyncpg.Connection | None = None
        self._beating = asyncio.Lock()  # one statement at a time on the heartbeat's
        self._listener: asyncpg.Connection | None = None
        self._connecting: asyncio.Task[None] | None = None  # opening the listener
        self._work = asyncio.Event()
        self._ends_wanted = False  # listen for workflows' ends too (see wait_for_work)
        self._listening_to_ends = False
        self._waiting_for_ends = 0
        self._renewed_at = 0.0
        self._closing = False
        self.batches_committed = 0
        # How long each of the recent batches took to commit (its successful attempt), for
        # benchmarks and metrics.
        self.commit_seconds: deque[float] = deque(maxlen=100_000)
        # A benchmark's probe of where a commit's time goes (benchmarks/_cluster.py,
        # CommitProbe): told of each save queued, each lane connection opened and each
        # batch taken; it samples some batches, which it times on the real clock. None
        # (nothing to tell) but in that benchmark.
        self.commit_probe: Any = None

    def __repr__(self) -> str:
        return f"PostgresStore({self.url.masked!r}, worker_id={self.worker_id!r})"

    # --- lifecycle

    async def connect_error(self, error: BaseException) -> DatabaseUnavailableError:
        reason = scrub(f"{type(error).__name__}: {error}".replace("\n", " "), self.url.secret)
        return DatabaseUnavailableError(
            f"cannot use PostgreSQL at {self.url.server} ({self.url.masked}): {reason}")

    async def open(self) -> None:
        if self._pool is not None:
            return
        try:
            import asyncpg
        except ImportError:
            raise ConfigurationError("the PostgreSQL store needs asyncpg: pip install "
                                     "'workflow-manager[postgres]'") from None
        try:
            # No connection floor (min_size 0): after an outage asyncpg would otherwise
            # restore it in the background, logging a traceback per failed try; connections
            # are made again on demand, by the callers that back off and log once.
            pool = await asyncpg.create_pool(self.url.secret, min_size=0,
                                             max_size=self.pool_size)
        except Exception as error:
            raise await self.connect_error(error) from None
        beat = None
        try:
            beat = await asyncpg.connect(self.url.secret)
            if self.apply_migrations:
                await migrate(beat)
            await beat.execute(_REGISTER_WORKER, self.worker_id, socket.gethostname(),
                               os.getpid(), self.lease_seconds)
        except BaseException as error:
            if beat is not None:
                beat.terminate()
            await pool.close()
            if isinstance(error, Exception) and _connection_lost(error):
                raise await self.connect_error(error) from None
            raise
        self._pool = pool
        self._beat = beat
        self._closing = False
        self._renewed_at = self.clock.monotonic()
        self._committer = asyncio.create_task(self._commit_loop(), name="postgres-committer")
        self._heartbeat = asyncio.create_task(self._heartbeat_loop(),
                                              name="postgres-heartbeat")

    async def close(self) -> None:
        pool = self._pool
        if pool is None:
            return
        for task in (self._heartbeat, self._reaper, self._connecting, self._prober):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._heartbeat = self._reaper = self._connecting = self._prober = None
        # Claims still held are given back, so other workers take them at once.
        for workflow_id, epoch in list(self._epochs.items()):
            self._release(workflow_id, epoch)
        await self._flush()
        self._closing = True
        self._wake.set_all()
        if self._committer is not None:
            await self._committer
        if self._prober is not None:  # one asked for while the last writes went out
            self._prober.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._prober
            self._prober = None
        lanes, self._lanes = list(self._lanes.values()), {}
        with contextlib.suppress(Exception):
            if self._claims_unsure:  # before the row goes: none would re-queue them then
                await self._release_orphans()
            await pool.execute("DELETE FROM workflow_workers WHERE worker_id = $1",
                               self.worker_id)
            await pool.execute("DELETE FROM workflow_commits WHERE worker_id = $1",
                               self.worker_id)
        for connection in (*lanes, self._listener, self._beat):
            if connection is not None:
                with contextlib.suppress(Exception):
                    await connection.close()
        self._listener = self._beat = None
        self._pool = None
        await pool.close()

    def require_pool(self) -> asyncpg.Pool:
        """The store's connection pool, for the modules that extend it (signals, live view)."""
        if self._pool is None:
            raise RuntimeError("the PostgreSQL store is not open")
        return self._pool

    async def _lane_connection(self, lane: int) -> asyncpg.Connection:
        """Commit lane ``lane``'s own connection, opened on its first use or after a loss."""
        connection = self._lanes.get(lane)
        if connection is not None and not connection.is_closed():
            return connection
        import asyncpg
        self.require_pool()
        connection = await asyncpg.connect(self.url.secret)
        self._lanes[lane] = connection
        if self.commit_probe is not None:
            self.commit_probe.connected(connection)
        return connection

    def _drop_lane(self, lane: int) -> None:
        """Forget lane ``lane``'s lost connection: its next batch opens another."""
        connection = self._lanes.pop(lane, None)
        if connection is not None:
            connection.terminate()

    # --- writes

    def _queue(self, workflow_id: str, entry: str | Snapshot, stages: frozenset[str],
               status: str | None = None, revision: int | None = None) -> None:
        batch = self._pending
        earlier = batch.writes.get(workflow_id)
        if earlier is not None:
            stages = stages | earlier[1]
        else:
            self._seq += 1
            batch.seqs[workflow_id] = self._seq
        batch.writes[workflow_id] = (entry, stages, self._epochs.get(workflow_id), status,
                                     revision)
        self._wake.set()

    def save_soon(self, workflow_id: str, snapshot: Snapshot, *,
                  promptly: bool = False) -> None:
        if workflow_id in self._lost:
            return
        earlier = self._pending.writes.get(workflow_id)
        if earlier is not None and isinstance(earlier[0], str):
            return  # a durable write of it is queued: keep that one
        self._queue(workflow_id, snapshot, frozenset())

    async def save(self, workflow_id: str, snapshot: Snapshot, *,
                   checkpoint_stage: str | None = None) -> None:
        await self.save_nowait(workflow_id, snapshot, checkpoint_stage=checkpoint_stage)

    def save_nowait(self, workflow_id: str, snapshot: Snapshot, *,
                    checkpoint_stage: str | None = None,
                    lazy: bool = False) -> asyncio.Future[None]:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if workflow_id in self._lost:
            waiter.set_exception(self._fenced(workflow_id, "lost its claim earlier"))
            return waiter
        self.require_pool()
        stages = frozenset((checkpoint_stage,)) if checkpoint_stage else frozenset()
        state = snapshot()
        self._queue(workflow_id, _encode(state), stages, str(state.get("status") or "pending"),
                    int(state.get("revision") or 0))
        self._pending.waiters.append((workflow_id, waiter))
        if self.commit_probe is not None:
            self.commit_probe.queued(workflow_id)
        return waiter

    def expedite(self) -> None:
        return None  # every batch is sent as soon as the previous one committed

    def archive(self, state: dict[str, Any]) -> None:
        return None  # the database keeps the current state and each stage's checkpoint

    def _fenced(self, workflow_id: str, reason: str) -> FencedError:
        return FencedError(workflow_id, self.worker_id, self._epochs.get(workflow_id, 0),
                           reason)

    def _lose(self, workflow_id: str) -> None:
        if workflow_id in self._lost:
            return
        self._lost.add(workflow_id)
        self._epochs.pop(workflow_id, None)
        logger.warning("Workflow %s: another worker owns it now; %s writes nothing more "
                       "for it", workflow_id, self.worker_id)
        if self.on_fenced is not None:
            self.on_fenced(workflow_id)

    def _oldest_outstanding(self) -> int:
        """The sequence number of the oldest write or release not yet committed."""
        found = [b.oldest() for b in (self._pending, *self._sending)]
        return min((n for n in found if n is not None), default=self._seq + 1)

    async def _flush(self) -> None:
        """Wait until everything queued so far is committed (or failed)."""
        if self._oldest_outstanding() > self._seq:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._flushes.append((self._seq, waiter))
        await asyncio.shield(waiter)

    def _settle_flushes(self) -> None:
        oldest = self._oldest_outstanding()
        waiting = []
        for sequence, waiter in self._flushes:
            if sequence >= oldest:
                waiting.append((sequence, waiter))
            elif not waiter.done():
                waiter.set_result(None)
        self._flushes = waiting

    async def _commit_loop(self) -> None:
        await asyncio.gather(*(self._lane_loop(lane) for lane in range(self.commit_lanes)))

    async def _lane_loop(self, lane: int) -> None:
        """One commit lane: sends the oldest rows queued, at most ``batch_rows`` a batch,
        and when its batch committed takes the next one in the same task, so a free lane
        starts its next batch without a hop through another task (each hop waits for a
        turn of a busy loop: several milliseconds of a commit's latency)."""
        busy = self._busy
        while True:
            # The oldest rows first, so everything queued is sent within a bounded number
            # of batches however fast new writes arrive; none of a workflow another lane
            # has in flight (a later write must not overtake an earlier one).
            batch = self._pending.take(self.batch_rows, busy)
            if batch.empty():
                if not self._sending and self._pending.empty():
                    self._settle_flushes()
                    if self._closing:
                        self._wake.set_all()  # the other lanes end too
                        return
                await self._wake.wait()
                continue
            if not self._pending.empty():
                self._wake.set()  # more than a batch queued: another lane takes the rest
            batch.lane = lane
            if self.commit_probe is not None:
                batch.trace = self.commit_probe.taken(batch)
            busy.update(batch.writes)
            busy.update(batch.releases)
            self._sending.append(batch)
            try:
                await self._commit_with_retries(batch)
            finally:
                self._sending.remove(batch)
                busy.difference_update(batch.writes)
                busy.difference_update(batch.releases)
                self._settle_flushes()
                if self._closing:
                    self._wake.set_all()

    async def _commit_with_retries(self, batch: _Batch) -> None:
        delay = _RETRY_FIRST
        while True:
            since = self._outage_changes
            try:
                started = self.clock.monotonic()
                failures = await self._commit(batch)
                self.commit_seconds.append(self.clock.monotonic() - started)
                self._mark_up(since)
                break
            except Exception as error:
                if not _connection_lost(error) or self._closing:
                    failure = error if not _connection_lost(error) else (
                        await self.connect_error(error))
                    failures = dict.fromkeys((w for w, _ in batch.waiters), failure)
                    break
                self._mark_down(error, since)
                await self.clock.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, _RETRY_MAX)
        self.batches_committed += 1
        for workflow_id, waiter in batch.waiters:
            if waiter.done():
                continue
            outcome = failures.get(workflow_id)
            if outcome is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(outcome)
        if batch.trace is not None:
            batch.trace.resolved(batch.waiters)

    def _mark_down(self, error: BaseException, since: int) -> None:
        """The server is unreachable: logged once, until ``_mark_up``.

        ``since``: ``_outage_changes`` when the failed round trip started. One decision
        per outage: a round trip that started before the last change is evidence of the
        state before it, and changes nothing. (During a crash, a commit sent just before
        it can succeed after another lane failed, and a retry sent during the outage can
        fail after the heartbeat found the server back; each used to flip the state, so
        one outage was logged as several.)"""
        if self._down_since is not None or since != self._outage_changes:
            return
        self._outage_changes += 1
        self._down_since = self.clock.monotonic()
        logger.warning("PostgreSQL at %s unreachable (%s); writes wait and reconnect with "
                       "backoff, no new stage starts once the lease is half gone",
                       self.url.server, scrub(f"{type(error).__name__}: {error}",
                                              self.url.secret).replace("\n", " "))

    def _mark_up(self, since: int) -> None:
        """The server answered a round trip that started at ``since`` (see _mark_down)."""
        if self._down_since is None or since != self._outage_changes:
            return
        self._outage_changes += 1
        down_for, self._down_since = self.clock.monotonic() - self._down_since, None
        logger.warning("PostgreSQL at %s reachable again after %.1f s; writes go on",
                       self.url.server, down_for)
        self._work.set()  # an idle worker claims again now, not at its next poll

    def unreachable(self, error: BaseException) -> bool:
        """True if ``error`` means the server cannot be reached now: the caller backs off
        and tries again. Whether that is an outage (logged once) is decided by a lease
        renewal sent now, not by ``error``: a round trip of the caller's that started
        before the server came back must not open a second outage."""
        if not _connection_lost(error):
            return False
        if self._pool is not None and not self._closing and (
                self._prober is None or self._prober.done()):
            self._prober = asyncio.create_task(self._probe(), name="postgres-probe")
        return True

    async def _probe(self) -> None:
        since = self._outage_changes
        try:
            await self.renew()
        except Exception as error:
            self._heartbeat_failed(error, "Lease renewal", since)
            return
        self._mark_up(since)

    @property
    def reachable(self) -> bool:
        """False from a failed round trip to the server until one succeeds again."""
        return self._down_since is None

    async def _commit(self, batch: _Batch) -> dict[str, BaseException]:
        fenced_ids, fenced_epochs, fenced_states, fenced_status, fenced_revisions = (
            [], [], [], [], [])
        checkpoint_ids: list[str] = []
        checkpoint_stages: list[str] = []
        register: list[tuple[str, str, str, int, str | None]] = []
        failures: dict[str, BaseException] = {}
        for workflow_id, (entry, stages, epoch, known_status, known_revision) in (
                batch.writes.items()):
            if workflow_id in self._lost:
                failures[workflow_id] = self._fenced(workflow_id, "lost its claim earlier")
                continue
            state = entry() if callable(entry) else None
            encoded = _encode(state) if state is not None else entry
            assert isinstance(encoded, str)
            if epoch is None or known_status is None or known_revision is None:
                if state is None:
                    state = orjson.loads(encoded)
                status = str(state.get("status") or "pending")
                revision = int(state.get("revision") or 0)
            else:  # read when it was queued: no second parse of every state
                status, revision = known_status, known_revision
            if epoch is None:
                assert state is not None
                register.append((workflow_id, encoded, status, revision,
                                 state.get("definition") or state.get("definition_name")))
                continue
            fenced_ids.append(workflow_id)
            fenced_epochs.append(epoch)
            fenced_states.append(encoded)
            fenced_status.append(status)
            fenced_revisions.append(revision)
            for stage in stages:
                checkpoint_ids.append(workflow_id)
                checkpoint_stages.append(stage)
        connection = await self._lane_connection(batch.lane)
        arguments = (self.worker_id, batch.lane, batch.id, SCHEMA_VERSION,
                     fenced_ids, fenced_epochs, fenced_states, fenced_status, fenced_revisions,
                     checkpoint_ids, checkpoint_stages,
                     [r[0] for r in register], [r[1] for r in register],
                     [r[2] for r in register], [r[3] for r in register],
                     [r[4] for r in register], list(batch.releases),
                     list(batch.releases.values()), list(CLAIMABLE), WORK_CHANNEL,
                     list(TERMINAL), RESULT_CHANNEL)
        try:
            if batch.trace is None:
                refused = await connection.fetchval(_COMMIT, *arguments)
            else:
                row = await connection.fetchrow(_COMMIT_TIMED, *arguments)
                assert row is not None  # a SELECT without FROM: one row
                batch.trace.replied(connection, row["started"], row["ended"])
                refused = row["refused"]
        except Exception as error:
            if _connection_lost(error):
                self._drop_lane(batch.lane)
            raise
        registered = {r[0] for r in register}
        for workflow_id in refused:
            if workflow_id in registered:
                failures[workflow_id] = FencedError(
                    workflow_id, self.worker_id, 0,
                    "holds no claim on it, and it was claimed before")
            else:
                failures[workflow_id] = self._fenced(
                    workflow_id, "no longer owns it (claimed again by another worker)")
        for workflow_id, failure in failures.items():
            if isinstance(failure, FencedError) and workflow_id in self._epochs:
                self._lose(workflow_id)
        return failures

    # --- workers and queues

    async def enqueue(self, states: Iterable[dict[str, Any]], *, queue: str = "default") -> None:
        """Queue new workflows (their first states) for any worker of ``queue``; durable
        when it returns. Refused (FencedError) for a workflow that exists already."""
        rows = [(validate_workflow_id(s["workflow_id"]), _encode(s),
                 str(s.get("status") or "pending"), int(s.get("revision") or 0),
                 s.get("definition") or s.get("definition_name")) for s in states]
        if not rows:
            return
        pool = self.require_pool()
        async with pool.acquire() as connection, connection.transaction():
            applied = await connection.fetch(
                _REGISTER, [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows],
                [r[3] for r in rows], [r[4] for r in rows], [queue] * len(rows),
                SCHEMA_VERSION)
            await connection.execute("SELECT pg_notify($1, $2)", WORK_CHANNEL, queue)
        if len(applied) != len(rows):
            done = {r["workflow_id"] for r in applied}
            refused = [r[0] for r in rows if r[0] not in done]
            raise FencedError(refused[0], self.worker_id, 0,
                              f"cannot queue it: it exists already ({len(refused)} refused)")

    async def claim_next(self, limit: int = 1, *, queue: str = "default",
                         exclude: Iterable[str] = ()) -> list[tuple[Claim, LoadedState]]:
        """Claim up to ``limit`` queued workflows (oldest first), with their states; none
        of ``exclude`` (those still ending here after their claim was lost: a workflow
        re-queued meanwhile must not run twice in one process)."""
        pool = self.require_pool()
        async with self._claims():
            rows = await pool.fetch(_CLAIM_NEXT, self.worker_id, queue, limit,
                                    list(CLAIMABLE), list(exclude))
        claimed: list[tuple[Claim, LoadedState]] = []
        for row in rows:
            workflow_id, epoch = row["workflow_id"], row["epoch"]
            self._lost.discard(workflow_id)
            self._epochs[workflow_id] = epoch
            source = self._source(workflow_id)
            claimed.append((_PostgresClaim(workflow_id, epoch, self), LoadedState(
                _decode(row["state"], row["schema_version"], workflow_id, source), source)))
        return claimed

    async def wait_for_work(self, poll: float | None = None, *, ends: bool = False) -> bool:
        """Wait for a NOTIFY of new work (True), or with ``ends`` also of a workflow's end
        anywhere (so a worker that exits when idle sees the last one end), or a jittered
        poll interval (False). A caller that must notice something else at once (a
        shutdown) waits for that beside this, and cancels this."""
        await self._listen(ends=ends)
        limit = self.poll_interval if poll is None else poll
        timed_out = False

        def expire() -> None:
            nonlocal timed_out
            timed_out = True
            self._work.set()

        timer = self.clock.call_later(limit * random.uniform(0.8, 1.0), expire)
        if ends:
            self._waiting_for_ends += 1
        try:
            await self._work.wait()
        finally:
            timer.cancel()
            if ends:
                self._waiting_for_ends -= 1
        self._work.clear()
        return not timed_out

    async def _listen(self, *, ends: bool = False) -> None:
        self._ends_wanted |= ends
        if self._listener is not None and not self._listener.is_closed():
            if not self._ends_wanted or self._listening_to_ends:
                return
            since = self._outage_changes
            try:
                await self._listener.add_listener(RESULT_CHANNEL, self._ended)
            except Exception as error:
                if not _connection_lost(error):
                    raise
                # The listener is lost: the next wait listens again.
                self._mark_down(error, since)
                return
            self._listening_to_ends = True
            return
        # The connection is opened by a task of the store's, not by the waiter: a waiter
        # is cancelled whenever a worker's slot frees, and a connect cancelled half-way
        # leaves asyncpg's handshake future failing with nobody to read it.
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.create_task(self._open_listener(),
                                                   name="postgres-listener")
        await asyncio.shield(self._connecting)

    async def _open_listener(self) -> None:
        import asyncpg
        connection = None
        since = self._outage_changes
        try:
            connection = await asyncpg.connect(self.url.secret)
            await connection.add_listener(WORK_CHANNEL, self._notified)
            if self._ends_wanted:
                await connection.add_listener(RESULT_CHANNEL, self._ended)
        except BaseException as error:
            # Connected but not listening (an error, or the store closing meanwhile):
            # this connection is nobody's, so it is closed here, never left to the GC.
            if connection is not None:
                connection.terminate()
            if isinstance(error, Exception) and _connection_lost(error):
                self._mark_down(error, since)
                return  # the poll still finds work; the next wait tries again
            raise
        self._mark_up(since)
        connection.add_termination_listener(self._listener_lost)
        self._listener = connection
        self._listening_to_ends = self._ends_wanted
        self._work.set()  # something may have been queued while nobody listened

    def _notified(self, *_: object) -> None:
        self._work.set()

    def _ended(self, *_: object) -> None:
        if self._waiting_for_ends:  # else a workflow's end is no news to an idle worker
            self._work.set()

    def _listener_lost(self, *_: object) -> None:
        self._listener = None
        self._listening_to_ends = False
        self._work.set()

    @property
    def lease_valid(self) -> bool:
        """False when the lease was not renewed for half of it: start nothing new."""
        return self.clock.monotonic() - self._renewed_at < self.lease_seconds / 2

    async def _heartbeat_loop(self) -> None:
        # Every third of the lease; after a failure sooner, with backoff, so the lease is
        # renewed (and stages start again) as soon as the server is back.
        interval = self.lease_seconds / 3
        delay, backoff = interval, _RETRY_FIRST
        while True:
            await self.clock.sleep(delay)
            since = self._outage_changes
            try:
                await self.renew()
            except Exception as error:
                # Never ends on an error: a worker whose heartbeat stopped would keep its
                # claims' tasks waiting for a lease forever.
                self._heartbeat_failed(error, "Lease renewal", since)
                delay = min(backoff, interval) * random.uniform(0.5, 1.0)
                backoff = min(backoff * 2, _RETRY_MAX)
                continue
            self._mark_up(since)
            delay, backoff = interval, _RETRY_FIRST
            # Reaping waits for the pool and can wait on row locks (a dead worker's
            # workflow a commit holds): beside the renewals, never before the next one.
            if self._reaper is None or self._reaper.done():
                self._reaper = asyncio.create_task(self._reap_once(), name="postgres-reaper")

    def _heartbeat_failed(self, error: Exception, what: str, since: int) -> None:
        if _connection_lost(error):
            self._mark_down(error, since)
            return
        logger.warning("%s of %s failed (%s); trying again", what, self.worker_id,
                       scrub(f"{type(error).__name__}: {error}",
                             self.url.secret).replace("\n", " "))

    async def _reap_once(self) -> None:
        since = self._outage_changes
        try:
            await self.reap()
        except Exception as error:
            # Tried again after the next renewal. Besides an outage, two workers reaping
            # at once after one can deadlock, and the server picks a victim.
            self._heartbeat_failed(error, "Reaping dead workers", since)

    async def renew(self) -> None:
        """Extend this worker's lease (on the heartbeat's own connection); if it was found
        dead meanwhile, every claim is lost."""
        self.require_pool()
        async with self._beating:
            connection = self._beat
            try:
                if connection is None or connection.is_closed():
                    import asyncpg
                    self._beat = None
                    connection = self._beat = await asyncpg.connect(self.url.secret)
                renewed = await connection.fetchval(_RENEW, self.worker_id, self.lease_seconds)
                if renewed is None:
                    for workflow_id in list(self._epochs):
                        self._lose(workflow_id)
                    await connection.execute(_REGISTER_WORKER, self.worker_id,
                                             socket.gethostname(), os.getpid(),
                                             self.lease_seconds)
            except Exception as error:
                if _connection_lost(error) and self._beat is not None:
                    self._beat.terminate()
                    self._beat = None
                raise
        lapsed = not self.lease_valid
        self._renewed_at = self.clock.monotonic()
        if lapsed:
            self._work.set()  # an idle worker may claim again

    async def reap(self) -> list[str]:
        """Re-queue the workflows of workers whose lease ran out; their IDs."""
        pool = self.require_pool()
        async with pool.acquire() as connection:
            rows = await connection.fetch(_REAP)
            for queue in {r["queue"] for r in rows if r["queue"] is not None}:
                await connection.execute("SELECT pg_notify($1, $2)", WORK_CHANNEL, queue)
        if rows:
            logger.warning("Re-queued %d workflow(s) of dead workers", len(rows))
        return [r["workflow_id"] for r in rows]

    # --- reads

    def _source(self, workflow_id: str) -> str:
        return f"{self.url.masked}#workflows/{workflow_id}"

    async def load(self, workflow_id: str) -> LoadedState:
        validate_workflow_id(workflow_id)
        await self._flush()
        row = await self.require_pool().fetchrow(
            "SELECT state, schema_version FROM workflows WHERE workflow_id = $1", workflow_id)
        if row is None or row["state"] is None:
            raise WorkflowNotFoundError(f"no workflow {workflow_id} in {self.url.masked}")
        source = self._source(workflow_id)
        return LoadedState(_decode(row["state"], row["schema_version"], workflow_id, source),
                           source)

    async def list_states(self, statuses: Iterable[str] | None = None) -> list[LoadedState]:
        await self._flush()
        pool = self.require_pool()
        if statuses is None:
            rows = await pool.fetch("SELECT workflow_id, state, schema_version FROM workflows "
                                    "WHERE state IS NOT NULL ORDER BY created_at")
        else:
            rows = await pool.fetch("SELECT workflow_id, state, schema_version FROM workflows "
                                    "WHERE state IS NOT NULL AND status = ANY($1::text[]) "
                                    "ORDER BY created_at", list(statuses))
        loaded = []
        for row in rows:
            workflow_id, source = row["workflow_id"], self._source(row["workflow_id"])
            try:
                state = _decode(row["state"], row["schema_version"], workflow_id, source)
            except StateCorruptedError as error:  # listed as the file store lists such files
                loaded.append(LoadedState({"workflow_id": workflow_id, "status": "corrupted",
                                           "error": str(error)}, source, (str(error),)))
                continue
            loaded.append(LoadedState(state, source))
        return loaded

    async def checkpoint(self, workflow_id: str, stage: str) -> LoadedState:
        """The state saved as ``stage``'s checkpoint."""
        row = await self.require_pool().fetchrow(
            "SELECT state, schema_version FROM workflow_checkpoints "
            "WHERE workflow_id = $1 AND stage = $2", workflow_id, stage)
        if row is None:
            raise WorkflowNotFoundError(f"no checkpoint of {stage!r} for {workflow_id}")
        source = f"{self._source(workflow_id)}/{stage}"
        return LoadedState(_decode(row["state"], row["schema_version"], workflow_id, source),
                           source)

    async def checkpoints(self, workflow_id: str) -> dict[str, Any]:
        """Every stage checkpoint of ``workflow_id``, oldest first: source -> state (or
        ``{"error": ...}`` for a row this code cannot read), for diagnostic bundles."""
        rows = await self.require_pool().fetch(
            "SELECT stage, state, schema_version FROM workflow_checkpoints "
            "WHERE workflow_id = $1 ORDER BY created_at, stage", validate_workflow_id(workflow_id))
        found: dict[str, Any] = {}
        for row in rows:
            source = f"{self._source(workflow_id)}/{row['stage']}"
            try:
                found[source] = _decode(row["state"], row["schema_version"], workflow_id, source)
            except StateCorruptedError as error:
                found[source] = {"error": error.problem}
        return found

    def describe(self, workflow_id: str) -> dict[str, str]:
        return {"database": self.url.masked, "workflow": f"workflows/{workflow_id}",
                "worker": self.worker_id}

    # --- claims

    async def claim(self, workflow_id: str) -> Claim:
        claims, refused = await self.claim_many([workflow_id])
        if refused:
            raise WorkflowLockedError(f"workflow {workflow_id} is already running (claimed by "
                                      f"a live worker in {self.url.masked}); not starting it "
                                      "twice")
        return claims[0]

    async def claim_many(self, workflow_ids: Iterable[str]) -> tuple[list[Claim], list[str]]:
        ids = [validate_workflow_id(w) for w in workflow_ids]
        mine = [w for w in ids if w in self._epochs]
        wanted = [w for w in dict.fromkeys(ids) if w not in self._epochs]
        granted: dict[str, int] = {}
        if wanted:
            await self._flush()  # a registration still queued must exist before its claim
            async with self._claims(), self.require_pool().acquire() as connection, \
                    connection.transaction():
                for row in await connection.fetch(_CLAIM, self.worker_id, wanted):
                    granted[row["workflow_id"]] = row["epoch"]
                missing = [w for w in wanted if w not in granted]
                if missing:
                    for row in await connection.fetch(_CLAIM_NEW, self.worker_id, missing):
                        granted[row["workflow_id"]] = row["epoch"]
        claims: list[Claim] = []
        refused: list[str] = list(mine)
        for workflow_id in wanted:
            epoch = granted.get(workflow_id)
            if epoch is None:
                refused.append(workflow_id)
                continue
            self._lost.discard(workflow_id)
            self._epochs[workflow_id] = epoch
            claims.append(_PostgresClaim(workflow_id, epoch, self))
        return claims, refused

    @contextlib.asynccontextmanager
    async def _claims(self) -> AsyncIterator[None]:
        """Around a claim statement: one at a time, so that what this store holds is known
        whenever none is in flight. After a claim whose reply was lost (it may have
        committed), the next one first gives back every claim the database says this
        worker holds and this store does not know of."""
        async with self._claiming:
            if self._claims_unsure:
                await self._release_orphans()
            try:
                yield
            except Exception as error:
                if _connection_lost(error):
                    self._claims_unsure = True
                raise

    async def _release_orphans(self) -> None:
        known = set(self._epochs) | set(self._pending.releases)
        for batch in self._sending:
            known.update(batch.releases)
        async with self.require_pool().acquire() as connection:
            rows = await connection.fetch(_ORPHANS, self.worker_id, sorted(known))
            for queue in {r["queue"] for r in rows if r["queue"] is not None}:
                await connection.execute("SELECT pg_notify($1, $2)", WORK_CHANNEL, queue)
        self._claims_unsure = False
        if rows:
            logger.warning("Gave back %d claim(s) whose replies were lost in an outage",
                           len(rows))

    def _release(self, workflow_id: str, epoch: int) -> None:
        if self._epochs.get(workflow_id) != epoch:
            return  # lost meanwhile: the new owner's, not ours to release
        del self._epochs[workflow_id]
        if self._pool is None:
            return
        if workflow_id not in self._pending.releases:
            self._seq += 1
            self._pending.release_seqs[workflow_id] = self._seq
        self._pending.releases[workflow_id] = epoch
        self._wake.set()

    def epoch_of(self, workflow_id: str) -> int | None:
        """The epoch this store holds ``workflow_id`` at, if it holds a claim on it."""
        return self._epochs.get(workflow_id)

    # --- for the runtime's workers (submit, result, serve, cancel from any host)

    async def count_unfinished(self, queue: str) -> int:
        """Workflows of ``queue`` not yet ended: queued, or running on any worker."""
        count = await self.require_pool().fetchval(
            "SELECT count(*) FROM workflows WHERE queue = $1 AND status = ANY($2::text[])",
            queue, list(CLAIMABLE))
        return int(count or 0)

    async def request_cancel(self, workflow_id: str) -> None:
        """Ask the worker running ``workflow_id`` (on any host) to stop it and mark it
        cancelled; it sees the request at its next lease renewal."""
        await self.require_pool().execute(
            "INSERT INTO workflow_signals (workflow_id, kind) VALUES ($1, 'cancel')",
            validate_workflow_id(workflow_id))

    async def take_cancels(self, workflow_ids: Iterable[str]) -> list[str]:
        """Those of ``workflow_ids`` with a cancel request not yet handled, marked handled."""
        ids = list(workflow_ids)
        if not ids:
            return []
        rows = await self.require_pool().fetch(
            "UPDATE workflow_signals SET handled_at = now() WHERE handled_at IS NULL AND "
            "kind = 'cancel' AND workflow_id = ANY($1::text[]) RETURNING workflow_id", ids)
        return sorted({r["workflow_id"] for r in rows})
