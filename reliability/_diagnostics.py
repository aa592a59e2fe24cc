"""Diagnostics for people and support: secret redaction, stored workflows, the bundle.

The diagnostic bundle is the spec's support file, ``diagnostic-bundle-{id}.json``:
workflow diagnostics, system health, configuration, the workflow's log lines, its state
and checkpoint files, and its performance report. Every secret in it is replaced by
``***`` (the secrets the configuration and its sections know of, and anything shaped like
a well-known access token, a bearer credential or a token in a URL), and the file is
created readable by its owner only.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections import deque
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiofiles

from ._errors import StateCorruptedError
from ._ids import validate_workflow_id
from ._logging import redact_secrets
from ._state import WorkflowRun
from ._store import FileStore, read_bounded

if TYPE_CHECKING:
    from ._runtime import Runtime

__all__ = ["LOG_LINES_LIMIT", "build_bundle", "collect_log_lines", "collect_state_files",
           "redact", "redact_text", "stored_diagnostics", "write_private_json"]

LOG_LINES_LIMIT = 500  # the newest lines naming the workflow; older ones are in the logs
_READ_CHUNK = 1 << 20
REDACTED = "***"

_SECRET_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # Well-known access-token shapes (forge personal and app tokens), whoever configured them
    (re.compile(r"\bgh[pousr]_[A-Za-z0-9]{8,}"), REDACTED),
    (re.compile(r"\bgithub_pat_[A-Za-z0-9_]{8,}"), REDACTED),
    (re.compile(r"(?i)\b(bearer|token|basic)(\s+)[A-Za-z0-9._~+/=-]{8,}"), r"\1\2" + REDACTED),
    (re.compile(r"(?i)x-access-token:[^@\s]+@"), "x-access-token:" + REDACTED + "@"),
    (re.compile(r"(https?://)[^/@\s:]+:[^/@\s]+@"), r"\1" + REDACTED + "@"),
    # A database URL's password: postgresql://user:***@host/db
    (re.compile(r"(postgres(?:ql)?://[^/@\s:]+:)[^/@\s]+@"), r"\1" + REDACTED + "@"),
)
_SECRET_KEY = re.compile(r"(?i)(token|secret|password|passwd|authorization|api[_-]?key)")


def redact_text(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with every known secret value (``secrets``, and those registered for the
    logs) and every token-shaped string as ``***``."""
    text = redact_secrets(text)
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    for pattern, replacement in _SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def redact(value: Any, secrets: Iterable[str] = ()) -> Any:
    """A copy of a JSON-like value with secrets redacted in every string, and the values
    of keys that name a secret (``token``, ``password``, ...) replaced outright."""
    known = tuple(s for s in secrets if s)
    return _redact(value, known)


