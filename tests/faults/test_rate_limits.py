"""Rate limits from the GitHub emulator over loopback: waits are the server's, exactly.

The forge is wired as the development workflow wires it: every request is one attempt,
and the runtime's guard (retries outside, the shared ``github`` breaker inside) retries.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from github_emulator import GitHubEmulator

from machines.development._github import GitHubForge
from reliability import FakeClock, MemoryStore, Runtime, WorkflowConfiguration
from reliability._clock import Clock

CALLERS = 4  # concurrent callers in the real-time test
WALL_START = 1_700_000_000.0


@pytest.fixture
def gh() -> Iterator[GitHubEmulator]:
    with GitHubEmulator(owner="acme", repo="widgets") as emulator:
        yield emulator


def _config() -> WorkflowConfiguration:
    return WorkflowConfiguration(enable_health_checks=False, enable_monitoring=False,
                                 retry_base_delay=0.01, retry_max_delay=0.1)


async def _call_rate_limited(gh: GitHubEmulator, runtime: Runtime, clock: Clock,
                             callers: int) -> list[float]:
    """Concurrent reads through the runtime's guard; when each attempt started."""
    started: list[float] = []

    async def guard(attempt: Callable[[], Awaitable[Any]]) -> Any:
        async def timed() -> Any:
            started.append(clock.monotonic())
            return await attempt()
        return await runtime.guarded_call("github", timed)

    async with GitHubForge("acme/widgets", gh.token, api_url=gh.url, clock=clock,
                           guard=guard) as forge:
        found = await asyncio.gather(*(forge.find_open_pull(f"feature-{i}")
                                       for i in range(callers)))
    assert found == [None] * callers
    return sorted(started)


@pytest.mark.parametrize(("kind", "wait"), [("primary", 3.0), ("secondary", 2.0)])
async def test_rate_limited_callers_wait_exactly_the_server_time_on_the_clock(
    gh: GitHubEmulator, tmp_path: Path, kind: str, wait: float
) -> None:
    """403 + X-RateLimit-Remaining: 0 (reset 3 s ahead) and 429 + Retry-After: 2: the call
    is retried exactly that much later on the runtime clock, with one request."""
    # One caller: the fake clock jumps whenever the loop idles, and a second caller's
    # request in flight on a socket would look idle (concurrency: the real-time test).
    clock = FakeClock(wall_start=WALL_START)
    gh.rate_limit_next(kind, retry_after=2, reset_at=int(WALL_START) + 3)
    async with Runtime(_config(), tmp_path, store=MemoryStore(), clock=clock,
                       configure_logs=False) as runtime:
        async with clock.autojump():
            started = await _call_rate_limited(gh, runtime, clock, callers=1)
        breaker = runtime.breakers["github"]

    assert started == [0.0, wait]  # exact: no jitter, not less, no backoff on top
    assert [r.status for r in gh.requests] == [403 if kind == "primary" else 429, 200]
    assert breaker.open_count == 0 and breaker.failure_count == 0  # a rate limit is no outage


async def test_retry_after_is_waited_in_real_time_without_requests_meanwhile(
    gh: GitHubEmulator, tmp_path: Path
) -> None:
    """429 + Retry-After: 2 in real time: the emulator sees nothing for 2 s, then exactly one
    retry per caller."""
    for _ in range(CALLERS):
        gh.rate_limit_next("secondary", retry_after=2)
    async with Runtime(_config(), tmp_path, store=MemoryStore(),
                       configure_logs=False) as runtime:
        await _call_rate_limited(gh, runtime, runtime.clock, callers=CALLERS)

    requests = gh.requests
    limited = [r.at for r in requests if r.status == 429]
    retried = [r.at for r in requests if r.status == 200]
    assert len(limited) == len(retried) == CALLERS and len(requests) == 2 * CALLERS
    assert max(limited) < min(retried)  # nothing reached the server during the wait
    for first, second in zip(sorted(limited), sorted(retried), strict=True):
        assert 2.0 <= second - first < 3.5  # not less than the server asked; no backoff on top
