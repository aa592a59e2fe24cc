"""The engine: drives one workflow through its stages, one stage at a time.

For each stage: take a fair turn (``_turns.py``), fire the machine's trigger (bookkeeping
only), queue a "started" checkpoint, run the handler under the watchdog, decide on
failures (retry, recover, degrade, stop), merge outputs and make the "completed"
checkpoint durable before the next stage starts (``durability="strict"``) or before the
stage after it ends (``"overlapped"``).

Invariant (DESIGN rule 2): the workflow's task is cancelled by the runtime only while it
is inside a handler (``_Live.in_handler``), never inside a trigger or a store write; a
stop asked for elsewhere is honoured at the next stage boundary.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from collections.abc import Callable, Mapping
from enum import Enum
from typing import TYPE_CHECKING, Any

from ._clock import TimerHandle
from ._context import DefinitionLike, StageContext, StageSpecLike
from ._errors import ErrorCategory, StageTimeoutError, classify
from ._logging import logger, redact_secrets, workflow_id_var
from ._retry import RetryPolicy, backoff_delays, next_delay
from ._state import WorkflowRun

if TYPE_CHECKING:
    from ._runtime import Runtime

__all__ = ["Engine", "Interrupted"]


class Interrupted(Exception):
    """Raised inside the engine when a workflow must stop now but stay resumable."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _StageFailed(Exception):
    def __init__(self, error: BaseException, status: str) -> None:
        super().__init__(str(error))
        self.error = error
        self.status = status


class _Decision(Enum):
    RETRY = "retry"
    SKIP = "skip"
    FAIL = "fail"


class _WorkflowLogger(logging.LoggerAdapter[logging.Logger]):
    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        kwargs.setdefault("extra", {})["workflow_id"] = self.extra["workflow_id"]  # type: ignore[index]
        return msg, kwargs


class _Live:
    """In-process facts about a running workflow that are never persisted."""

    __slots__ = ("_logger", "_on_timer", "deadline", "in_handler", "last_beat", "progress",
                 "run", "stage_spec", "stage_started", "stop_reason", "task", "timeout_reason",
                 "timer", "unsynced", "warn_at", "warned")

    def __init__(self, run: WorkflowRun) -> None:
        self.run = run
        # Made once per workflow, not per stage attempt: the hot path allocates less.
        self._logger: logging.LoggerAdapter[logging.Logger] | None = None
        self._on_timer: Callable[[], None] | None = None
        self.task: asyncio.Task[Any] | None = None
        self.in_handler = False
        self.stop_reason: str | None = None  # "cancel" or "shutdown", once asked
        self.timeout_reason: str | None = None
        self.timer: TimerHandle | None = None
        self.stage_spec: StageSpecLike | None = None
        self.stage_started = 0.0
        self.deadline = 0.0
        self.warn_at = 0.0
        self.warned = False
        self.last_beat = 0.0
        self.progress: tuple[float, str] | None = None
        # durability="overlapped": the last stage-completion write, still on its way to disk
        self.unsynced: asyncio.Future[None] | None = None


