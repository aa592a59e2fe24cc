"""Retries: the pure backoff computation, server-given waits, and the retry_call loop.

``backoff_delays`` is a pure function of the policy and a random source, so it is tested
without waiting; ``retry_call`` runs on a FakeClock, so every wait is exact.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from itertools import islice

import pytest

from reliability import (
    CircuitOpenError,
    ConfigurationError,
    FakeClock,
    RateLimitedError,
    RetryPolicy,
    TransientError,
)
from reliability._retry import backoff_delays, next_delay, retry_call


def first(policy: RetryPolicy, count: int, rng: random.Random | None = None) -> list[float]:
    return list(islice(backoff_delays(policy, rng), count))


class TestBackoffDelays:
    def test_without_jitter_delays_double_from_base(self) -> None:
        """base 1: waits 1, 2, 4, 8, 16 before retries 1..5."""
        assert first(RetryPolicy(jitter=False), 5) == [1.0, 2.0, 4.0, 8.0, 16.0]

    def test_delays_are_capped_at_max_delay(self) -> None:
        """Doubling stops at max_delay and stays there."""
        policy = RetryPolicy(base_delay=3.0, max_delay=20.0, jitter=False)
        assert first(policy, 6) == [3.0, 6.0, 12.0, 20.0, 20.0, 20.0]

    def test_full_jitter_stays_within_zero_and_the_exponential_bound(self) -> None:
        """Every jittered wait lies in [0, min(base * 2**n, max_delay))."""
        policy = RetryPolicy(base_delay=0.5, max_delay=10.0)
        for seed in range(50):
            for n, delay in enumerate(first(policy, 8, random.Random(seed))):
                assert 0.0 <= delay < min(0.5 * 2 ** n, 10.0)

    def test_same_seed_gives_the_same_waits(self) -> None:
        """The computation is pure: one random source, one sequence."""
        policy = RetryPolicy()
        assert first(policy, 6, random.Random(3)) == first(policy, 6, random.Random(3))
        assert first(policy, 6, random.Random(3)) != first(policy, 6, random.Random(4))

    def test_jitter_scales_the_exponential_value_by_one_random_draw(self) -> None:
        """Wait n is (base * 2**n) * rng.random(), one draw per wait."""
        draws = random.Random(9)
        expected = [2.0 * 2 ** n * draws.random() for n in range(4)]
        assert first(RetryPolicy(base_delay=2.0), 4, random.Random(9)) == expected

    def test_zero_base_delay_never_waits(self) -> None:
        """base_delay 0 (tests, tight loops) gives zero waits."""
        assert first(RetryPolicy(base_delay=0.0), 4) == [0.0, 0.0, 0.0, 0.0]

    @pytest.mark.parametrize("changes", [{"max_retries": -1}, {"base_delay": -0.5},
                                         {"max_delay": -1.0}, {"budget_seconds": 0.0}])
    def test_invalid_policy_is_refused(self, changes: dict[str, float]) -> None:
        """Negative settings and a zero budget are refused when the policy is made."""
        with pytest.raises(ValueError):
            RetryPolicy(**changes)  # type: ignore[arg-type]


class TestNextDelay:
    def test_server_retry_after_is_used_exactly(self) -> None:
        """RateLimitedError(retry_after=2) waits 2, ignoring the computed backoff."""
        assert next_delay(RateLimitedError("429", retry_after=2), 0.37) == 2.0

    def test_open_breaker_wait_is_its_retry_in(self) -> None:
        """CircuitOpenError waits until the breaker's half-open probe is due."""
        assert next_delay(CircuitOpenError("github", 42.5), 0.37) == 42.5

    def test_other_errors_use_the_computed_delay(self) -> None:
        """A plain transient error waits the backoff value."""
        assert next_delay(TransientError("blip"), 0.37) == 0.37

    def test_negative_retry_after_becomes_zero(self) -> None:
        """A server asking for a negative wait gets none."""
        assert RateLimitedError("429", retry_after=-5).retry_after == 0.0


