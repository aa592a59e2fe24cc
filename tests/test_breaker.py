"""Circuit breakers: trip on the original error, refuse while open, one half-open probe.

All on a FakeClock: ``retry_in`` and reopen times are exact, and callers that wait for a
probe are counted while it is still running.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest

from reliability import (
    Breaker,
    CircuitOpenError,
    ConfigurationError,
    FakeClock,
    MemoryStore,
    RateLimitedError,
    RetryPolicy,
    Runtime,
    TransientError,
    WorkflowConfiguration,
)
from reliability._retry import retry_call


class HTTPStatusError(Exception):
    """Shaped like httpx.HTTPStatusError: the status is on ``.response.status_code``."""

    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.response = SimpleNamespace(status_code=status)


class Dependency:
    """A scripted dependency: raises the queued errors in order, then answers 'pong'.

    While ``gate`` is closed every call waits on it (a probe that is still in flight).
    """

    def __init__(self, *errors: Callable[[], Exception]) -> None:
        self.errors = list(errors)
        self.calls = 0
        self.in_flight = 0
        self.gate = asyncio.Event()
        self.gate.set()

    async def __call__(self) -> str:
        self.calls += 1
        self.in_flight += 1
        try:
            await self.gate.wait()
            if self.errors:
                raise self.errors.pop(0)()
            return "pong"
        finally:
            self.in_flight -= 1


def make_breaker(clock: FakeClock, threshold: int = 3, recovery: float = 300.0) -> Breaker:
    return Breaker("github", failure_threshold=threshold, recovery_timeout=recovery, clock=clock)


async def trip(breaker: Breaker, count: int) -> None:
    for _ in range(count):
        with pytest.raises(TransientError):
            await breaker.call(Dependency(lambda: TransientError("503")))


class TestClosed:
    async def test_calls_pass_through_while_closed(self) -> None:
        """A closed breaker returns the call's result and stays closed."""
        breaker = make_breaker(FakeClock())
        assert await breaker.call(Dependency()) == "pong"
        assert breaker.state == "closed" and breaker.failure_count == 0

    async def test_trips_after_threshold_raising_the_original_error(self) -> None:
        """The call that reaches the threshold raises its own error, not a breaker error."""
        breaker = make_breaker(FakeClock(), threshold=3)
        original = TransientError("503 Service Unavailable")
        await trip(breaker, 2)
        assert breaker.state == "closed" and breaker.failure_count == 2
        with pytest.raises(TransientError) as raised:
            await breaker.call(Dependency(lambda: original))
        assert raised.value is original
        assert breaker.state == "open" and breaker.open_count == 1

    async def test_success_resets_the_consecutive_failure_count(self) -> None:
        """Failures must be consecutive: a success in between starts the count again."""
        breaker = make_breaker(FakeClock(), threshold=3)
        await trip(breaker, 2)
        await breaker.call(Dependency())
        await trip(breaker, 2)
        assert breaker.state == "closed" and breaker.failure_count == 2

    @pytest.mark.parametrize("error", [
        lambda: ConfigurationError("422 Unprocessable: bad branch name"),
        lambda: HTTPStatusError(404),
        lambda: HTTPStatusError(422),
        lambda: RateLimitedError("429", retry_after=5),
        lambda: ValueError("bad input"),
    ], ids=["configuration", "404", "422", "rate-limited", "value-error"])
    async def test_request_errors_do_not_trip_it(self, error: Callable[[], Exception]) -> None:
        """4xx-like errors and rate limits say the server is alive: the breaker stays closed."""
        breaker = make_breaker(FakeClock(), threshold=2)
        for _ in range(5):
            with pytest.raises(Exception):  # noqa: B017 - whichever error was scripted
                await breaker.call(Dependency(error))
        assert breaker.state == "closed" and breaker.failure_count == 0

    async def test_server_errors_do_trip_it(self) -> None:
        """HTTP 5xx and connection failures count toward the threshold."""
        breaker = make_breaker(FakeClock(), threshold=2)
        with pytest.raises(HTTPStatusError):
            await breaker.call(Dependency(lambda: HTTPStatusError(502)))
        with pytest.raises(ConnectionResetError):
            await breaker.call(Dependency(ConnectionResetError))
        assert breaker.state == "open"


