"""The file store's client: ``FileStore``, the embedded store under the project root.

Every write goes through one group-commit writer (docs/architecture.md, invariant 4): the
writes queued in one loop iteration form a batch, coalesced per workflow (newest wins),
sent to the writer process (``_writer.py``, supervised through ``_writer_link.py``), which
appends every batch that arrived during its last sync to the journal with one
``fdatasync``: the durability point. A workflow awaits only its own record. State and
checkpoint files are written from the journal afterwards (temp file + rename) and synced
with one ``syncfs`` (or an ``fsync`` per file without it) before a journal is deleted.
Journals whose writer died are replayed at open (``_replay.py``); reads are
``_reads.py``'s, claims ``_claims.py``'s; ``_layout.py`` lists the files.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from .._errors import WorkflowError, WorkflowLockedError
from .._ids import validate_workflow_id
from .._logging import logger
from .._state import WorkflowRun
from . import _waits
from ._claims import ClaimLocks, claim_locks
from ._layout import JOURNAL_DIRECTORY, checkpoint_name, storage_error
from ._platform import portable_requested, require_file_locks
from ._protocol import (
    Claim,
    LoadedState,
    ParkedEntry,
    Snapshot,
    canonical,
    check_state,
    encode_document,
)
from ._reads import list_stored, load_many_stored, load_stored, state_file
from ._replay import replay_orphan_journals
from ._writer import (
    encode_frame,
    load_syncfs,
    make_private_directory,
    make_workflow_directory,
    sync_filesystem,
    write_file,
)
from ._writer_link import WriterLink, WriterStartError

__all__ = ["INFORMATIONAL_DELAY", "JOURNAL_LIMIT", "UNREAD_LIMIT", "WAKE_CHUNK",
           "WRITER_RESTARTS", "FileStore"]

JOURNAL_LIMIT = 256 * 1024 * 1024  # past this, appends move to a fresh journal
# An informational write (a stage's start) waits this long before it joins a batch: a
# stage that ends sooner is recorded by its completion alone, so most stages of a busy
# runtime cost one encoded state, not two. Long stages still show up as started.
INFORMATIONAL_DELAY = 0.05
# Answers of lazy batches left unread in the writer's pipe at most (~20 bytes each).
UNREAD_LIMIT = 512
# A writer process that dies is replaced this many times per store; then writes fail.
WRITER_RESTARTS = 3
# Waiters woken per loop iteration once their batch is durable. Each wakes a workflow that
# runs on to its next stage boundary (~5-10 us): 256 keep an iteration near 2 ms, where
# waking a 3,000-save batch at once held the loop for 20-30 ms.
WAKE_CHUNK = 256


_NO_STAGES: frozenset[str] = frozenset()  # most writes want no checkpoint file


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



_TO_STATE = WorkflowRun.to_state


def _encode(snapshot: Snapshot) -> bytes:
    """``canonical(snapshot())``. A workflow's own snapshot (the engine hands over
    ``run.to_state``) is taken with its monitoring lists already encoded, entry by entry
    once in the workflow's life (``WorkflowRun.to_state(encoded=True)``): the same bytes,
    without re-encoding every earlier stage at every save."""
    run = getattr(snapshot, "__self__", None)
    if getattr(snapshot, "__func__", None) is _TO_STATE and isinstance(run, WorkflowRun):
        return canonical(run.to_state(encoded=True))
    return canonical(snapshot())

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

    ``portable``: take the paths every POSIX system has instead of Linux's (claims as
    one ``flock``-ed file per running workflow, a writer that exits when its input pipe
    closes instead of by the parent-death signal). Default: the environment's
    ``WORKFLOW_STORE_PORTABLE=1``, else on everywhere but Linux (``_platform.py``).
    Windows has no ``fcntl``: ``open()`` raises ConfigurationError saying so.
    """

    def __init__(self, state_directory: Path, checkpoint_directory: Path, *,
                 durable: bool = True, journal_limit: int = JOURNAL_LIMIT,
                 portable: bool | None = None) -> None:
        self.state_directory = state_directory
        self.checkpoint_directory = checkpoint_directory
        self._checkpoint_prefix = os.path.join(checkpoint_directory, "")
        self._state_prefix = os.path.join(state_directory, "")
        self.journal_directory = state_directory / JOURNAL_DIRECTORY
        self.durable = durable
        self.portable = portable_requested(portable)
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
        # Reads asked of the writer ("R"), not answered yet: sequence -> (IDs, answer).
        self._reads: dict[int, tuple[list[str], asyncio.Future[list[tuple[str, bytes]]]]] = {}
        self._read_sequence = 0
        self._wrote = False  # a write was ever sent: the writer may hold newer states
        self._unflushed = False  # sent writes whose state files may not be written yet
        self._broken: BaseException | None = None  # why the writer stopped, if it did
        self._restarting: asyncio.Task[None] | None = None
        self._restarts = 0
        self._claimed: set[str] = set()
        # Claims released but still locked until the writer says their workflows' state
        # files are written (invariant 12): workflow ID -> its "U" request (0: not sent).
        self._releasing: dict[str, int] = {}
        self._to_release: list[str] = []  # released in this loop iteration, not sent yet
        self._release_requests: dict[int, list[str]] = {}  # sent, not answered
        self._release_sequence = 0
        self._finals: set[str] = set()  # final state sent, claim not yet released
        self._deferred: dict[str, tuple[float, Snapshot]] = {}  # informational, held back
        self._deferred_order: collections.deque[tuple[float, str]] = collections.deque()
        self._deferred_timer: asyncio.TimerHandle | None = None
        self._claim_locks: ClaimLocks = claim_locks(state_directory, portable=self.portable)
        self._opening_claims: asyncio.Future[None] | None = None
        self._made_dirs: set[Path] = set()
        self._file_paths: dict[str, dict[str, str]] = {}  # workflow -> {stage or "": path}
        self._notices_sent: dict[str, list[Path]] = {}  # workflow -> our signals' notices
        self._temporary_suffix = f".tmp-{os.getpid()}"
        self._fsync_each = durable and _SYNCFS is None
        self.materialize_errors: list[str] = []
        self.batches_written = 0
        self.bytes_sent = 0  # frames handed to the writer (for the benchmarks)
        self.files_written = 0
        self.replayed_workflows = 0

    # --- lifecycle

    async def open(self) -> None:
        if self._link is not None:
            return
        require_file_locks()  # one clear error where there are none (Windows)
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
                 str(self._journal_limit), "1" if self.portable else "0"],
                self._received, self._answers_read, self._writer_ended)
        except WriterStartError as error:
            raise storage_error(Path(error.path), OSError(error.errno, error.message)) from None

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
            # The writer has written every state file now (or died: then the kernel has
            # freed its journal's lock and the next store to open replays it).
            self._unlock_released()
            if not self._claimed:  # else the last release closes them: claims stay held
                self._close_claim_files()
        if self.materialize_errors:
            logger.warning("%d state or checkpoint file(s) could not be written (the journal "
                           "keeps those states and the next start writes them); first: %s",
                           len(self.materialize_errors), self.materialize_errors[0])
        if status != 0 and self._broken is None:
            raise storage_error(Path(link.journal_path), OSError(
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
        return state_file(self.state_directory, workflow_id)

    def checkpoint_path(self, workflow_id: str, stage: str) -> Path:
        return self.checkpoint_directory / checkpoint_name(validate_workflow_id(workflow_id),
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
            # ``state_path`` as a string join: pathlib's two joins and str() were most of
            # this in a profile of 10,000 woken workflows' first records.
            paths = self._file_paths[workflow_id] = {
                "": f"{self._state_prefix}{validate_workflow_id(workflow_id)}{os.sep}state.json"}
        checkpoints = []
        for stage in stages:
            path = paths.get(stage)
            if path is None:
                # The ID was validated with the state path above; a string join is ~3 us
                # cheaper than pathlib's, once per workflow and stage (the same path).
                path = paths[stage] = self._checkpoint_prefix + checkpoint_name(workflow_id,
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
            # Its timer is set when this iteration's writes go (_send_pending), if it is
            # still held then: a stage that ends in the iteration it started (a handler
            # that returns at once) costs no timer at all, where one per stage was set
            # and cancelled.
            self._schedule()

    def _time_deferred(self) -> None:
        """Set the timer that promotes informational writes, if any is held and none is set."""
        if self._deferred_timer is None and self._deferred and self._link is not None:
            delay = self._deferred_order[0][0] - time.monotonic()
            self._deferred_timer = asyncio.get_running_loop().call_later(
                max(0.0, delay), self._promote_deferred)

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
        self._queue(workflow_id, _encode(snapshot), checkpoint_stage)
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
            # caller need not wait at all (one chunk, unless a wake-up is due anyway:
            # _answers_read).
            self._link.read_available()
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
        if (self._wanted > self._answered or self._flushes or self._release_requests
                or self._reads
                or unanswered > UNREAD_LIMIT):
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
        self._time_deferred()
        if self._restarting is not None:
            return  # still pending and scheduled: sent once the writer is back
        batch, self._pending = self._pending, _Batch()
        if not batch.scheduled:
            return  # close() sent it already
        if not (batch.writes or batch.appends or batch.waiters):
            return  # scheduled by save_soon alone: nothing to send
        if self._broken is not None or self._link is None:
            error = self._broken or RuntimeError("the store was closed before this write")
            _resolve(batch.waiters, {w: error for w in batch.writes})
            return
        # Snapshots still pending are taken here: the record is the state as it is now.
        items = []
        for workflow_id, (document, stages) in batch.writes.items():
            if not isinstance(document, bytes):
                document = _encode(document)
            state_path, checkpoints = self._file_paths_of(workflow_id, stages)
            items.append((workflow_id, document, state_path, checkpoints))
            if "final" in stages:
                # It ended here (or parked): nothing of it stays in this process but a
                # mark until its claim is released (_release).
                del self._file_paths[workflow_id]
                if len(self._finals) > 100_000:
                    self._finals.clear()  # bounded: ones never released here (no claim)
                self._finals.add(workflow_id)
        appends = [(str(path), documents) for path, documents in batch.appends.items()]
        self._sequence += 1
        sent = _Sent(self._sequence, encode_frame(("W", self._sequence, items, appends)),
                     batch.waiters, tuple(batch.writes))
        self._sent.append(sent)
        self.bytes_sent += len(sent.frame)
        self._unflushed = self._wrote = True
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
            # Woken once the read that brought this ends (_answers_read), in order.
            while self._sent and self._sent[0].sequence <= message[1]:
                self._to_wake.extend(self._sent.popleft().waiters)
                self.batches_written += 1
        elif kind == "E":
            _, _, last, number, path, text = message
            error = storage_error(Path(path), OSError(number, text))
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
        elif kind == "U":
            self._released(message[1], message[2])
        elif kind == "R":
            _, answer = self._reads.pop(message[1], (None, None))
            if answer is not None and not answer.done():
                answer.set_result(message[2])
            self._watch_answers()
        elif kind == "S":
            self.files_written += message[1]
            self.materialize_errors.extend(message[2])

    def _answers_read(self) -> None:
        """Every answer of one read of the pipe is handled: wake the first WAKE_CHUNK
        durable waiters here, in the read's own callback, and the rest in the next
        iterations. A callback scheduled for the first chunk too cost every strict save
        one loop iteration more (~16 us after 10 ms idle, traced). Each ``set_result``
        only schedules its task; none runs here."""
        if self._to_wake and not self._wake_scheduled:
            # Nothing queued before (else a wake-up is scheduled): these go first.
            self._wake_some()

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
        if link is None or (link.finishing and not self._sent and not self._flushes
                            and not self._reads):
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
        for sequence, workflow_ids in self._release_requests.items():
            link.send(("U", sequence, workflow_ids))
        if self._pending.scheduled:
            self._send_pending()
        # After every write sent before them: the new writer holds those the dead one did
        # not acknowledge, and the files (its journal replayed) hold the others.
        for sequence, (workflow_ids, _) in self._reads.items():
            link.send(("R", sequence, workflow_ids))
        self._send_releases()

    def _fail_everything_sent(self, link: WriterLink, cause: BaseException | None) -> None:
        pid = link.process.pid
        because = f": {cause}" if cause is not None else ""
        self._broken = storage_error(Path(link.journal_path), OSError(
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
        for _, answer in self._reads.values():
            if not answer.done():
                answer.set_exception(self._broken)
        self._reads.clear()
        if self._pending.scheduled:
            self._send_pending()  # fails those too, with the same error

    async def _flush_state_files(self) -> None:
        """Have the writer write every state only its journal holds, before a read."""
        if self._link is None or self._broken is not None:
            return
        if not self._unflushed:
            if self._flushes:
                # Another read's flush is on its way and covers every write sent so far:
                # wait for it too (not waiting let 10,000 woken workflows read state files
                # not yet written). Shielded: that read may be cancelled, this one not.
                await asyncio.shield(self._flushes[max(self._flushes)])
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
        self.replayed_workflows += replay_orphan_journals(
            self.journal_directory, self.state_directory, self._write_atomically,
            self._sync_filesystem if self.durable else None)

    def _ensure_dir(self, directory: Path, *, workflow: bool = False) -> None:
        if directory not in self._made_dirs:
            (make_workflow_directory if workflow else make_private_directory)(directory)
            self._made_dirs.add(directory)

    def _write_atomically(self, path: Path, document: bytes) -> None:
        self._ensure_dir(path.parent, workflow=True)
        write_file(str(path), document, self._temporary_suffix, self._fsync_each)

    def _sync_filesystem(self) -> None:
        sync_filesystem(_SYNCFS, str(self.state_directory), str(self.checkpoint_directory))

    # --- reads (in a thread: see _reads.py)

    async def _newest_records(self, workflow_ids: list[str]) -> dict[str, bytes]:
        """The canonical states of these workflows that this store's writer holds newer
        than their state files, asked of it in one frame ("R"): the newest durable record
        of each (a read sees every write asked for before it), with nothing on disk
        waited for. Its state files are created later as ever, at idle priority: a wake
        waiting for them waited for 10,000 file creations (3-16 s, longer while other
        processes kept the CPUs busy). A workflow not answered for has its newest state in
        its file. Nothing to ask when the store is closed or nothing was written (the
        files then hold everything: journals of dead writers are replayed at open)."""
        link = self._link
        if link is None or self._broken is not None or not self._wrote or not workflow_ids:
            return {}
        assert self._loop is not None
        if self._pending.scheduled:
            self._send_pending()  # writes asked for before the read go first
        self._read_sequence += 1
        sequence = self._read_sequence
        answer: asyncio.Future[list[tuple[str, bytes]]] = self._loop.create_future()
        self._reads[sequence] = (workflow_ids, answer)
        if self._restarting is None:  # else the restart sends it, after the writes
            link.send(("R", sequence, workflow_ids))
        self._watch_answers()
        return dict(await answer)

    async def load(self, workflow_id: str) -> LoadedState:
        validate_workflow_id(workflow_id)
        record = (await self._newest_records([workflow_id])).get(workflow_id)
        if record is not None:  # one small decode: no thread hop for it
            path = str(self.state_path(workflow_id))
            return LoadedState(check_state(orjson.loads(record), workflow_id, path), path)
        return await asyncio.to_thread(self.load_sync, workflow_id)

    def load_sync(self, workflow_id: str) -> LoadedState:
        """``load`` without the event loop, for a caller not on it: what the state and
        checkpoint files hold (a state only a running writer's journal holds is not
        seen until that writer writes its file)."""
        return load_stored(self.state_directory, self.checkpoint_directory, workflow_id)

    async def list_states(self, statuses: Iterable[str] | None = None) -> list[LoadedState]:
        wanted = frozenset(statuses) if statuses is not None else None
        await self._flush_state_files()
        return await asyncio.to_thread(list_stored, self.state_directory,
                                       self.checkpoint_directory, wanted)

    # --- claims (the locks themselves: _claims.py)

    async def claim(self, workflow_id: str) -> Claim:
        claims, refused = await self.claim_many([workflow_id])
        if refused:
            raise WorkflowLockedError(
                f"workflow {workflow_id} is already running (its lock in "
                f"{self.claims_path(workflow_id)} is held); not starting it twice")
        return claims[0]

    async def load_claimed(self, workflow_ids: list[str]
                           ) -> dict[str, LoadedState | WorkflowError]:
        """What a decision to run workflows just claimed rests on (docs/architecture.md,
        invariant 12): their current states, read under the claims, one thread hop.

        A claim another process released is current in the state files (``_release``);
        one freed by its holder's death is current in that process's journal: so every
        journal whose process died is replayed first, as at open (one look at the journal
        directory; a live process's journal is left alone)."""
        self._validate_unclaimed(workflow_ids)
        records = await self._newest_records(workflow_ids)
        return await asyncio.to_thread(self._load_claimed, workflow_ids, records)

    def _load_claimed(self, workflow_ids: list[str], records: dict[str, bytes]
                      ) -> dict[str, LoadedState | WorkflowError]:
        self._prepare_journal_directory()
        return load_many_stored(self.state_directory, self.checkpoint_directory,
                                workflow_ids, records)

    def _validate_unclaimed(self, workflow_ids: list[str]) -> None:
        """Validate the IDs before a path is built from them, but those claimed here:
        ``claim_many`` validated those (10,000 woken workflows' IDs were checked three
        times on the way to their states)."""
        claimed = self._claimed
        for workflow_id in workflow_ids:
            if workflow_id not in claimed:
                validate_workflow_id(workflow_id)

    def claims_path(self, workflow_id: str) -> Path:
        """The lock file holding ``workflow_id``'s claim."""
        return self._claim_locks.path(validate_workflow_id(workflow_id))

    async def claim_many(self, workflow_ids: Iterable[str]) -> tuple[list[Claim], list[str]]:
        ids = [validate_workflow_id(w) for w in workflow_ids]
        await self._open_claim_files()
        # No await from here on: two tasks of this loop cannot both win one workflow.
        claims: list[Claim] = []
        refused: list[str] = []
        locks = self._claim_locks
        releasing = self._releasing
        for workflow_id in ids:
            if workflow_id in releasing:
                # Released here, still locked until its state file is written: this
                # process holds the lock and reads its own writes (a load flushes them),
                # so it takes the claim back (a parked workflow woken at once).
                del releasing[workflow_id]
                self._claimed.add(workflow_id)
                claims.append(_FileClaim(workflow_id, self))
            elif workflow_id in self._claimed or not locks.lock(workflow_id):
                refused.append(workflow_id)
            else:
                self._claimed.add(workflow_id)
                claims.append(_FileClaim(workflow_id, self))
        return claims, refused

    async def _open_claim_files(self) -> None:
        if not self._claim_locks.opened:
            opening = self._opening_claims
            if opening is None or (opening.done() and (opening.cancelled()
                                                      or opening.exception() is not None)):
                opening = self._opening_claims = asyncio.ensure_future(
                    asyncio.to_thread(self._claim_locks.open))
            # Shielded, and kept: a claimer cancelled meanwhile leaves the opened locks to
            # the next one.
            await asyncio.shield(opening)

    def _release(self, workflow_id: str) -> None:
        """Give the claim back once every process can read what this one wrote.

        Another process decides whether to run a workflow from its state file, but this
        store's writer writes state files after the journal, at idle priority: unlocked at
        once, a claim let a second process read a ``pending`` that this one had finished,
        and run it again. So a workflow this store wrote stays locked until the writer
        says its state file is written (one "U" request per loop iteration's releases;
        docs/architecture.md, invariant 12). Until then this process may take it back.
        """
        self._claimed.discard(workflow_id)
        if not self._claim_locks.opened:
            return
        written = (workflow_id in self._finals or workflow_id in self._file_paths
                   or workflow_id in self._pending.writes)
        if written and self._link is not None:
            self._releasing[workflow_id] = 0
            self._to_release.append(workflow_id)
            if len(self._to_release) == 1:
                assert self._loop is not None
                self._loop.call_soon(self._send_releases)
            return
        self._finals.discard(workflow_id)
        self._claim_locks.unlock(workflow_id)
        if self._link is None and not self._claimed and not self._releasing:
            self._close_claim_files()  # the store closed before

    def _send_releases(self) -> None:
        """Ask the writer to write the state files of this iteration's releases."""
        link = self._link
        if (self._restarting is not None or self._broken is not None or link is None
                or link.finishing):
            # Sent by the restart; or never: close() unlocks them once the writer ended.
            return
        releasing = self._releasing
        workflow_ids = [w for w in self._to_release if releasing.get(w) == 0]
        self._to_release = []
        if not workflow_ids:
            return
        if self._pending.scheduled:
            self._send_pending()  # their last writes go first: the writer keeps the order
        self._release_sequence += 1
        sequence = self._release_sequence
        for workflow_id in workflow_ids:
            releasing[workflow_id] = sequence
        self._release_requests[sequence] = workflow_ids
        link.send(("U", sequence, workflow_ids))
        self._watch_answers()

    def _released(self, sequence: int, failed: list[str]) -> None:
        """The writer wrote the state files of release request ``sequence``: unlock them
        (not those taken back meanwhile, nor one it could not write: close() does)."""
        workflow_ids = self._release_requests.pop(sequence, ())
        releasing, unlock, finals = self._releasing, self._claim_locks.unlock, self._finals
        skip = set(failed)
        for workflow_id in workflow_ids:
            if releasing.get(workflow_id) == sequence and workflow_id not in skip:
                del releasing[workflow_id]
                finals.discard(workflow_id)
                unlock(workflow_id)
        self._watch_answers()

    def _unlock_released(self) -> None:
        """Unlock every claim still waiting for its state file (the writer has ended)."""
        releasing, self._releasing = self._releasing, {}
        self._to_release, self._release_requests = [], {}
        if self._claim_locks.opened:
            for workflow_id in releasing:
                self._claim_locks.unlock(workflow_id)
        self._finals.difference_update(releasing)

    def _close_claim_files(self) -> None:
        self._opening_claims = None
        self._claim_locks.close()

    # --- durable waits (the SignalStore protocol; the files: _waits.py)

    signals_from_other_processes = True  # any process may send one (a notice tells us)

    async def send_signal(self, workflow_id: str, name: str, payload: bytes) -> None:
        validate_workflow_id(workflow_id)
        notice = await asyncio.to_thread(_waits.write_signal, self.state_directory,
                                         workflow_id, name, payload, self.durable)
        # Our own notices are for other processes; dropped when the workflow finishes.
        if len(self._notices_sent) > 10_000:
            self._notices_sent.clear()  # bounded: the rest expire (NOTICE_SECONDS)
        self._notices_sent.setdefault(workflow_id, []).append(notice)

    async def read_signal(self, workflow_id: str, name: str, index: int) -> bytes | None:
        return await asyncio.to_thread(_waits.read_signal, self.state_directory,
                                       workflow_id, name, index)

    async def signals_ready(self, wanted: list[tuple[str, str, int]]) -> list[str]:
        return await asyncio.to_thread(_waits.signals_ready, self.state_directory, wanted)

    async def park(self, entry: ParkedEntry) -> None:
        await asyncio.to_thread(_waits.write_parked, self.state_directory, entry, self.durable)

    async def unpark(self, entry: ParkedEntry) -> None:
        await asyncio.to_thread(_waits.remove_parked, self.state_directory, entry)

    async def unpark_many(self, entries: list[ParkedEntry]) -> None:
        await asyncio.to_thread(_waits.remove_parked_many, self.state_directory, entries)

    async def load_many(self, workflow_ids: list[str]) -> dict[str, LoadedState | WorkflowError]:
        self._validate_unclaimed(workflow_ids)
        records = await self._newest_records(workflow_ids)  # one frame for the batch
        return await asyncio.to_thread(load_many_stored, self.state_directory,
                                       self.checkpoint_directory, workflow_ids, records)

    async def parked(self) -> list[ParkedEntry]:
        return await asyncio.to_thread(_waits.list_parked, self.state_directory)

    async def signal_notices(self) -> list[tuple[str, str]]:
        return await asyncio.to_thread(_waits.take_notices, self.state_directory)

    async def signalled(self) -> list[str]:
        return await asyncio.to_thread(_waits.signalled, self.state_directory)

    async def drop_signals(self, workflow_id: str, *, scan: bool = False) -> None:
        notices = self._notices_sent.pop(workflow_id, ())
        await asyncio.to_thread(_waits.drop_signals, self.state_directory, workflow_id,
                                notices, scan)


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
