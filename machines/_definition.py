"""Workflow definitions: ``StageSpec``s built into one shared ``transitions`` machine.

One ``AsyncMachine`` per definition; each running workflow is a model on it
(``auto_transitions=False``, ``queued="model"``, identity comparison; docs/architecture.md,
invariant 1). Its triggers only move the state; handlers never run inside them
(invariant 2). The model's state is the one record of where a workflow is (invariant 10):
``pending``, then each stage in order (``advance``), then ``completed``; or an outcome
(``failed``, ``timed_out``, ``cancelled``, ``interrupted``) fired from ``pending`` or any
stage. A move the machine does not allow raises ``InvalidTransitionError``.
"""

from __future__ import annotations

import itertools
import sys
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field
from enum import Enum
from typing import Any

from transitions import MachineError, State
from transitions.extensions.asyncio import AsyncMachine, AsyncTransition

from reliability._context import RecoveryAction, StageHandler
from reliability._errors import InvalidTransitionError
from reliability._recovery import BUILTIN_ACTIONS, resolve_action_names
from reliability._state import COMPLETED, PENDING, WorkflowRun
from reliability._state import OUTCOMES as RUN_OUTCOMES

from ._stages import DEFAULT_TIMEOUTS, FALLBACK_TIMING, OUTCOMES, WorkflowStage

__all__ = ["StageSpec", "WorkflowDefinition"]

_OUTCOME_NAMES = tuple(o.value for o in OUTCOMES)
_ENDINGS = tuple(o for o in RUN_OUTCOMES if o != COMPLETED)  # finish()'s; advance() completes


@dataclass(frozen=True, slots=True)
class StageSpec:
    """One stage: its name, handler and reliability settings.

    ``StageSpec("fetch", fetch, timeout_seconds=30)``: the stage and its handler are
    positional, every setting after them is keyword-only. Timing fields left as None take
    the spec's defaults for that stage (scaled by the configuration's
    ``timeout_multiplier``); given values are used exactly. ``recovery_actions`` and
    ``warning_actions`` take any sequence of action names and are kept as tuples.
    """

    stage: WorkflowStage | str
    handler: StageHandler
    _: KW_ONLY
    timeout_seconds: float | None = None
    warning_threshold_seconds: float | None = None
    baseline_seconds: float | None = None
    max_retries: int | None = None
    critical: bool = True
    recovery_actions: Sequence[str] | None = None
    warning_actions: Sequence[str] = ()
    heartbeat_timeout_seconds: float | None = None
    health_check: bool = False
    checkpoint: bool = False

    def __post_init__(self) -> None:
        name = self.name
        for label in ("recovery_actions", "warning_actions"):
            actions = getattr(self, label)
            if actions is not None:
                object.__setattr__(self, label, _action_names(name, label, actions))
        if not name or not all(c.isalnum() or c in "_-" for c in name):
            raise ValueError(f"stage name {name!r} must be letters, digits, '_' or '-'")
        if name == PENDING or name in _OUTCOME_NAMES or name in _ENDINGS:
            raise ValueError(f"stage name {name!r} is reserved for workflow outcomes")
        for label in ("timeout_seconds", "warning_threshold_seconds", "baseline_seconds",
                      "heartbeat_timeout_seconds"):
            value = getattr(self, label)
            if value is not None and not (isinstance(value, (int, float)) and value > 0
                                          and value == value and value != float("inf")):
                raise ValueError(f"stage {name!r}: {label} must be a finite number > 0, "
                                 f"not {value!r}")
        if self.max_retries is not None and not (isinstance(self.max_retries, int)
                                                 and 0 <= self.max_retries <= 100):
            raise ValueError(f"stage {name!r}: max_retries must be 0..100")
        if not callable(self.handler):
            raise TypeError(f"stage {name!r}: handler must be an async function")

    @property
    def name(self) -> str:
        return self.stage.value if isinstance(self.stage, Enum) else str(self.stage)


def _action_names(stage: str, label: str, actions: object) -> tuple[str, ...]:
    # A str is a sequence too: "retry" would become ("r", "e", "t", "r", "y").
    names = tuple(actions) if isinstance(actions, Iterable) and not isinstance(
        actions, (str, bytes)) else None
    if names is None or not all(isinstance(a, str) and a for a in names):
        raise TypeError(f"stage {stage!r}: {label} must be a list or tuple of action names, "
                        f"not {actions!r}")
    return names


