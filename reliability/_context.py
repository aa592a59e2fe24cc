"""What a stage handler receives: ``StageContext``; and what definitions must provide."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

from ._errors import ConfigurationError

if TYPE_CHECKING:
    from ._breaker import Breaker
    from ._clock import Clock
    from ._config import WorkflowConfiguration
    from ._engine import Engine, LiveWorkflow
    from ._runtime import Runtime
    from ._state import WorkflowRun
    from ._waits import StageWaits

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

    ``attach``/``detach`` put a run on (and take it off) the definition's one shared
    machine at a given state; ``advance`` and ``finish`` fire its triggers, which only do
    bookkeeping and raise ``InvalidTransitionError`` for a move the machine does not
    allow. The run's ``state`` is then where it is (docs/architecture.md, invariant 10).
    """

    @property
    def name(self) -> str: ...
    @property
    def import_path(self) -> str | None: ...
    @property
    def stages(self) -> Sequence[StageSpecLike]: ...
    @property
    def recovery_actions(self) -> Mapping[str, RecoveryAction]: ...
    def attach(self, run: WorkflowRun, state: str) -> None: ...
    def detach(self, run: WorkflowRun) -> None: ...
    def advance_now(self, run: WorkflowRun) -> bool:
        """``advance`` done at once if it needs no await (nothing but the state changes);
        False if the caller must await ``advance`` instead."""
    async def advance(self, run: WorkflowRun) -> None: ...
    async def finish(self, run: WorkflowRun, outcome: str) -> None: ...
    def next_state(self, state: str) -> str:
        """The state ``advance`` moves a run at ``state`` to (for log lines)."""


class StageContext:
    """Everything a handler may use; one is made per attempt of a stage.

    ``context`` is a read-only view of the workflow's inputs merged with the outputs of
    earlier stages. Return a mapping from the handler to add outputs.
    """

    # Made at every attempt of every stage: five fields set, the rest (the context's
    # view, the logger) made when a handler asks for them.
    __slots__ = ("_engine", "_live", "_run", "_waits", "attempt", "stage")

    def __init__(self, engine: Engine, live: LiveWorkflow, stage: str, attempt: int) -> None:
        self._engine = engine
        self._live = live
        self._run = live.run
        self.stage = stage
        self.attempt = attempt
        self._waits: StageWaits | None = None  # made by the first durable wait

    @property
    def context(self) -> Mapping[str, Any]:
        """The workflow's inputs and earlier stages' outputs, read-only."""
        return MappingProxyType(self._run.context)

    @property
    def logger(self) -> logging.LoggerAdapter[logging.Logger]:
        """The runtime's logger, its records tagged with this workflow's ID."""
        return self._engine.logger_for(self._live)

    @property
    def workflow_id(self) -> str:
        return self._run.workflow_id

    @property
    def runtime(self) -> Runtime:
        """The runtime this workflow runs in, for its whole API (``register_health_check``,
        ``cancel``...). An engine built on another host (a test's) returns that host."""
        return cast("Runtime", self._engine.host)

    @property
    def config(self) -> WorkflowConfiguration:
        return self._engine.host.config

    @property
    def project_root(self) -> Path:
        return self._engine.host.project_root

    @property
    def clock(self) -> Clock:
        return self._engine.host.clock

    def breaker(self, name: str) -> Breaker:
        """The runtime's shared circuit breaker for dependency ``name``."""
        return self._engine.host.breaker(name)

    def call(self, name: str, call: Callable[[], Awaitable[T]]) -> Coroutine[Any, Any, T]:
        """Await ``call()`` with retries (outer) through breaker ``name`` (inner).

        ``await ctx.call(...)``: the host's coroutine itself, not one wrapping it (a
        coroutine frame less per call; nothing runs until it is awaited)."""
        return self._engine.host.guarded_call(name, call)

    def heartbeat(self) -> None:
        """Say the stage is alive; stages with a heartbeat timeout need one in time."""
        self._engine.heartbeat(self._live)

    def progress(self, fraction: float, message: str = "") -> None:
        """Report progress (0..1) for progress displays; also a heartbeat."""
        self._engine.progress(self._live, self.stage, fraction, message)

    async def sleep(self, seconds: float) -> None:
        """Sleep on the runtime's clock (virtual in tests)."""
        await self._engine.host.clock.sleep(seconds)

    async def shared(self, key: str, factory: Callable[[], Awaitable[T]]) -> T:
        """One object per runtime for ``key`` (an HTTP client, a forge), made on first use.

        If it has an ``aclose()`` method it is called when the runtime closes.
        """
        return await self._engine.host.shared(key, factory)

    async def check_health(self, reason: str) -> None:
        """Take a health reading now and record it in this workflow's history."""
        await self._engine.host.stage_health_check(self._run, reason)

    def save_output(self, **outputs: Any) -> None:
        """Record outputs now (an issue number the moment it exists) and queue a checkpoint.

        Use it for the identity of a side effect, so a crash right after the effect
        still leaves a record that the re-run stage can reconcile with.
        """
        self._run.outputs.update(outputs)
        self._run.context.update(outputs)
        self._engine.checkpoint_soon(self._run)

    async def save_output_durably(self, **outputs: Any) -> None:
        """Like ``save_output``, and wait until the checkpoint is on disk (with no outputs:
        make the workflow's current state durable now)."""
        self._run.outputs.update(outputs)
        self._run.context.update(outputs)
        await self._engine.checkpoint(self._run)

    # --- durable waits (``_waits.py``)

    @property
    def stage_waits(self) -> StageWaits | None:
        """The durable waits this attempt made (the signals it took), or None."""
        return self._waits

    async def wait_for_signal(self, name: str, *, timeout_seconds: float) -> Any:
        """The payload of the next signal ``name`` sent to this workflow.

        Stored already: returned at once. Otherwise the workflow parks (status
        ``waiting``; no slot, task or memory held) and this stage runs again from its
        start when the signal comes, or when ``timeout_seconds`` have passed: then this
        call raises ``SignalTimeout``. The code before the wait therefore runs twice:
        keep it idempotent, as every stage must be. The deadline is set by the first run
        of the stage and kept across its runs.
        """
        from ._waits import check_signal_name
        check_signal_name(name)
        _, payload = await self._durable_wait(name, float(timeout_seconds))
        return payload

    async def sleep_durably(self, seconds: float | None = None, *,
                            until: float | None = None) -> None:
        """Wait ``seconds`` (or until the epoch time ``until``) without holding anything:
        the workflow parks, and this stage runs again from its start when the time has
        come (so its code before the sleep runs twice; keep it idempotent)."""
        if (seconds is None) == (until is None):
            raise ValueError("sleep_durably takes seconds or until=, one of them")
        delay = float(seconds) if seconds is not None else float(until or 0.0) - (
            self._engine.host.clock.time())
        await self._durable_wait("", delay)

    async def _durable_wait(self, name: str, delay: float) -> tuple[bool, Any]:
        from ._waits import StageWaits, durable_wait, signal_store
        if not self._engine.host.persistence:
            raise ConfigurationError("a durable wait needs enable_persistence")
        store = signal_store(self._engine.host.store)
        if self._waits is None:
            self._waits = StageWaits()
        now = self._engine.host.clock.time()
        return await durable_wait(store, now, self._run, self._waits, name, now + delay)
