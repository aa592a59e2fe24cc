"""FileStore's writer: a child process that makes every state durable, off the event loop.

Why a process and not a thread: a writer thread shares the event loop's GIL, and every
system call it makes (append, ``fdatasync``, four per state file) takes the GIL back from
the loop. Under 10,000 workflows that was 1.8 million futex calls per 190,000 stages and
a quarter of the loop's time spent waiting. Here the loop only hands encoded records to
a pipe; this process, with its own interpreter, appends them to the journal, syncs, and
answers. It uses the standard library alone (started as ``python -I -S``), so it starts in
a few milliseconds, and it dies with its parent, which keeps the journal's ``flock``
meaning "the process that owns these workflows is alive": on Linux by the parent-death
signal (``PR_SET_PDEATHSIG``); everywhere (and on Linux with ``portable``) because its
parent's death closes its input, an end of input without "Q" (below), and it exits then.
The client imports this module too (it defines the frames and the file helpers both
sides use), so nothing at its top level may need more than every OS offers.

Frames, both ways: a 4-byte little-endian length, then a ``marshal``-ed tuple.

parent -> writer
    ``("W", seq, items, appends)``: items are ``(workflow_id, canonical_state,
    state_path, checkpoint_paths)`` (wrapped here by ``wrap_document``); appends are
    ``(history_path, documents)``.
    ``("F", seq)``: write every state file that only the journal holds, then answer.
    ``("U", seq, workflow_ids)``: those workflows' claims are being released: write the
    state file of each whose newest state only the journal holds, then answer.
    ``("R", seq, workflow_ids)``: a read: answer with the newest record of each whose
    state file is not written from it yet (the file holds the newest of the others).
    ``("Q",)``: the store is closing. At the end of input after it: finish (state files
    written and synced, journal deleted), then exit. An end of input without it means
    the parent died: exit at once and leave the journal to be replayed.
writer -> parent
    ``("R", journal_path)`` ready; ``("X", errno, path, message)`` could not start;
    ``("A", seq)`` every write up to ``seq`` is durable; ``("E", first, last, errno,
    path, message)`` writes ``first..last`` failed; ``("J", path)`` appends continue in
    a fresh journal; ``("F", seq)`` flushed; ``("U", seq, failed_ids)`` the state
    files of request ``seq`` are written (all but ``failed_ids``); ``("R", seq,
    records)`` the read ``seq``: ``(workflow_id, canonical_state)`` of each workflow
    asked for whose newest durable state only the journal holds, nothing for the others;
    ``("S", files_written, materialize_errors)`` finished.

Journal invariant (as before): every state newer than its ``state.json`` is in a journal
that is not deleted until those files are synced; a journal whose owner died (its flock
is free) is replayed by the next store that opens. A journal is its records, one line
each, then zeros written ahead of them (``ZEROED_AHEAD``), a last "line" no reader decodes.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import gzip
import hashlib
import io
import marshal
import os
import signal
import struct
import sys
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

__all__ = ["FRAME_HEADER", "SCHEMA_VERSION", "encode_frame", "load_syncfs",
           "make_private_directory", "make_workflow_directory",
           "sync_filesystem", "take_frames", "wrap_document", "write_file"]

FRAME_HEADER = struct.Struct("<I")
_READ_SIZE = 1 << 20
# Journal bytes kept written (as zeros) and synced ahead of the records: a group then
# overwrites blocks the file already has, and its fdatasync writes those data blocks
# alone, without the inode's new size and block map. Measured here: 85 against 160 us
# of CPU and 270 against 500 us per 2.3 KB write + fdatasync. Zeroed again when less
# than half is left: one 256 KiB write and sync (~0.7 ms, 190 us of CPU here; 1 MiB took
# 8 ms, long enough to hold the next group up) per ~55 records of a 19-stage workflow.
ZEROED_AHEAD = 256 * 1024
# Only while groups are smaller than this: a group's sync is then mostly its fixed cost,
# which the zeros cut. A 230 KB group's own data outweighs it, and writing every byte
# twice (zeros, then records) cost more than it saved (302 against 247 us of CPU).
ZEROED_GROUPS = 64 * 1024
_ZEROS = bytes(ZEROED_AHEAD)
_PR_SET_PDEATHSIG = 1


SCHEMA_VERSION = 1


def wrap_document(body: bytes) -> bytes:
    """The on-disk form of a canonical state: schema version, its SHA-256, the state.

    Done here for every record the store sends, so the event loop pays for the
    canonical encoding only (the hash and the copy were 1.4 of its 3.4 us per record).
    """
    return b"".join(_wrapped(_digest(body), body))


# A record is the canonical state between these, with its checksum (see wrap_document).
_HEAD = b'{"schema_version":%d,"checksum":"sha256:' % SCHEMA_VERSION
_MIDDLE = b'","state":'
_TAIL = b"}\n"


def _digest(body: bytes) -> bytes:
    return hashlib.sha256(body).hexdigest().encode()


def _wrapped(digest: bytes, body: bytes) -> tuple[bytes, bytes, bytes, bytes, bytes]:
    return _HEAD, digest, _MIDDLE, body, _TAIL


def encode_frame(message: tuple[Any, ...]) -> bytes:
    payload = marshal.dumps(message)
    return FRAME_HEADER.pack(len(payload)) + payload


def take_frames(buffer: bytearray) -> list[tuple[Any, ...]]:
    """Decode and remove the complete frames at the start of ``buffer``."""
    frames, start = [], 0
    while len(buffer) - start >= FRAME_HEADER.size:
        (length,) = FRAME_HEADER.unpack_from(buffer, start)
        end = start + FRAME_HEADER.size + length
        if end > len(buffer):
            break
        frames.append(marshal.loads(buffer[start + FRAME_HEADER.size:end]))
        start = end
    del buffer[:start]
    return frames


def make_private_directory(directory: str | os.PathLike[str]) -> None:
    """Create ``directory`` and each missing parent with mode 0700.

    ``os.makedirs(mode=0o700)`` gives the parents it creates the umask's default (usually
    0755), which would leave ``.github/workflow-states`` readable by all.
    """
    missing: list[str] = []
    current = os.fspath(directory)
    while not os.path.isdir(current) and current != os.path.dirname(current):
        missing.append(current)
        current = os.path.dirname(current)
    for path in reversed(missing):
        with contextlib.suppress(FileExistsError):  # made meanwhile by another writer
            os.mkdir(path, 0o700)


def make_workflow_directory(directory: str | os.PathLike[str]) -> None:
    """A workflow's own directory: made private if missing, refused if it is a link (its
    state is never written through a link that may point out of the state directory)."""
    make_private_directory(directory)
    if os.path.islink(directory):
        raise OSError(errno.ELOOP, "is a symbolic link; refused", os.fspath(directory))


def write_file(path: str, document: bytes, temporary_suffix: str, fsync: bool) -> None:
    """Replace ``path`` atomically (temp file + rename) in a directory already made."""
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


def load_syncfs() -> Callable[[int], int] | None:
    """Linux's ``syncfs`` from the C library; None elsewhere (then each file is fsynced)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        function: Callable[[int], int] = libc.syncfs
    except (OSError, AttributeError):
        return None
    return function