@dataclass(frozen=True, slots=True)
class _ResolvedStage:
    """A StageSpec with every timing filled in; what the engine reads."""

    name: str
    handler: StageHandler
    timeout_seconds: float
    warning_threshold_seconds: float
    baseline_seconds: float
    max_retries: int | None
    critical: bool
    recovery_actions: tuple[str, ...]
    warning_actions: tuple[str, ...]
    heartbeat_timeout_seconds: float | None
    health_check: bool
    checkpoint: bool
    timing_is_default: bool


def _resolve(spec: StageSpec, own_actions: Mapping[str, RecoveryAction]) -> _ResolvedStage:
    default = DEFAULT_TIMEOUTS.get(spec.name, FALLBACK_TIMING)
    timeout = spec.timeout_seconds or default.timeout_seconds
    warning = spec.warning_threshold_seconds or min(default.warning_threshold_seconds,
                                                    timeout * 0.75)
    if warning >= timeout:
        raise ValueError(f"stage {spec.name!r}: warning_threshold_seconds ({warning:g}) must be "
                         f"below timeout_seconds ({timeout:g})")
    if spec.recovery_actions is not None:
        actions = tuple(spec.recovery_actions)
        resolve_action_names(actions, own_actions, where=f"stage {spec.name!r}")
    else:  # the spec's defaults name actions not every definition has: keep those it does
        actions = tuple(a for a in default.recovery_actions
                        if a in own_actions or a in BUILTIN_ACTIONS)
    resolve_action_names(tuple(spec.warning_actions), own_actions,
                         where=f"stage {spec.name!r} warning")
    return _ResolvedStage(
        name=spec.name, handler=spec.handler, timeout_seconds=float(timeout),
        warning_threshold_seconds=float(warning),
        baseline_seconds=float(spec.baseline_seconds or default.baseline_seconds),
        max_retries=spec.max_retries, critical=spec.critical, recovery_actions=actions,
        warning_actions=tuple(spec.warning_actions),
        heartbeat_timeout_seconds=spec.heartbeat_timeout_seconds,
        health_check=spec.health_check, checkpoint=spec.checkpoint,
        timing_is_default=spec.timeout_seconds is None)


class _DirectTransition(AsyncTransition):
    """transitions' AsyncTransition, minus the work a machine without callbacks, conditions
    or graphs never needs: five debug-log calls, awaits of seven empty callback lists, a
    failed ``hasattr`` (an exception) and a search for trigger tasks to cancel (there are
    none: ``process_context`` starts no task). Measured: 10.4 -> 6.4 us per trigger. A
    transition that has callbacks or conditions takes transitions' own path."""

    async def execute(self, event_data: Any) -> bool:  # type: ignore[override]
        machine = event_data.machine
        if (self.prepare or self.conditions or self.before or self.after
                or machine.before_state_change or machine.after_state_change):
            return bool(await super().execute(event_data))
        if self.dest:
            await self._change_state(event_data)
        return True

    async def _change_state(self, event_data: Any) -> None:  # type: ignore[override]
        machine = event_data.machine  # a _SharedMachine: never a graph machine
        await machine.get_state(self.source).exit(event_data)
        machine.set_state(self.dest, event_data.model)
        event_data.update(getattr(event_data.model, machine.model_attribute))
        dest = machine.get_state(self.dest)
        await dest.enter(event_data)
        if dest.final:
            await machine.callbacks(machine.on_final, event_data)


