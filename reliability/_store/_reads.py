"""The file store's reads: a workflow's newest valid state, and every workflow's.

Blocking file reads, run in a thread by ``FileStore`` (or directly by a caller that is not
on the event loop, such as ``diagnose``). Nothing here follows a symbolic link out of the
state directory or reads a file past ``MAX_STATE_BYTES``.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import orjson

from .._errors import StateCorruptedError, WorkflowError, WorkflowNotFoundError
from .._ids import validate_workflow_id
from ._platform import O_NOFOLLOW
from ._protocol import LoadedState, check_state, decode_document, decode_written

__all__ = ["MAX_STATE_BYTES", "NeverSavedError", "list_stored", "load_many_stored",
           "load_stored", "read_bounded", "state_file"]

MAX_STATE_BYTES = 16 * 1024 * 1024  # a state file larger than this is refused, not parsed
# ``load_many_stored`` reads a state file in one ``read`` of this many bytes; a file that
# fills it takes ``load_stored``'s path (most states are 1-4 KiB). Below the allocator's
# mmap threshold, so the buffer costs no system call of its own.
_ONE_READ = 64 * 1024
# Non-blocking: a FIFO planted as a state file must not hang the read (a regular file
# ignores the flag).
_ONE_READ_FLAGS = os.O_RDONLY | O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0)
# From this many workflows on, one scan of the state directory (its entries' types come
# with their names) replaces a ``lstat`` per workflow directory.
_SCAN_FROM = 64


class NeverSavedError(WorkflowNotFoundError):
    """Raised when a workflow's directory holds a claim but no state was ever saved."""


def state_file(state_directory: Path, workflow_id: str) -> Path:
    """``{state_directory}/{id}/state.json``, for a valid ID only."""
    return state_directory / validate_workflow_id(workflow_id) / "state.json"


def read_bounded(path: Path) -> bytes:
    """Read a state file without following a symlink and without reading a huge file."""
    try:
        fd = os.open(path, os.O_RDONLY | O_NOFOLLOW)
    except OSError as error:
        if error.errno == errno.ELOOP:  # the final component is a symlink
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


def load_stored(state_directory: Path, checkpoint_directory: Path,
                workflow_id: str) -> LoadedState:
    """``workflow_id``'s state file, or its newest valid checkpoint if that is damaged."""
    path = state_file(state_directory, workflow_id)
    _refuse_symlinked_directory(path.parent)
    problems: list[str] = []
    try:
        state = check_state(decode_document(read_bounded(path), str(path)), workflow_id,
                            str(path))
        return LoadedState(state, str(path))
    except FileNotFoundError:
        if not path.parent.exists():
            raise WorkflowNotFoundError(
                f"no workflow {workflow_id} under {state_directory}") from None
        problems.append(f"{path}: missing")
    except StateCorruptedError as error:
        problems.append(str(error))
    except OSError as error:
        problems.append(f"{path}: unreadable: {error.strerror}")
    return _newest_checkpoint(path, checkpoint_directory, workflow_id, problems)


def _newest_checkpoint(path: Path, checkpoint_directory: Path, workflow_id: str,
                       problems: list[str]) -> LoadedState:
    best: tuple[float, str, dict[str, Any]] | None = None
    for candidate in checkpoint_directory.glob(f"{workflow_id}_checkpoint_*.json"):
        try:
            state = check_state(decode_document(read_bounded(candidate), str(candidate)),
                                workflow_id, str(candidate))
        except (StateCorruptedError, OSError) as error:
            problems.append(str(error))
            continue
        key = (float(state.get("revision") or 0), str(candidate), state)
        if best is None or key[:2] > best[:2]:
            best = key
    if best is None:
        if problems == [f"{path}: missing"]:
            raise NeverSavedError(
                f"workflow {workflow_id} was claimed but never saved: its process "
                "stopped before its first stage began, so nothing happened; start it "
                "again")
        raise StateCorruptedError(str(path), "no valid state or checkpoint: "
                                             + "; ".join(problems))
    return LoadedState(best[2], best[1], tuple(problems))