def sync_filesystem(syncfs: Callable[[int], int] | None, state_directory: str,
                    checkpoint_directory: str) -> None:
    """Make every file written so far durable: one ``syncfs`` of the state directory's
    file system, or, without it (each file was fsynced as written), the directories."""
    if syncfs is not None:
        fd = os.open(state_directory, os.O_RDONLY)
        try:
            if syncfs(fd) != 0:
                number = ctypes.get_errno()
                raise OSError(number, os.strerror(number), state_directory)
        finally:
            os.close(fd)
        return
    for directory in (state_directory, checkpoint_directory):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


_Record = tuple[bytes, bytes, str]  # (checksum, canonical state, state path)


class Writer:
    """The journal and the state files of one FileStore, written by this process."""

    def __init__(self, parent_pid: int, journal_directory: str, state_directory: str,
                 checkpoint_directory: str, durable: bool, journal_limit: int) -> None:
        self.sync_data = _data_sync()
        self.parent_pid = parent_pid
        self.journal_directory = journal_directory
        self.state_directory = state_directory
        self.checkpoint_directory = checkpoint_directory
        self.durable = durable
        self.journal_limit = journal_limit
        self.syncfs = load_syncfs()
        self.fsync_each = durable and self.syncfs is None
        self.temporary_suffix = f".tmp-{os.getpid()}"
        self.journal_fd = -1
        self.journal_path = ""
        self.journal_size = 0
        # Invariant: _newest holds, per workflow, the newest journal record whose
        # state.json has not been written from it yet. A record is (checksum, canonical
        # state, state path): the document is put together only when a file is written
        # from it, which most records never are.
        self._newest: dict[str, _Record] = {}
        # Records whose checkpoint files are still to be written (with those files),
        # coalesced per workflow: the newest record, every checkpoint wanted meanwhile.
        self._handoff: dict[str, tuple[_Record, frozenset[str]]] = {}
        self._lock = threading.Lock()  # guards _newest and _handoff
        self._handoff_scheduled = False
        self._made_dirs: set[str] = set()
        self._materializer = ThreadPoolExecutor(max_workers=1, initializer=_yield_the_cpu,
                                                thread_name_prefix="workflow-state-files")
        self.files_written = 0
        self.materialize_errors: list[str] = []

    # --- the journal (main thread)

    def start_journal(self) -> None:
        name = f"journal-{self.parent_pid}-{os.urandom(4).hex()}.log"
        path = os.path.join(self.journal_directory, name)
        import fcntl  # here: the client imports this module, and Windows has no fcntl

        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)  # held while this process lives: "not an orphan"
        self.journal_fd, self.journal_path, self.journal_size = fd, path, 0
        # Past the records the file holds zeros up to here (zero_ahead): a last "line" of
        # NULs, skipped by every reader as a torn last line is.
        self.journal_zeroed = 0

    def append(self, data: bytes) -> bool:
        """Append one group of records and sync it: the moment they become durable.

        Written at the records' end, not with O_APPEND: the file runs on in zeros
        (``zero_ahead``). True when the journal was full and appends continue in a
        fresh one."""
        view = memoryview(data)
        offset = self.journal_size
        try:
            while view:
                written = os.pwrite(self.journal_fd, view, offset)
                view, offset = view[written:], offset + written
        except OSError:
            # A torn group would glue onto the next one's first line, and its complete
            # lines (never acknowledged) would outlast a shorter next group: zero it, or
            # cut it off past the zeros. (If even this fails, replay skips the
            # undecodable line; the next group is written over the rest.)
            with contextlib.suppress(OSError):
                self._undo(offset)
            raise
        self.journal_size = offset
        if self.durable:
            self.sync_data(self.journal_fd)
        if self.journal_size > self.journal_limit:
            # Continue in a fresh journal; the full one stays locked and on disk until
            # every state it holds is in a synced state file (queued after this group).
            old = self.journal_fd, self.journal_path
            self.start_journal()
            self._materializer.submit(self._retire, *old)
            return True
        return False

    def _undo(self, end: int) -> None:
        """Bytes from the records' end to ``end`` back to what they were: zeros, none past."""
        size, zeroed = self.journal_size, self.journal_zeroed
        if end > zeroed:
            os.ftruncate(self.journal_fd, max(size, zeroed))
        if zeroed > size:
            os.pwrite(self.journal_fd, memoryview(_ZEROS)[:min(end, zeroed) - size], size)

    def zero_ahead(self, group_size: int) -> None:
        """Write and sync zeros ahead of the records once less than half of ZEROED_AHEAD
        is left, after a group of ``group_size`` bytes smaller than ZEROED_GROUPS (after
        it is answered: its waiters do not wait for this). Best effort: without it an
        append is an ordinary one, its sync writing the new size; a disk too full for the
        zeros fails only the writes that do not fit."""
        size = self.journal_size
        if self.journal_zeroed - size >= ZEROED_AHEAD // 2 or group_size >= ZEROED_GROUPS:
            return
        start, end = max(self.journal_zeroed, size), size + ZEROED_AHEAD
        zeros = memoryview(_ZEROS)[:end - start]
        try:
            while zeros:
                written = os.pwrite(self.journal_fd, zeros, start)
                zeros, start = zeros[written:], start + written
            if self.durable:
                self.sync_data(self.journal_fd)
        except OSError:
            return
        self.journal_zeroed = end

    # --- state files (materializer thread)

    def hand_off(self, records: Iterable[tuple[str, _Record, tuple[str, ...]]],
                 appends: list[tuple[str, list[bytes]]]) -> None:
        """Queue durable records' state files. Work not reached yet is coalesced, the
        newest record winning; checkpoint files wanted by any of them are kept. A record
        that wants no checkpoint file (most do not) only replaces the workflow's newest:
        its state.json is written at its next checkpoint, a flush or the end."""
        with self._lock:
            newest, handoff = self._newest, self._handoff
            for workflow_id, record, checkpoints in records:
                newest[workflow_id] = record
                earlier = handoff.get(workflow_id)
                if checkpoints:
                    wanted = frozenset(checkpoints)
                    handoff[workflow_id] = (record, wanted if earlier is None
                                            else wanted | earlier[1])
                elif earlier is not None:
                    handoff[workflow_id] = (record, earlier[1])
            if handoff and not self._handoff_scheduled:
                self._handoff_scheduled = True
                self._materializer.submit(self._materialize_handoff)
        if appends:
            self._materializer.submit(self._append_history, appends)

    def write_before_release(self, sequence: int, workflow_ids: list[str],
                             send: Callable[[tuple[Any, ...]], None]) -> None:
        """Write these workflows' state files, then answer ``("U", sequence, failed)``;
        their claims are released only then (docs/architecture.md, invariant 12).

        Queued behind the state files already handed off, on the same idle-priority
        thread: no wait on this thread, and most are written already (a workflow's end
        wants its final checkpoint, so its hand-off writes the state file too)."""
        self._materializer.submit(self._write_before_release, sequence, workflow_ids, send)

    def _write_before_release(self, sequence: int, workflow_ids: list[str],
                              send: Callable[[tuple[Any, ...]], None]) -> None:
        with self._lock:
            remaining = [(w, self._newest[w]) for w in workflow_ids if w in self._newest]
        failed = [workflow_id for workflow_id, record in remaining
                  if not self._materialize(workflow_id, record, ())]
        send(("U", sequence, failed))

    def newest_of(self, workflow_ids: Iterable[str]) -> list[tuple[str, bytes]]:
        """``(id, canonical state)`` of those whose newest record no state file holds yet.

        Answered from memory, in frame order (every write sent before the request is
        handed off by then): a read in the parent need not wait for this process's
        idle-priority thread to create thousands of files (10,000 woken workflows waited
        3-16 s for them). The files are still written later, as always."""
        with self._lock:
            newest = self._newest
            return [(w, newest[w][1]) for w in workflow_ids if w in newest]

    def flush(self) -> None:
        """Write every state only the journal holds (no sync: readers share the cache)."""
        self._materializer.submit(self._materialize_all, False).result()

    def finish(self) -> None:
        try:
            if self.journal_fd >= 0:
                self._materializer.submit(self._retire, self.journal_fd,
                                          self.journal_path).result()
                self.journal_fd = -1
        finally:
            self._materializer.shutdown(wait=True)

    def _materialize_handoff(self) -> None:
        with self._lock:
            items, self._handoff = self._handoff, {}
            self._handoff_scheduled = False
        for workflow_id, (record, checkpoints) in items.items():
            self._materialize(workflow_id, record, checkpoints)

    def _materialize(self, workflow_id: str, record: _Record,
                     checkpoints: Iterable[str]) -> bool:
        digest, body, state_path = record
        document = b"".join(_wrapped(digest, body))
        try:
            self._ensure_dir(os.path.dirname(state_path), workflow=True)
            write_file(state_path, document, self.temporary_suffix, self.fsync_each)
            self.files_written += 1
            for path in checkpoints:
                self._ensure_dir(os.path.dirname(path))
                write_file(path, document, self.temporary_suffix, self.fsync_each)
                self.files_written += 1
        except OSError as error:
            # The journal holds it durably; the files are written again later.
            self.materialize_errors.append(f"{state_path}: {error}")
            return False
        with self._lock:
            if self._newest.get(workflow_id) is record:  # nothing newer came meanwhile
                del self._newest[workflow_id]
        return True

    def _materialize_all(self, sync: bool) -> bool:
        """Write every state only a journal holds; False if any could not be written."""
        self._materialize_handoff()
        with self._lock:
            remaining = list(self._newest.items())
        written = [self._materialize(workflow_id, record, ())
                   for workflow_id, record in remaining]
        if sync and self.durable:
            self._sync_filesystem()
        return all(written)

    def _retire(self, fd: int, path: str) -> None:
        complete = self._materialize_all(True)
        os.close(fd)  # its lock goes: unless deleted below, the next store replays it
        if complete:  # else it is the only copy of a state its file could not take
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def _append_history(self, appends: list[tuple[str, list[bytes]]]) -> None:
        for path, documents in appends:
            with contextlib.suppress(OSError):  # history is a convenience, not the record
                self._ensure_dir(os.path.dirname(path))
                with gzip.open(path, "ab") as history:
                    history.writelines(documents)

    def _ensure_dir(self, directory: str, *, workflow: bool = False) -> None:
        if directory not in self._made_dirs:
            (make_workflow_directory if workflow else make_private_directory)(directory)
            self._made_dirs.add(directory)

    def _sync_filesystem(self) -> None:
        sync_filesystem(self.syncfs, self.state_directory, self.checkpoint_directory)


