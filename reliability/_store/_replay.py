"""Journal replay: bring state files up to date from journals whose writer died.

Run by a FileStore as it opens (in a thread), before anything else reads state files.
A journal's writer holds an exclusive ``flock`` on it for as long as it lives, so a
journal whose lock can be taken is an orphan: every state in it that is newer than its
``state.json`` is written there, the file system is synced, and only then is the journal
deleted (kept if any state could not be written: it is that state's only copy).

A writer outlives its parent by a moment: the kernel kills it (parent-death signal), or it
sees the end of its input, only after the parent died, and the parent's claims are free
from that death on. A journal still locked whose owner (the PID in its name) is dead is
therefore waited for, not skipped: skipped, its states stayed unread while their
workflows' claims were free (docs/architecture.md, invariant 12).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from .._errors import StateCorruptedError
from .._ids import validate_workflow_id
from .._logging import logger
from ._platform import O_NOFOLLOW, process_alive, require_file_locks
from ._protocol import decode_document
from ._reads import read_bounded, state_file

__all__ = ["ORPHAN_WAIT", "replay_orphan_journals"]

# How long a journal whose owner died may stay locked by its dying writer before it is
# left for the next start (with a warning): the writer is killed with its parent, so
# this is milliseconds unless the machine stalls.
ORPHAN_WAIT = 30.0

# Journals waited for ORPHAN_WAIT in vain by this process: not waited for again. Their
# owner may only look dead (a process in another PID namespace sharing the volume), and
# every claim round of a worker replays: one wait per journal, not one per round.
_given_up: set[str] = set()


def replay_orphan_journals(journal_directory: Path, state_directory: Path,
                           write: Callable[[Path, bytes], None],
                           sync: Callable[[], None] | None) -> int:
    """Replay every orphan journal in ``journal_directory``; returns how many workflows'
    state files were written. ``write`` replaces a file atomically, ``sync`` (if
    durable) makes what was written durable."""
    fcntl = require_file_locks()
    replayed = 0
    for path in sorted(journal_directory.glob("journal-*.log")):
        try:
            fd = os.open(path, os.O_RDWR | O_NOFOLLOW)
        except OSError:
            continue
        try:
            if not _lock_orphan(fd, path, fcntl):
                continue  # its process is alive and owns those workflows
            if not os.path.exists(path):
                continue  # replayed and deleted by another store while this one waited
            complete, written = _replay(path, state_directory, write)
            replayed += written
            if sync is not None:
                sync()
            if complete:  # else kept, the only copy of what could not be written
                os.unlink(path)
        finally:
            os.close(fd)
    return replayed


def _lock_orphan(fd: int, path: Path, fcntl: ModuleType) -> bool:
    """Lock ``path``'s journal if its writer is gone, waiting for a writer whose parent
    died already; False if its owner is alive."""
    exclusive = fcntl.LOCK_EX | fcntl.LOCK_NB
    deadline = None
    while True:
        try:
            fcntl.flock(fd, exclusive)
            return True
        except BlockingIOError:
            pass
        if str(path) in _given_up or _owner_alive(path):
            return False
        now = time.monotonic()
        if deadline is None:
            deadline = now + ORPHAN_WAIT
        elif now > deadline:
            _given_up.add(str(path))
            logger.warning("The journal %s stays locked %gs after the process its name "
                           "gives died (or lives in another PID namespace); it is replayed "
                           "once its lock is free, at a later start", path, ORPHAN_WAIT)
            return False
        time.sleep(0.005)  # a thread of the store, never the loop: the writer's exit


def _owner_alive(path: Path) -> bool:
    """Whether the process named in ``journal-{pid}-*.log`` is alive (not a zombie);
    alive if the name says nothing or another user's process has that PID."""
    try:
        pid = int(path.name.split("-")[1])
    except (IndexError, ValueError):
        return True
    return pid == os.getpid() or process_alive(pid)


def _replay(journal: Path, state_directory: Path,
            write: Callable[[Path, bytes], None]) -> tuple[bool, int]:
    complete, written = True, 0
    for workflow_id, (revision, document) in _newest_per_workflow(journal).items():
        path = state_file(state_directory, workflow_id)
        if revision <= _materialized_revision(path):
            continue
        try:
            write(path, document)
        except OSError as error:
            complete = False
            logger.warning("Could not write %s from the journal %s: %s; the journal is "
                           "kept and replayed again at the next start", path, journal,
                           error.strerror or error)
            continue
        written += 1
    return complete, written


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


def _materialized_revision(path: Path) -> int:
    try:
        state = decode_document(read_bounded(path), str(path))
    except (OSError, StateCorruptedError):
        return -1
    return int(state.get("revision") or 0)
