"""Durable workflow state: the ``Store`` interface, the embedded ``FileStore``, ``MemoryStore``.

The interface is shaped for a shared database too (a PostgreSQL store with lease rows):
everything is async, workflows are listed by status, and running one needs an exclusive
claim (here a lock on one byte of a shared lock file, released by the kernel if the
process dies).

FileStore layout (the spec's paths, under the project root)::

    {state_directory}/{id}/state.json             current state, atomic, checksummed
    {state_directory}/_claims/{00..ff}.lock       every claim: one locked byte each
    {state_directory}/_journal/journal-*.log      the durability point (see FileStore)
    {state_directory}/{id}/history.jsonl.gz       compressed earlier states
    {checkpoint_directory}/{id}_checkpoint_{stage}.json

Every write goes through one group-commit writer (DESIGN rule 4): the writes queued in
one loop iteration form a batch, coalesced per workflow (newest wins), sent to the writer
process (``_writer.py``), which appends every batch that arrived during its last sync to
the journal with one ``fdatasync``: the durability point. A workflow awaits only its own
record. State and checkpoint files are written from the journal afterwards (temp file +
rename) and synced with one ``syncfs`` (or an ``fsync`` per file without it) before a
journal is deleted.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import fcntl
import functools
import hashlib
import os
import stat
import struct
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import orjson

from ._errors import (
    ResourceError,
    StateCorruptedError,
    WorkflowLockedError,
    WorkflowNotFoundError,
    classify,
)
from ._ids import validate_workflow_id
from ._logging import logger
from ._writer import (
    SCHEMA_VERSION,
    encode_frame,
    load_syncfs,
    make_private_directory,
    make_workflow_directory,
    sync_filesystem,
    wrap_document,
    write_file,
)
from ._writer_link import WriterLink, WriterStartError

__all__ = ["SCHEMA_VERSION", "Claim", "FileStore", "LoadedState", "MemoryStore", "Store",
           "decode_document", "encode_document", "make_private_directory"]

Snapshot = Callable[[], dict[str, Any]]
MAX_STATE_BYTES = 16 * 1024 * 1024  # a state file larger than this is refused, not parsed
JOURNAL_LIMIT = 256 * 1024 * 1024  # past this, appends move to a fresh journal
# An informational write (a stage's start) waits this long before it joins a batch: a
# stage that ends sooner is recorded by its completion alone, so most stages of a busy
# runtime cost one encoded state, not two. Long stages still show up as started.
INFORMATIONAL_DELAY = 0.05
# Answers of lazy batches left unread in the writer's pipe at most (~20 bytes each).
UNREAD_LIMIT = 512
# A writer process that dies is replaced this many times per store; then writes fail.
WRITER_RESTARTS = 3


_NO_STAGES: frozenset[str] = frozenset()  # most writes want no checkpoint file


class _NeverSaved(WorkflowNotFoundError):
    """Raised when a workflow's directory holds a claim but no state was ever saved."""


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
    """Where workflows' states live. Implementations: FileStore, MemoryStore (PostgreSQL next)."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def save(self, workflow_id: str, snapshot: Snapshot, *,
                   checkpoint_stage: str | None = None) -> None:
        """Make the workflow's state durable; with ``checkpoint_stage``, also as that
        stage's checkpoint. The write is queued when ``save`` is called, so cancelling the
        caller abandons only the wait, never the write (the engine relies on this for the
        final record of a workflow stopped by a second Ctrl-C)."""
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
        """Keep ``state`` in the workflow's compressed history."""
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


@functools.lru_cache(maxsize=4096)
def _safe_stage(stage: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in stage)[:80]


def _checkpoint_name(workflow_id: str, stage: str) -> str:
    return f"{workflow_id}_checkpoint_{_safe_stage(stage)}.json"


_CANONICAL = orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS


def _canonical(state: Mapping[str, Any]) -> bytes:
    # orjson: the same canonical bytes as json.dumps(sort_keys=True) for our states, ~10x
    # faster, which matters when every stage of thousands of workflows is checkpointed.
    # OPT_NON_STR_KEYS (for outputs keyed by numbers) makes every call ~25 % slower, so it
    # is only used when a plain call refuses a key; both give the same bytes otherwise.
    try:
        return orjson.dumps(state, option=orjson.OPT_SORT_KEYS, default=str)
    except TypeError:
        return orjson.dumps(state, option=_CANONICAL, default=str)


def encode_document(state: Mapping[str, Any]) -> bytes:
    """The on-disk form: schema version, SHA-256 of the canonical state, then the state."""
    return wrap_document(_canonical(state))


def decode_document(data: bytes, path: str) -> dict[str, Any]:
    """The state inside ``data``; StateCorruptedError says what is wrong with the file."""
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
    expected = "sha256:" + hashlib.sha256(_canonical(state)).hexdigest()
    if document.get("checksum") != expected:
        raise StateCorruptedError(path, "checksum mismatch: the file was changed or damaged")
    return state


