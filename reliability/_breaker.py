"""Circuit breakers, one per external dependency, shared by every workflow in a runtime.

The state record (closed / open / half-open) and the failure counter live in
``aiobreaker``'s storage, which a shared (Redis) storage can replace for many processes.
Its call path is not used, because of defects measured in 1.2.0:
half-open lets every waiting caller through, the tripping call raises
``CircuitBreakerError`` instead of the real error, reopen time mixes UTC and local time,
and its ``datetime.utcnow()`` warning turns into an error under ``-W error``. This adapter
decides instead, on the runtime's monotonic clock:

- closed: calls pass; a counted failure increments the counter, the threshold opens it;
- open: calls are refused with ``CircuitOpenError(retry_in)`` until ``recovery_timeout``;
- then exactly one caller is the half-open probe; the others wait for its outcome;
- the caller always sees the original error, never a breaker error, for a failed call.
"""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from aiobreaker import CircuitBreakerState
from aiobreaker.storage.memory import CircuitMemoryStorage

from ._clock import Clock
from ._errors import CircuitOpenError, ErrorCategory, RateLimitedError, classify

__all__ = ["Breaker"]

_STATE_NAMES = {CircuitBreakerState.CLOSED: "closed", CircuitBreakerState.OPEN: "open",
                CircuitBreakerState.HALF_OPEN: "half-open"}

T = TypeVar("T")


def _counts_as_failure(error: BaseException) -> bool:
    """Only failures that say the dependency is unwell trip the breaker.

    A rate limit means the server is alive and answering; a 4xx means our request was
    wrong. Neither should stop every other workflow's calls.
    """
    if isinstance(error, (RateLimitedError, CircuitOpenError)):
        return False
    return classify(error) in (ErrorCategory.TRANSIENT, ErrorCategory.RESOURCE)


class Breaker:
    """A circuit breaker guarding one dependency (``name``) for all workflows in a loop."""

    def __init__(self, name: str, *, failure_threshold: int, recovery_timeout: float,
                 clock: Clock, notify: Callable[..., Any] | None = None,
                 heard_by: Sequence[object] | None = None) -> None:
        self.name = name
        # notify(event, **data): "breaker" on each state change, "dependency_call" per call
        self._notify = notify
        # Who hears notify, kept current in place by the caller: a call's outcome is not
        # told while it is empty (a state change always is).
        self._heard_by = heard_by
        self.failure_threshold = failure_threshold
        self.recovery_timeout = recovery_timeout
        self._clock = clock
        self._storage = CircuitMemoryStorage(CircuitBreakerState.CLOSED)
        self._opened_at: float | None = None  # monotonic; aiobreaker's own time is not used
        self._probe_done: asyncio.Event | None = None  # set while a half-open probe runs
        self.open_count = 0
        self.probe_count = 0

    @property
    def state(self) -> str:
        """``closed``, ``open`` or ``half-open``."""
        if self._probe_done is not None:
            return "half-open"
        return "open" if self._opened_at is not None else "closed"

    @property
    def failure_count(self) -> int:
        return int(self._storage.counter)

    def retry_in(self) -> float:
        """Seconds until the next half-open probe may start (0 when closed)."""
        if self._opened_at is None:
            return 0.0
        return max(0.0, self._opened_at + self.recovery_timeout - self._clock.monotonic())

    async def call(self, call: Callable[[], Awaitable[T]]) -> T:
        """Await ``call()`` unless the breaker refuses; the original error is re-raised."""
        while True:
            if self._probe_done is not None:
                await self._probe_done.wait()  # another caller is probing; await its verdict
                continue
            if self._opened_at is None:
                return await self._guarded(call)
            remaining = self.retry_in()
            if remaining > 0:
                self._outcome("rejected")
                raise CircuitOpenError(self.name, remaining)
            return await self._probe(call)

    def call_now(self, call: Callable[[], Awaitable[T]]) -> Awaitable[T]:
        """``call(call)`` for a caller that awaits the result at once (the retry loop):
        while the breaker is closed, the guarded call's coroutine without one around it.
        The state is read here, so an awaitable kept for later must come from ``call``."""
        if self._probe_done is None and self._opened_at is None:
            return self._guarded(call)
        return self.call(call)

    async def _guarded(self, call: Callable[[], Awaitable[T]]) -> T:
        try:
            result = await call()
        except Exception as error:
            self._failed(error)
            if _counts_as_failure(error):
                self._record_failure()
            raise
        self._outcome("ok")
        if self._storage.counter:
            self._storage.reset_counter()
        return result

    async def _probe(self, call: Callable[[], Awaitable[T]]) -> T:
        self._probe_done = asyncio.Event()
        self.probe_count += 1
        self._set_state(CircuitBreakerState.HALF_OPEN)
        try:
            result = await call()
        except BaseException as error:
            if isinstance(error, Exception):
                self._failed(error)
            if isinstance(error, Exception) and not _counts_as_failure(error):
                self._close()  # the dependency answered; the request itself was at fault
            else:
                self._open()
            raise
        else:
            self._outcome("ok")
            self._close()
            return result
        finally:
            done, self._probe_done = self._probe_done, None
            done.set()

    def _record_failure(self) -> None:
        self._storage.increment_counter()
        if self._storage.counter >= self.failure_threshold:
            self._open()

    def _open(self) -> None:
        self._opened_at = self._clock.monotonic()
        self.open_count += 1
        self._set_state(CircuitBreakerState.OPEN)

    def _close(self) -> None:
        self._opened_at = None
        self._storage.reset_counter()
        self._set_state(CircuitBreakerState.CLOSED)

    def _outcome(self, outcome: str) -> None:
        if self._notify is not None and (self._heard_by is None or self._heard_by):
            self._notify("dependency_call", dependency=self.name, outcome=outcome)

    def _failed(self, error: Exception) -> None:
        self._outcome("rate_limited" if isinstance(error, RateLimitedError) else "error")

    def _set_state(self, state: CircuitBreakerState) -> None:
        if self._notify is not None and state is not self._storage.state:
            self._notify("breaker", dependency=self.name, state=_STATE_NAMES[state])
        # aiobreaker stamps opened_at with datetime.utcnow(), deprecated since 3.12; the
        # stamp is never read here, so its warning is silenced at this one call site.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            self._storage.state = state
            if state is CircuitBreakerState.OPEN:
                self._storage.opened_at = None

    def snapshot(self) -> dict[str, object]:
        """State for diagnostics and health reports."""
        return {"name": self.name, "state": self.state, "failure_count": self.failure_count,
                "failure_threshold": self.failure_threshold,
                "recovery_timeout": self.recovery_timeout, "retry_in": round(self.retry_in(), 3),
                "times_opened": self.open_count}
