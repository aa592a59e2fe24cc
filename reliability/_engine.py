"""The engine: drives one workflow through its stages, one stage at a time.

The workflow's machine state (``run.state``) says which stage runs next; the engine keeps
no index of its own (docs/architecture.md, invariant 10). For each stage: take a fair
turn (``_turns.py``), queue a "started" checkpoint, run the handler under the watchdog,
decide on failures (retry, recover, degrade, stop), merge outputs, make the "completed"
checkpoint durable before the next stage starts (``durability="strict"``) or before the
stage after it ends (``"overlapped"``; invariant 8), then fire the machine's ``advance``
trigger into the next stage. An ending fires the trigger of its outcome.

The engine uses its host only through ``EngineHost`` (``_host.py``), bound once here.

Invariant 2: triggers only do bookkeeping, and the workflow's task is cancelled by the
runtime only while it is inside a handler (``LiveWorkflow.in_handler``), never inside a
trigger or a store write; a stop asked for elsewhere is honoured at the next stage
boundary.
"""

from __future__ import annotations

import asyncio
import heapq
import inspect
import logging
from collections.abc import Callable, Mapping
from enum import Enum
from typing import TYPE_CHECKING, Any

from ._clock import Clock, SystemClock, TimerHandle
from ._context import DefinitionLike, RecoveryAction, StageContext, StageSpecLike
from ._errors import ErrorCategory, FencedError, StageTimeoutError, classify
from ._logging import log_soon, logger, redact_secrets, workflow_id_var
from ._recovery import BUILTIN_ACTIONS
from ._retry import RetryPolicy, backoff_delays, next_delay
from ._state import COMPLETED, PENDING, TERMINAL, WAITING, WorkflowRun
from ._waits import WaitParked

if TYPE_CHECKING:
    from ._host import EngineHost

__all__ = ["Engine", "Interrupted", "LiveWorkflow"]


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


class LiveWorkflow:
    """In-process facts about a running workflow that are never persisted.

    The host makes one per run, sets ``task`` to the task that runs it, and asks it to stop
    with ``stop()``; the engine and the watchdog fill in the rest.
    """

    __slots__ = ("deadline", "fenced", "in_handler", "last_beat", "log", "progress", "run",
                 "stage_spec", "stage_started", "stop_reason", "task", "timeout_reason", "timer",
                 "unsynced", "warn_at", "warned")

    def __init__(self, run: WorkflowRun) -> None:
        self.run = run
        # Made once per workflow, not per stage attempt: the hot path allocates less.
        self.log: logging.LoggerAdapter[logging.Logger] | None = None
        self.task: asyncio.Task[Any] | None = None
        self.in_handler = False
        self.stop_reason: str | None = None  # "cancel" or "shutdown", once asked
        self.timeout_reason: str | None = None
        self.timer: list[Any] | None = None  # its entry in the engine's _Watchdogs
        self.stage_spec: StageSpecLike | None = None
        self.stage_started = 0.0
        self.deadline = 0.0
        self.warn_at = 0.0
        self.warned = False
        self.last_beat = 0.0
        self.progress: tuple[float, str] | None = None
        # durability="overlapped": the last stage-completion write, still on its way to disk
        self.unsynced: asyncio.Future[None] | None = None
        self.fenced = False  # another worker owns it now: nothing more is written here

    def fence(self) -> None:
        """The claim is lost: stop now (the handler is cancelled) and write nothing more."""
        self.fenced = True
        self.stop("fenced")

    def stop(self, reason: str) -> None:
        """Ask the workflow to stop (``"cancel"``, ``"shutdown"``), ending ``interrupted``.

        Its task is cancelled only inside a handler, never inside a trigger or a store
        write (docs/architecture.md, invariant 2); elsewhere the engine sees the request
        at the next stage boundary.
        """
        self.stop_reason = self.stop_reason or reason
        task = self.task
        if self.in_handler and task is not None and not task.done():
            task.cancel()