def _redact(value: Any, secrets: tuple[str, ...]) -> Any:
    if isinstance(value, str):
        return redact_text(value, secrets)
    if isinstance(value, Mapping):
        return {str(k): (REDACTED if _SECRET_KEY.search(str(k)) and isinstance(v, str) and v
                         else _redact(v, secrets)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_redact(v, secrets) for v in value]
    return value


async def stored_diagnostics(runtime: Runtime, workflow_id: str) -> dict[str, Any]:
    """``get_workflow_diagnostics`` for a workflow known here, else read from the store
    without blocking the loop (in a fresh process, every workflow is read this way)."""
    from ._runtime import diagnostics_for  # the runtime imports this module's users

    validate_workflow_id(workflow_id)
    if runtime.knows(workflow_id):
        return runtime.get_workflow_diagnostics(workflow_id)
    loaded = await runtime.store.load(workflow_id)
    run = WorkflowRun.from_state(loaded.state)
    diagnostics = diagnostics_for(run, None, runtime.clock, runtime.store.describe(workflow_id))
    diagnostics["state_source"] = loaded.source
    diagnostics["state_problems"] = list(loaded.problems)
    return diagnostics


async def collect_log_lines(directory: Path, workflow_id: str, *,
                            limit: int = LOG_LINES_LIMIT) -> list[str]:
    """The last ``limit`` lines of ``{directory}/workflow-*.log`` that name the workflow."""
    validate_workflow_id(workflow_id)
    found: deque[str] = deque(maxlen=limit)
    try:
        paths = await asyncio.to_thread(lambda: sorted(directory.glob("workflow-*.log")))
    except OSError:
        return []
    for path in paths:
        try:
            await _scan_log(path, workflow_id, found)
        except OSError as error:
            found.append(f"[could not read {path}: {error.strerror or error}]")
    return list(found)


async def _scan_log(path: Path, workflow_id: str, found: deque[str]) -> None:
    # Chunked reads: one thread hop per megabyte, not one per line.
    carry = ""
    async with aiofiles.open(path, encoding="utf-8", errors="replace") as log:
        while chunk := await log.read(_READ_CHUNK):
            lines = (carry + chunk).split("\n")
            carry = lines.pop()
            found.extend(line for line in lines if workflow_id in line)
    if carry and workflow_id in carry:
        found.append(carry)


async def collect_state_files(runtime: Runtime, workflow_id: str) -> dict[str, Any]:
    """The workflow's state document and checkpoint files (or rows): where -> content."""
    store = runtime.store
    if not isinstance(store, FileStore):
        loaded = await store.load(workflow_id)
        files: dict[str, Any] = {loaded.source: loaded.state}
        checkpoints = getattr(store, "checkpoints", None)  # PostgreSQL's: one row per stage
        if checkpoints is not None:
            files.update(await checkpoints(workflow_id))
        return files
    return await asyncio.to_thread(_read_state_files, store, workflow_id)


def _read_state_files(store: FileStore, workflow_id: str) -> dict[str, Any]:
    paths = [store.state_path(workflow_id),
             *sorted(store.checkpoint_directory.glob(f"{workflow_id}_checkpoint_*.json"))]
    files: dict[str, Any] = {}
    for path in paths:
        try:  # bounded, and never through a symbolic link: the store's own reader
            files[str(path)] = json.loads(read_bounded(path))
        except FileNotFoundError:
            files[str(path)] = {"error": "missing"}
        except StateCorruptedError as error:
            files[str(path)] = {"error": error.problem}
        except OSError as error:
            files[str(path)] = {"error": f"unreadable: {error.strerror or error}"}
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            files[str(path)] = {"error": f"not valid JSON: {error}"}
    return files


async def build_bundle(runtime: Runtime, workflow_id: str) -> dict[str, Any]:
    """The spec's diagnostic bundle for one workflow, every secret redacted."""
    diagnostics = await stored_diagnostics(runtime, workflow_id)
    health = await runtime.perform_health_check(workflow_id)
    try:
        state_files = await collect_state_files(runtime, workflow_id)
    except StateCorruptedError as error:  # a memory store's document failed its checksum
        state_files = {"error": str(error)}
    bundle = {
        "workflow_id": workflow_id,
        "generated_at": runtime.clock.time(),
        "workflow_diagnostics": diagnostics,
        "system_health": health.to_dict(),
        "configuration": runtime.config.redacted(),
        "log_files": await collect_log_lines(runtime.resolve_path(runtime.config.log_directory),
                                             workflow_id),
        "state_files": state_files,
        "performance_metrics": {
            "performance_report": diagnostics["performance_report"],
            "stage_history": diagnostics["stage_history"],
            "loop_lag_ms": runtime.loop_lag_ms,
        },
    }
    redacted: dict[str, Any] = redact(bundle, runtime.config.secret_values())
    return redacted


def write_private_json(path: Path, document: Any) -> None:
    """Write ``document`` as indented JSON to ``path``, created (or reset) to mode 0600."""
    data = json.dumps(document, indent=2, default=str).encode() + b"\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an existing file keeps its old mode otherwise
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)