def _check_state(state: dict[str, Any], workflow_id: str, path: str) -> dict[str, Any]:
    if state.get("workflow_id") != workflow_id:
        raise StateCorruptedError(path, f"belongs to {state.get('workflow_id')!r}, "
                                        f"not {workflow_id}")
    return state


# --------------------------------------------------------------------------- file store


CLAIMS_DIRECTORY = "_claims"
# The kernel keeps a file's locks in one list and walks it on every lock and unlock:
# 10,000 claims in one file made each release cost 115 us on the loop. 256 files keep
# each list short; they are created once per state directory and opened once per store.
CLAIM_SHARDS = 256
_F_OFD_SETLK = 37  # Linux's F_OFD_SETLK (fcntl exports it from Python 3.9 on Linux only)
_FLOCK = struct.Struct("hhqqi4x")  # struct flock: type, whence, start, length, pid


def _claim_position(workflow_id: str) -> tuple[int, int]:
    """(claims file, byte in it) standing for ``workflow_id``: from a 64-bit hash, so
    two IDs share a byte with odds of 1 in 10^7 even among a million running workflows."""
    digest = int.from_bytes(hashlib.blake2b(workflow_id.encode(), digest_size=8).digest(),
                            "big")
    return digest % CLAIM_SHARDS, digest >> 2


class _FileClaim:
    __slots__ = ("_store", "workflow_id")

    def __init__(self, workflow_id: str, store: FileStore) -> None:
        self.workflow_id = workflow_id
        self._store: FileStore | None = store

    def release(self) -> None:
        store, self._store = self._store, None
        if store is not None:
            store._release(self.workflow_id)


_SYNCFS = load_syncfs()


