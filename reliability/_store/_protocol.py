"""The ``Store`` protocol: what the runtime asks of any store, and the state documents.

A store keeps each workflow's state: a JSON-able ``dict`` whose ``"workflow_id"`` names
the workflow, with ``"status"`` (``pending``, ``running``, ``interrupted``, ``completed``,
``failed``, ...) and an increasing integer ``"revision"``. The runtime owns what is inside;
a store only keeps it, returns it, and guarantees the properties below. Implementations
here: ``FileStore`` (files under the project root, the default) and ``MemoryStore``
(this process only); a PostgreSQL store sits beside them. A third-party store is a class
with these methods (structural typing: no base class to inherit), passed as
``Runtime(store=...)``.

Snapshots
    Every write takes a *snapshot*: a callable returning the state as a new dict. A store
    calls it when it encodes the write (``save``/``save_nowait``: at once; ``save_soon``:
    later, or never if superseded), so the state written is the state as it is then.
    It must not keep the dict after encoding it: the runtime goes on changing its
    workflow. ``encode_document`` gives the canonical bytes with a checksum;
    ``decode_document`` verifies them (a store keeping rows or blobs may use both).

Lifecycle
    ``await open()`` before any write; ``await close()`` makes every write asked for so far
    durable (or failed) and then releases what the store holds, except claims still held:
    those stay held until released. ``load``, ``list_states``, ``claim``, ``claim_many``
    and ``describe`` may be called on a store that is not open (the CLI lists and
    inspects that way). Both ``open`` and ``close`` are idempotent.

Writes and durability
    ``save(id, snapshot, checkpoint_stage=None)``
        Returns once the state is durable: after a crash, ``load`` returns it or a newer
        one. The write is queued when ``save`` is *called*: cancelling the awaiting task
        abandons only the wait, never the write (the engine relies on this for the final
        record of a workflow stopped by a second Ctrl-C). With ``checkpoint_stage``, the
        same state is also kept as that stage's checkpoint (what ``load`` falls back to
        when the current state is damaged; a store without separate copies may ignore it).
    ``save_nowait(id, snapshot, checkpoint_stage=None, lazy=False) -> Future``
        Like ``save``, but returns at once with a future that completes when the write is
        durable, or fails with its error (a store that is durable on return returns a
        future already done). Writes become durable in the order they were asked for,
        across workflows: a workflow's durable write implies every earlier write of it.
        ``lazy=True`` says nobody will wait for this future before calling
        ``expedite()``: the store may notice late that it is durable (it need not wake to
        read an acknowledgement), but the write itself must not be delayed. A store with
        nothing to batch treats ``lazy`` as ``False``.
    ``expedite()``
        Someone is about to await the lazy futures handed out so far: from now on they
        must complete as soon as their writes are durable (the engine calls it before
        awaiting the previous stage's lazy future, and before asking for the next lazy
        write). Synchronous; a no-op for a store whose futures are complete on return.
    ``save_soon(id, snapshot, promptly=False)``
        An informational write (a stage started, an output recorded mid-stage): queued
        without waiting, never awaited, dropped if a later ``save``/``save_nowait`` of
        the same workflow supersedes it. Unless ``promptly``, the store may hold it back a
        little (FileStore: 50 ms) so that a stage ending sooner is recorded once; reads
        need not see it before it is written.
    ``archive(state)``
        Keep ``state`` in the workflow's history (best effort: losing history is never
        an error, and a store may keep none).

Reads
    ``await load(id) -> LoadedState``
        The newest valid state of ``id``, including every write asked for before the
        call (durable or not yet). A damaged current state falls back to the newest
        valid checkpoint, with what was wrong in ``problems``. Raises
        ``WorkflowNotFoundError`` for an unknown workflow, ``StateCorruptedError`` when
        nothing valid is left, and ``InvalidWorkflowIdError`` (a ``ValueError``) for an ID
        ``validate_workflow_id`` refuses.
    ``await list_states(statuses=None) -> list[LoadedState]``
        Every workflow's state (those whose ``status`` is in ``statuses``, if given), in
        no particular order. A workflow whose state cannot be read is listed with
        ``status: "corrupted"`` and an ``error`` rather than failing the listing.

Claims (one process runs a workflow at a time; docs/architecture.md, invariant 9)
    ``await claim(id) -> Claim``
        The exclusive right to run ``id``, against every other claim on the same store's
        data: other tasks, other store objects in this process, other processes and, for
        a shared database, other hosts. Raises ``WorkflowLockedError`` if it is held.
        A claim whose holder dies must free itself (the kernel drops a dead process's
        locks; a database lease expires).
    ``await claim_many(ids) -> (claims, refused)``
        Claims for those free and the IDs held elsewhere, in one call (a ``resume --all``
        of 10,000 workflows must not cost 10,000 round trips). Two tasks of one event
        loop calling it together never both win one ID.
    ``Claim.release()``
        Synchronous, idempotent: gives the claim back, even after the store closed.

Diagnostics
    ``describe(id) -> dict[str, str]``: where the workflow's data lives (files, a table
    and key), shown by ``diagnose``; synchronous, and no I/O.

Concurrency: every method is called from the event loop's thread. Nothing may block the
loop for long (docs/architecture.md, invariant 4: one writer owns the store's files and
batches many workflows' writes; a store that blocks on I/O per write caps the runtime at
one stage per I/O round trip).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from .._errors import StateCorruptedError, WorkflowError
from ._writer import SCHEMA_VERSION, wrap_document

__all__ = ["SCHEMA_VERSION", "Claim", "DueClaims", "LoadedState", "ParkedEntry", "SignalStore",
           "Snapshot", "Store", "canonical", "check_state", "decode_document", "decode_written",
           "encode_document"]

# A parked workflow: (workflow_id, deadline in epoch seconds, signal name or "" for a
# durable sleep, index of the signal of that name it waits for).
ParkedEntry = tuple[str, float, str, int]

Snapshot = Callable[[], dict[str, Any]]


@dataclass(frozen=True, slots=True)
class LoadedState:
    """A validated state, where it came from, and what was wrong with newer copies."""

    state: dict[str, Any]
    source: str
    problems: tuple[str, ...] = ()


class Claim(Protocol):
    """The exclusive right to run one workflow; ``release()`` gives it back."""

    workflow_id: str

    def release(self) -> None: ...


class Store(Protocol):
    """Where workflows' states live; the module docstring says what each method promises."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def save(self, workflow_id: str, snapshot: Snapshot, *,
                   checkpoint_stage: str | None = None) -> None:
        """Make the workflow's state durable; with ``checkpoint_stage``, also as that
        stage's checkpoint. The write is queued when ``save`` is called, so cancelling the
        caller abandons only the wait, never the write."""
        ...

    def save_soon(self, workflow_id: str, snapshot: Snapshot, *,
                  promptly: bool = False) -> None:
        """Queue an informational write without waiting. Unless ``promptly``, it may wait
        a little before it is written; either way it is dropped when a durable save of the
        workflow supersedes it."""
        ...

    def save_nowait(self, workflow_id: str, snapshot: Snapshot, *,
                    checkpoint_stage: str | None = None,
                    lazy: bool = False) -> asyncio.Future[None]:
        """Like ``save``, but returns at once with a future that is done when the write is
        durable (or failed). Writes are durable in the order they were asked for.

        ``lazy``: nobody waits for this one before calling ``expedite()``, so the store
        may notice late that it is durable; the write itself is not delayed."""
        ...

    def expedite(self) -> None:
        """Someone is about to wait for the lazy writes asked for so far: complete their
        futures as soon as they are durable. Call it before asking for more of them."""
        ...

    def archive(self, state: dict[str, Any]) -> None:
        """Keep ``state`` in the workflow's history (best effort)."""
        ...

    async def load(self, workflow_id: str) -> LoadedState: ...

    async def list_states(self, statuses: Iterable[str] | None = None) -> list[LoadedState]: ...

    async def claim(self, workflow_id: str) -> Claim:
        """Raises WorkflowLockedError if another task or process holds the claim."""
        ...

    async def claim_many(self, workflow_ids: Iterable[str]) -> tuple[list[Claim], list[str]]:
        """Claims for those free, and the IDs already claimed elsewhere."""
        ...

    def describe(self, workflow_id: str) -> dict[str, str]:
        """Where a workflow's data lives, for diagnostics."""
        ...