class _SharedMachine(AsyncMachine):
    """An AsyncMachine whose models are added and removed in O(1).

    transitions 0.9.3's add_model scans the model list (O(n)) and wires an ``is_<state>``
    helper per state onto each model (~11 KiB each); the engine needs neither: it fires
    events through the machine and reads ``model.state``.
    """

    transition_cls = _DirectTransition

    def __init__(self, **kwargs: Any) -> None:
        self._slots: dict[int, int] = {}
        super().__init__(**kwargs)

    def add_model(self, model: Any, initial: Any = None) -> None:
        if model is self.self_literal or isinstance(model, list):
            super().add_model(model, initial)  # the machine's own model, at construction
            return
        self._transition_queue_dict[id(model)] = deque()
        self.set_state(initial if initial is not None else PENDING, model=model)
        self._slots[id(model)] = len(self.models)
        self.models.append(model)

    async def process_context(self, func: Any, model: Any) -> Any:
        # transitions tracks each trigger's task so a new trigger can cancel it, and turns
        # CancelledError into a False result. The engine fires one trigger at a time per
        # model and never cancels inside one, so neither is wanted; a cancellation from
        # outside (Ctrl-C) must propagate, not vanish.
        return await self._process_async(func, model)

    async def callbacks(self, funcs: Any, event_data: Any) -> None:  # type: ignore[override]
        # In order, one after another: transitions gathers each list concurrently, which
        # costs a gather per phase even when the list is empty.
        for func in funcs:
            await self.callback(func, event_data)

    @staticmethod
    async def await_all(callables: Any) -> list[Any]:
        if not callables:  # the usual case (no conditions): skip building a comprehension
            return []
        results = []
        for func in callables:
            results.append(await func())
        return results

    def set_state(self, state: Any, model: Any = None) -> None:
        """transitions' ``set_state``, without its list handling for the one case every
        move of a model comes with (a State and one model): the one place a model's state
        is set, on the short path (``move_now``) and transitions' own alike."""
        if model is None or isinstance(model, list) or not isinstance(state, State):
            super().set_state(state, model)
            return
        setattr(model, self.model_attribute, state.value)

    def move_now(self, event: Any, model: Any) -> bool:
        """Fire ``event`` for ``model`` at once, when all it would do is change the state.

        That is every trigger the runtime fires: one transition from the model's state, no
        conditions, no callbacks on it, on its two states or on the machine, and no other
        trigger of this model in progress. The state is then set by transitions' own
        ``set_state``, and nothing else of the stock path would run (no EventData to
        build, no empty callback lists to await, no queue entry to add and pop):
        measured, the trigger's share of a stage went from ~25 Python calls to ~5.
        Anything else returns False, and the caller fires the event transitions' way,
        which also raises ``MachineError`` for a move the machine does not have.
        """
        if self._transition_queue_dict[id(model)]:
            return False  # inside another trigger of this model: queue behind it (stock)
        moves = event.transitions.get(getattr(model, self.model_attribute))
        if moves is None or len(moves) != 1:
            return False
        move = moves[0]
        # The machine's callback lists read from their attributes, not their properties
        # (five Python calls a trigger): transitions is pinned at 0.9.3, and a test holds
        # each list, set on the machine, to sending the trigger down the full path.
        if (move.prepare or move.conditions or move.before or move.after
                or self._prepare_event or self._before_state_change
                or self._after_state_change or self._finalize_event or self._on_exception):
            return False
        states = self.states
        dest = states[move.dest]
        if states[move.source].on_exit or dest.on_enter or (dest.final and self._on_final):
            return False
        self.set_state(dest, model)
        return True

    def remove_model(self, model: Any) -> None:
        index = self._slots.pop(id(model))
        last = self.models.pop()
        if last is not model:  # move the last model into the freed slot
            self.models[index] = last
            self._slots[id(last)] = index
        self._transition_queue_dict.pop(id(model), None)


def _caller_module() -> str | None:
    frame = sys._getframe(2)
    while frame is not None and frame.f_globals.get("__name__") == __name__:
        frame = frame.f_back  # type: ignore[assignment]
    name = frame.f_globals.get("__name__") if frame is not None else None
    return name if isinstance(name, str) else None


