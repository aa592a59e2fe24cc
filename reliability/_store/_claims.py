"""Claims behind a platform seam: the locks that make a workflow run in one process only
(docs/architecture.md, invariant 9).

A FileStore takes every claim through ``ClaimLocks``: ``lock`` and ``unlock`` one
workflow's lock, on the event loop's thread and without waiting (a lock held elsewhere is
refused at once), so two tasks of one loop can never both win one workflow. Each lock is
released by the kernel when its holder dies, conflicts with every other descriptor's lock
on it, this process's other stores included, and survives the store closing until it is
released. Two implementations:

``ByteLocks`` (Linux)
    Open file description locks (``F_OFD_SETLK``) on one byte per workflow of 256 shared
    lock files, opened once per store: a claim is one ``fcntl`` call of a few
    microseconds, no file and no descriptor of its own.
``FileLocks`` (macOS, the BSDs, and Linux with ``WORKFLOW_STORE_PORTABLE=1``)
    One file per claimed workflow, ``{state_directory}/_claims/{id}.lock``, held open with
    an exclusive ``flock`` while claimed and deleted on release: one descriptor per
    running workflow (mind ``ulimit -n`` when thousands run at once). A process that
    forks without exec'ing hands its locks to the child too.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import struct
from pathlib import Path
from typing import Protocol

from ._layout import CLAIMS_DIRECTORY, storage_error
from ._platform import O_NOFOLLOW, require_file_locks
from ._writer import make_private_directory

__all__ = ["CLAIM_SHARDS", "ByteLocks", "ClaimLocks", "FileLocks", "claim_locks"]

# The kernel keeps a file's locks in one list and walks it on every lock and unlock:
# 10,000 claims in one file made each release cost 115 us on the loop. 256 files keep
# each list short; they are created once per state directory and opened once per store.
CLAIM_SHARDS = 256
_F_OFD_SETLK = 37  # Linux's F_OFD_SETLK (fcntl exports it from Python 3.9 on Linux only)
_FLOCK = struct.Struct("hhqqi4x")  # struct flock: type, whence, start, length, pid


class ClaimLocks(Protocol):
    """One store's claim locks. ``open`` (blocking: the store runs it in a thread) before
    ``lock``; ``close`` gives back whatever is still held."""

    @property
    def opened(self) -> bool: ...

    def open(self) -> None: ...

    def lock(self, workflow_id: str) -> bool:
        """Take ``workflow_id``'s lock; False if it is held elsewhere."""
        ...

    def unlock(self, workflow_id: str) -> None: ...

    def close(self) -> None: ...

    def path(self, workflow_id: str) -> Path:
        """The file holding ``workflow_id``'s lock, for messages."""
        ...


def claim_locks(state_directory: Path, *, portable: bool) -> ClaimLocks:
    """The claim locks this platform (or the portable switch) calls for."""
    directory = state_directory / CLAIMS_DIRECTORY
    return FileLocks(directory) if portable else ByteLocks(directory)


class ByteLocks:
    """Linux: OFD locks on one byte per workflow of ``CLAIM_SHARDS`` shared files."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        # One descriptor per claims file, opened once: a claim is then one fcntl() on the
        # loop's thread (a few microseconds), no open, no thread hop, no descriptor each.
        self._fds: list[int] = []

    @property
    def opened(self) -> bool:
        return bool(self._fds)

    def open(self) -> None:
        """Open (creating once per state directory) every claims file.

        Linux open file description locks are released by the kernel when the descriptor
        is closed or its process dies, and conflict with other descriptors' locks even in
        this process (another store). Files opened once, not per workflow: a lock file per
        workflow cost a directory and a file creation, ~1 ms of kernel time each on this
        machine's disk.
        """
        self._fcntl = require_file_locks()
        fds: list[int] = []
        try:
            make_private_directory(self.directory)
            for shard in range(CLAIM_SHARDS):
                path = self.directory / f"{shard:02x}.lock"
                fds.append(os.open(path, os.O_RDWR | os.O_CREAT | O_NOFOLLOW, 0o600))
        except OSError as error:
            for fd in fds:
                os.close(fd)
            raise storage_error(self.directory, error) from None
        self._fds = fds

    def lock(self, workflow_id: str) -> bool:
        return self._set(workflow_id, self._fcntl.F_WRLCK)

    def unlock(self, workflow_id: str) -> None:
        self._set(workflow_id, self._fcntl.F_UNLCK)

    def _set(self, workflow_id: str, kind: int) -> bool:
        shard, byte = _position(workflow_id)
        try:
            self._fcntl.fcntl(self._fds[shard], _F_OFD_SETLK,
                              _FLOCK.pack(kind, os.SEEK_SET, byte, 1, 0))
        except OSError as error:
            if error.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise storage_error(self.path(workflow_id), error) from None
        return True

    def close(self) -> None:
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)

    def path(self, workflow_id: str) -> Path:
        shard, _ = _position(workflow_id)
        return self.directory / f"{shard:02x}.lock"


def _position(workflow_id: str) -> tuple[int, int]:
    """(claims file, byte in it) standing for ``workflow_id``: from a 64-bit hash, so
    two IDs share a byte with odds of 1 in 10^7 even among a million running workflows."""
    digest = int.from_bytes(hashlib.blake2b(workflow_id.encode(), digest_size=8).digest(),
                            "big")
    return digest % CLAIM_SHARDS, digest >> 2


class FileLocks:
    """Every POSIX system: an exclusive ``flock`` on one file per claimed workflow."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._held: dict[str, int] = {}  # workflow ID -> the locked file's descriptor
        self._opened = False

    @property
    def opened(self) -> bool:
        return self._opened

    def open(self) -> None:
        self._fcntl = require_file_locks()
        try:
            make_private_directory(self.directory)
        except OSError as error:
            raise storage_error(self.directory, error) from None
        self._opened = True

    def lock(self, workflow_id: str) -> bool:
        path = self.path(workflow_id)
        fcntl = self._fcntl
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | O_NOFOLLOW, 0o600)
            except OSError as error:
                raise storage_error(path, error) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                os.close(fd)
                if error.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                    return False
                raise storage_error(path, error) from None
            # The holder before us deletes the file as it releases it: a lock taken on a
            # file no longer at this path (or replaced by a newer one) guards nothing.
            try:
                current = os.stat(path, follow_symlinks=False)
            except FileNotFoundError:
                os.close(fd)
                continue
            mine = os.fstat(fd)
            if (current.st_dev, current.st_ino) != (mine.st_dev, mine.st_ino):
                os.close(fd)
                continue
            self._held[workflow_id] = fd
            return True

    def unlock(self, workflow_id: str) -> None:
        fd = self._held.pop(workflow_id, None)
        if fd is None:
            return
        # Deleted while still locked, then closed (which unlocks): whoever opened the old
        # file meanwhile sees it is gone once it gets the lock, and tries again.
        try:
            with contextlib.suppress(OSError):  # left behind, it is only an unlocked file
                os.unlink(self.path(workflow_id))
        finally:
            os.close(fd)

    def close(self) -> None:
        for workflow_id in list(self._held):
            self.unlock(workflow_id)
        self._opened = False

    def path(self, workflow_id: str) -> Path:
        return self.directory / f"{workflow_id}.lock"
