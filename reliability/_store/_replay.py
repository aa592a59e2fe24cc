"""Journal replay: bring state files up to date from journals whose writer died.

Run by a FileStore as it opens (in a thread), before anything else reads state files.
A journal's writer holds an exclusive ``flock`` on it for as long as it lives, so a
journal whose lock can be taken is an orphan: every state in it that is newer than its
``state.json`` is written there, the file system is synced, and only then is the journal
deleted (kept if any state could not be written: it is that state's only copy).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from .._errors import StateCorruptedError
from .._ids import validate_workflow_id
from .._logging import logger
from ._platform import O_NOFOLLOW, require_file_locks
from ._protocol import decode_document
from ._reads import read_bounded, state_file

__all__ = ["replay_orphan_journals"]


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
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its process is alive and owns those workflows
            complete, written = _replay(path, state_directory, write)
            replayed += written
            if sync is not None:
                sync()
            if complete:  # else kept, the only copy of what could not be written
                os.unlink(path)
        finally:
            os.close(fd)
    return replayed


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
