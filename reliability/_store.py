"""Durable workflow state: the ``Store`` interface, the embedded ``FileStore``, ``MemoryStore``.

The interface is shaped for a shared database too (a PostgreSQL store with lease rows):
everything is async, workflows are listed by status, and running one needs an exclusive
claim (here a ``flock``-ed lock file, released by the kernel if the process dies).

FileStore layout (the spec's paths, under the project root)::

    {state_directory}/{id}/state.json             current state, atomic, checksummed
    {state_directory}/{id}/lock                   the claim
    {state_directory}/{id}/history.jsonl.gz       compressed earlier states
    {checkpoint_directory}/{id}_checkpoint_{stage}.json

Every write goes through one group-commit writer (DESIGN rule 4): writes queued while a
batch is on disk form the next batch, coalesced per file (newest wins), written by one
dedicated thread as temp file + rename, then made durable with a single ``syncfs`` (or an
``fsync`` per file where ``syncfs`` is missing). A workflow awaits only its own files.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import ctypes.util
import fcntl
import gzip
import hashlib
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
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

__all__ = ["SCHEMA_VERSION", "Claim", "FileStore", "LoadedState", "MemoryStore", "Store",
           "decode_document", "encode_document", "make_private_directory"]

Snapshot = Callable[[], dict[str, Any]]
SCHEMA_VERSION = 1
MAX_STATE_BYTES = 16 * 1024 * 1024  # a state file larger than this is refused, not parsed
JOURNAL_LIMIT = 256 * 1024 * 1024  # past this, appends move to a fresh journal
# An informational write (a stage's start) waits this long before it joins a batch: a
# stage that ends sooner is recorded by its completion alone, so most stages of a busy
# runtime cost one encoded state, not two. Long stages still show up as started.
INFORMATIONAL_DELAY = 0.05


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
                    checkpoint_stage: str | None = None) -> asyncio.Future[None]:
        """Like ``save``, but returns at once with a future that is done when the write is
        durable (or failed). Writes are durable in the order they were asked for."""
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
    body = _canonical(state)
    digest = hashlib.sha256(body).hexdigest()
    return b'{"schema_version":%d,"checksum":"sha256:%s","state":%s}\n' % (
        SCHEMA_VERSION, digest.encode(), body)


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


def make_private_directory(directory: Path) -> None:
    """Create ``directory`` and each missing parent with mode 0700.

    ``Path.mkdir(mode=0o700, parents=True)`` gives the parents it creates the umask's
    default (usually 0755), which would leave ``.github/workflow-states`` readable by all.
    """
    missing: list[Path] = []
    current = directory
    while not current.is_dir() and current != current.parent:
        missing.append(current)
        current = current.parent
    for path in reversed(missing):
        with contextlib.suppress(FileExistsError):  # made meanwhile by another writer
            path.mkdir(mode=0o700)


def _check_state(state: dict[str, Any], workflow_id: str, path: str) -> dict[str, Any]:
    if state.get("workflow_id") != workflow_id:
        raise StateCorruptedError(path, f"belongs to {state.get('workflow_id')!r}, "
                                        f"not {workflow_id}")
    return state


# --------------------------------------------------------------------------- file store


class _FileClaim:
    __slots__ = ("_fd", "_registry", "workflow_id")

    def __init__(self, workflow_id: str, fd: int, registry: set[str]) -> None:
        self.workflow_id = workflow_id
        self._fd = fd
        self._registry = registry

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = -1
            self._registry.discard(self.workflow_id)


def _load_syncfs() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        function: Callable[[int], int] = libc.syncfs
    except (OSError, AttributeError):
        return None
    return function


_SYNCFS = _load_syncfs()


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
    # workflow ID -> (encoded document, or a snapshot to take at flush time; stages whose
    # checkpoint file is wanted): coalesced per workflow, the newest write wins.
    writes: dict[str, tuple[bytes | Snapshot, frozenset[str]]] = field(default_factory=dict)
    appends: dict[Path, list[bytes]] = field(default_factory=dict)
    waiters: list[tuple[str, asyncio.Future[None]]] = field(default_factory=list)
    scheduled: bool = False


class FileStore:
    """The embedded store: files under the project root, one group-commit writer thread.

    Durability point: a batch is durable once appended to this process's journal
    (``{state_directory}/_journal/journal-*.log``) and ``fdatasync``-ed; one append and
    one sync for thousands of workflows' writes. ``state.json`` and checkpoint files are
    then materialized from the batch every ``checkpoint_frequency`` stages and at the end
    of each workflow, without a sync each. Invariant: every state newer than its
    ``state.json`` is in a journal that is not deleted until those files are synced. A
    journal whose process died (its ``flock`` is free) is replayed into ``state.json``
    files by the next store that opens, before anything else reads them.
    """

    def __init__(self, state_directory: Path, checkpoint_directory: Path, *,
                 durable: bool = True, journal_limit: int = JOURNAL_LIMIT) -> None:
        self.state_directory = state_directory
        self.checkpoint_directory = checkpoint_directory
        self.journal_directory = state_directory / "_journal"
        self.durable = durable
        self._journal_limit = journal_limit
        self._executor: ThreadPoolExecutor | None = None
        self._materializer: ThreadPoolExecutor | None = None
        self._pending = _Batch()
        self._flusher: asyncio.Task[None] | None = None
        self._wakeup: asyncio.Event | None = None
        self._claimed: set[str] = set()
        self._deferred: dict[str, tuple[float, Snapshot]] = {}  # informational, held back
        self._deferred_order: collections.deque[tuple[float, str]] = collections.deque()
        self._deferred_timer: asyncio.TimerHandle | None = None
        self._claim_requests: list[tuple[list[str], asyncio.Future[list[int]]]] = []
        self._claim_tasks: set[asyncio.Task[None]] = set()
        self._made_dirs: set[Path] = set()
        self._file_paths: dict[str, dict[str, str]] = {}  # workflow -> {stage or "": path}
        self._temporary_suffix = f".tmp-{os.getpid()}"
        self._fsync_each = durable and _SYNCFS is None
        self._closing = False
        # Writer-thread state. Invariant: _newest holds, per workflow, the newest
        # journal document whose state.json has not been written from it yet.
        self._journal_fd = -1
        self._journal_path: Path | None = None
        self._journal_size = 0
        self._newest: dict[str, bytes] = {}
        self._handoff: dict[str, tuple[bytes, frozenset[str]]] = {}  # journal -> state files
        self._handoff_lock = threading.Lock()  # guards _newest and _handoff
        self._handoff_scheduled = False
        self.materialize_errors: list[str] = []
        self.batches_written = 0
        self.files_written = 0
        self.replayed_workflows = 0

    # --- lifecycle

    async def open(self) -> None:
        if self._executor is not None:
            return
        # One thread: batches are serial by design, and the loop's default pool (shared
        # with DNS lookups) is never flooded by thousands of workflows' writes.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="workflow-journal")
        self._materializer = ThreadPoolExecutor(max_workers=1,
                                                thread_name_prefix="workflow-state-files")
        await asyncio.get_running_loop().run_in_executor(self._executor, self._open_journal)
        self._wakeup = asyncio.Event()
        self._flusher = asyncio.create_task(self._flush_forever(), name="workflow-store-writer")

    async def close(self) -> None:
        if self._executor is None:
            return
        if self._deferred_timer is not None:
            self._deferred_timer.cancel()
        self._promote_deferred(everything=True)
        self._closing = True
        assert self._wakeup is not None and self._flusher is not None
        self._wakeup.set()
        with contextlib.suppress(asyncio.CancelledError):
            await self._flusher
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor,
                                                             self._retire_journal)
        finally:
            self._executor.shutdown(wait=True)
            self._executor = None
            if self._materializer is not None:
                self._materializer.shutdown(wait=True)
                self._materializer = None

    # --- paths

    def state_path(self, workflow_id: str) -> Path:
        return self.state_directory / validate_workflow_id(workflow_id) / "state.json"

    def checkpoint_path(self, workflow_id: str, stage: str) -> Path:
        safe_stage = "".join(c if c.isalnum() or c in "-_" else "_" for c in stage)[:80]
        return self.checkpoint_directory / (
            f"{validate_workflow_id(workflow_id)}_checkpoint_{safe_stage}.json")

    def describe(self, workflow_id: str) -> dict[str, str]:
        return {"state_file": str(self.state_path(workflow_id)),
                "checkpoint_glob": str(self.checkpoint_directory / f"{workflow_id}_checkpoint_*"),
                "history_file": str(self.state_path(workflow_id).parent / "history.jsonl.gz"),
                "journal_directory": str(self.journal_directory)}

    # --- writes (event loop side)

    def save_soon(self, workflow_id: str, snapshot: Snapshot, *,
                  promptly: bool = False) -> None:
        # Held back INFORMATIONAL_DELAY (unless promptly), then taken at flush time, and
        # only if no durable save of this workflow came meanwhile (it says all this would).
        if self._executor is None:
            raise RuntimeError("the store is not open (use 'async with Runtime(...)')")
        if promptly:
            # In the next batch, replacing any write of it there: taken at flush time, the
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
        if self._executor is None:  # closed meanwhile: close() already promoted them all
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
                    checkpoint_stage: str | None = None) -> asyncio.Future[None]:
        # Encoded now: the cost is spread over the loop's iterations instead of one burst
        # at flush time, and the state cannot move on before it is written.
        self._queue(workflow_id, encode_document(snapshot()), checkpoint_stage)
        # A future of its own: cancelling one waiter never disturbs the others in the batch.
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.waiters.append((workflow_id, waiter))
        return waiter

    def archive(self, state: dict[str, Any]) -> None:
        path = self.state_path(state["workflow_id"]).parent / "history.jsonl.gz"
        self._pending.appends.setdefault(path, []).append(encode_document(state))
        self._schedule()

    def _queue(self, workflow_id: str, document: bytes | Snapshot,
               checkpoint_stage: str | None) -> None:
        if self._executor is None:
            raise RuntimeError("the store is not open (use 'async with Runtime(...)')")
        if isinstance(document, bytes):
            self._deferred.pop(workflow_id, None)  # a durable write says it all
        writes = self._pending.writes
        earlier = writes.get(workflow_id)
        stages = earlier[1] if earlier is not None else _NO_STAGES
        if checkpoint_stage is not None:
            stages = stages | {checkpoint_stage}  # a new set only when there is a stage
        writes[workflow_id] = (document, stages)
        self._schedule()

    def _schedule(self) -> None:
        if not self._pending.scheduled:
            self._pending.scheduled = True
            assert self._wakeup is not None
            self._wakeup.set()

    async def _flush_forever(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending.scheduled:
                # Checked before every wait, not after: close() may find a batch still
                # pending, and its one wake-up must not be spent without ending here.
                if self._closing:
                    return
                await self._wakeup.wait()
                self._wakeup.clear()
                continue
            batch, self._pending = self._pending, _Batch()
            # Snapshots still pending are taken here, on the loop: the thread never sees a
            # state the loop is still changing.
            items = [(w, d if isinstance(d, bytes) else encode_document(d()), stages)
                     for w, (d, stages) in batch.writes.items()]
            data = b"".join(document for _, document, _ in items)
            try:
                retired = await loop.run_in_executor(self._executor, self._write_batch, data)
            except BaseException as error:
                if isinstance(error, OSError):
                    error = _storage_error(self._journal_path or self.journal_directory, error)
                _resolve(batch.waiters, {w: error for w in batch.writes})
                if isinstance(error, asyncio.CancelledError):
                    raise
                continue
            self._hand_off(items, batch.appends, retired)
            _wake_in_chunks(loop, batch.waiters)
            self.batches_written += 1

    # --- writes (writer thread side)

    def _write_batch(self, data: bytes) -> tuple[int, Path] | None:
        """Append one batch to the journal and sync it: the writer thread's only job.

        Returns the retired journal (descriptor, path) when this append filled it up.
        """
        self._append_to_journal(data)
        if self._journal_size > self._journal_limit:
            return self._rotate_journal()
        return None

    def _hand_off(self, items: list[tuple[str, bytes, frozenset[str]]],
                  appends: dict[Path, list[bytes]], retired: tuple[int, Path] | None) -> None:
        """After a batch is durable (on the loop): queue its state files for the second
        thread. Work it has not reached yet is coalesced, the newest document winning."""
        assert self._materializer is not None
        with self._handoff_lock:
            for workflow_id, document, stages in items:
                self._newest[workflow_id] = document
                earlier = self._handoff.get(workflow_id)
                if earlier is not None and earlier[1]:
                    stages = stages | earlier[1]
                self._handoff[workflow_id] = (document, stages)
            if not self._handoff_scheduled:
                self._handoff_scheduled = True
                self._materializer.submit(self._materialize_handoff)
        if appends:
            self._materializer.submit(self._append_history, appends)
        if retired is not None:
            # Submitted after this batch's documents are in _newest, so the old journal is
            # deleted only once everything it holds is in synced state files.
            self._materializer.submit(self._retire, *retired)

    def _materialize_handoff(self) -> None:
        with self._handoff_lock:
            items, self._handoff = self._handoff, {}
            self._handoff_scheduled = False
        for workflow_id, (document, stages) in items.items():
            if not stages:
                continue  # the journal and _newest hold it until a checkpoint or the end
            try:
                self._materialize(workflow_id, document, stages)
            except OSError as error:
                # The journal holds it durably; the files are written again later.
                self.materialize_errors.append(f"{self.state_path(workflow_id)}: {error}")

    def _append_history(self, appends: dict[Path, list[bytes]]) -> None:
        for path, documents in appends.items():
            with contextlib.suppress(OSError):  # history is a convenience, not the record
                self._ensure_dir(path.parent)
                with gzip.open(path, "ab") as history:
                    history.writelines(documents)

    def _append_to_journal(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._journal_fd, view):]
        except OSError:
            # A torn batch would glue onto the next one's first line; cut it off. (If even
            # this fails, replay skips the undecodable line: that batch was never durable.)
            with contextlib.suppress(OSError):
                os.ftruncate(self._journal_fd, self._journal_size)
            raise
        self._journal_size += len(data)
        if self.durable:
            os.fdatasync(self._journal_fd)

    def _materialize(self, workflow_id: str, document: bytes, stages: Iterable[str]) -> None:
        # Plain strings, built once per workflow and stage: this thread holds the GIL for
        # every Python step, and pathlib's joins cost the event loop more than the writes.
        paths = self._file_paths.get(workflow_id)
        if paths is None:
            if len(self._file_paths) > 50_000:
                self._file_paths.clear()  # bounded: finished workflows' paths go stale
            state_path = self.state_path(workflow_id)
            self._ensure_dir(state_path.parent)
            self._ensure_dir(self.checkpoint_directory)
            paths = self._file_paths[workflow_id] = {"": str(state_path)}
        _write_file(paths[""], document, self._temporary_suffix, self._fsync_each)
        for stage in stages:
            path = paths.get(stage)
            if path is None:
                path = paths[stage] = str(self.checkpoint_path(workflow_id, stage))
            _write_file(path, document, self._temporary_suffix, self._fsync_each)
        with self._handoff_lock:
            if self._newest.get(workflow_id) is document:  # nothing newer came meanwhile
                del self._newest[workflow_id]
        self.files_written += 1

    def _materialize_all(self) -> None:
        """Write every state that only the journal holds, then sync them to disk."""
        self._materialize_handoff()
        with self._handoff_lock:
            remaining = list(self._newest.items())
        for workflow_id, document in remaining:
            self._materialize(workflow_id, document, ())
        if self.durable:
            self._sync_filesystem()

    def _rotate_journal(self) -> tuple[int, Path]:
        """Continue in a fresh journal; the full one is retired by the state-file thread.

        The old journal stays locked and on disk until every state it holds is in a
        synced state file, so appends never wait for that work.
        """
        old_fd, old_path = self._journal_fd, self._journal_path
        assert old_path is not None
        self._start_journal()
        return old_fd, old_path

    def _retire(self, fd: int, path: Path) -> None:
        self._materialize_all()
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    def _open_journal(self) -> None:
        self._ensure_dir(self.journal_directory)
        self._replay_orphan_journals()
        self._start_journal()

    def _start_journal(self) -> None:
        name = f"journal-{os.getpid()}-{os.urandom(4).hex()}.log"
        self._journal_path = self.journal_directory / name
        fd = os.open(self._journal_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW,
                     0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)  # held while this process lives: "not an orphan"
        self._journal_fd = fd
        self._journal_size = 0

    def _retire_journal(self) -> None:
        if self._journal_fd < 0:
            return
        assert self._materializer is not None and self._journal_path is not None
        self._materializer.submit(self._retire, self._journal_fd, self._journal_path).result()
        self._journal_fd = -1

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
                newest = _newest_per_workflow(path)
                for workflow_id, (revision, document) in newest.items():
                    if revision > self._materialized_revision(workflow_id):
                        self._write_atomically(self.state_path(workflow_id), document)
                        self.replayed_workflows += 1
                if self.durable:
                    self._sync_filesystem()
                os.unlink(path)
            finally:
                os.close(fd)

    def _materialized_revision(self, workflow_id: str) -> int:
        path = self.state_path(workflow_id)
        try:
            state = decode_document(_read_bounded(path), str(path))
        except (OSError, StateCorruptedError):
            return -1
        return int(state.get("revision") or 0)

    def _ensure_dir(self, directory: Path) -> None:
        if directory not in self._made_dirs:
            make_private_directory(directory)
            self._made_dirs.add(directory)

    def _write_atomically(self, path: Path, document: bytes) -> None:
        self._ensure_dir(path.parent)
        _write_file(str(path), document, self._temporary_suffix, self._fsync_each)

    def _sync_filesystem(self) -> None:
        if _SYNCFS is not None:
            fd = os.open(self.state_directory, os.O_RDONLY)
            try:
                if _SYNCFS(fd) != 0:
                    errno = ctypes.get_errno()
                    raise OSError(errno, os.strerror(errno), str(self.state_directory))
            finally:
                os.close(fd)
            return
        # Without syncfs each file was fsynced as written; the directories remain.
        for directory in (self.state_directory, self.checkpoint_directory):
            fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    # --- reads

    async def load(self, workflow_id: str) -> LoadedState:
        validate_workflow_id(workflow_id)
        return await asyncio.to_thread(self._load_sync, workflow_id)

    def _load_sync(self, workflow_id: str) -> LoadedState:
        path = self.state_path(workflow_id)
        _refuse_symlinked_directory(path.parent)
        with self._handoff_lock:
            newest = self._newest.get(workflow_id)
        if newest is not None:  # durable in this process's journal, not yet in state.json
            source = f"{self._journal_path} (journal)"
            return LoadedState(decode_document(newest, source), source)
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
                f"workflow {workflow_id} is already running (its lock "
                f"{self.state_path(workflow_id).parent / 'lock'} is held); not starting it twice")
        return claims[0]

    async def claim_many(self, workflow_ids: Iterable[str]) -> tuple[list[Claim], list[str]]:
        ids = [validate_workflow_id(w) for w in workflow_ids]
        free = [w for w in ids if w not in self._claimed]
        refused = [w for w in ids if w in self._claimed]
        self._claimed.update(free)  # reserve now, so two tasks in this loop cannot both win
        try:
            fds = await self._lock_soon(free)
        except BaseException:
            self._claimed.difference_update(free)
            raise
        claims: list[Claim] = []
        for workflow_id, fd in zip(free, fds, strict=True):
            if fd < 0:
                self._claimed.discard(workflow_id)
                refused.append(workflow_id)
            else:
                claims.append(_FileClaim(workflow_id, fd, self._claimed))
        return claims, refused

    def _lock_soon(self, workflow_ids: list[str]) -> asyncio.Future[list[int]]:
        """The lock descriptors of ``workflow_ids``, taken together with every other claim
        asked for in this loop iteration: one thread job for a burst of thousands of
        starts, instead of one thread hop each."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[list[int]] = loop.create_future()
        if not self._claim_requests:
            loop.call_soon(self._start_claim_batch)
        self._claim_requests.append((workflow_ids, waiter))
        return waiter

    def _start_claim_batch(self) -> None:
        requests, self._claim_requests = self._claim_requests, []
        task = asyncio.get_running_loop().create_task(self._claim_batch(requests))
        self._claim_tasks.add(task)  # a strong reference until it ends
        task.add_done_callback(self._claim_tasks.discard)

    async def _claim_batch(self, requests: list[tuple[list[str], asyncio.Future[list[int]]]],
                           ) -> None:
        everything = [w for ids, _ in requests for w in ids]
        try:
            fds = await asyncio.to_thread(self._lock_all, everything)
        except BaseException as error:
            for _, waiter in requests:
                if not waiter.done():
                    waiter.set_exception(error)
            if isinstance(error, asyncio.CancelledError):
                raise
            return
        start = 0
        for ids, waiter in requests:
            mine, start = fds[start:start + len(ids)], start + len(ids)
            if waiter.done():  # its caller was cancelled meanwhile: give the locks back
                for fd in mine:
                    if fd >= 0:
                        os.close(fd)
            else:
                waiter.set_result(mine)

    def _lock_all(self, workflow_ids: list[str]) -> list[int]:
        fds: list[int] = []
        try:
            for workflow_id in workflow_ids:
                fds.append(self._lock_one(workflow_id))
        except BaseException:
            for fd in fds:
                if fd >= 0:
                    os.close(fd)
            raise
        return fds

    def _lock_one(self, workflow_id: str) -> int:
        directory = self.state_path(workflow_id).parent
        _refuse_symlinked_directory(directory)
        try:
            self._ensure_dir(directory)
            fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        except OSError as error:
            raise _storage_error(directory / "lock", error) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return -1
        return fd


def _write_file(path: str, document: bytes, temporary_suffix: str, fsync: bool) -> None:
    """``_write_atomically`` for a path already checked and a directory already made."""
    temporary = path + temporary_suffix
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        view = memoryview(document)
        while view:
            view = view[os.write(fd, view):]
        if fsync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    os.close(fd)
    os.replace(temporary, path)


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


def _wake_in_chunks(loop: asyncio.AbstractEventLoop,
                    waiters: list[tuple[str, asyncio.Future[None]]]) -> None:
    _resolve(waiters[:WAKE_CHUNK], {})
    if len(waiters) > WAKE_CHUNK:
        loop.call_soon(_wake_in_chunks, loop, waiters[WAKE_CHUNK:])


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
                    checkpoint_stage: str | None = None) -> asyncio.Future[None]:
        self._keep(workflow_id, snapshot, checkpoint_stage)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

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
