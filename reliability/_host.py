"""What the engine, the stage context and the monitor use of the runtime that hosts them.

They depend on these protocols, not on ``Runtime``: an ``Engine`` can be built on a small
fake host and a ``MemoryStore`` and unit-tested without a runtime, and the runtime's other
parts (claims, admission, the CLI's needs) can change without touching the engine.
``Runtime`` satisfies all three (mypy checks it where the runtime builds its engines and
its monitor).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    from ._breaker import Breaker
    from ._clock import Clock
    from ._config import WorkflowConfiguration
    from ._engine import LiveWorkflow
    from ._health import SystemHealthCheck
    from ._state import WorkflowRun
    from ._store import Store
    from ._turns import Turns

__all__ = ["EngineHost", "ErrorHandler", "Listener", "MonitorHost", "WorkflowServices"]

T = TypeVar("T")
# handler(workflow_id, error, stage, context) -> a strategy dict, None, or an awaitable of one
ErrorHandler = Callable[[str, BaseException, str, dict[str, Any]], Any]
Listener = Callable[..., None]


class WorkflowServices(Protocol):
    """The shared services a stage handler reaches through its ``StageContext``."""

    @property
    def clock(self) -> Clock: ...
    @property
    def config(self) -> WorkflowConfiguration: ...
    @property
    def project_root(self) -> Path: ...
    @property
    def breakers(self) -> Mapping[str, Breaker]: ...
    def breaker(self, name: str) -> Breaker: ...
    async def guarded_call(self, name: str, call: Callable[[], Awaitable[T]]) -> T: ...
    async def shared(self, key: str, factory: Callable[[], Awaitable[T]]) -> T: ...
    async def stage_health_check(self, run: WorkflowRun, reason: str) -> None:
        """Take a health reading for ``run`` and record it in its history."""


class EngineHost(WorkflowServices, Protocol):
    """What an ``Engine`` uses besides: where states go, fair turns, events, side tasks.

    The engine reads every value here once, when it is built: a host must not swap its
    store, turns or configuration afterwards.
    """

    @property
    def persistence(self) -> bool: ...
    @property
    def store(self) -> Store: ...
    @property
    def turns(self) -> Turns: ...
    @property
    def error_handlers(self) -> Sequence[ErrorHandler]: ...
    def emit(self, event: str, run: WorkflowRun, **data: Any) -> None:
        """Tell listeners of a workflow's event (``stage``, ``retry``, ``progress``...)."""
    def listeners(self, event: str) -> Sequence[Listener]:
        """Who hears ``event``: one sequence per event that the host keeps current in
        place as listeners are added. The engine holds it from when it is built and, for
        its per-stage events, builds and emits nothing while it is empty."""
    def spawn(self, coroutine: Coroutine[Any, Any, Any], name: str) -> None:
        """Run a short side task, cancelled when the host closes."""


class MonitorHost(Protocol):
    """What the ``RuntimeMonitor`` watches and reports to."""

    loop_lag_ms: float | None  # the monitor writes the loop's lag (p99, ms) here

    @property
    def clock(self) -> Clock: ...
    @property
    def config(self) -> WorkflowConfiguration: ...
    def live_workflows(self) -> list[LiveWorkflow]:
        """The workflows running now (a copy: the caller may iterate it while they end)."""
    def emit(self, event: str, run: WorkflowRun, **data: Any) -> None: ...
    def notify(self, event: str, **data: Any) -> None:
        """Tell runtime listeners of an event that belongs to no one workflow."""
    def spawn(self, coroutine: Coroutine[Any, Any, Any], name: str) -> None: ...
    async def stage_health_check(self, run: WorkflowRun, reason: str) -> None: ...
    async def perform_health_check(
            self, workflow_id: str | None = None) -> SystemHealthCheck: ...
