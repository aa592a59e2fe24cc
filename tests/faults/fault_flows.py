"""Workflow definitions for the fault-injection suite, bound to module-level names.

Subprocesses import this module as ``fault_flows`` (their ``PYTHONPATH`` holds
``tests/faults``; see ``conftest.cli_env``), so ``--definition fault_flows:LEDGER`` and
``resume`` in a fresh process find every definition here. pytest imports it under the same
name, because ``tests/faults`` has no ``__init__.py``.

Side effects are lines appended to ``{project_root}/effects/{workflow_id}.log`` with one
``write`` on an ``O_APPEND`` descriptor (a line is whole or absent): ``"<stage> <attempt>"``.
Counting lines tells how often each stage's work really ran.
"""

from __future__ import annotations

import os
import random
import sys
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from machines import StageContext, StageSpec, WorkflowDefinition
from machines.development._commands import run_command
from reliability import CriticalError, TransientError

__all__ = ["BURST", "DEGRADING", "HANG_CODE", "HUNG", "LEDGER", "PARK", "PROP_FLOWS",
           "SIX_STAGES",
           "effect_counts", "effect_lines"]

SIX_STAGES = ("fetch", "plan", "build", "test", "package", "publish")
EFFECTS = "effects"


def effect_lines(project_root: Path, workflow_id: str) -> list[str]:
    path = project_root / EFFECTS / f"{workflow_id}.log"
    return path.read_text().splitlines() if path.exists() else []


def effect_counts(project_root: Path) -> dict[str, Counter[str]]:
    """Per workflow ID: how many times each stage's work ran."""
    directory = project_root / EFFECTS
    if not directory.is_dir():
        return {}
    return {path.stem: Counter(line.split()[0] for line in path.read_text().splitlines())
            for path in directory.glob("*.log")}


