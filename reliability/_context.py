"""What a stage handler receives: ``StageContext``; and what definitions must provide."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    from ._breaker import Breaker
    from ._clock import Clock
    from ._config import WorkflowConfiguration
    from ._engine import Engine
    from ._runtime import Runtime
    from ._state import WorkflowRun

__all__ = ["DefinitionLike", "RecoveryAction", "StageContext", "StageHandler", "StageSpecLike"]

T = TypeVar("T")

StageHandler = Callable[["StageContext"], Awaitable[Mapping[str, Any] | None]]
RecoveryAction = Callable[["StageContext", "BaseException | None"], Awaitable[None]]


class StageSpecLike(Protocol):
    """The parts of ``machines.StageSpec`` the engine reads."""

    @property
    def name(self) -> str: ...
    @property
    def handler(self) -> StageHandler: ...
    @property
    def timeout_seconds(self) -> float: ...
    @property
    def warning_threshold_seconds(self) -> float: ...
    @property
    def baseline_seconds(self) -> float: ...
    @property
    def max_retries(self) -> int | None: ...
    @property
    def critical(self) -> bool: ...
    @property
    def recovery_actions(self) -> tuple[str, ...]: ...
    @property
    def warning_actions(self) -> tuple[str, ...]: ...
    @property
    def heartbeat_timeout_seconds(self) -> float | None: ...
    @property
    def checkpoint(self) -> bool: ...


class DefinitionLike(Protocol):
    """The parts of ``machines.WorkflowDefinition`` the engine uses.

    ``attach``/``detach`` add a run to (and take it off) the definition's one shared
    machine; ``advance`` and ``finish`` fire its triggers, which only do bookkeeping.
    """

    @property
    def name(self) -> str: ...
    @property
    def import_path(self) -> str | None: ...
    @property
    def stages(self) -> Sequence[StageSpecLike]: ...
    @property
    def recovery_actions(self) -> Mapping[str, RecoveryAction]: ...
    def stage_index(self, name: str) -> int: ...
    def attach(self, run: WorkflowRun, stage: str | None) -> None: ...
    def detach(self, run: WorkflowRun) -> None: ...
    async def advance(self, run: WorkflowRun) -> None: ...
    async def finish(self, run: WorkflowRun, outcome: str) -> None: ...


class StageContext:
    """Everything a handler may use; one is made per attempt of a stage.

    ``context`` is a read-only view of the workflow's inputs merged with the outputs of
    earlier stages. Return a mapping from the handler to add outputs.
    """

    __slots__ = ("_engine", "_run", "attempt", "context", "logger", "stage")

    def __init__(self, engine: Engine, run: WorkflowRun, stage: str, attempt: int,
                 logger: logging.LoggerAdapter[logging.Logger]) -> None:
        self._engine = engine
        self._run = run
        self.stage = stage
        self.attempt = attempt
        self.context: Mapping[str, Any] = MappingProxyType(run.context)
        self.logger = logger

    @property
    def workflow_id(self) -> str:
        return self._run.workflow_id

    @property
    def runtime(self) -> Runtime:
        """The runtime this workflow runs in (shared services, health checks)."""
        return self._engine.runtime

    @property
    def config(self) -> WorkflowConfiguration:
        return self._engine.runtime.config

    @property
    def project_root(self) -> Path:
        return self._engine.runtime.project_root

    @property
    def clock(self) -> Clock:
        return self._engine.runtime.clock

    def breaker(self, name: str) -> Breaker:
        """The runtime's shared circuit breaker for dependency ``name``."""
        return self._engine.runtime.breaker(name)

    async def call(self, name: str, call: Callable[[], Awaitable[T]]) -> T:
        """Await ``call()`` with retries (outer) through breaker ``name`` (inner)."""
        return await self._engine.runtime.guarded_call(name, call)

    def heartbeat(self) -> None:
        """Say the stage is alive; stages with a heartbeat timeout need one in time."""
        self._engine.heartbeat(self._run)

    def progress(self, fraction: float, message: str = "") -> None:
        """Report progress (0..1) for progress displays; also a heartbeat."""
        self._engine.progress(self._run, self.stage, fraction, message)

    async def sleep(self, seconds: float) -> None:
        """Sleep on the runtime's clock (virtual in tests)."""
        await self._engine.runtime.clock.sleep(seconds)

    async def shared(self, key: str, factory: Callable[[], Awaitable[T]]) -> T:
        """One object per runtime for ``key`` (an HTTP client, a forge), made on first use.

        If it has an ``aclose()`` method it is called when the runtime closes.
        """
        return await self._engine.runtime.shared(key, factory)

    def save_output(self, **outputs: Any) -> None:
        """Record outputs now (an issue number the moment it exists) and queue a checkpoint.

        Use it for the identity of a side effect, so a crash right after the effect
        still leaves a record that the re-run stage can reconcile with.
        """
        self._run.outputs.update(outputs)
        self._run.context.update(outputs)
        self._engine.checkpoint_soon(self._run)

    async def save_output_durably(self, **outputs: Any) -> None:
        """Like ``save_output``, and wait until the checkpoint is on disk."""
        self._run.outputs.update(outputs)
        self._run.context.update(outputs)
        await self._engine.checkpoint(self._run)
