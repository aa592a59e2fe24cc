"""The runtime: services shared by every workflow in one event loop, and the entry points.

One ``Runtime`` owns the store (and its single writer process), the circuit breakers, the
health sampler, shared objects such as HTTP clients, and the table of live workflows.
``run_workflow`` and ``resume_workflow`` are one-workflow conveniences around it.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import importlib
import logging
import os
import signal
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ._analytics import performance_report
from ._breaker import Breaker
from ._clock import Clock, SystemClock
from ._cluster import load_claimed, make_store
from ._config import WorkflowConfiguration, load_configuration
from ._context import DefinitionLike
from ._engine import Engine, LiveWorkflow
from ._errors import (
    ConfigurationError,
    CriticalError,
    SignalRefusedError,
    WorkflowError,
    WorkflowLockedError,
)
from ._health import (
    HealthCheckFunction,
    HealthSampler,
    HealthStatus,
    SystemHealthCheck,
    assess_loop_lag,
    parse_status,
    run_custom_check,
    worst,
)
from ._host import ErrorHandler, Listener
from ._ids import new_workflow_id, validate_workflow_id
from ._logging import (
    configure_logging,
    hand_over_held_records,
    log_soon,
    logger,
    register_secret,
)
from ._monitor import RuntimeMonitor
from ._plugins import ResolvedTarget, TargetResolver, default_target_resolver
from ._retry import RetryPolicy, retry_call
from ._state import COMPLETED, PENDING, RESUMABLE, STATUSES, TERMINAL, WAITING, WorkflowRun
from ._store import Claim, LoadedState, Store
from ._tuning import hold_tuning, release_tuning
from ._turns import Turns
from ._waits import Waker, check_signal_name, encode_payload, signal_store

__all__ = ["Runtime", "WorkflowResult", "resolve_definition", "resume_workflow", "run_workflow",
           "workflow_row"]

T = TypeVar("T")
_REMEMBERED = 1000  # finished runs kept in memory for diagnostics; older ones are on disk
_QUIET_STATUSES = frozenset({HealthStatus.HEALTHY, HealthStatus.WARNING})  # health logged at INFO


@dataclass(frozen=True, slots=True)
class WorkflowResult:
    """How a workflow ended. ``to_dict()`` gives the spec's result dict."""

    workflow_id: str
    success: bool
    status: str
    current_stage: str | None
    outputs: Mapping[str, Any] = field(default_factory=dict)
    error: str | None = None
    error_category: str | None = None
    recovery_recommendations: tuple[str, ...] = ()
    resumed_from: str | None = None
    reliability_metrics: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        result = {"workflow_id": self.workflow_id, "success": self.success,
                  "status": self.status, "current_stage": self.current_stage,
                  "error": self.error, "error_category": self.error_category,
                  "recovery_recommendations": list(self.recovery_recommendations),
                  "resumed_from": self.resumed_from,
                  "reliability_metrics": dict(self.reliability_metrics)}
        result.update(self.outputs)
        result["outputs"] = dict(self.outputs)
        return result


def report_for(run: WorkflowRun) -> dict[str, Any]:
    attempts = sum(int(e.get("attempts", 1)) for e in run.stage_history) or 1
    return performance_report(run.stage_history, error_count=run.error_count,
                              recovery_attempts=run.recovery_attempts,
                              recovery_successes=run.recovery_successes, attempts=attempts)


_ADVICE = {
    "transient": "A dependency kept failing; check connectivity and the forge's status, then "
                 "run 'workflow-manager resume {id}'.",
    "resource": "The machine ran short (disk, memory); free some, then resume {id}.",
    "configuration": "Fix the setting or input named in the error, then resume {id} or start "
                     "a new run.",
    "critical": "The workflow stopped safely with its state kept; read the log, then resume "
                "{id}.",
}


def result_for(run: WorkflowRun) -> WorkflowResult:
    advice: tuple[str, ...] = ()
    if run.status == "interrupted":
        advice = (f"Resume with 'workflow-manager resume {run.workflow_id}'.",)
    elif run.status == WAITING and run.wait is not None:
        advice = (f"Waiting for {_waits_for(run.wait)}; an open runtime (a worker, "
                  f"'workflow-manager resume --all') wakes it.",)
    elif run.status == "timed_out":
        advice = ("A stage ran past its timeout; raise timeout_multiplier or the stage's "
                  f"timeout, then resume {run.workflow_id}.",)
    elif run.status == "failed" and run.error_category in _ADVICE:
        advice = (_ADVICE[run.error_category].format(id=run.workflow_id),)
    return WorkflowResult(
        workflow_id=run.workflow_id, success=run.status == "completed", status=run.status,
        current_stage=run.current_stage, outputs=dict(run.outputs), error=run.error,
        error_category=run.error_category, recovery_recommendations=advice,
        resumed_from=run.resumed_from, reliability_metrics=report_for(run))


def _waits_for(wait: Mapping[str, Any]) -> str:
    what = f"signal {wait['signal']!r}" if wait.get("signal") else "its time"
    return f"{what} until epoch {float(wait.get('deadline') or 0):.0f} (stage {wait.get('stage')})"


