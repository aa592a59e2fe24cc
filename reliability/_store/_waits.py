"""The file store's durable waits: signals, the index of parked workflows, and notices.

Layout under the state directory (``_signals`` is skipped by listings: not a workflow ID)::

    _signals/{id}/{name}/{ns:020d}-{pid}.json   one signal each, its JSON payload
    _signals/_parked/{id}~{deadline}~{name}~{index}   a parked workflow (empty file)
    _signals/_notices/{id}~{name}~{pid}~{ns}    "a signal came": a hint for other processes

These small files are written by a thread of the process that sends or parks, not by the
writer: the exception to docs/architecture.md, invariant 4 that its "Durable waits"
section explains (one file per event, rare next to stage writes, never in the files the
writer owns). A signal is synced before it is acknowledged; the parked entry is synced
before the state that says ``waiting`` is queued (invariant 11), so a crash leaves at
worst an entry whose state does not wait (dropped when checked). Blocking functions:
``FileStore`` runs them in a thread.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Iterable
from pathlib import Path

from .._ids import validate_workflow_id
from ._protocol import ParkedEntry

__all__ = ["NOTICE_SECONDS", "SIGNALS_DIRECTORY", "drop_signals", "list_parked",
           "read_signal", "remove_parked", "remove_parked_many", "signalled", "signals_ready",
           "take_notices", "write_parked", "write_signal"]

SIGNALS_DIRECTORY = "_signals"
_PARKED = "_parked"
_NOTICES = "_notices"
# A notice nobody took within this long is dropped by whoever sees it: every runtime that
# watches takes them every ``poll_seconds`` (1 s), and a runtime that opens rescans the
# parked index anyway. The sender's own notices are never taken by itself: they end so.
NOTICE_SECONDS = 300.0


def _signal_directory(root: Path, workflow_id: str, name: str) -> Path:
    return root / SIGNALS_DIRECTORY / validate_workflow_id(workflow_id) / name


def write_signal(root: Path, workflow_id: str, name: str, payload: bytes,
                 durable: bool) -> Path:
    """Store one signal atomically (temporary file, sync, rename), then leave a notice;
    returns the notice's path."""
    directory = _signal_directory(root, workflow_id, name)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    stamp = f"{time.time_ns():020d}-{os.getpid()}"
    final = directory / f"{stamp}.json"
    temporary = directory / f".{stamp}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, payload)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(temporary, final)
    if durable:
        _sync_directory(directory)
    notices = root / SIGNALS_DIRECTORY / _NOTICES
    notices.mkdir(parents=True, exist_ok=True, mode=0o700)
    # A hint only: a lost notice costs a wake at the next open or rescan, never a signal.
    notice = notices / f"{workflow_id}~{name}~{os.getpid()}~{time.time_ns()}"
    notice.touch()
    return notice


def _sync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _signal_files(root: Path, workflow_id: str, name: str) -> list[str]:
    try:
        names = os.listdir(_signal_directory(root, workflow_id, name))
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.endswith(".json") and not n.startswith("."))


def read_signal(root: Path, workflow_id: str, name: str, index: int) -> bytes | None:
    """The payload of the ``index``-th signal ``name`` sent to the workflow, or None."""
    files = _signal_files(root, workflow_id, name)
    if index >= len(files):
        return None
    return (_signal_directory(root, workflow_id, name) / files[index]).read_bytes()


def signals_ready(root: Path, wanted: Iterable[tuple[str, str, int]]) -> list[str]:
    """Of ``(id, name, index)``, the IDs whose ``index``-th signal ``name`` is stored.

    For many, one listing of the workflows that have any signal first: 10,000 woken past
    their deadline mostly have none, and a look into each one's missing directory was
    10,000 failed ``open``s and exceptions."""
    asked = list(wanted)
    if len(asked) > 1:
        try:
            signalled_ids = set(os.listdir(root / SIGNALS_DIRECTORY))
        except FileNotFoundError:
            return []
        asked = [item for item in asked if item[0] in signalled_ids]
    return [w for w, name, index in asked if len(_signal_files(root, w, name)) > index]


