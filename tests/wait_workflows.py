"""Workflows that wait durably, for the durable-wait tests and benchmarks.

Bound to module-level names so a fresh process resumes them. Each stage run appends its
name to ``RUNS[workflow_id]`` (in this process) and, when the context names an
``effects`` directory, one line to ``{effects}/{id}.log`` (the count a SIGKILLed process
leaves behind). Subprocess use: ``python -c "import wait_workflows; wait_workflows.main()"
park ROOT COUNT TIMEOUT``: park COUNT workflows, print ``parked`` and every ID, then sleep
until killed.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from machines import StageContext, StageSpec, WorkflowDefinition
from reliability import FileStore, Runtime, SignalTimeout, WorkflowConfiguration

__all__ = ["GATED", "GATED_FLOW", "RUNS", "SLEEP_FLOW", "WAIT_FLOW", "effect_lines", "main",
           "quiet_config", "run_gated"]

RUNS: defaultdict[str, list[str]] = defaultdict(list)


def quiet_config(**changes: Any) -> WorkflowConfiguration:
    settings: dict[str, Any] = {"enable_health_checks": False, "enable_monitoring": False,
                                "log_level": "WARNING", "tune_interpreter": False}
    settings.update(changes)
    return WorkflowConfiguration(**settings)


def _ran(ctx: StageContext, what: str) -> None:
    RUNS[ctx.workflow_id].append(what)
    effects = ctx.context.get("effects")
    if effects:
        fd = os.open(Path(effects) / f"{ctx.workflow_id}.log",
                     os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, f"{what}\n".encode())
        finally:
            os.close(fd)


def effect_lines(effects: Path, workflow_id: str) -> list[str]:
    path = effects / f"{workflow_id}.log"
    return path.read_text().split() if path.exists() else []


async def prepare(ctx: StageContext) -> Mapping[str, Any]:
    _ran(ctx, "prepare")
    return {"prepared": True}


async def await_go(ctx: StageContext) -> Mapping[str, Any]:
    _ran(ctx, "await")
    try:
        payload = await ctx.wait_for_signal("go", timeout_seconds=float(
            ctx.context.get("timeout", 3600.0)))
    except SignalTimeout:
        payload = "timed out"
    _ran(ctx, "signalled")
    return {"payload": payload}


async def finish(ctx: StageContext) -> Mapping[str, Any]:
    _ran(ctx, "finish")
    return {"finished": True}


WAIT_FLOW = WorkflowDefinition("wait-for-go", [
    StageSpec(stage="prepare", handler=prepare, timeout_seconds=60),
    StageSpec(stage="await_go", handler=await_go, timeout_seconds=60, max_retries=0),
    StageSpec(stage="finish", handler=finish, timeout_seconds=60),
])


async def nap(ctx: StageContext) -> Mapping[str, Any]:
    _ran(ctx, "nap")
    await ctx.sleep_durably(float(ctx.context.get("seconds", 60.0)))
    return {"slept_until": ctx.clock.time()}


SLEEP_FLOW = WorkflowDefinition("sleep", [
    StageSpec(stage="nap", handler=nap, timeout_seconds=60),
    StageSpec(stage="finish", handler=finish, timeout_seconds=60),
])


class Gated:
    """Stages woken from a sleep and held at a gate until the test opens it: how many were
    inside at once, at most."""

    def __init__(self) -> None:
        self.inside: set[str] = set()
        self.most = 0
        self.entered: asyncio.Queue[str] | None = None
        self.gates: dict[str, asyncio.Event] = {}

    def reset(self) -> asyncio.Queue[str]:
        self.inside.clear()
        self.most = 0
        self.gates.clear()
        self.entered = asyncio.Queue()
        return self.entered


GATED = Gated()


async def nap_then_gate(ctx: StageContext) -> Mapping[str, Any]:
    await ctx.sleep_durably(float(ctx.context.get("seconds", 60.0)))
    GATED.inside.add(ctx.workflow_id)
    GATED.most = max(GATED.most, len(GATED.inside))
    gate = GATED.gates.setdefault(ctx.workflow_id, asyncio.Event())
    assert GATED.entered is not None
    GATED.entered.put_nowait(ctx.workflow_id)
    try:
        await gate.wait()
    finally:
        GATED.inside.discard(ctx.workflow_id)
    return {"gated": True}


GATED_FLOW = WorkflowDefinition("gated", [
    StageSpec(stage="nap", handler=nap_then_gate, timeout_seconds=600),
    StageSpec(stage="finish", handler=finish, timeout_seconds=60),
])


async def run_gated(rt: Runtime, count: int, limit: int) -> None:
    """Open the gates of ``count`` woken stages one at a time, each once ``limit`` (or all
    that are left) are inside, checking that no more than ``limit`` woken workflows run."""
    entered = GATED.entered
    assert entered is not None
    held: list[str] = []
    for opened in range(count):
        while len(held) < min(limit, count - opened):
            held.append(await asyncio.wait_for(entered.get(), 60))
        assert len(rt.live_workflows()) <= limit, [w.run.workflow_id
                                                   for w in rt.live_workflows()]
        GATED.gates[held.pop(0)].set()
    assert GATED.most <= limit


async def _park(root: Path, count: int, wait_seconds: float) -> None:
    (root / "effects").mkdir(parents=True, exist_ok=True)
    store = FileStore(root / ".github/workflow-states", root / ".github/workflow-checkpoints")
    async with Runtime(quiet_config(), root, store=store) as runtime:
        context = {"timeout": wait_seconds, "effects": str(root / "effects")}
        results = await asyncio.gather(*(runtime.run(WAIT_FLOW, context=context)
                                         for _ in range(count)))
        lines = ["parked", *(r.workflow_id for r in results if r.status == "waiting")]
        print("\n".join(lines), flush=True)
        await asyncio.sleep(3600)


def main(argv: list[str] | None = None) -> None:
    command, *rest = argv if argv is not None else sys.argv[1:]
    if command != "park":
        raise SystemExit(f"unknown command {command!r}")
    asyncio.run(_park(Path(rest[0]), int(rest[1]), float(rest[2])))