class SignalStore(Protocol):
    """What durable waits (``ctx.wait_for_signal``, ``ctx.sleep_durably``) need of a store,
    besides ``Store``. Optional: a store without these methods refuses durable waits and
    signals with a ConfigurationError.

    Signals are kept per workflow and name, in the order sent, and never change; a
    workflow's state counts how many of each it has taken, so a stage run again after a
    crash takes the same one. ``park`` records a parked workflow in an index before its
    ``waiting`` state is saved, so an open runtime finds every parked workflow (and its
    deadline) without reading every state; ``unpark`` drops the entry when it wakes.
    ``signal_notices`` returns signals sent by other processes since the last call (a
    hint, each taken by one process; a store of one process returns ``[]``).
    ``drop_signals`` forgets a finished workflow's signals: called once its terminal state
    is durable, and for leftovers (``signalled``) when a runtime opens.

    Waking many at once (10,000 due at a runtime's start) must not cost a round trip or a
    thread hop per workflow: ``load_many`` reads the states of many parked workflows in
    one, ``unpark_many`` drops many entries in one.

    Capability, a class attribute: ``signals_from_other_processes`` is True when a signal
    may be sent to this store by another process (a file store on a shared directory, a
    database): an open runtime then takes ``signal_notices()`` every ``poll_seconds``.
    False for a store of one process (``MemoryStore``), whose own sends wake directly. A
    store without the attribute is taken to be shared.
    """

    signals_from_other_processes: bool

    async def send_signal(self, workflow_id: str, name: str, payload: bytes) -> None:
        """Store the signal durably (``payload`` is JSON bytes)."""
        ...

    async def read_signal(self, workflow_id: str, name: str, index: int) -> bytes | None: ...

    async def signals_ready(self, wanted: list[tuple[str, str, int]]) -> list[str]:
        """Of ``(id, name, index)``, the IDs whose ``index``-th signal is stored."""
        ...

    async def park(self, entry: ParkedEntry) -> None: ...

    async def unpark(self, entry: ParkedEntry) -> None: ...

    async def unpark_many(self, entries: list[ParkedEntry]) -> None:
        """``unpark`` for each entry, in one go."""
        ...

    async def load_many(self, workflow_ids: list[str]) -> dict[str, LoadedState | WorkflowError]:
        """Each workflow's ``load``, or the error ``load`` would raise, in one go."""
        ...

    async def parked(self) -> list[ParkedEntry]: ...

    async def signal_notices(self) -> list[tuple[str, str]]: ...

    async def signalled(self) -> list[str]:
        """The IDs of the workflows that have signals stored."""
        ...

    async def drop_signals(self, workflow_id: str, *, scan: bool = False) -> None:
        """Forget a finished workflow's signals (and the notices this store sent for it);
        with ``scan``, also whatever notices and parked entries of it are left (slower:
        for what a crash or another process left behind)."""
        ...