def _parked_name(entry: ParkedEntry) -> str:
    workflow_id, deadline, name, index = entry
    return f"{validate_workflow_id(workflow_id)}~{deadline!r}~{name}~{index}"


def write_parked(root: Path, entry: ParkedEntry, durable: bool) -> None:
    """Create the entry (its name is its content); with ``durable``, synced before the
    state that says ``waiting`` is queued (docs/architecture.md, invariant 11)."""
    directory = root / SIGNALS_DIRECTORY / _PARKED
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    (directory / _parked_name(entry)).touch()
    if durable:
        _sync_directory(directory)


def remove_parked(root: Path, entry: ParkedEntry) -> None:
    with contextlib.suppress(FileNotFoundError):  # woken before: nothing to drop
        os.unlink(root / SIGNALS_DIRECTORY / _PARKED / _parked_name(entry))


def remove_parked_many(root: Path, entries: Iterable[ParkedEntry]) -> None:
    """``remove_parked`` for each (one thread hop for a batch of woken workflows)."""
    for entry in entries:
        remove_parked(root, entry)


def list_parked(root: Path) -> list[ParkedEntry]:
    """Every parked entry (one scan of one directory; nothing is read)."""
    try:
        names = os.listdir(root / SIGNALS_DIRECTORY / _PARKED)
    except FileNotFoundError:
        return []
    entries: list[ParkedEntry] = []
    for file_name in names:
        parts = file_name.split("~")
        if len(parts) != 4:
            continue
        try:
            entries.append((validate_workflow_id(parts[0]), float(parts[1]), parts[2],
                            int(parts[3])))
        except ValueError:
            continue  # not ours: never act on it
    return entries


def take_notices(root: Path) -> list[tuple[str, str]]:
    """``(id, name)`` of signals other processes sent since the last take (each notice is
    taken by one process: the first to see it)."""
    directory = root / SIGNALS_DIRECTORY / _NOTICES
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    mine = str(os.getpid())
    expired = time.time_ns() - int(NOTICE_SECONDS * 1e9)
    taken: list[tuple[str, str]] = []
    for file_name in names:
        parts = file_name.split("~")
        if len(parts) != 4:
            continue
        if parts[2] == mine:  # our own sends wake directly; old ones are dropped
            if parts[3].isdigit() and int(parts[3]) < expired:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(directory / file_name)
            continue
        try:
            os.unlink(directory / file_name)
            taken.append((validate_workflow_id(parts[0]), parts[1]))
        except (FileNotFoundError, ValueError):
            continue  # another process took it first, or not ours
    return taken


def signalled(root: Path) -> list[str]:
    """The IDs of the workflows that have signals stored."""
    try:
        names = os.listdir(root / SIGNALS_DIRECTORY)
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        with contextlib.suppress(ValueError):  # _parked, _notices, or not ours
            found.append(validate_workflow_id(name))
    return found


def drop_signals(root: Path, workflow_id: str, notices: Iterable[Path], scan: bool) -> None:
    """Remove a finished workflow's signals and the given notices; with ``scan``, also
    every notice and parked entry of it (a scan of both directories: for what a crash or
    another process left)."""
    prefix = f"{validate_workflow_id(workflow_id)}~"
    shutil.rmtree(root / SIGNALS_DIRECTORY / workflow_id, ignore_errors=True)
    for notice in notices:
        with contextlib.suppress(FileNotFoundError):  # taken by another process
            os.unlink(notice)
    for kind in (_NOTICES, _PARKED) if scan else ():
        directory = root / SIGNALS_DIRECTORY / kind
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            continue
        for file_name in names:
            if file_name.startswith(prefix):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(directory / file_name)
