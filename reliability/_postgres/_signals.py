"""Durable waits on PostgreSQL: signals, the parked index, and due wakes across workers.

``PostgresStore`` takes these methods from ``PostgresSignals`` (a mixin: the store's own
commit path is untouched). Tables: ``workflow_wait_signals`` and ``workflow_parked``
(migration 0005). How the promises of ``SignalStore`` are kept here:

- ``park`` is fenced like every other write: the entry is written only where the
  workflow's row still has this worker as owner at its claim's epoch (audited in
  ``workflow_writes`` as ``park``, applied or refused); refused, the claim is lost and
  FencedError raised. It is committed before the state that says ``waiting`` is queued
  (docs/architecture.md, invariant 11). Its deadline is kept twice: as the runtime
  recorded it, and as ``due_at`` on the database's clock (now() plus the time left), so
  every worker agrees when it is due whatever its own clock says.
- A parked workflow is claimed by nobody. ``claim_due`` claims those due (``due_at`` passed
  on the database's clock, or the signal they wait for stored) with ``FOR UPDATE SKIP
  LOCKED``, as workers claim queued work, and returns their states: two workers never wake
  one workflow, and a worker that starts after a deadline passed wakes it at once.
- ``send_signal`` takes an advisory lock on the workflow (so its signals commit in the
  order of their ids: a stage run again takes the same one), inserts the row (a foreign key:
  never for an unknown workflow) and NOTIFYs ``workflow_wake``; ``wait_for_due`` sleeps
  until such a NOTIFY, the next ``due_at``, or a poll interval.
- ``unpark`` deletes an entry only where all its fields match: a workflow parked again
  meanwhile (a new entry, by its new owner) keeps its new entry. It needs no fence: it
  removes nothing but that one event.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from typing import TYPE_CHECKING, Any

import orjson

from .._errors import (
    FencedError,
    StateCorruptedError,
    WorkflowError,
    WorkflowNotFoundError,
)
from .._ids import validate_workflow_id
from .._store import SCHEMA_VERSION, LoadedState, ParkedEntry

if TYPE_CHECKING:
    import asyncpg

    from .._clock import Clock
    from ._url import DatabaseURL

__all__ = ["WAKE_CHANNEL", "PostgresSignals"]

WAKE_CHANNEL = "workflow_wake"  # payload: the ID of a workflow a signal was sent to

_PARK = """
WITH parked AS (
    INSERT INTO workflow_parked AS p (workflow_id, deadline, signal, signal_index, due_at)
    SELECT w.workflow_id, $4, $5, $6, now() + make_interval(secs => $7)
    FROM workflows w WHERE w.workflow_id = $1 AND w.owner = $2 AND w.epoch = $3
    ON CONFLICT (workflow_id) DO UPDATE
        SET deadline = EXCLUDED.deadline, signal = EXCLUDED.signal,
            signal_index = EXCLUDED.signal_index, due_at = EXCLUDED.due_at, parked_at = now()
    RETURNING p.workflow_id),
audit AS (
    INSERT INTO workflow_writes (workflow_id, owner, epoch, kind, applied)
    SELECT $1, $2, $3, 'park', EXISTS (SELECT 1 FROM parked))
SELECT count(*) FROM parked
"""

_UNPARK = """
DELETE FROM workflow_parked p
USING unnest($1::text[], $2::float8[], $3::text[], $4::integer[]) AS u(w, d, s, i)
WHERE p.workflow_id = u.w AND p.deadline = u.d AND p.signal = u.s AND p.signal_index = u.i
"""

# A signal of the name it waits for beyond those it took: due now, whatever its deadline.
_SIGNALLED = """(p.signal <> '' AND (
    SELECT count(*) FROM workflow_wait_signals s
    WHERE s.workflow_id = p.workflow_id AND s.name = p.signal) > p.signal_index)"""

_CLAIM_DUE = f"""
WITH due AS (
    SELECT w.workflow_id FROM workflow_parked p JOIN workflows w USING (workflow_id)
    WHERE w.status = 'waiting' AND w.owner IS NULL AND (p.due_at <= now() OR {_SIGNALLED})
    ORDER BY p.due_at
    LIMIT $2
    FOR UPDATE OF w SKIP LOCKED),
claimed AS (
    UPDATE workflows w SET owner = $1, epoch = w.epoch + 1, claimed_at = now()
    FROM due d WHERE w.workflow_id = d.workflow_id
    RETURNING w.workflow_id, w.epoch, w.state, w.schema_version),
audit AS (
    INSERT INTO workflow_writes (workflow_id, owner, epoch, kind, applied)
    SELECT workflow_id, $1, epoch, 'claim', true FROM claimed)
SELECT workflow_id, epoch, state, schema_version FROM claimed
"""

# Seconds until the next parked workflow is due on the database's clock (NULL: none). One
# due (or signalled) but still claimed is looked at again shortly: its claim is being given
# back (its "waiting" state committed, the release not yet), or its owner died and is about
# to be reaped; no NOTIFY says when either happened.
_NEXT_DUE = f"""
SELECT extract(epoch FROM min(greatest(
    CASE WHEN {_SIGNALLED} THEN now() ELSE p.due_at END,
    CASE WHEN w.owner IS NULL THEN '-infinity'::timestamptz
         ELSE now() + make_interval(secs => $1) END)) - now())::float8