class Engine:
    """Runs workflows of one definition for one host (a ``Runtime``, or a test's fake)."""

    def __init__(self, host: EngineHost, definition: DefinitionLike) -> None:
        self.host = host
        self.definition = definition
        # Bound once: the per-stage path reads attributes of the engine, never the host's.
        self._clock = host.clock
        self._store = host.store
        self._persistence = host.persistence
        self._drop_signals = getattr(host.store, "drop_signals", None)
        self._turns = host.turns
        self._emit = host.emit
        # Who hears the per-stage events, kept current in place by the host: while
        # nobody does, a stage builds no keyword arguments and makes no call for them.
        self._stage_listeners = host.listeners("stage")
        self._stage_end_listeners = host.listeners("stage_end")
        self._error_handlers = host.error_handlers
        config = host.config
        self._multiplier = config.timeout_multiplier
        self._policy = RetryPolicy(max_retries=config.max_retries,
                                   base_delay=config.retry_base_delay,
                                   max_delay=config.retry_max_delay,
                                   budget_seconds=config.retry_budget_seconds)
        self._log_info = logger.isEnabledFor(logging.INFO) and config.enable_monitoring
        self._baselines = config.performance_baselines
        self._overlapped = config.durability == "overlapped"
        self._checkpoint_frequency = config.checkpoint_frequency
        self._enable_recovery = config.enable_recovery
        self._recovery_strategies = config.recovery_strategies
        self._health_checks = config.enable_health_checks
        # The machine's state names the stage; this finds its spec (a stage's name is its
        # state's name).
        self._specs: dict[str, StageSpecLike] = {s.name: s for s in definition.stages}
        # Stage name -> the reason its health check before it logs ("before NAME"), made
        # once here, not at every attempt.
        self._checked_before = {
            s.name: f"before {s.name}" for s in definition.stages
            if config.enable_health_checks and getattr(s, "health_check", False)}
        self._actions: dict[str, RecoveryAction] = {**BUILTIN_ACTIONS,
                                                    **definition.recovery_actions}
        # Each stage's (timeout, warning threshold), scaled once here, not at every attempt.
        self._timings = {s.name: self._scaled_timing(s) for s in definition.stages}
        self._watchdogs = _Watchdogs(self._clock, self._on_timer,
                                     keep_idle_timer=isinstance(self._clock, SystemClock))
        # A store with leases (PostgreSQL): no stage starts while the lease may be lost.
        self._leased = isinstance(getattr(type(self._store), "lease_valid", None), property)

    # ------------------------------------------------------------------ the workflow

    async def execute(self, live: LiveWorkflow, at: str = PENDING) -> None:
        """Run ``live.run`` from machine state ``at`` to its end; ``run.status`` says how.

        ``at`` is PENDING for a new workflow, else where a resumed one stopped: the stage
        to run next, or COMPLETED when only its final record was missing.
        """
        run = live.run
        if live.task is None:
            live.task = asyncio.current_task()
        definition = self.definition
        advance = definition.advance
        advance_now = definition.advance_now
        specs = self._specs
        definition.attach(run, at)  # raises for a state a run cannot be resumed at
        self._watchdogs.bind()  # once per workflow: its stages arm without this check
        token = workflow_id_var.set(run.workflow_id)
        run.wait = None  # woken, or resumed: it waits no more until a stage parks it again
        try:
            run.status = "running"
            self._log("info", "Starting workflow %s (%d stages)%s", definition.name,
                      len(specs), f", resumed at {run.resumed_from}"
                      if run.resumed_from is not None else "")
            if run.state == PENDING and not advance_now(run):
                await advance(run)  # pending -> the first stage
            turns = self._turns
            # The machine says where the workflow is; past the last stage it is COMPLETED,
            # which no spec is named after.
            while (spec := specs.get(run.state)) is not None:
                waiter = turns.take()
                if waiter is not None:  # the loop is saturated: queue for a fair turn
                    await waiter
                if live.stop_reason is not None:
                    raise Interrupted(live.stop_reason)
                await self._run_stage(live, spec)
                if not advance_now(run):  # this stage -> the next one (or COMPLETED)
                    await advance(run)
            run.status = run.state  # COMPLETED: no other state is left by advancing
            run.current_stage = COMPLETED
        except Interrupted as stop:
            await self._end(run, "interrupted", f"interrupted ({stop.reason}); resumable")
        except WaitParked as parked:
            self._park(run, parked)
            await self._end(run, WAITING, None)
        except _StageFailed as failure:
            run.stage_waits.clear()  # a resume of the failed stage waits afresh
            run.error = redact_secrets(f"{type(failure.error).__name__}: {failure.error}")
            run.error_category = classify(failure.error).value
            await self._end(run, failure.status, None)
        except FencedError:  # a write was refused: the new owner carries it on
            live.fenced = True
            await self._end(run, "interrupted", "stopped here: another worker owns it now")
        except asyncio.CancelledError:
            # Cancelled from outside (task group, loop shutdown): keep it resumable.
            await self._end(run, "interrupted", "interrupted (cancelled); resumable")
            raise
        finally:
            await self._final_save(live)
            run.forget_encoding()
            definition.detach(run)
            workflow_id_var.reset(token)

    def _park(self, run: WorkflowRun, parked: WaitParked) -> None:
        """Record what a parked workflow waits for (durable with its final save)."""
        _, deadline, name, index = parked.entry
        run.wait = {"stage": run.current_stage, "signal": name or None, "deadline": deadline,
                    "index": index}
        if self._log_info:
            logger.info("Stage %s waits for %s until %.0f; parked", run.current_stage,
                        f"signal {name!r}" if name else "its time", deadline)

    async def _end(self, run: WorkflowRun, outcome: str, note: str | None) -> None:
        """Move the machine to ``outcome``; the status is then the state it reached."""
        if note is not None:
            run.error = run.error or note
        await self.definition.finish(run, outcome)
        run.status = run.state

    async def _final_save(self, live: LiveWorkflow) -> None:
        run = live.run
        run.updated_at = self._clock.time()
        if not self._persistence or live.fenced:
            return
        unsynced, live.unsynced = live.unsynced, None
        if unsynced is not None:  # the final write below covers it; only report a failure
            unsynced.add_done_callback(self._report_unsynced)
        try:
            # No shield needed (and none paid for, at thousands of endings a second): the
            # write is queued before the first await, so a second Ctrl-C abandons only
            # the wait, never the record (Store.save's contract).
            await self._store.save(run.workflow_id, run.to_state, checkpoint_stage="final")
        except Exception as error:  # the state on disk is still the last durable one
            self._log("error", "Could not save final state: %s", error)
            return
        if run.signals_consumed and run.status in TERMINAL and self._drop_signals is not None:
            # Its end is durable: nothing will read its signals again. (Signals a workflow
            # never took go when a runtime next opens: Waker.sweep.)
            try:
                await self._drop_signals(run.workflow_id)
            except OSError as error:
                self._log("warning", "Could not remove signals: %s", error)

    def _report_unsynced(self, write: asyncio.Future[None]) -> None:
        if not write.cancelled() and write.exception() is not None:
            self._log("error", "Could not save a stage's completion: %s", write.exception())

    # ------------------------------------------------------------------ one stage

    async def _run_stage(self, live: LiveWorkflow, spec: StageSpecLike) -> None:
        """One stage to its end: completed, retried until it is, skipped (degraded), or
        failed by raising. Its attempts run inline: no coroutine frame of their own."""
        run = live.run
        retries_allowed = spec.max_retries if spec.max_retries is not None else (
            self._policy.max_retries)
        delays = None  # the backoff, made at the first failure (most stages have none)
        budget_end = 0.0  # the retry budget runs from the first attempt's start
        recovered = False
        attempt = 0
        while True:
            attempt += 1
            if self._leased and not getattr(self._store, "lease_valid", True):
                await self._await_lease(live)
            fresh = run.revision == 0  # no snapshot of this workflow was ever taken
            started = self._begin_attempt(live, spec, attempt)
            if attempt == 1:
                budget_end = started + self._policy.budget_seconds
            if fresh and self._persistence:
                # Durable before the first handler's first side effect: a crash inside
                # stage 1 must leave a resumable record, not an unknown workflow. (The
                # "started" write just queued coalesces with this one.)
                await self._store.save(run.workflow_id, run.to_state)
                if live.stop_reason is not None:
                    raise Interrupted(live.stop_reason)
            try:
                ctx = StageContext(self, live, spec.name, attempt)
                reason = self._checked_before.get(spec.name)
                if reason is not None:
                    await self.host.stage_health_check(run, reason)
                if live.stop_reason is not None:
                    # Asked to stop while outside the handler (during the health check
                    # above), when nothing could be cancelled: honour it before the
                    # handler starts, not after.
                    raise Interrupted(live.stop_reason)
                self._arm_watchdog(live, spec)
                live.in_handler = True
                try:
                    outputs = await spec.handler(ctx)
                except asyncio.CancelledError:
                    stop = self._stopped_by_us(live, spec)
                    if stop is None:
                        raise  # not ours: propagate to whoever cancelled
                    raise stop from None
                finally:
                    live.in_handler = False
                    if live.timer is not None:
                        self._watchdogs.disarm(live)
                self._check_attempt(live, spec, ctx, outputs)
            except (Interrupted, FencedError):  # a refused mid-stage checkpoint: no retry
                raise
            except Exception as error:
                if delays is None:
                    delays = backoff_delays(self._policy)
                decision, delay = await self._decide(live, spec, error, attempt,
                                                     retries_allowed, delays, budget_end)
                if decision is not _Decision.RETRY:
                    self._give_up(run, spec, error, decision, started, attempt)
                    if (saving := self._save(live, spec, checkpoint=True)) is not None:
                        await saving
                    return  # degraded: the next stage runs
                recovered = recovered or run.recovery_attempts > 0
                run.retry_count += 1
                self._emit("retry", run, stage=spec.name, attempt=attempt, delay=delay)
                if delay > 0:
                    await self._interruptible_sleep(live, delay)
                continue
            if recovered:
                run.recovery_successes += 1
            self._complete(run, spec, outputs, started, attempt)
            saving = self._save(live, spec, checkpoint=self._wants_checkpoint(run, spec))
            if saving is not None:
                await saving
            return

    def _stopped_by_us(self, live: LiveWorkflow, spec: StageSpecLike) -> Exception | None:
        """What a handler's cancellation becomes: our timeout's error or our stop's
        ``Interrupted``; None if the cancellation is not ours."""
        reason = self._take_cancel(live)
        if reason is None:
            return None
        if reason in ("timeout", "heartbeat"):
            return self._timeout_error(spec, reason)
        return Interrupted(reason)

    def _check_attempt(self, live: LiveWorkflow, spec: StageSpecLike, ctx: StageContext,
                       outputs: Any) -> None:
        """After a handler returned: a cancellation of ours it swallowed still stops it,
        it must have returned a mapping or None, and the waits it took are consumed."""
        if live.timeout_reason is not None or live.stop_reason is not None:
            reason = self._take_cancel(live)
            if reason in ("timeout", "heartbeat"):
                raise self._timeout_error(spec, reason)
            if reason is not None:
                raise Interrupted(reason)
        if outputs is not None and not isinstance(outputs, Mapping):
            raise TypeError(f"stage {spec.name!r} handler returned "
                            f"{type(outputs).__name__}; return a mapping of outputs or None")
        if ctx.stage_waits is not None or live.run.stage_waits:
            self._end_waits(live.run, ctx)

    def _give_up(self, run: WorkflowRun, spec: StageSpecLike, error: Exception,
                 decision: _Decision, started: float, attempt: int) -> None:
        """Record a stage no retry will finish; raise unless it is skipped (degraded)."""
        skipped = decision is _Decision.SKIP
        self._record_stage(run, spec, started, attempt, "degraded" if skipped else "failed")
        if not skipped:
            raise _StageFailed(error, "timed_out" if isinstance(error, StageTimeoutError)
                               else "failed") from error

    async def _await_lease(self, live: LiveWorkflow) -> None:
        """Start no stage while this worker's lease may have run out (not renewed for half
        of it): another worker may own the workflow by now (invariant 9)."""
        # Debug only: the store logs the outage once, not once per waiting workflow.
        self._log("debug", "Lease not renewed for half its length: waiting before "
                  "stage %s", live.run.current_stage or "1")
        while not getattr(self._store, "lease_valid", True):
            if live.stop_reason is not None:
                raise Interrupted(live.stop_reason)
            await self._clock.sleep(0.05)
        if live.stop_reason is not None:
            raise Interrupted(live.stop_reason)

    async def _interruptible_sleep(self, live: LiveWorkflow, delay: float) -> None:
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

    def _begin_attempt(self, live: LiveWorkflow, spec: StageSpecLike, attempt: int) -> float:
        run = live.run
        now = self._clock.monotonic()
        run.current_stage = spec.name
        run.attempt = attempt
        run.stage_start_time = self._clock.time()
        run.updated_at = run.stage_start_time
        live.stage_spec = spec
        live.stage_started = now
        live.progress = None
        if self._stage_listeners:
            self._emit("stage", run, stage=spec.name, attempt=attempt)
        if self._persistence:
            # "started": at once before a side-effecting stage (spec.checkpoint), so a
            # crash inside it is on record as such; other stages' starts may be folded
            # into their completion.
            self._store.save_soon(run.workflow_id, run.to_state, promptly=spec.checkpoint)
        return now

    @staticmethod
    def _end_waits(run: WorkflowRun, ctx: StageContext) -> None:
        """A stage that waited completed: the signals it took are consumed, and its
        deadlines end with it."""
        waits = ctx.stage_waits
        if waits is not None:
            for name, count in waits.taken.items():
                run.signals_consumed[name] = run.signals_consumed.get(name, 0) + count
        if run.stage_waits:
            run.stage_waits.clear()

    def _take_cancel(self, live: LiveWorkflow) -> str | None:
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
            # The record is built and formatted by the logging thread, not here.
            log_soon(logging.INFO, "Stage transition: %s -> %s (duration: %.1fs)", spec.name,
                     self.definition.next_state(run.state), duration)

    def _record_stage(self, run: WorkflowRun, spec: StageSpecLike, started: float,
                      attempt: int, status: str) -> float:
        duration = self._clock.monotonic() - started
        baseline = self._baselines.get(spec.name, spec.baseline_seconds)
        entry = {"stage": spec.name, "started_at": run.stage_start_time,
                 "duration": round(duration, 6), "baseline": baseline,
                 "attempts": attempt, "status": status}
        run.stage_history.append(entry)
        if self._stage_end_listeners:
            self._emit("stage_end", run, entry=entry)
        return duration

    def _wants_checkpoint(self, run: WorkflowRun, spec: StageSpecLike) -> bool:
        return spec.checkpoint or len(run.completed_stages) % self._checkpoint_frequency == 0

    def _save(self, live: LiveWorkflow, spec: StageSpecLike, *,
              checkpoint: bool) -> asyncio.Future[None] | None:
        """Record a stage's end; the caller awaits what this returns, if anything.

        "strict": the write itself, durable when done. "overlapped": the previous stage's
        write (durable long ago, as a rule), while this one is on its way during the next
        stage (the journal keeps order, so a later durable write implies it). A future,
        not a coroutine: one frame less per stage."""
        if not self._persistence:
            return None
        run = live.run
        run.updated_at = self._clock.time()
        stage = spec.name if checkpoint else None
        store = self._store
        if not self._overlapped:
            return store.save_nowait(run.workflow_id, run.to_state, checkpoint_stage=stage)
        previous = live.unsynced
        if previous is not None and not previous.done():
            store.expedite()  # before queueing the next write, which nobody waits for yet
        # Lazy: nobody waits for it until the next stage ends, so its answer need not
        # wake the loop in the middle of that stage.
        live.unsynced = store.save_nowait(run.workflow_id, run.to_state,
                                          checkpoint_stage=stage, lazy=True)
        return previous  # a write error surfaces where it is awaited

    def checkpoint_soon(self, run: WorkflowRun) -> None:
        if self._persistence:
            run.updated_at = self._clock.time()
            # Outputs recorded mid-stage (an issue number the moment it exists): at once.
            self._store.save_soon(run.workflow_id, run.to_state, promptly=True)

    async def checkpoint(self, run: WorkflowRun) -> None:
        if self._persistence:
            run.updated_at = self._clock.time()
            await self._store.save(run.workflow_id, run.to_state)

    # ------------------------------------------------------------------ failures

    async def _decide(self, live: LiveWorkflow, spec: StageSpecLike, error: Exception, attempt: int,
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
        can_retry = self._enable_recovery and attempt <= retries_allowed
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
        extra = self._recovery_strategies.get(f"{category.value}_errors", ())
        if category is ErrorCategory.RESOURCE:
            extra = (*extra, "free_memory", "check_system_health")
        return tuple(dict.fromkeys((*names, *extra)))

    async def _recover(self, live: LiveWorkflow, spec: StageSpecLike, error: BaseException | None,
                       names: tuple[str, ...]) -> None:
        run = live.run
        if not names:
            return
        run.recovery_attempts += 1
        ctx = StageContext(self, live, spec.name, run.attempt)
        for name in names:
            action = self._actions.get(name)
            if action is None:
                continue  # a configured name this definition does not implement
            try:
                await action(ctx, error)
                self._log("info", "Recovery action %s done for stage %s", name, spec.name)
            except Exception as failure:
                self._log("warning", "Recovery action %s failed: %s", name, failure)

    async def _custom_decision(
        self, live: LiveWorkflow, spec: StageSpecLike, error: Exception, attempt: int,
        retries_allowed: int,
    ) -> tuple[_Decision, float] | None:
        for handler in self._error_handlers:
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

    def _scaled_timing(self, spec: StageSpecLike) -> tuple[float, float]:
        scale = self._multiplier if getattr(spec, "timing_is_default", False) else 1.0
        return spec.timeout_seconds * scale, spec.warning_threshold_seconds * scale

    def _timing(self, spec: StageSpecLike) -> tuple[float, float]:
        timing = self._timings.get(spec.name)
        return timing if timing is not None else self._scaled_timing(spec)

    def _arm_watchdog(self, live: LiveWorkflow, spec: StageSpecLike) -> None:
        # _rearm's due time, worked out inline: this runs at every attempt of every stage.
        timeout, warning = self._timing(spec)
        now = self._clock.monotonic()
        live.deadline = due = now + timeout
        if 0 < warning < timeout:
            live.warn_at = due = now + warning
        else:
            live.warn_at = float("inf")
        live.warned = False
        live.last_beat = now
        live.timeout_reason = None
        heartbeat = spec.heartbeat_timeout_seconds
        if heartbeat and now + heartbeat < due:
            due = now + heartbeat
        self._watchdogs.arm(live, due, now)

    def _rearm(self, live: LiveWorkflow, now: float) -> None:
        spec = live.stage_spec
        assert spec is not None
        due = min(live.deadline, live.warn_at if not live.warned else float("inf"))
        if spec.heartbeat_timeout_seconds:
            due = min(due, live.last_beat + spec.heartbeat_timeout_seconds)
        self._watchdogs.arm(live, due, now)

    def _on_timer(self, live: LiveWorkflow) -> None:
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

    def _fire_timeout(self, live: LiveWorkflow, reason: str) -> None:
        spec = live.stage_spec
        assert spec is not None and live.task is not None
        with _as_workflow(live.run.workflow_id):
            logger.error("Stage %s timed out after %.1fs (%s); cancelling it", spec.name,
                         self._clock.monotonic() - live.stage_started, reason)
        live.timeout_reason = reason
        self._watchdog_event(live, spec, reason)
        live.task.cancel()

    def _warn(self, live: LiveWorkflow, spec: StageSpecLike, now: float) -> None:
        with _as_workflow(live.run.workflow_id):
            logger.warning("Stage %s still running after %.1fs (warning threshold %.1fs, "
                           "timeout in %.1fs)", spec.name, now - live.stage_started,
                           self._timing(spec)[1], live.deadline - now)
        self._watchdog_event(live, spec, "warning")
        self.host.spawn(self._on_warning(live, spec), f"warning-{live.run.workflow_id}")

    def _watchdog_event(self, live: LiveWorkflow, spec: StageSpecLike, level: str) -> None:
        """Kept in the workflow's record (the dashboard's timeline marks) and told to
        listeners (metrics, traces)."""
        live.run.record_watchdog({"stage": spec.name, "attempt": live.run.attempt,
                                  "level": level, "at": self._clock.time()})
        self.host.emit("watchdog", live.run, stage=spec.name, level=level)

    async def _on_warning(self, live: LiveWorkflow, spec: StageSpecLike) -> None:
        token = workflow_id_var.set(live.run.workflow_id)
        try:
            if self._health_checks:
                await self.host.stage_health_check(live.run, f"warning in {spec.name}")
            await self._recover(live, spec, None, tuple(spec.warning_actions))
        finally:
            workflow_id_var.reset(token)

    def heartbeat(self, live: LiveWorkflow) -> None:
        live.last_beat = self._clock.monotonic()

    def progress(self, live: LiveWorkflow, stage: str, fraction: float, message: str) -> None:
        live.last_beat = self._clock.monotonic()
        live.progress = (max(0.0, min(1.0, fraction)), message)
        self._emit("progress", live.run, stage=stage, fraction=fraction, message=message)

    # ------------------------------------------------------------------ helpers

    def logger_for(self, live: LiveWorkflow) -> logging.LoggerAdapter[logging.Logger]:
        """The workflow's logger (``StageContext.logger``), made once per workflow."""
        if live.log is None:
            live.log = _WorkflowLogger(logger, {"workflow_id": live.run.workflow_id})
        return live.log

    def _log(self, level: str, message: str, *args: Any) -> None:
        if level == "info":
            if self._log_info:
                log_soon(logging.INFO, message, *args)
            return
        getattr(logger, level)(message, *args)


class _Watchdogs:
    """Every workflow's watchdog due time, on one clock timer per engine.

    A stage used to cost a ``call_later`` (a TimerHandle into the loop's heap, compared in
    Python) and its ``cancel``. Here it costs a list pushed onto a heap compared in C, and
    a flag: the clock's one timer is set for the earliest entry, and moved only when an
    entry comes due before it. An entry disarmed (its stage ended) stays in the heap until
    its time, or until stale entries outnumber live ones, when the heap is rebuilt; one
    such entry at the top costs one wake-up that finds nothing due. Each callback runs at
    its exact due time, as its own timer would have: timeouts keep their precision.
    """

    __slots__ = ("_callback", "_clock", "_heap", "_keep_idle_timer", "_loop", "_sequence",
                 "_stale", "_timer", "_timer_due")

    def __init__(self, clock: Clock, callback: Callable[[LiveWorkflow], None], *,
                 keep_idle_timer: bool) -> None:
        self._clock = clock
        self._callback = callback
        self._keep_idle_timer = keep_idle_timer
        self._loop: asyncio.AbstractEventLoop | None = None  # whose timer is kept
        self._heap: list[list[Any]] = []  # [due, sequence, live or None once disarmed]
        self._sequence = 0
        self._stale = 0
        self._timer: TimerHandle | None = None
        self._timer_due = float("inf")

    def bind(self) -> None:
        """Called as each workflow starts, on its loop: a runtime used again by a later
        asyncio.run() kept the ended loop's timer, which would never fire (nor would any
        entry behind it). Once per workflow, not at every arm."""
        if self._keep_idle_timer:
            loop = asyncio.get_running_loop()
            if loop is not self._loop:
                self._loop = loop
                self._heap, self._stale = [], 0
                self._timer, self._timer_due = None, float("inf")

    def arm(self, live: LiveWorkflow, due: float, now: float) -> None:
        """Call back for ``live`` at ``due`` (replacing its earlier entry, if any)."""
        if live.timer is not None:
            self.disarm(live)
        self._sequence += 1
        live.timer = entry = [due, self._sequence, live]
        heapq.heappush(self._heap, entry)
        if due < self._timer_due:
            self._set_timer(due, now)

    def disarm(self, live: LiveWorkflow) -> None:
        entry, live.timer = live.timer, None
        if entry is None:
            return
        entry[2] = None
        self._stale += 1
        if self._stale == len(self._heap):
            self._heap.clear()
            self._stale = 0
            # None armed. On the system clock the timer stays: handlers that return at
            # once arm and disarm one at a time, and cancelling it each time would cost a
            # timer per stage again; it wakes once, finds nothing and is not set again. A
            # fake clock's autojump would jump to it, moving virtual time for nothing.
            if not self._keep_idle_timer and self._timer is not None:
                self._timer.cancel()
                self._timer, self._timer_due = None, float("inf")
        elif self._stale > 64 and self._stale > len(self._heap) // 2:
            # Bounded: stages far shorter than their timeout leave many stale entries.
            self._heap = [e for e in self._heap if e[2] is not None]
            heapq.heapify(self._heap)
            self._stale = 0

    def _set_timer(self, due: float, now: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_due = due
        self._timer = self._clock.call_later(due - now, self._fire)

    def _fire(self) -> None:
        self._timer, self._timer_due = None, float("inf")
        heap = self._heap
        now = self._clock.monotonic()
        due: list[LiveWorkflow] = []
        while heap and heap[0][0] <= now:
            entry = heapq.heappop(heap)
            live = entry[2]
            if live is None:
                self._stale -= 1
                continue
            live.timer = None
            due.append(live)
        # Called after the heap is settled: a callback re-arms its workflow.
        for live in due:
            try:
                self._callback(live)
            except Exception:
                logger.exception("Watchdog of %s failed", live.run.workflow_id)
        while heap and heap[0][2] is None:  # aim the timer at a live entry
            heapq.heappop(heap)
            self._stale -= 1
        if heap and heap[0][0] < self._timer_due:
            self._set_timer(heap[0][0], self._clock.monotonic())


class _as_workflow:
    """Set the workflow ID for log records emitted from a timer callback."""

    __slots__ = ("_token", "_workflow_id")

    def __init__(self, workflow_id: str) -> None:
        self._workflow_id = workflow_id

    def __enter__(self) -> None:
        self._token = workflow_id_var.set(self._workflow_id)

    def __exit__(self, *exc: object) -> None:
        workflow_id_var.reset(self._token)