def _append_effect(ctx: StageContext, text: str) -> None:
    directory = ctx.project_root / EFFECTS
    directory.mkdir(exist_ok=True)
    fd = os.open(directory / f"{ctx.workflow_id}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                 0o600)
    try:
        os.write(fd, f"{text}\n".encode())
    finally:
        os.close(fd)


def _check_earlier_outputs(ctx: StageContext, stages: tuple[str, ...]) -> None:
    index = stages.index(ctx.stage)
    missing = [s for s in stages[:index] if ctx.context.get(f"{s}_output") != s.upper()]
    if missing:
        raise CriticalError(f"stage {ctx.stage} did not see the outputs of {missing}")


async def _ledger_stage(ctx: StageContext) -> Mapping[str, Any]:
    _check_earlier_outputs(ctx, SIX_STAGES)
    _append_effect(ctx, f"{ctx.stage} {ctx.attempt}")
    await ctx.sleep(random.uniform(0.05, 0.2))  # workflows drift apart: kills land anywhere
    return {f"{ctx.stage}_output": ctx.stage.upper()}


# Six short stages: a kill lands inside a handler, a trigger or a write alike.
LEDGER = WorkflowDefinition("ledger", [
    StageSpec(stage=name, handler=_ledger_stage, timeout_seconds=60) for name in SIX_STAGES])

BURST_STAGES = tuple(f"step{i}" for i in range(8))


async def _burst_stage(ctx: StageContext) -> Mapping[str, Any]:
    _check_earlier_outputs(ctx, BURST_STAGES)
    _append_effect(ctx, f"{ctx.stage} {ctx.attempt}")
    return {f"{ctx.stage}_output": ctx.stage.upper()}


# Eight stages that never wait: the store's writer is busy all the time.
BURST = WorkflowDefinition("burst", [
    StageSpec(stage=name, handler=_burst_stage, timeout_seconds=60, checkpoint=True)
    for name in BURST_STAGES])


async def _park_stage(ctx: StageContext) -> Mapping[str, Any]:
    """Record the effect, then wait until ``{project_root}/release`` exists."""
    _append_effect(ctx, f"{ctx.stage} {ctx.attempt}")
    while not (ctx.project_root / "release").exists():
        await ctx.sleep(0.05)
    return {f"{ctx.stage}_output": ctx.stage.upper()}


async def _quick_stage(ctx: StageContext) -> Mapping[str, Any]:
    _append_effect(ctx, f"{ctx.stage} {ctx.attempt}")
    return {f"{ctx.stage}_output": ctx.stage.upper()}


# Two quick stages, one that holds until released, one more quick stage.
PARK = WorkflowDefinition("park", [
    StageSpec(stage="one", handler=_quick_stage, checkpoint=True),
    StageSpec(stage="two", handler=_quick_stage, checkpoint=True),
    StageSpec(stage="hold", handler=_park_stage, timeout_seconds=600),
    StageSpec(stage="four", handler=_quick_stage, checkpoint=True),
])

# A stand-in agent that never exits: it ignores SIGTERM, starts a grandchild that ignores
# it too, writes both PIDs to argv[1], then sleeps forever.
HANG_CODE = r"""
import os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = os.fork()
if child == 0:
    time.sleep(3600)
    os._exit(0)
with open(sys.argv[1], "w") as f:
    f.write(f"{os.getpid()} {child}\n")
print("working", flush=True)
time.sleep(3600)
"""


async def _agent_stage(ctx: StageContext) -> Mapping[str, Any]:
    hang = bool(ctx.context.get("hang")) and ctx.attempt == 1
    pid_file = ctx.project_root / f"pids-{ctx.workflow_id}"
    argv = [sys.executable, "-c", HANG_CODE, str(pid_file)] if hang else [
        sys.executable, "-c", "print('done')"]
    _append_effect(ctx, f"{ctx.stage} {ctx.attempt} start")
    result = await run_command(argv, cwd=ctx.project_root, on_line=lambda _: ctx.heartbeat(),
                               kill_grace_seconds=0.5)
    if not result.ok:
        raise TransientError(f"agent exited with {result.returncode}")
    _append_effect(ctx, f"{ctx.stage} {ctx.attempt} done")
    return {"agent_output": result.output_tail}


async def _note_recovery(ctx: StageContext, error: BaseException | None) -> None:
    _append_effect(ctx, f"recovery {ctx.stage} {type(error).__name__}")


async def _steady_stage(ctx: StageContext) -> Mapping[str, Any]:
    await ctx.sleep(0.2)
    _append_effect(ctx, f"{ctx.stage} {ctx.attempt}")
    return {}


# The agent stage: warning at 0.7 s, timeout at 2 s, one retry after recovery.
HUNG = WorkflowDefinition("hung", [
    StageSpec(stage="prepare", handler=_steady_stage, timeout_seconds=30),
    StageSpec(stage="agent", handler=_agent_stage, timeout_seconds=2.0,
              warning_threshold_seconds=0.7, max_retries=1,
              recovery_actions=("note_recovery",)),
    StageSpec(stage="finish", handler=_steady_stage, timeout_seconds=30),
], recovery_actions={"note_recovery": _note_recovery})


# --------------------------------------------------------------------------- properties

# Per workflow and stage: how often the stage's work was entered and completed, across
# every runtime that ran it. Filled by ``_planned_stage``; the property test reads it.
PROPERTY_LEDGER: dict[str, Counter[str]] = {}
PROPERTY_EFFECTS: dict[str, Counter[str]] = {}
PROPERTY_TIMEOUT = 10.0


async def _planned_stage(ctx: StageContext) -> Mapping[str, Any]:
    """Do what the workflow's ``plan`` says for this execution of this stage.

    ``plan[stage]`` lists, per execution (counted across processes, not attempts), one of
    ``"ok"``, ``"transient"``, ``"fatal"``, ``"timeout"``, ``"shutdown"`` or ``"cancel"``;
    executions past
    the list succeed. The effect is recorded only when the work completes.
    """
    entered = PROPERTY_LEDGER.setdefault(ctx.workflow_id, Counter())
    entered[ctx.stage] += 1
    script = list(ctx.context["plan"].get(ctx.stage, ()))
    step = script[entered[ctx.stage] - 1] if entered[ctx.stage] <= len(script) else "ok"
    if step == "transient":
        raise TransientError(f"planned transient failure in {ctx.stage}")
    if step == "fatal":
        raise CriticalError(f"planned critical failure in {ctx.stage}")
    if step == "timeout":
        await ctx.sleep(PROPERTY_TIMEOUT * 10)  # the watchdog cancels it at the timeout
    elif step == "shutdown":
        ctx.runtime.request_shutdown()
        await ctx.sleep(1.0)  # cancelled: the runtime stops the handler at once
    elif step == "cancel":
        await ctx.runtime.cancel(ctx.workflow_id)
        await ctx.sleep(1.0)
    await ctx.sleep(0.5)
    PROPERTY_EFFECTS.setdefault(ctx.workflow_id, Counter())[ctx.stage] += 1
    return {f"{ctx.stage}_output": ctx.stage.upper()}


def _property_flow(stage_count: int) -> WorkflowDefinition:
    return WorkflowDefinition(f"property{stage_count}", [
        StageSpec(stage=f"s{i}", handler=_planned_stage, timeout_seconds=PROPERTY_TIMEOUT,
                  warning_threshold_seconds=PROPERTY_TIMEOUT / 2, max_retries=2)
        for i in range(stage_count)])


PROP_1 = _property_flow(1)
PROP_2 = _property_flow(2)
PROP_3 = _property_flow(3)
PROP_4 = _property_flow(4)
PROP_5 = _property_flow(5)
PROP_FLOWS = {1: PROP_1, 2: PROP_2, 3: PROP_3, 4: PROP_4, 5: PROP_5}

# The middle stage is non-critical: a failure there degrades (skips) it.
DEGRADING = WorkflowDefinition("degrading", [
    StageSpec(stage=f"s{i}", handler=_planned_stage, timeout_seconds=PROPERTY_TIMEOUT,
              max_retries=0, critical=i != 1) for i in range(3)])