def _could_not_resume(workflow_id: str, error: WorkflowError) -> WorkflowResult:
    logger.error("Cannot resume %s: %s", workflow_id, error)
    return WorkflowResult(workflow_id=workflow_id, success=False, status="failed",
                          current_stage=None, error=str(error),
                          error_category=error.category.value)


def resolve_definition(import_path: str) -> DefinitionLike:
    """Import ``"package.module:NAME"`` and return the definition bound to NAME."""
    module_name, _, attribute = import_path.partition(":")
    if not module_name or not attribute:
        raise ConfigurationError(f"definition path {import_path!r} must look like "
                                 "'package.module:NAME'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigurationError(
            f"cannot import workflow definition {import_path!r}: {error}. Run from the "
            "directory that holds the module, or install it.") from None
    definition = getattr(module, attribute, None)
    if definition is None or not hasattr(definition, "stages"):
        raise ConfigurationError(f"{import_path!r} does not name a WorkflowDefinition")
    return definition  # type: ignore[no-any-return]


class Runtime:
    """Many workflows, one event loop: ``async with Runtime(config=..., project_root=...)``."""

    def __init__(self, config: WorkflowConfiguration | None = None,
                 project_root: str | os.PathLike[str] = ".", *, store: Store | None = None,
                 clock: Clock | None = None, handle_signals: bool = False,
                 configure_logs: bool = True,
                 target_resolver: TargetResolver | None = None) -> None:
        """``target_resolver`` turns a path given to ``run``/``register`` into a workflow;
        without one, the registered default (``register_target_resolver``, called by the
        installed workflow package that owns paths) is used."""
        self.config = config if config is not None else load_configuration()
        for secret in self.config.secret_values():
            register_secret(secret)  # never in a log or a stored error
        self._target_resolver = target_resolver
        self.project_root = Path(project_root).resolve()
        self.clock: Clock = clock or SystemClock()
        # The file store, or the PostgreSQL store when config.store_url names one.
        self.store: Store = store or make_store(self.config, self.project_root,
                                                self._on_fenced)
        self.persistence = self.config.enable_persistence
        self.breakers: dict[str, Breaker] = {}
        self.error_handlers: list[ErrorHandler] = []
        self.health_checks: list[HealthCheckFunction] = []
        self._handle_signals = handle_signals
        self._configure_logs = configure_logs
        self._live: dict[str, LiveWorkflow] = {}
        self._finished: OrderedDict[str, WorkflowRun] = OrderedDict()
        self._engines: dict[int, Engine] = {}
        self._shared: dict[str, Any] = {}
        self._shared_locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._listeners: list[Listener] = []  # hear every event
        # Per event: the listeners above plus those that asked for it only, so a stage's
        # events cost nothing for a listener that counts workflows.
        self._listening: dict[str, list[Listener]] = {}
        self._runtime_listeners: list[Callable[..., None]] = []
        self._sampler: HealthSampler | None = None
        # The last health result built without registered checks: (sample, loop lag,
        # result, recorded entry), shared until either changes (see _health_result).
        self._shared_health: tuple[object, float | None, SystemHealthCheck,
                                   dict[str, Any]] | None = None
        self._policy = RetryPolicy(max_retries=self.config.max_retries,
                                   base_delay=self.config.retry_base_delay,
                                   max_delay=self.config.retry_max_delay,
                                   budget_seconds=self.config.retry_budget_seconds)
        self._warned_unbound: set[int] = set()
        self.shutting_down = False
        self.shutdown_requested = asyncio.Event()  # set with shutting_down: wakes idle waits
        self.loop_lag_ms: float | None = None
        self._monitor = RuntimeMonitor(self)  # loop lag, periodic health, admission
        self.turns = Turns()  # at most so many stage starts per loop iteration
        self._tuned = False
        self._registered: dict[str, tuple[DefinitionLike, WorkflowRun]] = {}
        self.waker = Waker(self)  # parked workflows: deadlines, signals, wakes

    def resolve_path(self, value: str) -> Path:
        """A configured directory as an absolute path (relative ones are under the project
        root)."""
        path = Path(value)
        return path if path.is_absolute() else self.project_root / path

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Runtime:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        if self._configure_logs:
            configure_logging(level=self.config.log_level, log_format=self.config.log_format,
                              directory=self.resolve_path(self.config.log_directory)
                              if self.config.enable_monitoring else None)
        await self.store.open()
        if self.config.tune_interpreter and not self._tuned:
            hold_tuning()
            self._tuned = True
        self._sampler = HealthSampler(self.project_root, self.clock)
        self._monitor.start()
        if self._handle_signals:
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(signum, self.request_shutdown, signum)

    async def close(self) -> None:
        try:
            await self._close()
        finally:
            hand_over_held_records()  # the last few ms of records, before the loop may end

    async def _close(self) -> None:
        await self.waker.close()
        await self._monitor.stop()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for value in self._shared.values():
            closer = getattr(value, "aclose", None)
            if closer is not None:
                with contextlib.suppress(Exception):
                    await closer()
        self._shared.clear()
        await self.store.close()
        if self._tuned:
            release_tuning()
            self._tuned = False
        if self._handle_signals:
            # Only now: a Ctrl-C while the store closes must not raise KeyboardInterrupt
            # into the middle of its last write.
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signum)

    def request_shutdown(self, signum: int | None = None) -> None:
        """Stop every workflow at its next safe point, leaving each ``interrupted``.

        Safe to call again (a second Ctrl-C): it only repeats the same requests.
        """
        if signum is not None:
            logger.warning("Received %s: stopping workflows; they stay resumable",
                           signal.Signals(signum).name)
        self.shutting_down = True
        self.shutdown_requested.set()
        self._monitor.release()  # workflows held for health start, and stop at once
        for live in list(self._live.values()):
            live.stop("shutdown")

    # ------------------------------------------------------------------ running

    async def run(self, target: str | os.PathLike[str] | DefinitionLike, *,
                  context: Mapping[str, Any] | None = None) -> WorkflowResult:
        """Run one workflow to its end: a definition, or a path the target resolver turns into
        one (with this project's workflows installed, a prompt file for the development
        workflow)."""
        definition, inputs, prompt_file = self.prepare_target(target, context)
        if self.shutting_down:
            raise WorkflowError("the runtime is shutting down; no new workflows start")
        await self.waker.start()  # a runtime that runs workflows wakes parked ones
        run = self.new_run(definition, inputs, prompt_file)
        return await self.execute_prepared(definition, run, PENDING)

    async def register(self, target: str | os.PathLike[str] | DefinitionLike, *,
                       context: Mapping[str, Any] | None = None) -> str:
        """Save a new workflow as ``pending`` without starting it; return its ID.

        ``resume(id)`` runs it. Until then ``resume_all()`` (in any process) finds it, so a
        batch stopped before it started every workflow is finished by ``resume --all``.
        """
        definition, inputs, prompt_file = self.prepare_target(target, context)
        if not self.persistence:
            raise ConfigurationError("registering a workflow needs enable_persistence")
        if definition.import_path is None:
            raise ConfigurationError(f"definition {definition.name!r} must be bound to a "
                                     "module-level name to be registered and resumed")
        run = self.new_run(definition, inputs, prompt_file)
        await self.store.save(run.workflow_id, run.to_state)
        # Kept here too: resume() in this process starts from it without reading the store
        # back, so it never depends on when the store's files catch up with its journal.
        self._registered[run.workflow_id] = (definition, run)
        return run.workflow_id

    def new_run(self, definition: DefinitionLike, inputs: dict[str, Any],
                 prompt_file: str | None) -> WorkflowRun:
        return WorkflowRun(new_workflow_id(self.clock.time()), definition_name=definition.name,
                           definition_path=definition.import_path, context=inputs,
                           prompt_file=prompt_file, created_at=self.clock.time())

    async def resume(self, workflow_id: str) -> WorkflowResult:
        """Continue a stored workflow from the stage after its last completed one."""
        await self.waker.start()  # a runtime that runs workflows wakes parked ones
        validate_workflow_id(workflow_id)
        registered = self._registered.pop(workflow_id, None)
        if registered is not None:
            return await self.execute_prepared(registered[0], registered[1], PENDING)
        prepared = self.prepare_resume(await self.store.load(workflow_id))
        if isinstance(prepared, WorkflowResult):
            return prepared
        return await self.execute_prepared(*prepared)

    def prepare_resume(self, loaded: LoadedState, known: dict[Any, Any] | None = None
                       ) -> tuple[DefinitionLike, WorkflowRun, str] | WorkflowResult:
        """What to run, from which machine state; or the result itself when there is nothing
        to run. ``known``: a dict kept across one batch (thousands woken at once are mostly
        of one definition, at one stage), so each definition is resolved and each resume
        point found once per batch."""
        workflow_id = loaded.state["workflow_id"]
        for problem in loaded.problems:
            logger.warning("State problem for %s: %s; using %s", workflow_id, problem,
                           loaded.source)
        run = WorkflowRun.from_state(loaded.state)
        if run.status == "completed":
            return result_for(run)
        if run.status not in RESUMABLE:
            raise ConfigurationError(f"workflow {workflow_id} is {run.status}; only "
                                     f"{', '.join(sorted(RESUMABLE))} workflows can be resumed")
        if known is None:
            definition = self._stored_definition(run)
            at = self._resume_state(definition, run)
        else:
            cached = known.get(run.definition_path)
            definition = cached if cached is not None else self._stored_definition(run)
            known[run.definition_path] = definition
            # What _resume_state reads of the run: its completed and degraded stages and
            # whether it is pending; a failure is not kept (each run raises its own).
            key = (id(definition), tuple(run.completed_stages), run.status == PENDING,
                   tuple(e.get("stage") for e in run.stage_history
                         if e.get("status") == "degraded"))
            point = known.get(key)
            at = point if point is not None else self._resume_state(definition, run)
            known[key] = at
        if at != PENDING:  # pending: registered, never run
            run.resumed_from = at  # COMPLETED: every stage is done, only the end was lost
        run.error = run.error_category = None
        return definition, run, at

    async def list_workflows(self, status: str | Iterable[str] | None = None
                             ) -> list[dict[str, Any]]:
        """The stored workflows, oldest first, as the rows ``workflow-manager list --json``
        prints: ``workflow_id, status, current_stage, definition, prompt_file, created_at,
        updated_at, error``. ``status`` keeps only those with that status (or any of
        several); ``"corrupted"`` lists the states that cannot be read.

        A coroutine: the store reads its files off the loop (in a thread).
        """
        wanted = None if status is None else (
            {status} if isinstance(status, str) else set(status))
        unknown = sorted((wanted or set()) - {*STATUSES, "corrupted"})
        if unknown:
            raise ValueError(f"unknown status {', '.join(map(repr, unknown))}; known: "
                             f"{', '.join([*STATUSES, 'corrupted'])}")
        states = [loaded.state for loaded in await self.store.list_states(wanted)]
        states.sort(key=lambda state: float(state.get("created_at") or 0))
        return [workflow_row(state) for state in states]

    async def resume_all(self) -> list[WorkflowResult]:
        """Find every stored workflow that did not finish (running when a process died,
        or interrupted) and run them all to their end, concurrently.

        All claims are taken in one batch, and the claimed ones read again in one batch
        (the list was read before the claims: another process may have run one since;
        docs/architecture.md, invariant 12): finding and starting 10,000 workflows
        costs three thread hops.
        """
        await self.waker.start()  # a runtime that runs workflows wakes parked ones
        unfinished = {"pending", "running", "interrupted"}
        listed = await self.store.list_states(unfinished)
        failed: list[WorkflowResult] = []
        ready: dict[str, tuple[DefinitionLike, WorkflowRun, str]] = {}
        for loaded in listed:
            workflow_id = loaded.state["workflow_id"]
            try:
                if loaded.state.get("status") == "corrupted":
                    raise CriticalError(str(loaded.state.get("error")))
                prepared = self.prepare_resume(loaded)
            except WorkflowError as error:
                failed.append(_could_not_resume(workflow_id, error))
                continue
            if isinstance(prepared, WorkflowResult):
                failed.append(prepared)
            else:
                ready[workflow_id] = prepared
        claims: list[Claim | None] = []
        if self.persistence:
            granted, refused = await self.store.claim_many(ready)
            for workflow_id in refused:
                failed.append(_could_not_resume(workflow_id, WorkflowLockedError(
                    f"workflow {workflow_id} is already running in another process")))
                del ready[workflow_id]
            by_id = {claim.workflow_id: claim for claim in granted}
            current = await load_claimed(self.store, list(ready))
            for workflow_id in list(ready):
                fresh = current[workflow_id]
                try:
                    if isinstance(fresh, WorkflowError):
                        raise fresh
                    if fresh.state.get("status") not in unfinished:
                        # Ended, or parked (its waker's), in another process meanwhile.
                        prepared = result_for(WorkflowRun.from_state(fresh.state))
                    else:
                        prepared = self.prepare_resume(fresh)
                except WorkflowError as error:
                    prepared = _could_not_resume(workflow_id, error)
                if isinstance(prepared, WorkflowResult):
                    failed.append(prepared)
                    del ready[workflow_id]
                    by_id.pop(workflow_id).release()
                else:
                    ready[workflow_id] = prepared
            claims = [by_id[w] for w in ready]
        else:
            claims = [None] * len(ready)
        started = await asyncio.gather(*(self.execute_prepared(*prepared, claim=claim)
                                         for prepared, claim in zip(ready.values(), claims,
                                                                    strict=True)))
        return [*failed, *started]

    async def execute_prepared(self, definition: DefinitionLike, run: WorkflowRun, at: str, *,
                       claim: Claim | None = None) -> WorkflowResult:
        """Run ``run`` from machine state ``at`` (PENDING when new) under a claim."""
        await self.turns.turn()  # a burst of starts queues here, not in the loop
        if claim is None:
            await self._monitor.admit(run)
            claim = await self.store.claim(run.workflow_id) if self.persistence else None
            # One claim batch wakes thousands of starts at once: start them a fair
            # share per loop iteration.
            await self.turns.turn()
        else:
            try:
                await self._monitor.admit(run)
            except BaseException:
                claim.release()
                raise
        live = LiveWorkflow(run)
        live.task = asyncio.current_task()
        if self.shutting_down:  # released from admission by a shutdown: stop before stage 1
            live.stop_reason = "shutdown"
        self._live[run.workflow_id] = live
        try:
            self.emit("started", run)
            await self._engine(definition).execute(live, at)
        finally:
            del self._live[run.workflow_id]
            if claim is not None:
                claim.release()
            if run.status == WAITING:  # parked: nothing of it stays here but its deadline
                self.waker.parked(run)
            else:
                self._remember(run)
            self.emit("finished", run)
        # A durable batch wakes many final saves together; the report is the costly part
        # of a workflow's ending, so it takes a turn like a stage.
        await self.turns.turn()
        return result_for(run)

    def _engine(self, definition: DefinitionLike) -> Engine:
        engine = self._engines.get(id(definition))
        if engine is None:
            engine = self._engines[id(definition)] = Engine(self, definition)
        return engine

    def _remember(self, run: WorkflowRun) -> None:
        self._finished[run.workflow_id] = run
        while len(self._finished) > _REMEMBERED:
            self._finished.popitem(last=False)

    def resolve_target(self, target: str | os.PathLike[str],
                       context: Mapping[str, Any] | None = None) -> ResolvedTarget:
        """What the target resolver makes of a path (see ``__init__``)."""
        resolver = self._target_resolver or default_target_resolver()
        if resolver is None:
            raise ConfigurationError(
                f"cannot run {os.fspath(target)!r}: a path needs a target resolver, and none "
                "is registered. Pass a WorkflowDefinition, give Runtime(target_resolver=...), "
                "or install a workflow package that registers one")
        return resolver(target, dict(context or {}))

    def prepare_target(self, target: str | os.PathLike[str] | DefinitionLike,
                context: Mapping[str, Any] | None) -> tuple[DefinitionLike, dict[str, Any],
                                                            str | None]:
        if isinstance(target, (str, os.PathLike)):
            resolved = self.resolve_target(target, context)
            return resolved.definition, dict(resolved.context), resolved.prompt_file
        inputs = dict(context or {})
        if not hasattr(target, "stages"):
            raise TypeError("run() takes a path or a WorkflowDefinition, not "
                            f"{type(target).__name__}")
        if target.import_path is None and id(target) not in self._warned_unbound:
            self._warned_unbound.add(id(target))
            logger.warning("Definition %r is not bound to a module-level name, so a fresh "
                           "process cannot resume its workflows", target.name)
        return target, inputs, None

    def _stored_definition(self, run: WorkflowRun) -> DefinitionLike:
        if not run.definition_path:
            raise ConfigurationError(
                f"workflow {run.workflow_id} used definition {run.definition_name!r}, which was "
                "not bound to a module-level name; bind it to one (NAME = "
                "WorkflowDefinition(...)) in an importable module so it can be resumed")
        return resolve_definition(run.definition_path)

    @staticmethod
    def _resume_state(definition: DefinitionLike, run: WorkflowRun) -> str:
        """The machine state a stored run goes on from: the stage after the last one it
        passed, COMPLETED past the last stage, PENDING if it was registered and never ran."""
        names = [s.name for s in definition.stages]
        done = run.completed_stages
        # A non-critical stage that degraded was skipped: it is not in completed_stages,
        # and is not run again. The completed ones must be the definition's stages in
        # order up to the last stage passed, minus the degraded ones.
        degraded = {e.get("stage") for e in run.stage_history if e.get("status") == "degraded"}
        last = max((i for i, n in enumerate(names) if n in done or n in degraded), default=-1)
        expected = [n for n in names[:last + 1] if n in done or n not in degraded]
        if done != expected:
            raise ConfigurationError(
                f"workflow {run.workflow_id} completed stages {done} that do not match "
                f"definition {definition.name!r} ({names}); was the definition changed?")
        if last < 0 and run.status == PENDING:
            return PENDING
        # The stage after the last one passed; COMPLETED when all are (a crash after the
        # last stage's checkpoint, before the final record): the engine then only records
        # completion, and no stage runs twice.
        return names[last + 1] if last + 1 < len(names) else COMPLETED

    async def cancel(self, workflow_id: str, *, abandon: bool = False) -> bool:
        """Stop a workflow. Running here: it ends ``interrupted`` (resumable). Stored and not
        running, with ``abandon=True``: it is marked ``cancelled`` and never resumed."""
        validate_workflow_id(workflow_id)
        live = self._live.get(workflow_id)
        if live is not None:
            live.stop("cancel")
            return True
        if not abandon:
            return False
        claim = await self.store.claim(workflow_id)
        try:
            run = WorkflowRun.from_state((await self.store.load(workflow_id)).state)
            if run.status in ("completed", "cancelled"):
                return False
            run.status = "cancelled"
            run.updated_at = self.clock.time()
            await self.store.save(run.workflow_id, run.to_state)
        finally:
            claim.release()
        return True

    # ------------------------------------------------------------------ durable waits

    async def signal(self, workflow_id: str, name: str, payload: Any = None) -> None:
        """Send signal ``name`` (with a JSON ``payload``) to a workflow that has not
        finished; it is kept until a stage waits for it (``ctx.wait_for_signal``), and a
        workflow parked on it here is woken. Raises InvalidWorkflowIdError,
        WorkflowNotFoundError, or SignalRefusedError (a finished workflow, a bad name, a
        payload that is not JSON); nothing is stored then."""
        validate_workflow_id(workflow_id)
        check_signal_name(name)
        data = encode_payload(payload)
        store = signal_store(self.store)
        status = (await self.store.load(workflow_id)).state.get("status")
        if status in TERMINAL:
            raise SignalRefusedError(f"workflow {workflow_id} is {status}: it takes no more "
                                     "signals")
        await store.send_signal(workflow_id, name, data)
        if status == WAITING:
            self.waker.wake(workflow_id)

    async def wake_due(self, *, rescan: bool = False) -> int:
        """Wake the parked workflows whose deadline passed or whose signal came (other
        processes' signals included); with ``rescan``, read the store's parked index
        again first (workflows another process parked). Returns how many were started;
        ``settle_woken()`` waits for them. A runtime's timer does this by itself for the
        deadlines it knows; a worker calls it now and then."""
        woken = await self.waker.start()
        if rescan and self.waker.signals is not None:
            woken += await self.waker.rescan()
        if self.waker.signals is not None:
            for workflow_id, _ in await self.waker.signals.signal_notices():
                woken += self.waker.wake(workflow_id)
        return woken + self.waker.wake_due_now()

    async def settle_woken(self) -> list[WorkflowResult]:
        """Wait until no woken workflow runs; the results of those woken since last
        asked (a workflow that parks again is among them, ``waiting``)."""
        return await self.waker.settle()

    # ------------------------------------------------------------------ workers (_cluster.py)

    async def submit(self, target: str | os.PathLike[str] | DefinitionLike, *,
                     context: Mapping[str, Any] | None = None, queue: str = "default") -> str:
        """Queue a new workflow for any worker (``serve``, ``workflow-manager worker``) of
        ``queue``, in any process or, with the PostgreSQL store, on any host; its ID.
        With the file store it is saved ``pending`` for a worker on this host."""
        from . import _cluster
        return await _cluster.submit(self, target, context=context, queue=queue)

    async def result(self, workflow_id: str,
                     timeout: float | None = None) -> WorkflowResult:  # noqa: ASYNC109
        """Wait for ``workflow_id`` to end (completed, failed, timed out or cancelled),
        wherever it runs; TimeoutError after ``timeout`` seconds."""
        from . import _cluster
        return await _cluster.result(self, workflow_id, timeout)

    async def serve(self, *, concurrency: int = 8, queue: str = "default",
                    exit_when_idle: bool = False) -> int:
        """Be a worker: claim queued workflows of ``queue`` (and dead workers' ones) and run
        them, ``concurrency`` at once, until ``request_shutdown()`` (running stages stop
        at their boundary and their claims are given back) or, with ``exit_when_idle``,
        until none is queued or running anywhere. Returns how many it ran."""
        from . import _cluster
        # It wakes parked workflows too, when they are due, in its slots (_cluster.serve).
        return await _cluster.serve(self, concurrency=concurrency, queue=queue,
                                    exit_when_idle=exit_when_idle)

    def _on_fenced(self, workflow_id: str) -> None:
        """The store refused a write for ``workflow_id`` (another worker owns it now): stop
        it here at once, writing nothing more (docs/architecture.md, invariant 9)."""
        live = self._live.get(workflow_id)
        if live is not None:
            live.fence()

    # ------------------------------------------------------------------ shared services

    def live(self, workflow_id: str) -> LiveWorkflow | None:
        """The in-process record of a workflow running here, or None."""
        return self._live.get(workflow_id)

    def knows(self, workflow_id: str) -> bool:
        """True when this runtime runs the workflow or ran it recently (its record is in
        memory, so diagnostics need not read the store)."""
        return workflow_id in self._live or workflow_id in self._finished

    def live_workflows(self) -> list[LiveWorkflow]:
        """Every workflow running here now (a copy)."""
        return list(self._live.values())

    @property
    def running(self) -> list[str]:
        return list(self._live)

    def breaker(self, name: str) -> Breaker:
        breaker = self.breakers.get(name)
        if breaker is None:
            settings = self.config.breaker_settings(name)
            breaker = self.breakers[name] = Breaker(
                name, failure_threshold=settings.failure_threshold,
                recovery_timeout=settings.recovery_timeout, clock=self.clock,
                notify=self.notify, heard_by=self._runtime_listeners)
        return breaker

    def guarded_call(self, name: str, call: Callable[[], Awaitable[T]]) -> Coroutine[Any, Any, T]:
        """Retries (outer) around breaker ``name`` (inner) around ``call``: the retry loop's
        coroutine itself, to await (a coroutine frame less per call)."""
        return retry_call(call, policy=self._policy, clock=self.clock,
                          breaker=self.breaker(name))

    async def shared(self, key: str, factory: Callable[[], Awaitable[T]]) -> T:
        if key in self._shared:
            return self._shared[key]  # type: ignore[no-any-return]
        lock = self._shared_locks.setdefault(key, asyncio.Lock())
        async with lock:
            if key not in self._shared:
                self._shared[key] = await factory()
        return self._shared[key]  # type: ignore[no-any-return]

    def spawn(self, coroutine: Coroutine[Any, Any, Any], name: str) -> None:
        """Run a short side task (warnings, health checks), cancelled when the runtime closes."""
        task = asyncio.get_running_loop().create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def add_listener(self, listener: Listener, *, events: Iterable[str] | None = None) -> None:
        """``listener(event, run, **data)`` hears of each workflow's events: ``started``,
        ``stage`` (stage=, attempt=), ``retry`` (stage=, attempt=, delay=), ``progress``
        (stage=, fraction=, message=), ``stage_end`` (entry=, the stage's history entry),
        ``watchdog`` (stage=, level= warning, timeout or heartbeat), ``held`` (status=) and
        ``finished`` (``run.status`` says how). With ``events``, only those."""
        if events is None:
            self._listeners.append(listener)
            for listeners in self._listening.values():
                listeners.append(listener)
            return
        for event in events:
            self._listening.setdefault(event, list(self._listeners)).append(listener)

    def listeners(self, event: str) -> list[Listener]:
        """Who hears ``event``: its list in the table ``add_listener`` keeps current in
        place from now on (the engine holds it; see ``EngineHost.listeners``)."""
        return self._listening.setdefault(event, list(self._listeners))

    def emit(self, event: str, run: WorkflowRun, **data: Any) -> None:
        listeners = self._listening.get(event, self._listeners)
        if not listeners:
            return
        for listener in listeners:
            try:
                listener(event, run, **data)
            except Exception:
                logger.exception("Listener %r failed on %s", listener, event)

    def add_runtime_listener(self, listener: Callable[..., None]) -> None:
        """``listener(event, **data)`` hears of events that belong to no one workflow:
        ``breaker`` (dependency=, state=), ``dependency_call`` (dependency=, outcome= ok,
        error, rejected or rate_limited), ``loop_lag`` (seconds=) and ``health`` (check=,
        a ``SystemHealthCheck``), once per new result: with no registered checks, the
        stages checked within one resource sample share a result and it is told once."""
        self._runtime_listeners.append(listener)

    def notify(self, event: str, **data: Any) -> None:
        """Tell the runtime listeners (``add_runtime_listener``) of ``event``."""
        for listener in self._runtime_listeners:
            try:
                listener(event, **data)
            except Exception:
                logger.exception("Runtime listener %r failed on %s", listener, event)

    def register_error_handler(self, handler: ErrorHandler) -> None:
        """``handler(workflow_id, error, stage, context)`` may return a strategy dict."""
        self.error_handlers.append(handler)

    def register_health_check(self, check: HealthCheckFunction) -> None:
        """``check(workflow_id)`` returns (or awaits to) a dict with a ``status``."""
        self.health_checks.append(check)

    # ------------------------------------------------------------------ health

    async def perform_health_check(self, workflow_id: str | None = None) -> SystemHealthCheck:
        """Resources, registered checks and loop lag, merged into one status (worst wins)."""
        if workflow_id is not None:
            validate_workflow_id(workflow_id)
        return await self._health_check(workflow_id)

    async def _health_check(self, workflow_id: str | None) -> SystemHealthCheck:
        # A running workflow's ID was validated when it was admitted: a stage's check
        # (stage_health_check) comes here directly, without the regex per stage.
        check, entry = await self._health_result(workflow_id)
        live = self._live.get(workflow_id) if workflow_id else None
        if live is not None:
            live.run.record_health_check(entry)
        return check

    async def _health_result(self, workflow_id: str | None,
                             ) -> tuple[SystemHealthCheck, dict[str, Any]]:
        """The health result for ``workflow_id`` and the entry a workflow's record keeps.

        With no registered checks the result depends only on the resource sample (reused
        for the sampler's ``min_interval``) and the loop lag, so it is built, and told to
        the runtime listeners, once per (sample, lag) and shared: every stage checked
        within one interval records the same entry (entries are never changed once
        recorded, see ``WorkflowRun.to_state``). Registered checks answer per workflow,
        so with any of them each call builds and tells its own result.
        """
        sampler = self._sampler or HealthSampler(self.project_root, self.clock)
        lag_ms = self.loop_lag_ms
        custom_checks = self.health_checks
        if not custom_checks:
            sample = sampler.sample()
            shared = self._shared_health
            if shared is not None and shared[0] is sample and shared[1] == lag_ms:
                return shared[2], shared[3]
        sample, status, advice = sampler.assessed()
        lag_status, lag_advice = assess_loop_lag(lag_ms)
        status = worst(status, lag_status)
        advice.extend(lag_advice)
        custom: dict[str, Any] = {}
        for check in custom_checks:
            name = getattr(check, "__name__", "check")
            try:
                answer = await run_custom_check(check, workflow_id)
            except Exception as error:
                answer = {"status": "DEGRADED", "error": f"{type(error).__name__}: {error}"}
            status = worst(status, parse_status(answer.get("status", "HEALTHY")))
            advice.extend(answer.get("recommendations", ()))
            custom[name] = dict(answer)
        check_result = SystemHealthCheck(
            status=status, cpu_usage=sample.cpu, memory_usage=sample.memory,
            disk_usage=sample.disk, recommendations=tuple(dict.fromkeys(advice)),
            timestamp=self.clock.time(), loop_lag_ms=lag_ms, custom=custom)
        entry = check_result.to_dict()
        if not custom_checks:
            self._shared_health = (sample, lag_ms, check_result, entry)
        self.notify("health", check=check_result)
        return check_result, entry

    async def stage_health_check(self, run: WorkflowRun, reason: str) -> None:
        if not self.config.enable_health_checks:
            return
        # The shared result while its sample and loop lag hold (see _health_result),
        # taken here without a coroutine of its own: this runs before every checked stage.
        shared, sampler = self._shared_health, self._sampler
        if (shared is not None and sampler is not None and not self.health_checks
                and sampler.sample() is shared[0] and shared[1] == self.loop_lag_ms):
            check, entry = shared[2], shared[3]
        else:
            check, entry = await self._health_result(run.workflow_id)
        run.record_health_check(entry)
        # A busy CPU alone (WARNING) is normal while handlers' subprocesses run; log it
        # quietly.
        status = check.status
        level = logging.INFO if status in _QUIET_STATUSES else logging.WARNING
        # One per stage: the record is built and formatted by the logging thread (the
        # status is a str enum: "%s" gives its value).
        log_soon(level, "Health check completed (%s): %s (CPU: %.0f%%, Memory: %.0f%%)",
                 reason, status, check.cpu_usage, check.memory_usage)

    # ------------------------------------------------------------------ diagnostics

    def get_workflow_diagnostics(self, workflow_id: str) -> dict[str, Any]:
        """The spec's diagnostics dict, for a running, finished or stored workflow."""
        validate_workflow_id(workflow_id)
        live = self._live.get(workflow_id)
        run = live.run if live is not None else self._finished.get(workflow_id)
        if run is None:
            loader = getattr(self.store, "load_sync", None)
            if loader is None:
                raise ConfigurationError(
                    f"workflow {workflow_id} is not known to this runtime and its store has "
                    "no synchronous read: use await runtime.workflow_diagnostics(id)")
            run = WorkflowRun.from_state(loader(workflow_id).state)
        return diagnostics_for(run, live, self.clock, self.store.describe(workflow_id))

    async def workflow_diagnostics(self, workflow_id: str) -> dict[str, Any]:
        """``get_workflow_diagnostics`` for a workflow in any store (PostgreSQL's too): one
        known here from memory, any other read from the store without blocking the loop,
        with ``state_source`` and ``state_problems`` saying where and how it was read."""
        from ._diagnostics import stored_diagnostics
        return await stored_diagnostics(self, workflow_id)


