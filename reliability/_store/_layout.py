"""Where the file store's files are, and how an error on one of them is told.

Under the project root (the paths the configuration names)::

    {state_directory}/{id}/state.json             current state, atomic, checksummed
    {state_directory}/{id}/history.jsonl.gz       compressed earlier states
    {state_directory}/_journal/journal-*.log      the durability point (see FileStore)
    {state_directory}/_claims/{00..ff}.lock       claims on Linux: one locked byte each
    {state_directory}/_claims/{id}.lock           claims elsewhere: one flock-ed file each
    {checkpoint_directory}/{id}_checkpoint_{stage}.json
"""

from __future__ import annotations

import functools
from pathlib import Path

from .._errors import ResourceError, classify

__all__ = ["CLAIMS_DIRECTORY", "JOURNAL_DIRECTORY", "checkpoint_name", "storage_error"]

CLAIMS_DIRECTORY = "_claims"
JOURNAL_DIRECTORY = "_journal"


@functools.lru_cache(maxsize=4096)
def _safe_stage(stage: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in stage)[:80]


def checkpoint_name(workflow_id: str, stage: str) -> str:
    """The file name of ``workflow_id``'s checkpoint after ``stage`` (ID validated)."""
    return f"{workflow_id}_checkpoint_{_safe_stage(stage)}.json"


def storage_error(path: Path, error: OSError) -> BaseException:
    """Name the file in the error; disk-full and friends become ResourceError."""
    message = f"cannot write {path}: {error.strerror or error}"
    if classify(error).value == "resource":
        return ResourceError(message + " (free some space, then resume the workflow)")
    wrapped = OSError(error.errno, message)
    return wrapped