def _yield_the_cpu() -> None:
    """Run this thread only when a CPU would otherwise idle (Linux ``SCHED_IDLE``).

    State files are a convenience copy of what the journal already holds, yet creating a
    file costs 0.5 ms of kernel time on some file systems (measured here): at full speed
    the thread took a core from the event loop. Behind, it coalesces (newest state wins)
    and catches up when the loop pauses; journal appends keep their normal priority.
    """
    if not sys.platform.startswith("linux"):
        return  # no per-thread priority to lower: it competes as any thread does
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        with contextlib.suppress(AttributeError, OSError):
            # Linux only: a thread's ID names that thread here (elsewhere, a process).
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


class _Channel:
    """Frames in on stdin, out on stdout; reads return every complete frame available."""

    # The state file thread answers release requests ("U") while the main thread answers
    # appends: one frame at a time on the pipe.
    _send_lock = threading.Lock()

    def __init__(self) -> None:
        self._buffer = bytearray()
        # One buffer for every read: os.read(0, 1 MiB) had the allocator mmap 1 MiB,
        # mremap it to the frame's size and munmap it, three system calls and page
        # faults for each frame received.
        # readinto on a raw FileIO is one read(2) into it, and works where os.readv
        # does not (Windows).
        self._input = io.FileIO(0, "rb", closefd=False)
        self._chunk = bytearray(_READ_SIZE)
        self._chunk_view = memoryview(self._chunk)

    def receive(self) -> list[tuple[Any, ...]] | None:
        """At least one frame, or None at end of input (a torn last frame is dropped)."""
        while True:
            frames = self._complete_frames()
            if frames:
                return frames
            count = self._input.readinto(self._chunk)
            if not count:
                return None
            self._buffer += self._chunk_view[:count]

    def _complete_frames(self) -> list[tuple[Any, ...]]:
        return take_frames(self._buffer)

    @classmethod
    def send(cls, message: tuple[Any, ...]) -> None:
        view = memoryview(encode_frame(message))
        with cls._send_lock:
            while view:
                view = view[os.write(1, view):]