def diagnostics_for(run: WorkflowRun, live: LiveWorkflow | None, clock: Clock,
                    files: Mapping[str, str]) -> dict[str, Any]:
    started = live.stage_started if live is not None else None
    duration = clock.monotonic() - started if started is not None else (
        run.stage_history[-1]["duration"] if run.stage_history else 0.0)
    return {
        "workflow_id": run.workflow_id,
        "status": run.status,
        "running_here": live is not None,
        "current_stage": {"stage": run.current_stage, "duration": duration,
                          "attempt": run.attempt,
                          "progress": live.progress if live is not None else None},
        "completed_stages": list(run.completed_stages),
        "error_count": run.error_count,
        "retry_count": run.retry_count,
        "recovery_attempts": run.recovery_attempts,
        "recent_errors": run.errors[-5:],
        # Copies, nested lists too: a recorded entry is shared by every workflow checked
        # within one sample.
        "recent_health_checks": copy.deepcopy(run.health_checks[-5:]),
        "stage_history": {e["stage"]: {**e, "status": _history_status(e)}
                          for e in run.stage_history},
        "performance_report": report_for(run),
        "outputs": dict(run.outputs),
        "error": run.error,
        "files": dict(files),
        "waiting_for": ({"stage": run.wait.get("stage"), "signal": run.wait.get("signal"),
                         "until": run.wait.get("deadline")}
                        if run.status == WAITING and run.wait else None),
    }