def _read_bounded(path: Path) -> bytes:
    """Read a state file without following a symlink and without reading a huge file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as error:
        if error.errno == 40:  # ELOOP: the final component is a symlink
            raise StateCorruptedError(str(path), "is a symbolic link; refused") from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise StateCorruptedError(str(path), "is not a regular file")
        if info.st_size > MAX_STATE_BYTES:
            raise StateCorruptedError(
                str(path), f"is {info.st_size} bytes, over the {MAX_STATE_BYTES}-byte limit")
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _refuse_symlinked_directory(directory: Path) -> None:
    """A workflow's own directory must be a real one: its state is never read or written
    through a link that may point out of the state directory."""
    try:
        info = os.lstat(directory)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(info.st_mode):
        raise StateCorruptedError(str(directory), "is a symbolic link; refused")


def _newest_per_workflow(path: Path) -> dict[str, tuple[int, bytes]]:
    """The last valid document per workflow in a journal; a torn last line is skipped."""
    newest: dict[str, tuple[int, bytes]] = {}
    with open(path, "rb") as journal:
        for line in journal:
            try:
                state = decode_document(line, str(path))
                workflow_id = validate_workflow_id(state.get("workflow_id"))
            except (StateCorruptedError, ValueError):
                continue
            revision = int(state.get("revision") or 0)
            if revision >= newest.get(workflow_id, (-1, b""))[0]:
                newest[workflow_id] = (revision, line)
    return newest


@dataclass(slots=True)
class _Batch:
    # workflow ID -> (canonical state, or a snapshot to take at send time; stages whose
    # checkpoint file is wanted): coalesced per workflow, the newest write wins.
    writes: dict[str, tuple[bytes | Snapshot, frozenset[str]]] = field(default_factory=dict)
    appends: dict[Path, list[bytes]] = field(default_factory=dict)
    waiters: list[tuple[str, asyncio.Future[None]]] = field(default_factory=list)
    scheduled: bool = False
    wanted: bool = False  # someone waits for this batch (a write that is not lazy)


@dataclass(slots=True)
class _Sent:
    sequence: int
    # Encoded, kept until acknowledged so a restarted writer gets it again. Bytes and a
    # tuple of strings, not the message's lists of tuples: the garbage collector would
    # walk those again and again while thousands of batches wait for their sync.
    frame: bytes
    waiters: list[tuple[str, asyncio.Future[None]]]
    workflow_ids: tuple[str, ...]


class FileStore:
    """The embedded store: files under the project root, written by one writer process.

    Durability point: a batch is durable once appended to this store's journal
    (``{state_directory}/_journal/journal-{pid}-*.log``) and ``fdatasync``-ed; one append
    and one sync for thousands of workflows' writes. ``state.json`` and checkpoint files
    are then materialized every ``checkpoint_frequency`` stages and at the end of each
    workflow, without a sync each. Invariant: every state newer than its ``state.json`` is
    in a journal that is not deleted until those files are synced. A journal whose owner
    died (its ``flock`` is free) is replayed into ``state.json`` files by the next store
    that opens, before anything else reads them.

    The loop encodes each record and hands batches to a child process (``_writer.py``)
    through a pipe; that process does every file system call, so none of them competes
    with the event loop for the GIL. It dies with this process, as a thread would.
    """

    def __init__(self, state_directory: Path, checkpoint_directory: Path, *,
                 durable: bool = True, journal_limit: int = JOURNAL_LIMIT) -> None:
        self.state_directory = state_directory
        self.checkpoint_directory = checkpoint_directory
        self._checkpoint_prefix = os.path.join(checkpoint_directory, "")
        self.journal_directory = state_directory / "_journal"
        self.durable = durable
        self._journal_limit = journal_limit
        self._link: WriterLink | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending = _Batch()
        self._sequence = 0
        self._answered = 0  # the newest sequence the writer's answers were read for
        self._wanted = 0  # the newest sequence someone waits for (see expedite)
        self._sent: collections.deque[_Sent] = collections.deque()
        self._to_wake: collections.deque[tuple[str, asyncio.Future[None]]] = (
            collections.deque())
        self._wake_scheduled = False
        self._flushes: dict[int, asyncio.Future[None]] = {}
        self._unflushed = False  # sent writes whose state files may not be written yet
        self._broken: BaseException | None = None  # why the writer stopped, if it did
        self._restarting: asyncio.Task[None] | None = None
        self._restarts = 0
        self._claimed: set[str] = set()
        self._deferred: dict[str, tuple[float, Snapshot]] = {}  # informational, held back
        self._deferred_order: collections.deque[tuple[float, str]] = collections.deque()
        self._deferred_timer: asyncio.TimerHandle | None = None
        # One descriptor per claims file, opened once: a claim is then one fcntl() on the
        # loop's thread (a few microseconds), no open, no thread hop, no descriptor each.
        self._claim_fds: list[int] = []
        self._opening_claims: asyncio.Future[list[int]] | None = None
        self._made_dirs: set[Path] = set()
        self._file_paths: dict[str, dict[str, str]] = {}  # workflow -> {stage or "": path}
        self._temporary_suffix = f".tmp-{os.getpid()}"
        self._fsync_each = durable and _SYNCFS is None
        self.materialize_errors: list[str] = []
        self.batches_written = 0
        self.files_written = 0
        self.replayed_workflows = 0

    # --- lifecycle

    async def open(self) -> None:
        if self._link is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._broken = None
        self._restarts = 0
        await self._open_claim_files()
        try:
            self._link = await self._start_writer()
        except BaseException:
            if not self._claimed:
                self._close_claim_files()
            raise

    async def _start_writer(self) -> WriterLink:
        """Replay journals whose writer died, then start this store's writer."""
        await asyncio.to_thread(self._prepare_journal_directory)
        try:
            return await WriterLink.start(
                [str(self.journal_directory), str(self.state_directory),
                 str(self.checkpoint_directory), "1" if self.durable else "0",
                 str(self._journal_limit)],
                self._received, self._writer_ended)
        except WriterStartError as error:
            raise _storage_error(Path(error.path), OSError(error.errno, error.message)) from None

    async def close(self) -> None:
        link = self._link
        if link is None:
            return
        if self._deferred_timer is not None:
            self._deferred_timer.cancel()
        self._promote_deferred(everything=True)
        if self._restarting is not None:
            await asyncio.shield(self._restarting)
            link = self._link or link
        if self._pending.scheduled:
            self._send_pending()
        try:
            status = await link.finish()
        finally:
            self._link = None
            if not self._claimed:  # else the last release closes them: claims stay held
                self._close_claim_files()
        if self.materialize_errors:
            logger.warning("%d state or checkpoint file(s) could not be written (the journal "
                           "keeps those states and the next start writes them); first: %s",
                           len(self.materialize_errors), self.materialize_errors[0])
        if status != 0 and self._broken is None:
            raise _storage_error(Path(link.journal_path), OSError(
                errno.EIO, f"the writer process ended with status {status}; the journal "
                           "is replayed when the store opens next"))

    @property
    def writer_pid(self) -> int | None:
        """The writer process's ID while the store is open (for diagnostics and tests)."""
        return self._link.process.pid if self._link is not None else None

    @property
    def journal_path(self) -> str:
        """The journal this store appends to now ("" while closed)."""
        return self._link.journal_path if self._link is not None else ""

    # --- paths

    def state_path(self, workflow_id: str) -> Path:
        return self.state_directory / validate_workflow_id(workflow_id) / "state.json"

    def checkpoint_path(self, workflow_id: str, stage: str) -> Path:
        return self.checkpoint_directory / _checkpoint_name(validate_workflow_id(workflow_id),
                                                            stage)

    def describe(self, workflow_id: str) -> dict[str, str]:
        return {"state_file": str(self.state_path(workflow_id)),
                "checkpoint_glob": str(self.checkpoint_directory / f"{workflow_id}_checkpoint_*"),
                "history_file": str(self.state_path(workflow_id).parent / "history.jsonl.gz"),
                "journal_directory": str(self.journal_directory)}

    def _file_paths_of(self, workflow_id: str, stages: Iterable[str]) -> tuple[str, list[str]]:
        # Plain strings, built once per workflow and stage: pathlib's joins per record
        # would cost the loop more than handing the record to the writer.
        paths = self._file_paths.get(workflow_id)
        if paths is None:
            if len(self._file_paths) > 50_000:
                self._file_paths.clear()  # bounded: finished workflows' paths go stale
            paths = self._file_paths[workflow_id] = {"": str(self.state_path(workflow_id))}
        checkpoints = []
        for stage in stages:
            path = paths.get(stage)
            if path is None:
                # The ID was validated with the state path above; a string join is ~3 us
                # cheaper than pathlib's, once per workflow and stage (the same path).
                path = paths[stage] = self._checkpoint_prefix + _checkpoint_name(workflow_id,
                                                                                   stage)
            checkpoints.append(path)
        return paths[""], checkpoints

    # --- writes

    def save_soon(self, workflow_id: str, snapshot: Snapshot, *,
                  promptly: bool = False) -> None:
        # Held back INFORMATIONAL_DELAY (unless promptly), then taken at send time, and
        # only if no durable save of this workflow came meanwhile (it says all this would).
        self._require_open()
        if promptly:
            # In the next batch, replacing any write of it there: taken at send time, the
            # snapshot holds all that write did and more (outputs recorded mid-stage).
            self._deferred.pop(workflow_id, None)
            self._queue(workflow_id, snapshot, None)
            return
        due = time.monotonic() + INFORMATIONAL_DELAY
        self._deferred[workflow_id] = (due, snapshot)
        self._deferred_order.append((due, workflow_id))
        if self._deferred_timer is None:
            self._deferred_timer = asyncio.get_running_loop().call_later(
                INFORMATIONAL_DELAY, self._promote_deferred)

    def _promote_deferred(self, *, everything: bool = False) -> None:
        """Move informational writes that waited long enough into the pending batch."""
        self._deferred_timer = None
        if self._link is None:  # closed meanwhile: close() already promoted them all
            self._deferred.clear()
            self._deferred_order.clear()
            return
        now = time.monotonic()
        order, deferred = self._deferred_order, self._deferred
        while order and (everything or order[0][0] <= now):
            due, workflow_id = order.popleft()
            entry = deferred.get(workflow_id)
            if entry is None or entry[0] != due:
                continue  # superseded by a durable save, or by a newer informational one
            del deferred[workflow_id]
            earlier = self._pending.writes.get(workflow_id)
            if earlier is not None and isinstance(earlier[0], bytes):
                continue  # a durable write of it is in the batch: keep that one
            self._queue(workflow_id, entry[1], None)
        if order:
            self._deferred_timer = asyncio.get_running_loop().call_later(
                max(0.0, order[0][0] - now), self._promote_deferred)

    async def save(self, workflow_id: str, snapshot: Snapshot, *,
                   checkpoint_stage: str | None = None) -> None:
        await self.save_nowait(workflow_id, snapshot, checkpoint_stage=checkpoint_stage)

    def save_nowait(self, workflow_id: str, snapshot: Snapshot, *,
                    checkpoint_stage: str | None = None,
                    lazy: bool = False) -> asyncio.Future[None]:
        if not lazy:
            self._pending.wanted = True
        # Encoded now: the cost is spread over the loop's iterations instead of one burst
        # at send time, and the state cannot move on before it is written. Canonical JSON
        # only: the writer process adds the checksum (wrap_document).
        self._queue(workflow_id, _canonical(snapshot()), checkpoint_stage)
        # A future of its own: cancelling one waiter never disturbs the others in the batch.
        assert self._loop is not None
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._pending.waiters.append((workflow_id, waiter))
        return waiter

    def expedite(self) -> None:
        # The awaited write was sent already, or is in the pending batch if that has
        # waiters: read answers up to whichever comes last.
        if self._pending.waiters:
            self._pending.wanted = True
        self._wanted = self._sequence
        if self._link is not None and self._wanted > self._answered:
            # In the pipe already, as a rule: read it and wake its waiters now, so the
            # caller need not wait at all (one chunk, unless a wake-up is due anyway).
            wake_due = self._wake_scheduled
            self._link.read_available()
            if not wake_due:
                self._wake_chunk()
        self._watch_answers()

    def _watch_answers(self) -> None:
        """Read the writer's answers while someone waits for one or UNREAD_LIMIT are
        unread; leave them in the pipe while only lazy writes are unanswered (see
        ``WriterLink.read_answers``). With nothing unanswered, leave it as it is: no
        answer can come, and each switch is a system call."""
        link = self._link
        if link is None:
            return
        unanswered = self._sequence - self._answered
        if self._wanted > self._answered or self._flushes or unanswered > UNREAD_LIMIT:
            link.read_answers(True)
        elif unanswered:
            link.read_answers(False)

    def archive(self, state: dict[str, Any]) -> None:
        path = self.state_path(state["workflow_id"]).parent / "history.jsonl.gz"
        self._pending.appends.setdefault(path, []).append(encode_document(state))
        self._schedule()

    def _require_open(self) -> None:
        if self._link is None:
            raise RuntimeError("the store is not open (use 'async with Runtime(...)')")

    def _queue(self, workflow_id: str, document: bytes | Snapshot,
               checkpoint_stage: str | None) -> None:
        self._require_open()
        if isinstance(document, bytes):
            self._drop_deferred(workflow_id)  # a durable write says it all
        writes = self._pending.writes
        earlier = writes.get(workflow_id)
        stages = earlier[1] if earlier is not None else _NO_STAGES
        if checkpoint_stage is not None:
            stages = stages | {checkpoint_stage}  # a new set only when there is a stage
        writes[workflow_id] = (document, stages)
        self._schedule()

    def _drop_deferred(self, workflow_id: str) -> None:
        if self._deferred.pop(workflow_id, None) is None or self._deferred:
            return
        # Nothing left held back: no timer to wake the loop mid-sleep (one workflow's
        # 10 ms stages lost ~0.5 ms to each such wake-up: asyncio rounds the rest up).
        if self._deferred_timer is not None:
            self._deferred_timer.cancel()
            self._deferred_timer = None
        self._deferred_order.clear()

    def _schedule(self) -> None:
        # Sent once per loop iteration: every write queued in this one shares the frame.
        if not self._pending.scheduled:
            self._pending.scheduled = True
            assert self._loop is not None
            self._loop.call_soon(self._send_pending)

    def _send_pending(self) -> None:
        if self._restarting is not None:
            return  # still pending and scheduled: sent once the writer is back
        batch, self._pending = self._pending, _Batch()
        if not batch.scheduled:
            return  # close() sent it already
        if self._broken is not None or self._link is None:
            error = self._broken or RuntimeError("the store was closed before this write")
            _resolve(batch.waiters, {w: error for w in batch.writes})
            return
        # Snapshots still pending are taken here: the record is the state as it is now.
        items = []
        for workflow_id, (document, stages) in batch.writes.items():
            if not isinstance(document, bytes):
                document = _canonical(document())
            state_path, checkpoints = self._file_paths_of(workflow_id, stages)
            items.append((workflow_id, document, state_path, checkpoints))
        appends = [(str(path), documents) for path, documents in batch.appends.items()]
        self._sequence += 1
        sent = _Sent(self._sequence, encode_frame(("W", self._sequence, items, appends)),
                     batch.waiters, tuple(batch.writes))
        self._sent.append(sent)
        self._unflushed = True
        self._link.send_frame(sent.frame)
        if batch.wanted:
            self._wanted = self._sequence
        self._watch_answers()

    def _received(self, message: tuple[Any, ...]) -> None:
        """A frame from the writer process (see ``_writer.py`` for what each says)."""
        kind = message[0]
        if kind == "A":
            self._answered = message[1]
            self._watch_answers()
            while self._sent and self._sent[0].sequence <= message[1]:
                self._to_wake.extend(self._sent.popleft().waiters)
                self.batches_written += 1
            if not self._wake_scheduled:
                self._wake_scheduled = True
                assert self._loop is not None
                self._loop.call_soon(self._wake_some)
        elif kind == "E":
            _, _, last, number, path, text = message
            error = _storage_error(Path(path), OSError(number, text))
            self._answered = last
            self._watch_answers()
            while self._sent and self._sent[0].sequence <= last:
                sent = self._sent.popleft()
                _resolve(sent.waiters, dict.fromkeys(sent.workflow_ids, error))
        elif kind == "J":
            assert self._link is not None
            self._link.journal_path = message[1]
        elif kind == "F":
            flushed = self._flushes.pop(message[1], None)
            if flushed is not None and not flushed.done():
                flushed.set_result(None)
            self._watch_answers()
        elif kind == "S":
            self.files_written += message[1]
            self.materialize_errors.extend(message[2])

    def _wake_some(self) -> None:
        """Wake WAKE_CHUNK durable waiters this iteration, the rest in the next ones: one
        queue for the whole store, so acknowledgements of several batches arriving
        together never wake more than one chunk per iteration."""
        self._wake_chunk()
        if self._to_wake:
            assert self._loop is not None
            self._loop.call_soon(self._wake_some)
        else:
            self._wake_scheduled = False

    def _wake_chunk(self) -> None:
        to_wake = self._to_wake
        for _ in range(min(WAKE_CHUNK, len(to_wake))):
            _, waiter = to_wake.popleft()
            if not waiter.done():  # its task was cancelled; the write happened all the same
                waiter.set_result(None)

    def _writer_ended(self) -> None:
        """Its output ended: after close() that is the end; otherwise it died."""
        link = self._link
        if link is None or (link.finishing and not self._sent and not self._flushes):
            return
        if link.finishing or self._restarts >= WRITER_RESTARTS:
            self._fail_everything_sent(link, None)
            return
        self._restarts += 1
        self._restarting = asyncio.ensure_future(self._restart_writer(link))

    async def _restart_writer(self, dead: WriterLink) -> None:
        """Start a new writer and send it every batch the dead one did not acknowledge.

        Records are whole states with revisions, so one written twice (durable in the dead
        writer's journal, unacknowledged, sent again) is harmless; its journal is replayed
        into state files first, once the kernel has freed its lock.
        """
        status = await dead.wait_closed()
        logger.warning("The state writer process %d stopped (status %d); restarting it "
                       "and sending it the %d batches it had not made durable",
                       dead.process.pid, status, len(self._sent))
        try:
            link = await self._start_writer()
        except Exception as error:
            self._restarting = None
            self._fail_everything_sent(dead, error)
            return
        self._link, self._restarting = link, None
        for sent in self._sent:
            link.send_frame(sent.frame)
        for sequence in self._flushes:
            link.send(("F", sequence))
        if self._pending.scheduled:
            self._send_pending()

    def _fail_everything_sent(self, link: WriterLink, cause: BaseException | None) -> None:
        pid = link.process.pid
        because = f": {cause}" if cause is not None else ""
        self._broken = _storage_error(Path(link.journal_path), OSError(
            errno.EIO, f"the writer process {pid} stopped unexpectedly{because}; writes it "
                       "had not acknowledged are not durable (the journal is replayed when "
                       "the store opens next, and resuming the workflows continues them)"))
        while self._sent:
            sent = self._sent.popleft()
            _resolve(sent.waiters, dict.fromkeys(sent.workflow_ids, self._broken))
        for flushed in self._flushes.values():
            if not flushed.done():
                flushed.set_exception(self._broken)
        self._flushes.clear()
        if self._pending.scheduled:
            self._send_pending()  # fails those too, with the same error

    async def _flush_state_files(self) -> None:
        """Have the writer write every state only its journal holds, before a read."""
        if self._link is None or not self._unflushed or self._broken is not None:
            return
        assert self._loop is not None
        self._sequence += 1
        flushed = self._flushes[self._sequence] = self._loop.create_future()
        self._unflushed = False
        self._link.send(("F", self._sequence))
        self._watch_answers()
        await flushed

    # --- journal replay (at open, in a thread)

    def _prepare_journal_directory(self) -> None:
        self._ensure_dir(self.journal_directory)
        self._replay_orphan_journals()

    def _replay_orphan_journals(self) -> None:
        """Bring state files up to date from journals left by processes that died."""
        for path in sorted(self.journal_directory.glob("journal-*.log")):
            try:
                fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
            except OSError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # its process is alive and owns those workflows
                complete = self._replay(path)
                if self.durable:
                    self._sync_filesystem()
                if complete:  # else kept, the only copy of what could not be written
                    os.unlink(path)
            finally:
                os.close(fd)

    def _replay(self, journal: Path) -> bool:
        complete = True
        for workflow_id, (revision, document) in _newest_per_workflow(journal).items():
            if revision <= self._materialized_revision(workflow_id):
                continue
            path = self.state_path(workflow_id)
            try:
                self._write_atomically(path, document)
            except OSError as error:
                complete = False
                logger.warning("Could not write %s from the journal %s: %s; the journal is "
                               "kept and replayed again at the next start", path, journal,
                               error.strerror or error)
                continue
            self.replayed_workflows += 1
        return complete

    def _materialized_revision(self, workflow_id: str) -> int:
        path = self.state_path(workflow_id)
        try:
            state = decode_document(_read_bounded(path), str(path))
        except (OSError, StateCorruptedError):
            return -1
        return int(state.get("revision") or 0)

    def _ensure_dir(self, directory: Path, *, workflow: bool = False) -> None:
        if directory not in self._made_dirs:
            (make_workflow_directory if workflow else make_private_directory)(directory)
            self._made_dirs.add(directory)

    def _write_atomically(self, path: Path, document: bytes) -> None:
        self._ensure_dir(path.parent, workflow=True)
        write_file(str(path), document, self._temporary_suffix, self._fsync_each)

    def _sync_filesystem(self) -> None:
        sync_filesystem(_SYNCFS, str(self.state_directory), str(self.checkpoint_directory))

    # --- reads

    async def load(self, workflow_id: str) -> LoadedState:
        validate_workflow_id(workflow_id)
        await self._flush_state_files()
        return await asyncio.to_thread(self._load_sync, workflow_id)

    def _load_sync(self, workflow_id: str) -> LoadedState:
        path = self.state_path(workflow_id)
        _refuse_symlinked_directory(path.parent)
        problems: list[str] = []
        try:
            state = _check_state(decode_document(_read_bounded(path), str(path)), workflow_id,
                                 str(path))
            return LoadedState(state, str(path))
        except FileNotFoundError:
            if not path.parent.exists():
                raise WorkflowNotFoundError(
                    f"no workflow {workflow_id} under {self.state_directory}") from None
            problems.append(f"{path}: missing")
        except StateCorruptedError as error:
            problems.append(str(error))
        except OSError as error:
            problems.append(f"{path}: unreadable: {error.strerror}")
        return self._newest_checkpoint(workflow_id, problems)

    def _newest_checkpoint(self, workflow_id: str, problems: list[str]) -> LoadedState:
        best: tuple[float, str, dict[str, Any]] | None = None
        for candidate in self.checkpoint_directory.glob(f"{workflow_id}_checkpoint_*.json"):
            try:
                state = _check_state(decode_document(_read_bounded(candidate), str(candidate)),
                                     workflow_id, str(candidate))
            except (StateCorruptedError, OSError) as error:
                problems.append(str(error))
                continue
            key = (float(state.get("revision") or 0), str(candidate), state)
            if best is None or key[:2] > best[:2]:
                best = key
        if best is None:
            if problems == [f"{self.state_path(workflow_id)}: missing"]:
                raise _NeverSaved(
                    f"workflow {workflow_id} was claimed but never saved: its process "
                    "stopped before its first stage began, so nothing happened; start it "
                    "again")
            raise StateCorruptedError(
                str(self.state_path(workflow_id)),
                "no valid state or checkpoint: " + "; ".join(problems))
        return LoadedState(best[2], best[1], tuple(problems))

    async def list_states(self, statuses: Iterable[str] | None = None) -> list[LoadedState]:
        wanted = frozenset(statuses) if statuses is not None else None
        await self._flush_state_files()
        return await asyncio.to_thread(self._list_sync, wanted)

    def _list_sync(self, wanted: frozenset[str] | None) -> list[LoadedState]:
        found: list[LoadedState] = []
        try:
            entries = list(os.scandir(self.state_directory))
        except FileNotFoundError:
            return found
        for entry in entries:
            try:
                workflow_id = validate_workflow_id(entry.name)
            except ValueError:
                continue  # not ours (or hostile): never build a path from it
            try:
                loaded = self._load_sync(workflow_id)
            except _NeverSaved:
                continue  # only a lock file: nothing to list or resume
            except (StateCorruptedError, WorkflowNotFoundError) as error:
                found.append(LoadedState({"workflow_id": workflow_id, "status": "corrupted",
                                          "error": str(error)}, str(entry.path), (str(error),)))
                continue
            if wanted is None or loaded.state.get("status") in wanted:
                found.append(loaded)
        return found

    # --- claims

    async def claim(self, workflow_id: str) -> Claim:
        claims, refused = await self.claim_many([workflow_id])
        if refused:
            raise WorkflowLockedError(
                f"workflow {workflow_id} is already running (its lock in "
                f"{self.claims_path(workflow_id)} is held); not starting it twice")
        return claims[0]

    def claims_path(self, workflow_id: str) -> Path:
        """The lock file holding ``workflow_id``'s claim (one byte of it)."""
        shard, _ = _claim_position(workflow_id)
        return self.state_directory / CLAIMS_DIRECTORY / f"{shard:02x}.lock"

    async def claim_many(self, workflow_ids: Iterable[str]) -> tuple[list[Claim], list[str]]:
        ids = [validate_workflow_id(w) for w in workflow_ids]
        await self._open_claim_files()
        # No await from here on: two tasks of this loop cannot both win one workflow.
        claims: list[Claim] = []
        refused: list[str] = []
        for workflow_id in ids:
            if workflow_id in self._claimed or not self._lock(workflow_id, fcntl.F_WRLCK):
                refused.append(workflow_id)
            else:
                self._claimed.add(workflow_id)
                claims.append(_FileClaim(workflow_id, self))
        return claims, refused

    async def _open_claim_files(self) -> None:
        if not self._claim_fds:
            opening = self._opening_claims
            if opening is None or (opening.done() and (opening.cancelled()
                                                      or opening.exception() is not None)):
                opening = self._opening_claims = asyncio.ensure_future(
                    asyncio.to_thread(self._open_claim_files_sync))
            # Shielded, and kept: a claimer cancelled meanwhile leaves the descriptors to
            # the next one.
            self._claim_fds = await asyncio.shield(opening)

    def _open_claim_files_sync(self) -> list[int]:
        """Open (creating once per state directory) every claims file.

        Every claim is a lock on one byte of one of them: Linux open file description
        locks, released by the kernel when the descriptor is closed or its process dies,
        and in conflict with other descriptors' locks even in this process (another
        store). Files opened once, not per workflow: a lock file per workflow cost a
        directory and a file creation, ~1 ms of kernel time each on this machine's disk.
        """
        directory = self.state_directory / CLAIMS_DIRECTORY
        fds: list[int] = []
        try:
            self._ensure_dir(directory)
            for shard in range(CLAIM_SHARDS):
                path = directory / f"{shard:02x}.lock"
                fds.append(os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600))
        except OSError as error:
            for fd in fds:
                os.close(fd)
            raise _storage_error(directory, error) from None
        return fds

    def _lock(self, workflow_id: str, kind: int) -> bool:
        """Lock (F_WRLCK) or unlock (F_UNLCK) the claim's byte; False if held elsewhere."""
        shard, byte = _claim_position(workflow_id)
        try:
            fcntl.fcntl(self._claim_fds[shard], _F_OFD_SETLK,
                        _FLOCK.pack(kind, os.SEEK_SET, byte, 1, 0))
        except OSError as error:
            if error.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise _storage_error(self.claims_path(workflow_id), error) from None
        return True

    def _release(self, workflow_id: str) -> None:
        self._claimed.discard(workflow_id)
        if self._claim_fds:
            self._lock(workflow_id, fcntl.F_UNLCK)
            if self._link is None and not self._claimed:  # the store closed before
                self._close_claim_files()

    def _close_claim_files(self) -> None:
        fds, self._claim_fds = self._claim_fds, []
        self._opening_claims = None
        for fd in fds:
            os.close(fd)


