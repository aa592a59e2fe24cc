"""Workflow definitions for the worker (cluster) tests, bound to module-level names.

Worker processes started from the repository root import them as
``tests.cluster_workflows:NAME``. Each stage of ``EFFECTS`` appends ``start`` and ``done``
lines (workflow, stage, pid, monotonic time) to ``{effects directory}/{pid}.log`` (the
directory is ``CLUSTER_EFFECTS`` in the environment), so a test can tell which process
started and completed which stage, and when. ``CLUSTER_STAGE_SECONDS`` makes each stage
take that long (default 0).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from machines import StageContext, StageSpec, WorkflowDefinition


def _log(kind: str, ctx: StageContext) -> None:
    directory = os.environ.get("CLUSTER_EFFECTS")
    if not directory:
        return
    line = f"{kind} {ctx.workflow_id} {ctx.stage} {os.getpid()} {time.monotonic():.6f}\n"
    # O_APPEND, one small write: lines of one process never interleave.
    fd = os.open(Path(directory) / f"{os.getpid()}.log",
                 os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


async def effect(ctx: StageContext) -> Mapping[str, Any]:
    _log("start", ctx)
    seconds = float(os.environ.get("CLUSTER_STAGE_SECONDS", "0"))
    if seconds:
        await asyncio.sleep(seconds)
    _log("done", ctx)
    return {f"{ctx.stage}_by": os.getpid()}


async def noop(ctx: StageContext) -> None:
    return None


async def note(ctx: StageContext) -> Mapping[str, Any]:
    """Copies the context's ``note`` into the outputs (a secret there must stay hidden)."""
    return {"note": ctx.context.get("note")}


EFFECTS = WorkflowDefinition("effects", [
    StageSpec("one", effect, timeout_seconds=60),
    StageSpec("two", effect, timeout_seconds=60),
    StageSpec("three", effect, timeout_seconds=60),
])

TINY = WorkflowDefinition("tiny", [StageSpec("only", noop)])

NOTED = WorkflowDefinition("noted", [StageSpec("first", note, checkpoint=True),
                                     StageSpec("second", noop)])


def read_effects(directory: Path) -> list[tuple[str, str, str, int, float]]:
    """Every effects line: (kind, workflow, stage, pid, monotonic time)."""
    rows = []
    for path in directory.glob("*.log"):
        for line in path.read_text().splitlines():
            kind, workflow_id, stage, pid, at = line.split()
            rows.append((kind, workflow_id, stage, int(pid), float(at)))
    return rows