class Engine:
    """Runs workflows of one definition inside one runtime."""

    def __init__(self, runtime: Runtime, definition: DefinitionLike) -> None:
        self.runtime = runtime
        self.definition = definition
        self._clock = runtime.clock
        config = runtime.config
        self._multiplier = config.timeout_multiplier
        self._policy = RetryPolicy(max_retries=config.max_retries,
                                   base_delay=config.retry_base_delay,
                                   max_delay=config.retry_max_delay,
                                   budget_seconds=config.retry_budget_seconds)
        self._log_info = logger.isEnabledFor(logging.INFO) and config.enable_monitoring
        self._baselines = config.performance_baselines
        self._overlapped = config.durability == "overlapped"

    # ------------------------------------------------------------------ the workflow

    async def execute(self, live: _Live, start_index: int) -> None:
        """Run stages from ``start_index``; the run's status says how it ended."""
        run = live.run
        token = workflow_id_var.set(run.workflow_id)
        stages = self.definition.stages
        resumed = start_index > 0 or bool(run.completed_stages) or run.resumed_from is not None
        # start_index == len(stages): every stage completed; only the outcome is recorded.
        self.definition.attach(run, stages[min(start_index, len(stages) - 1)].name
                               if resumed else None)
        try:
            run.status = "running"
            self._log("info", "Starting workflow %s (%d stages)%s", self.definition.name,
                      len(stages), f", resumed at {run.resumed_from or stages[start_index].name}"
                      if resumed else "")
            turns = self.runtime.turns
            for index in range(start_index, len(stages)):
                waiter = turns.take()
                if waiter is not None:  # the loop is saturated: queue for a fair turn
                    await waiter
                if live.stop_reason is not None:
                    raise Interrupted(live.stop_reason)
                if index > start_index or not resumed:
                    await self.definition.advance(run)
                await self._run_stage(live, stages[index])
            await self.definition.advance(run)  # last stage -> completed
            run.status = "completed"
            run.current_stage = "completed"
        except Interrupted as stop:
            await self._end(run, "interrupted", f"interrupted ({stop.reason}); resumable")
        except _StageFailed as failure:
            run.error = redact_secrets(f"{type(failure.error).__name__}: {failure.error}")
            run.error_category = classify(failure.error).value
            await self._end(run, failure.status, None)
        except asyncio.CancelledError:
            # Cancelled from outside (task group, loop shutdown): keep it resumable.
            await self._end(run, "interrupted", "interrupted (cancelled); resumable")
            raise
        finally:
            await self._final_save(live)
            self.definition.detach(run)
            workflow_id_var.reset(token)

    async def _end(self, run: WorkflowRun, status: str, note: str | None) -> None:
        run.status = status
        if note is not None:
            run.error = run.error or note
        if status in ("failed", "timed_out"):
            await self.definition.finish(run, status)
        elif status == "interrupted":
            await self.definition.finish(run, "interrupted")

    async def _final_save(self, live: _Live) -> None:
        run = live.run
        run.updated_at = self._clock.time()
        if not self.runtime.persistence:
            return
        unsynced, live.unsynced = live.unsynced, None
        if unsynced is not None:  # the final write below covers it; only report a failure
            unsynced.add_done_callback(self._report_unsynced)
        try:
            # No shield needed (and none paid for, at thousands of endings a second): the
            # write is queued before the first await, so a second Ctrl-C abandons only
            # the wait, never the record (Store.save's contract).
            await self.runtime.store.save(run.workflow_id, run.to_state,
                                          checkpoint_stage="final")
        except Exception as error:  # the state on disk is still the last durable one
            self._log("error", "Could not save final state: %s", error)

    def _report_unsynced(self, write: asyncio.Future[None]) -> None:
        if not write.cancelled() and write.exception() is not None:
            self._log("error", "Could not save a stage's completion: %s", write.exception())

    # ------------------------------------------------------------------ one stage

    async def _run_stage(self, live: _Live, spec: StageSpecLike) -> None:
        run = live.run
        retries_allowed = spec.max_retries if spec.max_retries is not None else (
            self._policy.max_retries)
        delays = backoff_delays(self._policy)
        budget_end = self._clock.monotonic() + self._policy.budget_seconds
        recovered = False
        attempt = 0
        while True:
            attempt += 1
            fresh = run.revision == 0  # no snapshot of this workflow was ever taken
            started = self._begin_attempt(live, spec, attempt)
            if fresh and self.runtime.persistence:
                # Durable before the first handler's first side effect: a crash inside
                # stage 1 must leave a resumable record, not an unknown workflow. (The
                # "started" write just queued coalesces with this one.)
                await self.runtime.store.save(run.workflow_id, run.to_state)
                if live.stop_reason is not None:
                    raise Interrupted(live.stop_reason)
            try:
                outputs = await self._attempt(live, spec, attempt)
            except Interrupted:
                raise
            except Exception as error:
                decision, delay = await self._decide(live, spec, error, attempt, retries_allowed,
                                                     delays, budget_end)
                if decision is not _Decision.RETRY:
                    self._record_stage(run, spec, started, attempt,
                                       "degraded" if decision is _Decision.SKIP else "failed")
                    if decision is _Decision.SKIP:
                        await self._save(live, spec, checkpoint=True)
                        return
                    status = "timed_out" if isinstance(error, StageTimeoutError) else "failed"
                    raise _StageFailed(error, status) from error
                recovered = recovered or run.recovery_attempts > 0
                run.retry_count += 1
                self.runtime.emit("retry", run, stage=spec.name, attempt=attempt, delay=delay)
                if delay > 0:
                    await self._interruptible_sleep(live, delay)
                continue
            if recovered:
                run.recovery_successes += 1
            self._complete(run, spec, outputs, started, attempt)
            await self._save(live, spec, checkpoint=self._wants_checkpoint(run, spec))
            return

    async def _interruptible_sleep(self, live: _Live, delay: float) -> None:
        """A retry wait that a cancel or shutdown ends at once, like a handler."""
        if live.stop_reason is not None:  # asked while deciding, when nothing was cancelled
            raise Interrupted(live.stop_reason)
        live.in_handler = True
        try:
            await self._clock.sleep(delay)
        except asyncio.CancelledError:
            reason = self._take_cancel(live)
            if reason is None:
                raise
            raise Interrupted(reason) from None
        finally:
            live.in_handler = False

    def _begin_attempt(self, live: _Live, spec: StageSpecLike, attempt: int) -> float:
        run = live.run
        now = self._clock.monotonic()
        run.current_stage = spec.name
        run.attempt = attempt
        run.stage_start_time = self._clock.time()
        run.updated_at = run.stage_start_time
        live.stage_spec = spec
        live.stage_started = now
        live.progress = None
        self.runtime.emit("stage", run, stage=spec.name, attempt=attempt)
        if self.runtime.persistence:
            # "started": at once before a side-effecting stage (spec.checkpoint), so a
            # crash inside it is on record as such; other stages' starts may be folded
            # into their completion.
            self.runtime.store.save_soon(run.workflow_id, run.to_state,
                                         promptly=spec.checkpoint)
        return now

    async def _attempt(self, live: _Live, spec: StageSpecLike,
                       attempt: int) -> Mapping[str, Any] | None:
        ctx = StageContext(self, live.run, spec.name, attempt, self._logger_for(live))
        if self.runtime.health_before(spec):
            await self.runtime.stage_health_check(live.run, f"before {spec.name}")
        if live.stop_reason is not None:
            # Asked to stop while outside the handler (during the health check above), when
            # nothing could be cancelled: honour it before the handler starts, not after.
            raise Interrupted(live.stop_reason)
        self._arm_watchdog(live, spec)
        live.in_handler = True
        try:
            result = await spec.handler(ctx)
        except asyncio.CancelledError:
            reason = self._take_cancel(live)
            if reason is None:
                raise  # not ours: propagate to whoever cancelled
            if reason in ("timeout", "heartbeat"):
                raise self._timeout_error(spec, reason) from None
            raise Interrupted(reason) from None
        finally:
            live.in_handler = False
            if live.timer is not None:
                live.timer.cancel()
                live.timer = None
        reason = self._take_cancel(live)  # the handler swallowed our cancellation
        if reason in ("timeout", "heartbeat"):
            raise self._timeout_error(spec, reason)
        if reason is not None:
            raise Interrupted(reason)
        if result is not None and not isinstance(result, Mapping):
            raise TypeError(f"stage {spec.name!r} handler returned {type(result).__name__}; "
                            "return a mapping of outputs or None")
        return result

    def _take_cancel(self, live: _Live) -> str | None:
        """Our own pending cancellation of this task, consumed; None if there is none."""
        reason = live.timeout_reason or live.stop_reason
        if reason is None:
            return None
        live.timeout_reason = None
        task = live.task
        if task is not None and task.cancelling():
            task.uncancel()
        return reason

    def _timeout_error(self, spec: StageSpecLike, reason: str) -> StageTimeoutError:
        if reason == "heartbeat":
            return StageTimeoutError(spec.name, spec.heartbeat_timeout_seconds or 0.0,
                                     reason="sent no heartbeat within")
        return StageTimeoutError(spec.name, self._timing(spec)[0])

    def _complete(self, run: WorkflowRun, spec: StageSpecLike,
                  outputs: Mapping[str, Any] | None, started: float, attempt: int) -> None:
        if outputs:
            run.outputs.update(outputs)
            run.context.update(outputs)
        run.completed_stages.append(spec.name)
        duration = self._record_stage(run, spec, started, attempt, "completed")
        if self._log_info:
            following = self._next_stage_name(spec)
            logger.info("Stage transition: %s -> %s (duration: %.1fs)", spec.name, following,
                        duration)

    def _next_stage_name(self, spec: StageSpecLike) -> str:
        stages = self.definition.stages
        index = self.definition.stage_index(spec.name)
        return stages[index + 1].name if index + 1 < len(stages) else "completed"

    def _record_stage(self, run: WorkflowRun, spec: StageSpecLike, started: float,
                      attempt: int, status: str) -> float:
        duration = self._clock.monotonic() - started
        baseline = self._baselines.get(spec.name, spec.baseline_seconds)
        run.stage_history.append({"stage": spec.name, "started_at": run.stage_start_time,
                                  "duration": round(duration, 6), "baseline": baseline,
                                  "attempts": attempt, "status": status})
        self.runtime.emit("stage_end", run, entry=run.stage_history[-1])
        return duration

    def _wants_checkpoint(self, run: WorkflowRun, spec: StageSpecLike) -> bool:
        frequency = self.runtime.config.checkpoint_frequency
        return spec.checkpoint or len(run.completed_stages) % frequency == 0

    async def _save(self, live: _Live, spec: StageSpecLike, *, checkpoint: bool) -> None:
        """Record a stage's end: durable now ("strict"), or on its way while the next stage
        runs ("overlapped"; the journal keeps order, so a later durable write implies it)."""
        if not self.runtime.persistence:
            return
        run = live.run
        run.updated_at = self._clock.time()
        stage = spec.name if checkpoint else None
        if not self._overlapped:
            # save_nowait's future, awaited here: the same as save(), one coroutine less.
            await self.runtime.store.save_nowait(run.workflow_id, run.to_state,
                                                 checkpoint_stage=stage)
            return
        store = self.runtime.store
        previous = live.unsynced
        if previous is not None and not previous.done():
            store.expedite()  # before queueing the next write, which nobody waits for yet
        # Lazy: nobody waits for it until the next stage ends, so its answer need not
        # wake the loop in the middle of that stage.
        live.unsynced = store.save_nowait(run.workflow_id, run.to_state,
                                          checkpoint_stage=stage, lazy=True)
        if previous is not None:
            await previous  # durable long ago, as a rule; a write error surfaces here

    def checkpoint_soon(self, run: WorkflowRun) -> None:
        if self.runtime.persistence:
            run.updated_at = self._clock.time()
            # Outputs recorded mid-stage (an issue number the moment it exists): at once.
            self.runtime.store.save_soon(run.workflow_id, run.to_state, promptly=True)

    async def checkpoint(self, run: WorkflowRun) -> None:
        if self.runtime.persistence:
            run.updated_at = self._clock.time()
            await self.runtime.store.save(run.workflow_id, run.to_state)

    # ------------------------------------------------------------------ failures

    async def _decide(self, live: _Live, spec: StageSpecLike, error: Exception, attempt: int,
                      retries_allowed: int, delays: Any,
                      budget_end: float) -> tuple[_Decision, float]:
        run = live.run
        category = classify(error)
        run.record_error({"stage": spec.name, "attempt": attempt, "type": type(error).__name__,
                          "message": redact_secrets(str(error))[:500],
                          "category": category.value, "started_at": run.stage_start_time,
                          "at": self._clock.time()})
        self._log("warning", "Stage %s attempt %d failed (%s): %s", spec.name, attempt,
                  category.value, error)
        custom = await self._custom_decision(live, spec, error, attempt, retries_allowed)
        if custom is not None:
            return custom
        can_retry = self.runtime.config.enable_recovery and attempt <= retries_allowed
        if category in (ErrorCategory.CONFIGURATION, ErrorCategory.CRITICAL) or not can_retry:
            if not spec.critical:
                self._log("warning", "Non-critical stage %s degraded: skipped after %d "
                          "attempt(s)", spec.name, attempt)
                return _Decision.SKIP, 0.0
            return _Decision.FAIL, 0.0
        if isinstance(error, StageTimeoutError) or category is ErrorCategory.RESOURCE:
            await self._recover(live, spec, error, self._recovery_names(spec, category))
            delay = 0.0 if isinstance(error, StageTimeoutError) else next(delays)
        else:
            delay = next_delay(error, next(delays))
        if self._clock.monotonic() + delay > budget_end:
            error.add_note(f"retry budget of {self._policy.budget_seconds:g}s exhausted")
            return (_Decision.SKIP if not spec.critical else _Decision.FAIL), 0.0
        self._log("info", "Retrying stage %s in %.2fs (retry %d of %d)", spec.name, delay,
                  attempt, retries_allowed)
        return _Decision.RETRY, delay

    def _recovery_names(self, spec: StageSpecLike, category: ErrorCategory) -> tuple[str, ...]:
        names = tuple(spec.recovery_actions)
        configured = self.runtime.config.recovery_strategies
        extra = configured.get(f"{category.value}_errors", ())
        if category is ErrorCategory.RESOURCE:
            extra = (*extra, "free_memory", "check_system_health")
        return tuple(dict.fromkeys((*names, *extra)))

    async def _recover(self, live: _Live, spec: StageSpecLike, error: BaseException | None,
                       names: tuple[str, ...]) -> None:
        run = live.run
        if not names:
            return
        run.recovery_attempts += 1
        ctx = StageContext(self, run, spec.name, run.attempt, self._logger_for(live))
        for name in names:
            action = self.runtime.recovery_action(self.definition, name)
            if action is None:
                continue  # a configured name this definition does not implement
            try:
                await action(ctx, error)
                self._log("info", "Recovery action %s done for stage %s", name, spec.name)
            except Exception as failure:
                self._log("warning", "Recovery action %s failed: %s", name, failure)

    async def _custom_decision(
        self, live: _Live, spec: StageSpecLike, error: Exception, attempt: int,
        retries_allowed: int,
    ) -> tuple[_Decision, float] | None:
        for handler in self.runtime.error_handlers:
            answer = handler(live.run.workflow_id, error, spec.name, dict(live.run.context))
            if inspect.isawaitable(answer):
                answer = await answer
            if not answer or answer.get("strategy") in (None, "default_recovery"):
                continue
            strategy = answer["strategy"]
            if strategy == "fail":
                return _Decision.FAIL, 0.0
            if strategy == "skip":
                return _Decision.SKIP, 0.0
            if attempt > retries_allowed:
                return None
            if strategy == "wait_and_retry":
                return _Decision.RETRY, float(answer.get("delay", 0.0))
            if strategy == "cleanup_and_continue":
                await self._recover(live, spec, error, tuple(answer.get("actions", ())))
                return _Decision.RETRY, 0.0
            self._log("warning", "Error handler returned unknown strategy %r; ignored", strategy)
        return None

    # ------------------------------------------------------------------ watchdog

    def _timing(self, spec: StageSpecLike) -> tuple[float, float]:
        scale = self._multiplier if getattr(spec, "timing_is_default", False) else 1.0
        return spec.timeout_seconds * scale, spec.warning_threshold_seconds * scale

    def _arm_watchdog(self, live: _Live, spec: StageSpecLike) -> None:
        timeout, warning = self._timing(spec)
        now = self._clock.monotonic()
        live.deadline = now + timeout
        live.warn_at = now + warning if 0 < warning < timeout else float("inf")
        live.warned = False
        live.last_beat = now
        live.timeout_reason = None
        self._rearm(live, now)

    def _rearm(self, live: _Live, now: float) -> None:
        spec = live.stage_spec
        assert spec is not None
        due = min(live.deadline, live.warn_at if not live.warned else float("inf"))
        if spec.heartbeat_timeout_seconds:
            due = min(due, live.last_beat + spec.heartbeat_timeout_seconds)
        if live._on_timer is None:
            live._on_timer = functools.partial(self._on_timer, live)
        live.timer = self._clock.call_later(due - now, live._on_timer)

    def _on_timer(self, live: _Live) -> None:
        live.timer = None
        if not live.in_handler:
            return
        spec = live.stage_spec
        assert spec is not None
        now = self._clock.monotonic()
        silent = spec.heartbeat_timeout_seconds and (
            now - live.last_beat >= spec.heartbeat_timeout_seconds)
        if now >= live.deadline or silent:
            self._fire_timeout(live, "heartbeat" if silent and now < live.deadline else "timeout")
            return
        if not live.warned and now >= live.warn_at:
            live.warned = True
            self._warn(live, spec, now)
        self._rearm(live, now)

    def _fire_timeout(self, live: _Live, reason: str) -> None:
        spec = live.stage_spec
        assert spec is not None and live.task is not None
        with _as_workflow(live.run.workflow_id):
            logger.error("Stage %s timed out after %.1fs (%s); cancelling it", spec.name,
                         self._clock.monotonic() - live.stage_started, reason)
        live.timeout_reason = reason
        self._watchdog_event(live, spec, reason)
        live.task.cancel()

    def _warn(self, live: _Live, spec: StageSpecLike, now: float) -> None:
        with _as_workflow(live.run.workflow_id):
            logger.warning("Stage %s still running after %.1fs (warning threshold %.1fs, "
                           "timeout in %.1fs)", spec.name, now - live.stage_started,
                           self._timing(spec)[1], live.deadline - now)
        self._watchdog_event(live, spec, "warning")
        self.runtime.spawn(self._on_warning(live, spec), f"warning-{live.run.workflow_id}")

    def _watchdog_event(self, live: _Live, spec: StageSpecLike, level: str) -> None:
        """Kept in the workflow's record (the dashboard's timeline marks) and told to
        listeners (metrics, traces)."""
        live.run.record_watchdog({"stage": spec.name, "attempt": live.run.attempt,
                                  "level": level, "at": self._clock.time()})
        self.runtime.emit("watchdog", live.run, stage=spec.name, level=level)

    async def _on_warning(self, live: _Live, spec: StageSpecLike) -> None:
        token = workflow_id_var.set(live.run.workflow_id)
        try:
            if self.runtime.config.enable_health_checks:
                await self.runtime.stage_health_check(live.run, f"warning in {spec.name}")
            await self._recover(live, spec, None, tuple(spec.warning_actions))
        finally:
            workflow_id_var.reset(token)

    def heartbeat(self, run: WorkflowRun) -> None:
        live = self.runtime.live(run.workflow_id)
        if live is not None:
            live.last_beat = self._clock.monotonic()

    def progress(self, run: WorkflowRun, stage: str, fraction: float, message: str) -> None:
        live = self.runtime.live(run.workflow_id)
        if live is not None:
            live.last_beat = self._clock.monotonic()
            live.progress = (max(0.0, min(1.0, fraction)), message)
        self.runtime.emit("progress", run, stage=stage, fraction=fraction, message=message)

    # ------------------------------------------------------------------ helpers

    def _logger_for(self, live: _Live) -> logging.LoggerAdapter[logging.Logger]:
        if live._logger is None:
            live._logger = _WorkflowLogger(logger, {"workflow_id": live.run.workflow_id})
        return live._logger

    def _log(self, level: str, message: str, *args: Any) -> None:
        if level == "info" and not self._log_info:
            return
        getattr(logger, level)(message, *args)


class _as_workflow:
    """Set the workflow ID for log records emitted from a timer callback."""

    __slots__ = ("_token", "_workflow_id")

    def __init__(self, workflow_id: str) -> None:
        self._workflow_id = workflow_id

    def __enter__(self) -> None:
        self._token = workflow_id_var.set(self._workflow_id)

    def __exit__(self, *exc: object) -> None:
        workflow_id_var.reset(self._token)


def new_live(run: WorkflowRun) -> _Live:
    return _Live(run)


Handler = Callable[..., Any]
