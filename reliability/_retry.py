"""Retries: pure backoff computation (the ``backoff`` package's generators) and one loop.

Order (docs/architecture.md, invariant 7): this loop is outermost, the breaker inside it,
the call innermost.
A server-given wait (``RateLimitedError.retry_after``) or an open breaker's remaining time
is waited exactly, without jitter; everything else waits exponential backoff with full
jitter. A total budget bounds the loop: a wait that would end past it is not started.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import backoff

from ._clock import Clock
from ._errors import CircuitOpenError, ErrorCategory, RateLimitedError, classify

if TYPE_CHECKING:
    from ._breaker import Breaker

__all__ = ["RetryPolicy", "backoff_delays", "next_delay", "retry_call"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """How often and how long to retry. ``max_retries`` counts retries, not attempts."""

    max_retries: int = 3
    base_delay: float = 1.0
    max_delay: float = 60.0
    budget_seconds: float = 900.0
    jitter: bool = True

    def __post_init__(self) -> None:
        if self.max_retries < 0 or self.base_delay < 0 or self.max_delay < 0:
            raise ValueError("retry settings must not be negative")
        if self.budget_seconds <= 0:
            raise ValueError("budget_seconds must be > 0")


def backoff_delays(policy: RetryPolicy, rng: random.Random | None = None) -> Iterator[float]:
    """The waits before retry 1, 2, ...: ``base * 2**n`` capped at ``max_delay``, jittered.

    A pure function of the policy and the random source, so it is tested without waiting.
    """
    # backoff.expo is a send()-primed generator: its first value is None, then factor * 2**n.
    exponential = backoff.expo(base=2, factor=policy.base_delay, max_value=policy.max_delay)
    next(exponential)
    source = rng or random.Random()
    for value in exponential:
        delay = float(value)
        if policy.jitter:
            delay = delay * source.random()  # what backoff.full_jitter does, on our RNG
        yield delay


def next_delay(error: BaseException, computed: float) -> float:
    """The wait before retrying after ``error``: the server's or breaker's own, else computed."""
    if isinstance(error, RateLimitedError):
        return error.retry_after
    if isinstance(error, CircuitOpenError):
        return error.retry_in
    return computed


def _is_retryable(error: BaseException) -> bool:
    return classify(error) is ErrorCategory.TRANSIENT


async def retry_call(
    call: Callable[[], Awaitable[T]],
    *,
    policy: RetryPolicy,
    clock: Clock,
    breaker: Breaker | None = None,
    on_retry: Callable[[int, BaseException, float], None] | None = None,
    rng: random.Random | None = None,
) -> T:
    """Await ``call()`` through ``breaker``, retrying transient failures per ``policy``.

    Waiting for an open breaker does not use up a retry, only budget. The last error is
    re-raised unchanged once retries or budget run out.
    """
    deadline = clock.monotonic() + policy.budget_seconds
    delays = None  # made at the first failure: most calls succeed at once
    retries = 0
    while True:
        try:
            return await (breaker.call_now(call) if breaker is not None else call())
        except Exception as error:
            if not _is_retryable(error):
                raise
            is_breaker_wait = isinstance(error, CircuitOpenError)
            if not is_breaker_wait:
                if retries >= policy.max_retries:
                    raise
                retries += 1
            if delays is None:
                delays = backoff_delays(policy, rng)
            delay = next_delay(error, 0.0 if is_breaker_wait else next(delays))
            if clock.monotonic() + delay > deadline:
                error.add_note(f"retry budget of {policy.budget_seconds:g}s exhausted")
                raise
            if on_retry is not None:
                on_retry(retries, error, delay)
            await clock.sleep(delay)