class DueClaims(Protocol):
    """Optional, besides ``SignalStore``: a store shared by many workers that decides itself
    when its parked workflows are due (the PostgreSQL store: deadlines on the database's
    clock, signals from any host by NOTIFY). Declared by the class attribute
    ``wakes_by_claim = True``; the waker then arms no timer and reads no notices of its
    own: it claims what ``claim_due`` returns and runs it, and waits with
    ``wait_for_due`` in between.

    A parked workflow is claimed by nobody; ``claim_due`` claims those due and free, each
    by one worker (``SKIP LOCKED``), with their states (or the error reading one).
    """

    wakes_by_claim: bool
    clock: Any  # the store's Clock: its waits and backoff
    poll_interval: float

    async def claim_due(self, limit: int) -> list[tuple[Any, LoadedState | WorkflowError]]:
        """Up to ``limit`` due parked workflows: (their ``Claim``, their state)."""
        ...

    async def wait_for_due(self, limit: float) -> None:
        """Until more may be due (a signal sent anywhere, the next deadline) or ``limit``
        seconds pass."""
        ...

    def poke_due(self) -> None:
        """End the current ``wait_for_due`` at once (a signal sent, a workflow parked)."""
        ...

    def unreachable(self, error: BaseException) -> bool:
        """True if ``error`` means the store cannot be reached now."""
        ...

    async def stop_waiting_for_due(self) -> None: ...


