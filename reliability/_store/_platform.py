"""What the file store needs from the operating system, and what stands in where it is
missing.

Linux has everything the fast paths use: open file description locks (``F_OFD_SETLK``)
for claims, ``PR_SET_PDEATHSIG`` so the writer dies with its parent, ``syncfs``,
``fdatasync``. macOS and the BSDs lack the first two: there claims are one ``flock``-ed
file per running workflow (see ``_claims.py``) and the writer exits when its input pipe
closes, which its parent's death does too (see ``_writer.py``). Windows has no ``fcntl``
at all: ``import reliability`` works there, and a FileStore refuses to open with one
error naming what is missing (a MemoryStore, or a store of your own, still works).

``WORKFLOW_STORE_PORTABLE=1`` in the environment makes a FileStore on Linux take the
macOS/BSD paths too (``FileStore(portable=True)`` does it for one store), so the tests can
run them on Linux and they cannot rot unnoticed.
"""

from __future__ import annotations

import os
import sys
from types import ModuleType

from .._errors import ConfigurationError

__all__ = ["LINUX", "O_NOFOLLOW", "PORTABLE_VARIABLE", "fcntl", "portable_requested",
           "process_alive",
           "require_file_locks"]

fcntl: ModuleType | None
try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

LINUX = sys.platform.startswith("linux")
# Windows lacks O_NOFOLLOW; it never gets far enough to use it (require_file_locks).
O_NOFOLLOW: int = getattr(os, "O_NOFOLLOW", 0)
PORTABLE_VARIABLE = "WORKFLOW_STORE_PORTABLE"


def portable_requested(explicit: bool | None) -> bool:
    """Whether a FileStore takes the paths every POSIX system has (flock claims, a writer
    that watches its pipe) instead of Linux's: ``explicit`` if given, else the
    environment's ``WORKFLOW_STORE_PORTABLE`` ("1" forces them), else only off Linux."""
    if explicit is not None:
        return explicit
    return os.environ.get(PORTABLE_VARIABLE, "") == "1" or not LINUX


def require_file_locks() -> ModuleType:
    """The ``fcntl`` module; ConfigurationError on a system without it (Windows)."""
    if fcntl is None:
        raise ConfigurationError(
            f"FileStore is not supported on this platform ({sys.platform}): it needs POSIX "
            "file locks (the fcntl module: flock and fcntl locks) for its claims and its "
            "journal, and this Python has no fcntl. Run on Linux, macOS or a BSD (or WSL), "
            "or give the Runtime another store (MemoryStore keeps states in memory only)")
    return fcntl


def process_alive(pid: int) -> bool:
    """Whether a process with this PID runs (a zombie does not: it only waits to be
    reaped); True when another user's process has it, since it might be the one meant."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if sys.platform.startswith("linux"):
        try:
            with open(f"/proc/{pid}/stat", "rb") as stat:
                # "pid (comm) state ...": comm may hold spaces and parentheses.
                return stat.read().rsplit(b")", 1)[1].split()[0] != b"Z"
        except (OSError, IndexError):
            return True
    return True
