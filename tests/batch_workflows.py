"""A definition for CLI batches that a test interrupts: it cannot finish before the test
has acted, however slowly the test runs (``tests.batch_workflows:GATED``).

Each stage writes one side-effect record per execution to
``{project_root}/effects/{workflow_id}.{stage}``, as ``workflows_for_tests.RECORDING``
does. Once ``GATE_AFTER`` records exist, every stage waits, after writing its own, until
the file ``{project_root}/gate`` exists: a test waits for the records, signals the batch,
and creates the gate before resuming.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from machines import StageContext, StageSpec, WorkflowDefinition

GATE_AFTER = 25
_POLL_SECONDS = 0.01


async def gated_stage(ctx: StageContext) -> Mapping[str, Any]:
    effects = ctx.project_root / "effects"
    effects.mkdir(exist_ok=True)
    # O_APPEND: each execution adds one line; re-running a stage shows as a second line.
    fd = os.open(effects / f"{ctx.workflow_id}.{ctx.stage}",
                 os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, f"attempt {ctx.attempt}\n".encode())
    finally:
        os.close(fd)
    gate = ctx.project_root / "gate"
    while len(os.listdir(effects)) >= GATE_AFTER and not gate.exists():
        await ctx.sleep(_POLL_SECONDS)  # cancelled by the interrupt the test sends
    return {f"{ctx.stage}_done": True}


GATED = WorkflowDefinition("gated", [
    StageSpec(stage=stage, handler=gated_stage, timeout_seconds=600)
    for stage in ("prepare", "build", "publish")
])