def _die_with_parent(parent_pid: int, portable: bool) -> None:
    """SIGKILL this process when its parent dies, as a writer thread would die with it
    (Linux). Portable, or elsewhere: nothing to set up; the end of input says it."""
    if not portable and sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, 9, 0, 0, 0)
    if os.getppid() != parent_pid:  # it died before the line above took effect
        os._exit(1)


def _data_sync() -> Callable[[int], None]:
    """What makes an append durable: ``fdatasync`` (Linux, the BSDs); on macOS, whose
    ``fsync`` leaves the data in the drive's cache, ``F_FULLFSYNC``."""
    import fcntl  # the writer process only (see start_journal)

    full_sync = getattr(fcntl, "F_FULLFSYNC", None)
    if full_sync is not None:
        def full(fd: int) -> None:
            fcntl.fcntl(fd, full_sync)
        return full
    return getattr(os, "fdatasync", os.fsync)


def _serve(writer: Writer, channel: _Channel) -> bool:
    """Serve until the input ends; True if the parent said it was closing ("Q") first."""
    closing = False
    while (frames := channel.receive()) is not None:
        group: list[tuple[Any, ...]] = []
        for frame in frames:
            if frame[0] == "W":
                group.append(frame)
                continue
            _write_group(writer, channel, group)
            group = []
            if frame[0] == "Q":
                closing = True
                continue
            if frame[0] == "U":  # after the group above: their last writes are handed off
                writer.write_before_release(frame[1], frame[2], channel.send)
                continue
            if frame[0] == "R":  # likewise: it sees every write sent before it
                channel.send(("R", frame[1], writer.newest_of(frame[2])))
                continue
            writer.flush()
            channel.send(("F", frame[1]))
        _write_group(writer, channel, group)
    return closing


