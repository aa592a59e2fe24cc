"""The file store's reads: a workflow's newest valid state, and every workflow's.

Blocking file reads, run in a thread by ``FileStore`` (or directly by a caller that is not
on the event loop, such as ``diagnose``). Nothing here follows a symbolic link out of the
state directory or reads a file past ``MAX_STATE_BYTES``.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Any

from .._errors import StateCorruptedError, WorkflowNotFoundError
from .._ids import validate_workflow_id
from ._platform import O_NOFOLLOW
from ._protocol import LoadedState, check_state, decode_document

__all__ = ["MAX_STATE_BYTES", "NeverSavedError", "list_stored", "load_stored",
           "read_bounded", "state_file"]

MAX_STATE_BYTES = 16 * 1024 * 1024  # a state file larger than this is refused, not parsed


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