def _resolve(waiters: list[tuple[str, asyncio.Future[None]]],
             failures: Mapping[str, BaseException]) -> None:
    for workflow_id, waiter in waiters:
        if waiter.done():
            continue  # its task was cancelled; the write happened all the same
        failure = failures.get(workflow_id)
        if failure is None:
            waiter.set_result(None)
        else:
            waiter.set_exception(failure)


# Waiters woken per loop iteration once their batch is durable. Each wakes a workflow that
# runs on to its next stage boundary (~5-10 us): 256 keep an iteration near 2 ms, where
# waking a 3,000-save batch at once held the loop for 20-30 ms.
WAKE_CHUNK = 256


def _storage_error(path: Path, error: OSError) -> BaseException:
    """Name the file in the error; disk-full and friends become ResourceError."""
    message = f"cannot write {path}: {error.strerror or error}"
    if classify(error).value == "resource":
        return ResourceError(message + " (free some space, then resume the workflow)")
    wrapped = OSError(error.errno, message)
    return wrapped


# --------------------------------------------------------------------------- memory store


class _MemoryClaim:
    __slots__ = ("_registry", "workflow_id")

    def __init__(self, workflow_id: str, registry: set[str]) -> None:
        self.workflow_id = workflow_id
        self._registry = registry

    def release(self) -> None:
        self._registry.discard(self.workflow_id)


