"""Recovery actions: named, real callables a stage's recovery list refers to.

Built-in actions here are generic; a definition adds its own (the development machine
adds GitHub and git ones). A name with no implementation is rejected when the definition
is built, never discovered at 3 a.m. during a recovery.
"""

from __future__ import annotations

import gc
from collections.abc import Mapping

from ._context import RecoveryAction, StageContext

__all__ = ["BUILTIN_ACTIONS", "resolve_action_names"]


async def check_system_health(ctx: StageContext, error: BaseException | None) -> None:
    """Take a health reading now and record it in the workflow's history."""
    await ctx.check_health(f"recovery in {ctx.stage}")


async def checkpoint_progress(ctx: StageContext, error: BaseException | None) -> None:
    """Make the workflow's current state durable before the stage is retried."""
    await ctx.save_output_durably()  # no new outputs: the current state, made durable


async def free_memory(ctx: StageContext, error: BaseException | None) -> None:
    """Run a full garbage collection, giving memory back before a retry."""
    collected = gc.collect()
    ctx.logger.info("free_memory: collected %d objects", collected)


async def wait_for_breakers(ctx: StageContext, error: BaseException | None) -> None:
    """Wait until every open circuit breaker is due for its half-open probe (max 5 min)."""
    waits = [b.retry_in() for b in ctx.runtime.breakers.values()]
    longest = min(300.0, max(waits, default=0.0))
    if longest > 0:
        ctx.logger.info("wait_for_breakers: waiting %.1fs for open breakers", longest)
        await ctx.sleep(longest)


BUILTIN_ACTIONS: Mapping[str, RecoveryAction] = {
    "check_system_health": check_system_health,
    "checkpoint_progress": checkpoint_progress,
    "create_implementation_checkpoint": checkpoint_progress,
    "free_memory": free_memory,
    "cleanup_resources": free_memory,
    "wait_for_breakers": wait_for_breakers,
}


def resolve_action_names(names: tuple[str, ...], own: Mapping[str, RecoveryAction],
                         *, where: str) -> None:
    """Raise ValueError naming ``where`` if any name has no implementation."""
    unknown = [n for n in names if n not in own and n not in BUILTIN_ACTIONS]
    if unknown:
        known = sorted({*BUILTIN_ACTIONS, *own})
        raise ValueError(f"{where}: recovery action(s) {', '.join(map(repr, unknown))} have no "
                         f"implementation; known actions: {', '.join(known)} (add yours with "
                         "WorkflowDefinition(..., recovery_actions={name: async_fn}))")