class TestOpen:
    async def test_open_breaker_refuses_with_retry_in(self) -> None:
        """While open, calls are refused without reaching the dependency, retry_in exact."""
        clock = FakeClock()
        breaker = make_breaker(clock, threshold=1, recovery=300.0)
        await trip(breaker, 1)
        clock.advance(120.0)
        dependency = Dependency()
        with pytest.raises(CircuitOpenError) as raised:
            await breaker.call(dependency)
        assert raised.value.retry_in == 180.0 and raised.value.name == "github"
        assert "circuit breaker 'github' is open; next probe in 180.0s" in str(raised.value)
        assert dependency.calls == 0
        assert breaker.retry_in() == 180.0

    async def test_open_breaker_lets_one_probe_through(self) -> None:
        """After recovery_timeout, 10 concurrent callers: one probe runs, 9 wait, all succeed."""
        clock = FakeClock()
        breaker = make_breaker(clock, threshold=1, recovery=60.0)
        await trip(breaker, 1)
        clock.advance(60.0)
        dependency = Dependency()
        dependency.gate.clear()
        callers = [asyncio.create_task(breaker.call(dependency)) for _ in range(10)]
        for _ in range(5):
            await asyncio.sleep(0)
        assert dependency.calls == 1 and dependency.in_flight == 1
        assert breaker.state == "half-open" and breaker.probe_count == 1
        dependency.gate.set()
        assert await asyncio.gather(*callers) == ["pong"] * 10
        assert dependency.calls == 10 and breaker.probe_count == 1
        assert breaker.state == "closed"

    async def test_failed_probe_reopens_for_a_full_recovery_timeout(self) -> None:
        """The probe's own error reaches the prober; waiters are refused until t+recovery."""
        clock = FakeClock()
        breaker = make_breaker(clock, threshold=1, recovery=60.0)
        await trip(breaker, 1)
        clock.advance(61.0)
        original = TransientError("still 503")
        dependency = Dependency(lambda: original)
        dependency.gate.clear()
        prober = asyncio.create_task(breaker.call(dependency))
        waiters = [asyncio.create_task(breaker.call(dependency)) for _ in range(3)]
        for _ in range(5):
            await asyncio.sleep(0)
        dependency.gate.set()
        with pytest.raises(TransientError) as raised:
            await prober
        assert raised.value is original
        for waiter in waiters:
            with pytest.raises(CircuitOpenError) as refused:
                await waiter
            assert refused.value.retry_in == 60.0
        assert dependency.calls == 1
        assert breaker.state == "open" and breaker.open_count == 2

    async def test_probe_answered_with_a_request_error_closes_it(self) -> None:
        """A probe that gets a 4xx shows the server is up: the breaker closes."""
        clock = FakeClock()
        breaker = make_breaker(clock, threshold=1, recovery=10.0)
        await trip(breaker, 1)
        clock.advance(10.0)
        with pytest.raises(HTTPStatusError):
            await breaker.call(Dependency(lambda: HTTPStatusError(404)))
        assert breaker.state == "closed"

    async def test_snapshot_reports_state_for_diagnostics(self) -> None:
        """snapshot() gives name, state, counts and the time to the next probe."""
        clock = FakeClock()
        breaker = make_breaker(clock, threshold=1, recovery=30.0)
        await trip(breaker, 1)
        clock.advance(10.0)
        assert breaker.snapshot() == {
            "name": "github", "state": "open", "failure_count": 1, "failure_threshold": 1,
            "recovery_timeout": 30.0, "retry_in": 20.0, "times_opened": 1}