class MemoryStore:
    """States kept in this process only: for tests on a fake clock and for benchmarks.

    It still encodes and validates every document, so what it keeps is what a file holds.
    """

    def __init__(self) -> None:
        self.documents: dict[str, bytes] = {}
        self.checkpoints: dict[tuple[str, str], bytes] = {}
        self._pending: dict[str, Snapshot] = {}  # save_soon: encoded only if never superseded
        self._claimed: set[str] = set()
        self.saves = 0

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def save_soon(self, workflow_id: str, snapshot: Snapshot, *,
                  promptly: bool = False) -> None:
        self._pending[workflow_id] = snapshot

    async def save(self, workflow_id: str, snapshot: Snapshot, *,
                   checkpoint_stage: str | None = None) -> None:
        await self.save_nowait(workflow_id, snapshot, checkpoint_stage=checkpoint_stage)

    def save_nowait(self, workflow_id: str, snapshot: Snapshot, *,
                    checkpoint_stage: str | None = None,
                    lazy: bool = False) -> asyncio.Future[None]:
        self._keep(workflow_id, snapshot, checkpoint_stage)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    def expedite(self) -> None:
        return None  # its futures are done when returned

    def _keep(self, workflow_id: str, snapshot: Snapshot, checkpoint_stage: str | None) -> None:
        self._pending.pop(workflow_id, None)
        document = encode_document(snapshot())
        self.documents[workflow_id] = document
        if checkpoint_stage is not None:
            self.checkpoints[(workflow_id, checkpoint_stage)] = document
        self.saves += 1

    def archive(self, state: dict[str, Any]) -> None:
        return None

    async def load(self, workflow_id: str) -> LoadedState:
        validate_workflow_id(workflow_id)
        self._flush_pending()
        document = self.documents.get(workflow_id)
        if document is None:
            raise WorkflowNotFoundError(f"no workflow {workflow_id} in this memory store")
        return LoadedState(decode_document(document, f"memory:{workflow_id}"),
                           f"memory:{workflow_id}")

    async def list_states(self, statuses: Iterable[str] | None = None) -> list[LoadedState]:
        wanted = frozenset(statuses) if statuses is not None else None
        self._flush_pending()
        states = [LoadedState(decode_document(d, f"memory:{w}"), f"memory:{w}")
                  for w, d in self.documents.items()]
        return [s for s in states if wanted is None or s.state.get("status") in wanted]

    def _flush_pending(self) -> None:
        for workflow_id, snapshot in self._pending.items():
            self.documents[workflow_id] = encode_document(snapshot())
        self._pending.clear()

    async def claim(self, workflow_id: str) -> Claim:
        claims, refused = await self.claim_many([workflow_id])
        if refused:
            raise WorkflowLockedError(f"workflow {workflow_id} is already running")
        return claims[0]

    async def claim_many(self, workflow_ids: Iterable[str]) -> tuple[list[Claim], list[str]]:
        claims: list[Claim] = []
        refused: list[str] = []
        for workflow_id in workflow_ids:
            if workflow_id in self._claimed:
                refused.append(workflow_id)
            else:
                self._claimed.add(workflow_id)
                claims.append(_MemoryClaim(workflow_id, self._claimed))
        return claims, refused

    def describe(self, workflow_id: str) -> dict[str, str]:
        return {"state_file": f"memory:{workflow_id}"}
