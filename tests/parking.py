"""Waiting, on the event loop alone, for handlers that park themselves in a stage."""

from __future__ import annotations

import asyncio


async def until_parked(parked: list[str], count: int) -> None:
    """Yield to the loop until ``count`` handlers have appended to ``parked``.

    Handlers park without timers, so this works on a fake clock that never moves.
    """
    for _ in range(10_000):
        if len(parked) >= count:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"only {len(parked)} of {count} workflows parked")