class TestRetryThroughBreaker:
    async def test_retry_call_waits_for_the_probe_instead_of_hammering(self) -> None:
        """retry_call on an open breaker sleeps exactly retry_in, then probes once."""
        clock = FakeClock()
        breaker = make_breaker(clock, threshold=1, recovery=300.0)
        await trip(breaker, 1)
        clock.advance(100.0)
        dependency = Dependency()
        async with clock.autojump():
            result = await retry_call(dependency, policy=RetryPolicy(max_retries=0),
                                      clock=clock, breaker=breaker)
        assert result == "pong"
        assert dependency.calls == 1
        assert clock.monotonic() == 300.0
        assert breaker.state == "closed" and breaker.probe_count == 1

    async def test_many_retrying_callers_share_one_probe(self) -> None:
        """10 retrying callers on an open breaker: no call before t=300, then one probe."""
        clock = FakeClock()
        breaker = make_breaker(clock, threshold=1, recovery=300.0)
        await trip(breaker, 1)
        dependency = Dependency()
        seen_at: list[float] = []

        async def call() -> str:
            seen_at.append(clock.monotonic())
            return await dependency()

        async with clock.autojump():
            results = await asyncio.gather(*(
                retry_call(call, policy=RetryPolicy(), clock=clock, breaker=breaker)
                for _ in range(10)))
        assert results == ["pong"] * 10
        assert seen_at == [300.0] * 10
        assert breaker.probe_count == 1 and breaker.open_count == 1

    async def test_breaker_wait_past_the_budget_is_not_started(self) -> None:
        """An open breaker whose probe is due after the retry budget fails now."""
        clock = FakeClock()
        breaker = make_breaker(clock, threshold=1, recovery=300.0)
        await trip(breaker, 1)
        with pytest.raises(CircuitOpenError) as raised:
            await retry_call(Dependency(), policy=RetryPolicy(budget_seconds=60.0), clock=clock,
                             breaker=breaker)
        assert "retry budget of 60s exhausted" in raised.value.__notes__


class TestRuntimeBreakers:
    async def test_runtime_shares_one_breaker_per_name_with_configured_settings(
            self, tmp_path: Path) -> None:
        """runtime.breaker('github') is one object, with the spec's 3 failures / 300 s."""
        # The development workflow's settings section gives "github" those defaults; it
        # registers them when imported (not only when an earlier test file imported it).
        import machines.development  # noqa: F401

        async with Runtime(WorkflowConfiguration(enable_health_checks=False), tmp_path,
                           clock=FakeClock(), store=MemoryStore(),
                           configure_logs=False) as runtime:
            github = runtime.breaker("github")
            assert runtime.breaker("github") is github
            assert (github.failure_threshold, github.recovery_timeout) == (3, 300.0)
            system = runtime.breaker("system")
            assert (system.failure_threshold, system.recovery_timeout) == (2, 120.0)
            other = runtime.breaker("pypi")
            assert (other.failure_threshold, other.recovery_timeout) == (5, 60.0)

    async def test_guarded_call_trips_the_shared_breaker(self, tmp_path: Path) -> None:
        """guarded_call retries through the breaker; three 503s open it for everyone."""
        clock = FakeClock()
        config = WorkflowConfiguration(enable_health_checks=False, max_retries=2,
                                       retry_base_delay=0.0)
        async with clock.autojump(), Runtime(config, tmp_path, clock=clock,
                                             store=MemoryStore(),
                                             configure_logs=False) as runtime:
            dependency = Dependency(*[lambda: TransientError("503")] * 3)
            with pytest.raises(TransientError, match="503"):
                await runtime.guarded_call("github", dependency)
            assert dependency.calls == 3
            assert runtime.breaker("github").state == "open"
            with pytest.raises(CircuitOpenError):
                await runtime.breaker("github").call(dependency)

    async def test_a_runtime_listener_added_after_a_breaker_is_made_hears_its_calls(
            self, tmp_path: Path) -> None:
        """A breaker made (and called) while nobody listened tells each later call's
        outcome to a runtime listener added afterwards."""
        config = WorkflowConfiguration(enable_health_checks=False)
        async with Runtime(config, tmp_path, clock=FakeClock(), store=MemoryStore(),
                           configure_logs=False) as runtime:
            assert await runtime.guarded_call("pypi", Dependency()) == "pong"
            heard: list[tuple[str, str]] = []
            runtime.add_runtime_listener(lambda event, **data: heard.append(
                (event, data.get("outcome", ""))))
            assert await runtime.guarded_call("pypi", Dependency()) == "pong"
            assert await runtime.breaker("pypi").call(Dependency()) == "pong"
        assert [h for h in heard if h[0] == "dependency_call"] == [
            ("dependency_call", "ok"), ("dependency_call", "ok")]
