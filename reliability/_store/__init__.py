"""Durable workflow state: the ``Store`` protocol and the stores that implement it.

One topic per module:

``_protocol.py``
    The ``Store`` protocol (what a store promises; enough to write one), ``Claim``,
    ``LoadedState``, and the checksummed state documents.
``_file.py``
    ``FileStore``, the embedded store: its client on the event loop (batches, group
    commit, answers, restarts of its writer).
``_writer_link.py``, ``_writer.py``
    Writer supervision (the loop's end of the pipe: start, send, read answers, notice a
    death) and the writer process itself (journal appends, ``fdatasync``, state files).
``_replay.py``
    Journal replay: state files brought up to date from journals whose writer died.
``_reads.py``
    Reads: a workflow's newest valid state (or checkpoint), every workflow's state.
``_claims.py``, ``_platform.py``
    Claims behind a platform seam (Linux OFD byte locks, or a ``flock``-ed file per
    workflow), and what each operating system offers.
``_layout.py``
    Where the file store's files are.
``_memory.py``
    ``MemoryStore``, this process only.
"""

from ._file import (
    JOURNAL_LIMIT,
    UNREAD_LIMIT,
    WAKE_CHUNK,
    WRITER_RESTARTS,
    FileStore,
)
from ._memory import MemoryStore
from ._platform import PORTABLE_VARIABLE
from ._protocol import (
    SCHEMA_VERSION,
    Claim,
    DueClaims,
    LoadedState,
    ParkedEntry,
    SignalStore,
    Snapshot,
    Store,
    decode_document,
    encode_document,
)
from ._reads import MAX_STATE_BYTES, read_bounded
from ._writer import make_private_directory

__all__ = ["JOURNAL_LIMIT", "MAX_STATE_BYTES", "PORTABLE_VARIABLE",
           "SCHEMA_VERSION", "UNREAD_LIMIT", "WAKE_CHUNK", "WRITER_RESTARTS", "Claim",
           "DueClaims", "FileStore", "LoadedState", "MemoryStore", "ParkedEntry", "SignalStore",
           "Snapshot", "Store", "decode_document",
           "encode_document", "make_private_directory", "read_bounded"]