def _write_group(writer: Writer, channel: _Channel, group: list[tuple[Any, ...]]) -> None:
    """One append and one sync for every batch that arrived while the last one synced."""
    if not group:
        return
    # The journal's lines are put together in one join (each wrapped document is not
    # made on its own: a file written from a record later wraps it then).
    pieces: list[bytes] = []
    batches = []
    for _, _, items, _ in group:
        records = []
        for workflow_id, body, state_path, checkpoints in items:
            digest = _digest(body)
            pieces += _wrapped(digest, body)
            records.append((workflow_id, (digest, body, state_path), checkpoints))
        batches.append(records)
    data = b"".join(pieces)
    try:
        rotated = writer.append(data)
    except OSError as error:
        channel.send(("E", group[0][1], group[-1][1], error.errno or 0,
                      error.filename or writer.journal_path, error.strerror or str(error)))
        return
    channel.send(("A", group[-1][1]))
    if rotated:
        channel.send(("J", writer.journal_path))
    for items, (_, _, _, appends) in zip(batches, group, strict=True):
        writer.hand_off(items, appends)
    writer.zero_ahead(len(data))


def main(argv: list[str]) -> int:
    (parent_pid, journal_directory, state_directory, checkpoint_directory, durable, limit,
     portable) = argv
    _die_with_parent(int(parent_pid), portable == "1")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    writer = Writer(int(parent_pid), journal_directory, state_directory, checkpoint_directory,
                    durable == "1", int(limit))
    channel = _Channel()
    try:
        writer.start_journal()
    except OSError as error:
        channel.send(("X", error.errno or 0, error.filename or journal_directory,
                      error.strerror or str(error)))
        return 1
    channel.send(("R", writer.journal_path))
    try:
        closing = _serve(writer, channel)
    except BaseException:
        writer.finish()  # what it acknowledged is in files; the traceback says the rest
        raise
    if not closing:
        # The input ended without a "Q": its parent died (on Linux the kernel's SIGKILL
        # is on its way; elsewhere this is how the writer learns it). Stop now, as a
        # thread of it would have: the journal stays, locked until this exit, for the
        # next start to replay.
        os._exit(1)
    writer.finish()
    channel.send(("S", writer.files_written, writer.materialize_errors))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