def list_stored(state_directory: Path, checkpoint_directory: Path,
                wanted: frozenset[str] | None) -> list[LoadedState]:
    """Every workflow's state (with a status in ``wanted``, if given); a damaged one is
    listed as ``corrupted``, a directory never saved to is skipped."""
    found: list[LoadedState] = []
    try:
        entries = list(os.scandir(state_directory))
    except FileNotFoundError:
        return found
    for entry in entries:
        try:
            workflow_id = validate_workflow_id(entry.name)
        except ValueError:
            continue  # not ours (or hostile): never build a path from it
        try:
            loaded = load_stored(state_directory, checkpoint_directory, workflow_id)
        except NeverSavedError:
            continue  # only a lock file: nothing to list or resume
        except (StateCorruptedError, WorkflowNotFoundError) as error:
            found.append(LoadedState({"workflow_id": workflow_id, "status": "corrupted",
                                      "error": str(error)}, str(entry.path), (str(error),)))
            continue
        if wanted is None or loaded.state.get("status") in wanted:
            found.append(loaded)
    return found


def load_many_stored(state_directory: Path, checkpoint_directory: Path,
                     workflow_ids: Collection[str], records: Mapping[str, bytes]
                     ) -> dict[str, LoadedState | WorkflowError]:
    """``load_stored`` of each workflow (or the error it raises), for many at once: what
    waking or resuming thousands of workflows reads, in one thread hop.

    ``workflow_ids`` must be valid already (the store validated them when it claimed
    them). ``records``: canonical states newer than their files (the writer's, from
    memory): decoded instead of a file. Otherwise a state file costs ``open``, one
    ``read`` and ``close`` (``load_stored``: an ``lstat``, an ``fstat`` and a second
    ``read`` besides), its checksum is taken over its bytes as read, and its workflow
    directories are checked for links by one scan of the state directory; anything
    unusual (a link, a large, damaged or missing file) goes through ``load_stored``, which
    says what is wrong and falls back to a checkpoint as ever."""
    prefix = os.path.join(state_directory, "")
    linked = (_linked_entries(state_directory) if len(workflow_ids) >= _SCAN_FROM
              else None)
    found: dict[str, LoadedState | WorkflowError] = {}
    for workflow_id in workflow_ids:
        path = f"{prefix}{workflow_id}{os.sep}state.json"
        record = records.get(workflow_id)
        state: Any = None
        if record is not None:
            state = orjson.loads(record)
        elif linked is not None and workflow_id not in linked:
            state = _read_written(path)
        if isinstance(state, dict) and state.get("workflow_id") == workflow_id:
            found[workflow_id] = LoadedState(state, path)
            continue
        try:
            found[workflow_id] = load_stored(state_directory, checkpoint_directory,
                                             workflow_id)
        except WorkflowError as error:
            found[workflow_id] = error
    return found


def _read_written(path: str) -> dict[str, Any] | None:
    """The state in ``path`` if it is small and exactly as the writer wrote it, read with
    one ``read``; None for anything else."""
    try:
        fd = os.open(path, _ONE_READ_FLAGS)
    except OSError:
        return None
    try:
        data = os.read(fd, _ONE_READ)
    except OSError:
        return None
    finally:
        os.close(fd)
    # A regular file reads short only at its end: one that fills the buffer may be larger.
    return decode_written(data) if len(data) < _ONE_READ else None


def _linked_entries(state_directory: Path) -> set[str] | None:
    """The names in ``state_directory`` that are symbolic links, from one scan (each
    entry's type comes with it); None if it cannot be scanned (then each workflow takes
    ``load_stored``'s path, and its errors)."""
    try:
        with os.scandir(state_directory) as entries:
            return {entry.name for entry in entries if entry.is_symlink()}
    except OSError:
        return None