def workflow_row(state: Mapping[str, Any]) -> dict[str, Any]:
    """One stored workflow as ``list_workflows`` returns it."""
    return {"workflow_id": state.get("workflow_id"), "status": state.get("status"),
            "current_stage": state.get("current_stage"),
            "definition": state.get("definition") or state.get("definition_name"),
            "prompt_file": state.get("prompt_file") or (state.get("context") or {}).get(
                "prompt_file"),
            "created_at": state.get("created_at"), "updated_at": state.get("updated_at"),
            "error": state.get("error")}


def _history_status(entry: Mapping[str, Any]) -> str:
    if entry.get("status") != "completed":
        return str(entry.get("status"))
    baseline = float(entry.get("baseline") or 0)
    ratio = float(entry.get("duration") or 0) / baseline if baseline else 0.0
    return "slow" if ratio > 1.2 else "fast" if ratio < 0.8 else "normal"


async def run_workflow(target: str | os.PathLike[str] | DefinitionLike, *,
                       context: Mapping[str, Any] | None = None,
                       config: WorkflowConfiguration | None = None,
                       project_root: str | os.PathLike[str] = ".",
                       clock: Clock | None = None, store: Store | None = None) -> WorkflowResult:
    """Run one workflow in a runtime of its own and return how it ended."""
    async with Runtime(config=config, project_root=project_root, clock=clock,
                       store=store) as runtime:
        return await runtime.run(target, context=context)


async def resume_workflow(workflow_id: str, *, config: WorkflowConfiguration | None = None,
                          project_root: str | os.PathLike[str] = ".",
                          clock: Clock | None = None,
                          store: Store | None = None) -> WorkflowResult:
    """Resume one stored workflow from where it stopped, in a runtime of its own."""
    async with Runtime(config=config, project_root=project_root, clock=clock,
                       store=store) as runtime:
        return await runtime.resume(workflow_id)

