"""Workflow definitions for tests, bound to module-level names.

Subprocesses started from the repository root import them as
``tests.workflows_for_tests:NAME``; pytest imports this module as ``workflows_for_tests``.

Stages of ``RECORDING`` write one side-effect record per execution to
``{project_root}/effects/{workflow_id}.{stage}``, keyed by workflow and stage, so a test
can count how often each stage's effect really happened.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

from machines import StageContext, StageSpec, WorkflowDefinition

STAGE_SECONDS = 0.05
FAILING_PROMPT_MARK = "fail"  # a prompt file whose name contains this fails its last stage


def _record_effect(ctx: StageContext) -> None:
    directory = ctx.project_root / "effects"
    directory.mkdir(exist_ok=True)
    path = directory / f"{ctx.workflow_id}.{ctx.stage}"
    # O_APPEND: each execution adds one line; re-running a stage shows as a second line.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, f"attempt {ctx.attempt}\n".encode())
    finally:
        os.close(fd)


async def record_stage(ctx: StageContext) -> Mapping[str, Any]:
    await ctx.sleep(STAGE_SECONDS)
    _record_effect(ctx)
    return {f"{ctx.stage}_done": True}


async def last_stage(ctx: StageContext) -> Mapping[str, Any]:
    await ctx.sleep(STAGE_SECONDS)
    prompt = str(ctx.context.get("prompt_file", ""))
    if FAILING_PROMPT_MARK in os.path.basename(prompt):
        raise ValueError(f"prompt {prompt} asks this stage to fail")
    _record_effect(ctx)
    return {"pr_url": f"https://example.invalid/pr/{ctx.workflow_id}", "pr_number": 1}


RECORDING = WorkflowDefinition("recording", [
    StageSpec(stage="prepare", handler=record_stage, timeout_seconds=30),
    StageSpec(stage="build", handler=record_stage, timeout_seconds=30),
    StageSpec(stage="publish", handler=last_stage, timeout_seconds=30, max_retries=0),
])


async def blocking_handler(ctx: StageContext) -> None:
    time.sleep(1.0)  # noqa: ASYNC251 - blocks the loop on purpose: the monitor must name it


BLOCKING = WorkflowDefinition("blocking", [
    StageSpec(stage="block", handler=blocking_handler, timeout_seconds=30),
])


async def timed_stage(ctx: StageContext) -> None:
    await ctx.sleep(float(ctx.context["durations"][ctx.stage]))


# Baselines 10 / 20 / 40 s; the analytics test runs them for known virtual durations.
TIMED = WorkflowDefinition("timed", [
    StageSpec(stage="fetch", handler=timed_stage, timeout_seconds=1000, baseline_seconds=10),
    StageSpec(stage="compute", handler=timed_stage, timeout_seconds=1000, baseline_seconds=20),
    StageSpec(stage="store", handler=timed_stage, timeout_seconds=1000, baseline_seconds=40),
])


async def long_stage(ctx: StageContext) -> None:
    await ctx.sleep(1000.0)


LONG = WorkflowDefinition("long", [
    StageSpec(stage="crunch", handler=long_stage, timeout_seconds=5000,
              warning_threshold_seconds=4000),
])
