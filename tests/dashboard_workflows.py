"""Workflow definitions the dashboard tests run in real processes (imported by name as
``dashboard_workflows:NAME`` with ``tests`` on the path).

Nothing here waits for a wall-clock margin: a stage that must stay running waits for a
file the test creates, and the watchdog's warning fires from a loop timer that is due
before the handler's own sleep ends.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from machines import StageContext, StageSpec, WorkflowDefinition
from reliability import RateLimitedError, TransientError

RELEASE = "release"  # the LIVE workflows' middle stage ends once this file exists
OUTAGE_OVER = "outage-over"  # the forge answers once this file exists
HOSTILE_TITLE = "<script>document.title='owned'</script><b>bold</b>"


async def quick(ctx: StageContext) -> Mapping[str, Any]:
    await ctx.sleep(0.01)
    return {f"{ctx.stage}_done": True}


async def gated(ctx: StageContext) -> None:
    while not (ctx.project_root / RELEASE).exists():
        ctx.heartbeat()
        await ctx.sleep(0.05)


LIVE = WorkflowDefinition("live", [
    StageSpec("prepare", quick),
    StageSpec("wait", gated, timeout_seconds=600),
    StageSpec("finish", quick),
])


async def flaky_build(ctx: StageContext) -> Mapping[str, Any]:
    if ctx.attempt == 1:
        await ctx.sleep(0.4)  # past the 0.2 s warning threshold, then a transient failure
        # A server-given wait is honoured exactly: the retry gap is 0.3 s on every run
        # (a computed backoff is fully jittered, and could draw a gap too thin to see).
        raise RateLimitedError("the build server answered 503", retry_after=0.3)
    return {"title": HOSTILE_TITLE}


RETRYING = WorkflowDefinition("retrying", [
    StageSpec("fetch", quick),
    StageSpec("build", flaky_build, timeout_seconds=60, warning_threshold_seconds=0.2,
              baseline_seconds=0.3),
    StageSpec("publish", quick),
])


async def call_forge(ctx: StageContext) -> Mapping[str, Any]:
    async def request() -> str:
        if not (ctx.project_root / OUTAGE_OVER).exists():
            raise TransientError("the forge is unreachable")
        return "ok"

    return {"forge": await ctx.call("forge", request)}


OUTAGE = WorkflowDefinition("outage", [StageSpec("call", call_forge, timeout_seconds=600)])