class Flaky:
    """A call that raises the scripted errors in order, then returns 'ok'."""

    def __init__(self, clock: FakeClock, *errors: Callable[[], Exception]) -> None:
        self.clock = clock
        self.errors = list(errors)
        self.times: list[float] = []

    async def __call__(self) -> str:
        self.times.append(self.clock.monotonic())
        if self.errors:
            raise self.errors.pop(0)()
        return "ok"


class TestRetryCall:
    async def test_transient_failures_are_retried_with_backoff(self) -> None:
        """Two transient failures, then success; waits are 1 and 2 (no jitter)."""
        clock = FakeClock()
        call = Flaky(clock, TransientError, TransientError)
        retries: list[tuple[int, str, float]] = []
        async with clock.autojump():
            result = await retry_call(call, policy=RetryPolicy(jitter=False), clock=clock,
                                      on_retry=lambda n, e, d: retries.append(
                                          (n, type(e).__name__, d)))
        assert result == "ok"
        assert call.times == [0.0, 1.0, 3.0]
        assert retries == [(1, "TransientError", 1.0), (2, "TransientError", 2.0)]

    async def test_last_error_is_raised_unchanged_when_retries_run_out(self) -> None:
        """max_retries=2 means 3 calls; the third error itself is raised."""
        clock = FakeClock()
        last = TransientError("third")
        call = Flaky(clock, TransientError, TransientError, lambda: last)
        async with clock.autojump():
            with pytest.raises(TransientError) as raised:
                await retry_call(call, policy=RetryPolicy(max_retries=2, jitter=False),
                                 clock=clock)
        assert raised.value is last
        assert call.times == [0.0, 1.0, 3.0]

    async def test_non_retryable_error_is_raised_at_once(self) -> None:
        """A configuration error (a 4xx) is not retried."""
        clock = FakeClock()
        call = Flaky(clock, lambda: ConfigurationError("bad token"))
        with pytest.raises(ConfigurationError, match="bad token"):
            await retry_call(call, policy=RetryPolicy(), clock=clock)
        assert call.times == [0.0]

    async def test_rate_limit_waits_exactly_retry_after(self) -> None:
        """RateLimitedError(retry_after=2) is retried at exactly t=2, with no jitter."""
        clock = FakeClock()
        call = Flaky(clock, lambda: RateLimitedError("429", retry_after=2))
        async with clock.autojump():
            assert await retry_call(call, policy=RetryPolicy(), clock=clock) == "ok"
        assert call.times == [0.0, 2.0]

    async def test_budget_stops_before_a_wait_that_would_overrun_it(self) -> None:
        """Budget 10 s, waits 4 then 8: the 8 s wait is never started; the error says why."""
        clock = FakeClock()
        call = Flaky(clock, *[TransientError] * 5)
        policy = RetryPolicy(max_retries=10, base_delay=4.0, budget_seconds=10.0, jitter=False)
        async with clock.autojump():
            with pytest.raises(TransientError) as raised:
                await retry_call(call, policy=policy, clock=clock)
        assert call.times == [0.0, 4.0]
        assert clock.monotonic() == 4.0
        assert "retry budget of 10s exhausted" in raised.value.__notes__

    async def test_server_wait_longer_than_the_budget_fails_now(self) -> None:
        """A Retry-After past the budget is not waited at all."""
        clock = FakeClock()
        call = Flaky(clock, lambda: RateLimitedError("429", retry_after=600))
        with pytest.raises(RateLimitedError):
            await retry_call(call, policy=RetryPolicy(budget_seconds=60.0), clock=clock)
        assert clock.monotonic() == 0.0 and call.times == [0.0]

    async def test_plain_connection_errors_are_retried(self) -> None:
        """Builtin ConnectionError and TimeoutError classify as transient."""
        clock = FakeClock()
        call = Flaky(clock, ConnectionResetError, TimeoutError)
        async with clock.autojump():
            assert await retry_call(call, policy=RetryPolicy(jitter=False),
                                    clock=clock) == "ok"
        assert call.times == [0.0, 1.0, 3.0]