@dataclass(eq=False)
class WorkflowDefinition:
    """A named, ordered list of stages and the one state machine all its workflows share.

    Bind it to a module-level name (``MY_FLOW = WorkflowDefinition(...)``) and resuming in
    a fresh process finds it by import path; or give ``import_path`` explicitly.
    """

    name: str
    stages: Sequence[Any]
    recovery_actions: Mapping[str, RecoveryAction] = field(default_factory=dict)
    import_path_hint: str | None = None
    _module: str | None = field(default=None, init=False, repr=False)
    _machine: _SharedMachine = field(init=False, repr=False)
    _following: dict[str, str] = field(init=False, repr=False)
    _advance: Any = field(init=False, repr=False)  # the machine's "advance" event

    def __post_init__(self) -> None:
        specs = list(self.stages)
        if not specs:
            raise ValueError(f"workflow definition {self.name!r} has no stages")
        if not all(isinstance(s, StageSpec) for s in specs):
            raise TypeError(f"workflow definition {self.name!r}: stages must be StageSpec")
        names = [s.name for s in specs]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"workflow definition {self.name!r}: duplicate stages {duplicates}")
        resolve_action_names(tuple(self.recovery_actions), self.recovery_actions,
                             where=f"definition {self.name!r}")
        self.stages = tuple(_resolve(s, self.recovery_actions) for s in specs)
        self._module = _caller_module()
        self._machine = _build_machine(names)
        # Read from the machine (not from the stage list): where advance goes from each state.
        self._advance = self._machine.events["advance"]
        self._following = {source: str(moves[0].dest) for source, moves
                           in self._advance.transitions.items()}

    @property
    def import_path(self) -> str | None:
        """``"module:NAME"`` where this definition is bound, found without registration."""
        if self.import_path_hint:
            return self.import_path_hint
        module = sys.modules.get(self._module or "")
        if module is None or self._module == "__main__":
            return None
        for attribute, value in vars(module).items():
            if value is self:
                found = f"{self._module}:{attribute}"
                self.import_path_hint = found
                return found
        return None

    # The engine's side of the machine. Each trigger is bookkeeping only.

    def attach(self, run: WorkflowRun, state: str) -> None:
        """Put ``run`` on the machine at ``state``: ``pending`` for a new workflow, else the
        stage a resumed one goes on from, or ``completed`` when only its end was unsaved.

        An ended workflow is resumed at a stage, never at its outcome: those raise.
        """
        if state not in self._following and state != COMPLETED:
            raise InvalidTransitionError(run.workflow_id, "resume", state, self.name)
        self._machine.add_model(run, initial=state)

    def detach(self, run: WorkflowRun) -> None:
        self._machine.remove_model(run)

    def advance_now(self, run: WorkflowRun) -> bool:
        """``advance`` done at once, without a coroutine, if the machine's short path takes
        it (``_SharedMachine.move_now``); False if ``advance`` must be awaited instead."""
        return self._machine.move_now(self._advance, run)

    async def advance(self, run: WorkflowRun) -> None:
        """``pending`` -> the first stage -> ... -> the last stage -> ``completed``."""
        if self._machine.move_now(self._advance, run):
            return
        # _fire's body, inlined: this runs once per stage of every workflow.
        source = run.state
        try:
            await self._advance.trigger(run)
        except MachineError:  # past the last stage, or at an outcome
            raise InvalidTransitionError(run.workflow_id, "advance", source,
                                         self.name) from None
        if run.state == source:
            raise InvalidTransitionError(run.workflow_id, "advance", source, self.name)

    async def finish(self, run: WorkflowRun, outcome: str) -> None:
        """Move ``run`` from ``pending`` or a stage to ``outcome``; raises from elsewhere."""
        if outcome not in _ENDINGS:
            raise ValueError(f"{outcome!r} is not an outcome; choose from {_ENDINGS}")
        await self._fire(outcome, run)

    def next_state(self, state: str) -> str:
        """The state ``advance`` moves a run at ``state`` to."""
        return self._following[state]

    async def _fire(self, trigger: str, run: WorkflowRun) -> None:
        event = self._machine.events[trigger]
        if self._machine.move_now(event, run):
            return
        source = run.state
        try:
            await event.trigger(run)
        except MachineError:  # no such move from the run's state
            raise InvalidTransitionError(run.workflow_id, trigger, source, self.name) from None
        # Every move changes the state, so an unchanged one was held back (by a condition
        # someone added: a queued machine's trigger returns True even then).
        if run.state == source:
            raise InvalidTransitionError(run.workflow_id, trigger, source, self.name)


def _build_machine(stage_names: Iterable[str]) -> _SharedMachine:
    return _SharedMachine(**_machine_settings(stage_names))


def _machine_settings(stage_names: Iterable[str]) -> dict[str, Any]:
    """A definition's machine, as keyword arguments of ``AsyncMachine`` (a test builds the
    stock machine from them to compare ours with)."""
    names = list(stage_names)
    order = [PENDING, *names, COMPLETED]
    transitions: list[dict[str, Any]] = [
        {"trigger": "advance", "source": source, "dest": dest}
        for source, dest in itertools.pairwise(order)
    ]
    live_states = [PENDING, *names]
    for outcome in _ENDINGS:
        transitions.append({"trigger": outcome, "source": live_states, "dest": outcome})
    return {"model": None, "states": [*order, *_ENDINGS], "transitions": transitions,
            "initial": PENDING, "auto_transitions": False, "queued": "model",
            "send_event": True}