FROM workflow_parked p JOIN workflows w USING (workflow_id)
WHERE w.status = 'waiting'
"""
_HELD_AGAIN = 0.5  # seconds: how soon a due workflow still claimed is looked at again

_SEND = """
WITH sent AS (
    INSERT INTO workflow_wait_signals (workflow_id, name, payload)
    VALUES ($1, $2, $3::jsonb) RETURNING workflow_id)
SELECT pg_notify($4, workflow_id) FROM sent
"""

_READY = """
SELECT u.w FROM unnest($1::text[], $2::text[], $3::integer[]) AS u(w, n, i)
WHERE (SELECT count(*) FROM workflow_wait_signals s
       WHERE s.workflow_id = u.w AND s.name = u.n) > u.i
"""


def decode_row(text: str, schema_version: int, workflow_id: str, source: str) -> dict[str, Any]:
    """A row's state; StateCorruptedError in a format this code does not read, or naming
    another workflow than its row (the checks every read of the store makes)."""
    if schema_version != SCHEMA_VERSION:
        raise StateCorruptedError(source, f"schema version {schema_version!r} is not "
                                          f"{SCHEMA_VERSION}, which this version reads")
    state = orjson.loads(text)
    if not isinstance(state, dict) or state.get("workflow_id") != workflow_id:
        raise StateCorruptedError(source, "not this workflow's state document")
    return state


class _WokenClaim:
    """The claim ``claim_due`` took: released like any of the store's claims."""

    __slots__ = ("_store", "epoch", "workflow_id")

    def __init__(self, workflow_id: str, epoch: int, store: PostgresSignals) -> None:
        self.workflow_id = workflow_id
        self.epoch = epoch
        self._store: PostgresSignals | None = store

    def release(self) -> None:
        store, self._store = self._store, None
        if store is not None:
            store._release(self.workflow_id, self.epoch)