# --------------------------------------------------------------------------- documents


_CANONICAL = orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS


def canonical(state: Mapping[str, Any]) -> bytes:
    """The state's canonical JSON (sorted keys): what the checksum covers."""
    # orjson: the same canonical bytes as json.dumps(sort_keys=True) for our states, ~10x
    # faster, which matters when every stage of thousands of workflows is checkpointed.
    # OPT_NON_STR_KEYS (for outputs keyed by numbers) makes every call ~25 % slower, so it
    # is only used when a plain call refuses a key; both give the same bytes otherwise.
    try:
        return orjson.dumps(state, option=orjson.OPT_SORT_KEYS, default=str)
    except TypeError:
        return orjson.dumps(state, option=_CANONICAL, default=str)


def encode_document(state: Mapping[str, Any]) -> bytes:
    """The stored form: schema version, SHA-256 of the canonical state, then the state."""
    return wrap_document(canonical(state))


def decode_document(data: bytes, path: str) -> dict[str, Any]:
    """The state inside ``data``; StateCorruptedError says what is wrong with it."""
    if not data.strip():
        raise StateCorruptedError(path, "the file is empty (torn write?)")
    try:
        document = orjson.loads(data)
    except orjson.JSONDecodeError as error:
        raise StateCorruptedError(path, f"not valid JSON (truncated or damaged): {error}") from None
    if not isinstance(document, dict) or not isinstance(document.get("state"), dict):
        raise StateCorruptedError(path, "not a workflow state document")
    version = document.get("schema_version")
    if version != SCHEMA_VERSION:
        raise StateCorruptedError(
            path, f"schema version {version!r} is not {SCHEMA_VERSION}, which this version reads")
    state: dict[str, Any] = document["state"]
    expected = "sha256:" + hashlib.sha256(canonical(state)).hexdigest()
    if document.get("checksum") != expected:
        raise StateCorruptedError(path, "checksum mismatch: the file was changed or damaged")
    return state


# The bytes ``wrap_document`` puts around a canonical state and its SHA-256 (hex).
_HEAD = b'{"schema_version":%d,"checksum":"sha256:' % SCHEMA_VERSION
_DIGEST_END = len(_HEAD) + 64
_MIDDLE = b'","state":'
_BODY_START = _DIGEST_END + len(_MIDDLE)
_TAIL = b"}\n"


def decode_written(data: bytes) -> dict[str, Any] | None:
    """The state inside ``data`` if it is exactly as ``wrap_document`` wrote it and its
    checksum holds; None for anything else (``decode_document`` then says what is wrong).

    The checksum is taken over the state's bytes as they are in the file, where
    ``decode_document`` encodes the parsed state again to hash it: the same verdict for
    every file this package wrote (their state is canonical), and the state parsed once,
    without its envelope. Reading 10,000 parked workflows at a start, this was a third of
    each state's decoding."""
    if (len(data) <= _BODY_START + len(_TAIL) or not data.startswith(_HEAD)
            or not data.endswith(_TAIL) or data[_DIGEST_END:_BODY_START] != _MIDDLE):
        return None
    body = memoryview(data)[_BODY_START:len(data) - len(_TAIL)]
    if hashlib.sha256(body).hexdigest().encode() != data[len(_HEAD):_DIGEST_END]:
        return None
    try:
        state = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return state if isinstance(state, dict) else None


def check_state(state: dict[str, Any], workflow_id: str, path: str) -> dict[str, Any]:
    """``state`` if it belongs to ``workflow_id``; else StateCorruptedError."""
    if state.get("workflow_id") != workflow_id:
        raise StateCorruptedError(path, f"belongs to {state.get('workflow_id')!r}, "
                                        f"not {workflow_id}")
    return state