class PostgresSignals:
    """The ``SignalStore`` methods of ``PostgresStore`` (the module docstring says how)."""

    # Signals from any host arrive by NOTIFY through ``wait_for_due``, not by notices.
    signals_from_other_processes = False
    # A store with ``claim_due`` decides when its parked workflows are due (the waker
    # then claims them from the store instead of arming timers of its own).
    wakes_by_claim = True

    _wake_listener: asyncpg.Connection | None = None
    _wake_event: asyncio.Event | None = None

    if TYPE_CHECKING:  # provided by PostgresStore
        worker_id: str
        url: DatabaseURL
        clock: Clock
        poll_interval: float
        _epochs: dict[str, int]
        _lost: set[str]

        def require_pool(self) -> asyncpg.Pool: ...

        def _release(self, workflow_id: str, epoch: int) -> None: ...

        def _lose(self, workflow_id: str) -> None: ...

        def _fenced(self, workflow_id: str, reason: str) -> FencedError: ...

        def _source(self, workflow_id: str) -> str: ...

        async def _flush(self) -> None: ...

    # --- signals

    async def send_signal(self, workflow_id: str, name: str, payload: bytes) -> None:
        import asyncpg
        validate_workflow_id(workflow_id)
        pool = self.require_pool()
        try:
            async with pool.acquire() as connection, connection.transaction():
                # Senders to one workflow one at a time: its signals commit in id order.
                await connection.execute("SELECT pg_advisory_xact_lock(hashtext($1))",
                                         workflow_id)
                await connection.execute(_SEND, workflow_id, name, payload.decode(),
                                         WAKE_CHANNEL)
        except asyncpg.ForeignKeyViolationError:
            raise WorkflowNotFoundError(f"no workflow {workflow_id} in {self.url.masked}"
                                        ) from None

    async def read_signal(self, workflow_id: str, name: str, index: int) -> bytes | None:
        text = await self.require_pool().fetchval(
            "SELECT payload::text FROM workflow_wait_signals WHERE workflow_id = $1 AND "
            "name = $2 ORDER BY id OFFSET $3 LIMIT 1", workflow_id, name, index)
        return None if text is None else str(text).encode()

    async def signals_ready(self, wanted: list[tuple[str, str, int]]) -> list[str]:
        if not wanted:
            return []
        rows = await self.require_pool().fetch(
            _READY, [w for w, _, _ in wanted], [n for _, n, _ in wanted],
            [i for _, _, i in wanted])
        return [row[0] for row in rows]

    async def signal_notices(self) -> list[tuple[str, str]]:
        return []  # NOTIFY wakes ``wait_for_due`` instead

    async def signalled(self) -> list[str]:
        rows = await self.require_pool().fetch(
            "SELECT DISTINCT workflow_id FROM workflow_wait_signals")
        return [row[0] for row in rows]

    async def drop_signals(self, workflow_id: str, *, scan: bool = False) -> None:
        pool = self.require_pool()
        await pool.execute("DELETE FROM workflow_wait_signals WHERE workflow_id = $1",
                           workflow_id)
        if scan:
            await pool.execute("DELETE FROM workflow_parked WHERE workflow_id = $1",
                               workflow_id)

    # --- the parked index

    async def park(self, entry: ParkedEntry) -> None:
        workflow_id, deadline, name, index = entry
        epoch = self._epochs.get(workflow_id)
        if epoch is None or workflow_id in self._lost:
            raise self._fenced(workflow_id, "holds no claim on it")
        left = max(0.0, deadline - self.clock.time())
        written = await self.require_pool().fetchval(
            _PARK, workflow_id, self.worker_id, epoch, deadline, name, index, left)
        if not written:
            self._lose(workflow_id)
            raise self._fenced(workflow_id, "lost its claim before parking")

    async def unpark(self, entry: ParkedEntry) -> None:
        await self.unpark_many([entry])

    async def unpark_many(self, entries: list[ParkedEntry]) -> None:
        if entries:
            await self.require_pool().execute(
                _UNPARK, [e[0] for e in entries], [e[1] for e in entries],
                [e[2] for e in entries], [e[3] for e in entries])

    async def parked(self) -> list[ParkedEntry]:
        rows = await self.require_pool().fetch(
            "SELECT workflow_id, deadline, signal, signal_index FROM workflow_parked")
        return [(r[0], float(r[1]), r[2], int(r[3])) for r in rows]

    async def load_many(self, workflow_ids: list[str]) -> dict[str, LoadedState | WorkflowError]:
        await self._flush()
        rows = await self.require_pool().fetch(
            "SELECT workflow_id, state, schema_version FROM workflows "
            "WHERE workflow_id = ANY($1::text[]) AND state IS NOT NULL", workflow_ids)
        found: dict[str, LoadedState | WorkflowError] = {}
        for row in rows:
            found[row[0]] = self._loaded(row[0], row[1], row[2])
        for workflow_id in workflow_ids:
            found.setdefault(workflow_id, WorkflowNotFoundError(
                f"no workflow {workflow_id} in {self.url.masked}"))
        return found

    def _loaded(self, workflow_id: str, text: str, schema_version: int
                ) -> LoadedState | WorkflowError:
        source = self._source(workflow_id)
        try:
            return LoadedState(decode_row(text, schema_version, workflow_id, source), source)
        except StateCorruptedError as error:
            return error

    # --- due wakes across workers

    async def claim_due(self, limit: int) -> list[tuple[_WokenClaim, LoadedState | WorkflowError]]:
        """Claim up to ``limit`` parked workflows that are due (on the database's clock, or
        signalled) and that nobody holds, skipping rows other workers are claiming."""
        rows = await self.require_pool().fetch(_CLAIM_DUE, self.worker_id, limit)
        claimed = []
        for row in rows:
            workflow_id, epoch = row["workflow_id"], row["epoch"]
            self._lost.discard(workflow_id)
            self._epochs[workflow_id] = epoch
            claimed.append((_WokenClaim(workflow_id, epoch, self),
                            self._loaded(workflow_id, row["state"], row["schema_version"])))
        return claimed

    async def wait_for_due(self, limit: float) -> None:
        """Until a signal is sent (NOTIFY from any host), the next parked workflow is due,
        or ``limit`` seconds (jittered) pass."""
        event = await self._wake_listen()
        seconds = await self.require_pool().fetchval(_NEXT_DUE, _HELD_AGAIN)
        wait = limit * random.uniform(0.8, 1.0)
        if seconds is not None:
            wait = min(wait, max(0.0, float(seconds)))
        if wait <= 0:
            return
        timer = self.clock.call_later(wait, event.set)
        try:
            await event.wait()
        finally:
            timer.cancel()
            event.clear()

    async def _wake_listen(self) -> asyncio.Event:
        if self._wake_event is None:
            self._wake_event = asyncio.Event()
        event = self._wake_event
        if self._wake_listener is not None and not self._wake_listener.is_closed():
            return event
        import asyncpg
        connection = None
        try:
            connection = await asyncpg.connect(self.url.secret)
            await connection.add_listener(WAKE_CHANNEL, self._wake_notified)
        except BaseException as error:
            if connection is not None:  # connected but not listening: nobody's
                connection.terminate()
            if isinstance(error, Exception):
                return event  # the poll still finds due ones; the next wait tries again
            raise
        connection.add_termination_listener(self._wake_lost)
        self._wake_listener = connection
        return event

    def _wake_notified(self, *_: object) -> None:
        if self._wake_event is not None:
            self._wake_event.set()

    def _wake_lost(self, *_: object) -> None:
        self._wake_listener = None
        self._wake_notified()

    def poke_due(self) -> None:
        """Look for due workflows now (a signal was sent from this process)."""
        self._wake_notified()

    async def stop_waiting_for_due(self) -> None:
        """Close the NOTIFY connection ``wait_for_due`` opened (the waker closes)."""
        connection, self._wake_listener = self._wake_listener, None
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.close()
