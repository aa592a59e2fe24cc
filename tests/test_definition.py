"""Workflow definitions: stage specs, import paths, and the one shared AsyncMachine."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import parking
import pytest
from crash_workflows import CRASH_FLOW
from transitions import MachineError
from transitions.extensions.asyncio import AsyncCondition, AsyncMachine

from machines import DEFAULT_TIMEOUTS, StageContext, StageSpec, WorkflowDefinition, WorkflowStage
from machines._definition import _machine_settings
from reliability import (
    ConfigurationError,
    FakeClock,
    InvalidTransitionError,
    MemoryStore,
    Runtime,
    WorkflowConfiguration,
)
from reliability._logging import logger as runtime_logger
from reliability._runtime import resolve_definition
from reliability._state import WorkflowRun
from reliability._store import decode_document, encode_document

SPEC_STAGES = [
    "initialization", "prompt_analysis", "task_preparation", "issue_creation", "branch_setup",
    "research_planning", "implementation_start", "implementation_progress",
    "implementation_complete", "testing_start", "testing_complete", "documentation_update",
    "pr_preparation", "pr_creation", "pr_verification", "review_request", "review_processing",
    "final_cleanup", "completion",
]
PARKED: list[str] = []
GATE: dict[str, asyncio.Event] = {}
STATES_SEEN: list[tuple[str, str]] = []


async def noop(ctx: StageContext) -> None:
    return None


async def gated(ctx: StageContext) -> dict[str, Any]:
    """Note the machine state this run is in, then wait until the test opens this stage."""
    models = [m for m in FLOW._machine.models if m.workflow_id == ctx.workflow_id]
    STATES_SEEN.append((ctx.stage, models[0].state if models else "not on FLOW"))
    PARKED.append(ctx.workflow_id)
    await GATE.setdefault(ctx.stage, asyncio.Event()).wait()
    return {ctx.stage: True}


async def nap(ctx: StageContext) -> None:
    await ctx.sleep(0.05)


FLOW = WorkflowDefinition("shared", [StageSpec(stage="first", handler=gated),
                                     StageSpec(stage="second", handler=gated)])
NAPPING_FLOW = WorkflowDefinition("napping", [StageSpec(stage=s, handler=nap)
                                              for s in ("a", "b", "c")])
HINTED_FLOW = WorkflowDefinition("hinted", [StageSpec(stage="a", handler=noop)],
                                 import_path_hint="somewhere.else:FLOW")
OTHER_FLOW = WorkflowDefinition("other", [StageSpec(stage="x", handler=noop),
                                          StageSpec(stage="y", handler=noop)])


@pytest.fixture(autouse=True)
def _reset() -> Iterator[None]:
    PARKED.clear()
    GATE.clear()
    STATES_SEEN.clear()
    yield


def runtime_for(tmp_path: Path, store: MemoryStore | None = None,
                clock: FakeClock | None = None) -> Runtime:
    return Runtime(WorkflowConfiguration(enable_health_checks=False), tmp_path,
                   clock=clock or FakeClock(), store=store or MemoryStore(),
                   configure_logs=False)


async def until_parked(count: int) -> None:
    await parking.until_parked(PARKED, count)


class TestWorkflowStage:
    def test_has_the_spec_s_19_stages_in_order(self) -> None:
        """The first 19 members are the spec's stages, in the spec's order."""
        assert [s.value for s in WorkflowStage][:19] == SPEC_STAGES

    def test_outcomes_follow_the_stages(self) -> None:
        """After the stages come the outcomes a workflow can end in."""
        assert [s.value for s in WorkflowStage][19:] == [
            "completed", "failed", "timed_out", "cancelled", "interrupted"]

    def test_str_is_the_value(self) -> None:
        """str(stage) is its value, as in log lines and state files."""
        assert str(WorkflowStage.PR_CREATION) == "pr_creation"

    def test_every_stage_has_default_timing(self) -> None:
        """Each of the 19 stages has spec timing with warning below timeout."""
        for name in SPEC_STAGES:
            timing = DEFAULT_TIMEOUTS[name]
            assert 0 < timing.warning_threshold_seconds < timing.timeout_seconds


class TestStageSpec:
    def test_stage_and_handler_are_positional_the_rest_keyword_only(self) -> None:
        """StageSpec("fetch", fetch, timeout_seconds=30) works; a third positional does not."""
        spec = StageSpec("fetch", noop, timeout_seconds=30)
        assert (spec.name, spec.handler, spec.timeout_seconds) == ("fetch", noop, 30)
        flow = WorkflowDefinition("t", [spec, StageSpec("report", noop, critical=False)])
        assert [s.name for s in flow.stages] == ["fetch", "report"]
        with pytest.raises(TypeError):
            StageSpec("fetch", noop, 30)  # type: ignore[misc]

    def test_action_lists_take_any_sequence_and_are_kept_as_tuples(self) -> None:
        """recovery_actions=["cleanup_resources"] is accepted and stored as a tuple."""
        spec = StageSpec("fetch", noop, recovery_actions=["cleanup_resources"],
                         warning_actions=["check_system_health"])
        assert spec.recovery_actions == ("cleanup_resources",)
        assert spec.warning_actions == ("check_system_health",)
        stage = WorkflowDefinition("t", [spec]).stages[0]
        assert stage.recovery_actions == ("cleanup_resources",)

    def test_one_string_is_not_a_list_of_actions(self) -> None:
        """recovery_actions="retry_with_backoff" is refused, not split into letters."""
        with pytest.raises(TypeError, match="recovery_actions must be a list or tuple"):
            StageSpec("fetch", noop, recovery_actions="retry_with_backoff")

    def test_spec_stage_takes_the_spec_s_default_timing(self) -> None:
        """A WorkflowStage with no timing gets the spec's values (pr_creation: 120/90/60)."""
        flow = WorkflowDefinition("t", [StageSpec(stage=WorkflowStage.PR_CREATION,
                                                  handler=noop)])
        stage = flow.stages[0]
        assert (stage.timeout_seconds, stage.warning_threshold_seconds,
                stage.baseline_seconds) == (120.0, 90.0, 60.0)
        assert stage.timing_is_default

    def test_user_stage_takes_fallback_timing(self) -> None:
        """A stage the spec does not know gets 300 s timeout, 200 s warning, 60 s baseline."""
        stage = WorkflowDefinition("t", [StageSpec(stage="mine", handler=noop)]).stages[0]
        assert (stage.timeout_seconds, stage.warning_threshold_seconds,
                stage.baseline_seconds) == (300.0, 200.0, 60.0)

    def test_given_timeout_alone_puts_the_warning_below_it(self) -> None:
        """timeout_seconds=10 with no warning: the warning is at 3/4 of the timeout."""
        stage = WorkflowDefinition("t", [StageSpec(stage="mine", handler=noop,
                                                   timeout_seconds=10)]).stages[0]
        assert stage.warning_threshold_seconds == 7.5 and not stage.timing_is_default

    def test_warning_at_or_above_timeout_is_refused(self) -> None:
        """warning_threshold_seconds >= timeout_seconds is a definition error."""
        with pytest.raises(ValueError, match="must be below timeout_seconds"):
            WorkflowDefinition("t", [StageSpec(stage="s", handler=noop, timeout_seconds=5,
                                               warning_threshold_seconds=5)])

    @pytest.mark.parametrize("value", [0, -1, math.nan, math.inf, "10"])
    def test_non_positive_or_non_finite_timeouts_are_refused(self, value: Any) -> None:
        """Timeouts must be finite numbers > 0."""
        with pytest.raises(ValueError, match="timeout_seconds must be a finite number > 0"):
            StageSpec(stage="s", handler=noop, timeout_seconds=value)

    @pytest.mark.parametrize("name", ["", "has space", "../up", "completed", "pending",
                                      "failed"])
    def test_bad_or_reserved_stage_names_are_refused(self, name: str) -> None:
        """Stage names are identifiers and never an outcome's name."""
        with pytest.raises(ValueError, match="stage name"):
            StageSpec(stage=name, handler=noop)

    def test_max_retries_out_of_range_is_refused(self) -> None:
        """max_retries must be 0..100."""
        with pytest.raises(ValueError, match=r"max_retries must be 0\.\.100"):
            StageSpec(stage="s", handler=noop, max_retries=101)

    def test_non_callable_handler_is_refused(self) -> None:
        """The handler must be callable."""
        with pytest.raises(TypeError, match="handler must be an async function"):
            StageSpec(stage="s", handler="not a function")  # type: ignore[arg-type]


class TestDefinitionChecks:
    def test_empty_definition_is_refused(self) -> None:
        """A definition needs at least one stage."""
        with pytest.raises(ValueError, match="has no stages"):
            WorkflowDefinition("empty", [])

    def test_duplicate_stages_are_refused(self) -> None:
        """Stage names are unique within a definition."""
        with pytest.raises(ValueError, match=r"duplicate stages \['a'\]"):
            WorkflowDefinition("dup", [StageSpec(stage="a", handler=noop),
                                       StageSpec(stage="a", handler=noop)])

    def test_unknown_recovery_action_is_refused_naming_it(self) -> None:
        """A recovery action with no implementation fails at definition time, by name."""
        with pytest.raises(ValueError, match="'restart_universe' have no implementation"):
            WorkflowDefinition("r", [StageSpec(stage="s", handler=noop,
                                               recovery_actions=("check_system_health",
                                                                 "restart_universe"))])

    def test_unknown_warning_action_is_refused_naming_it(self) -> None:
        """Warning actions are checked the same way."""
        with pytest.raises(ValueError, match=r"stage 's' warning.*'page_someone'"):
            WorkflowDefinition("r", [StageSpec(stage="s", handler=noop,
                                               warning_actions=("page_someone",))])

    def test_definition_s_own_actions_are_accepted(self) -> None:
        """An action the definition implements may be named by its stages."""
        async def rebase(ctx: StageContext, error: BaseException | None) -> None:
            return None
        flow = WorkflowDefinition("r", [StageSpec(stage="s", handler=noop,
                                                  recovery_actions=("rebase",))],
                                  recovery_actions={"rebase": rebase})
        assert flow.stages[0].recovery_actions == ("rebase",)

    def test_spec_default_actions_keep_only_implemented_ones(self) -> None:
        """initialization's spec actions keep check_system_health, drop the unimplemented."""
        flow = WorkflowDefinition("r", [StageSpec(stage=WorkflowStage.INITIALIZATION,
                                                  handler=noop)])
        assert flow.stages[0].recovery_actions == ("check_system_health",)


class TestImportPath:
    def test_module_level_definition_knows_its_import_path(self) -> None:
        """A definition bound to a module-level name finds "module:NAME" by itself."""
        assert FLOW.import_path == "test_definition:FLOW"
        assert CRASH_FLOW.import_path == "crash_workflows:CRASH_FLOW"

    def test_explicit_hint_wins(self) -> None:
        """import_path_hint is used as given."""
        assert HINTED_FLOW.import_path == "somewhere.else:FLOW"

    def test_unbound_definition_has_no_import_path(self) -> None:
        """A definition made inside a function has no import path."""
        local = WorkflowDefinition("local", [StageSpec(stage="a", handler=noop)])
        assert local.import_path is None

    def test_resolve_definition_imports_by_path(self) -> None:
        """resolve_definition("crash_workflows:CRASH_FLOW") returns that very object."""
        assert resolve_definition("crash_workflows:CRASH_FLOW") is CRASH_FLOW

    @pytest.mark.parametrize(("path", "message"), [
        ("no_colon", "must look like 'package.module:NAME'"),
        ("no_such_module_xyz:FLOW", "cannot import workflow definition"),
        ("crash_workflows:NOPE", "does not name a WorkflowDefinition"),
        ("crash_workflows:ROOT", "does not name a WorkflowDefinition"),
    ])
    def test_bad_paths_give_configuration_errors(self, path: str, message: str) -> None:
        """A path that does not lead to a definition says what is wrong."""
        with pytest.raises(ConfigurationError, match=message):
            resolve_definition(path)

    async def test_resuming_an_unbound_definition_says_what_to_do(
            self, tmp_path: Path) -> None:
        """Resume of a run whose definition had no module name: ConfigurationError advice."""
        local = WorkflowDefinition("local", [StageSpec(stage="first", handler=gated),
                                             StageSpec(stage="second", handler=noop)])
        records: list[str] = []
        handler = logging.Handler()
        handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
        runtime_logger.addHandler(handler)
        try:
            async with runtime_for(tmp_path) as runtime:
                task = asyncio.create_task(runtime.run(local))
                await until_parked(1)
                await runtime.cancel(PARKED[0])
                result = await task
                assert result.status == "interrupted"
                with pytest.raises(ConfigurationError, match=(
                        "used definition 'local', which was not bound to a module-level name; "
                        r"bind it to one \(NAME = WorkflowDefinition\(...\)\)")):
                    await runtime.resume(result.workflow_id)
        finally:
            runtime_logger.removeHandler(handler)
        assert any("'local' is not bound to a module-level name" in r for r in records)

    async def test_resuming_after_the_definition_changed_is_refused(
            self, tmp_path: Path) -> None:
        """Completed stages that the definition no longer has stop the resume with a reason."""
        store = MemoryStore()
        async with runtime_for(tmp_path, store) as runtime:
            task = asyncio.create_task(runtime.run(FLOW))
            await until_parked(1)
            GATE["first"].set()
            await until_parked(2)
            await runtime.cancel(PARKED[1])
            workflow_id = (await task).workflow_id
            state = decode_document(store.documents[workflow_id], "memory")
            state["definition"] = "test_definition:OTHER_FLOW"
            store.documents[workflow_id] = encode_document(state)
            with pytest.raises(ConfigurationError, match="was the definition changed"):
                await runtime.resume(workflow_id)


class TestSharedMachine:
    async def test_one_model_per_running_workflow_removed_when_done(
            self, tmp_path: Path) -> None:
        """Five running workflows are five models on FLOW's one machine; none remain after."""
        async with runtime_for(tmp_path) as runtime:
            tasks = [asyncio.create_task(runtime.run(FLOW)) for _ in range(5)]
            await until_parked(5)
            models = FLOW._machine.models
            assert len(models) == 5
            assert sorted(m.workflow_id for m in models) == sorted(PARKED)
            assert {m.state for m in models} == {"first"}
            GATE["first"].set()
            GATE.setdefault("second", asyncio.Event()).set()
            results = await asyncio.gather(*tasks)
        assert {r.status for r in results} == {"completed"}
        assert FLOW._machine.models == []

    async def test_machine_state_is_the_stage_while_its_handler_runs(
            self, tmp_path: Path) -> None:
        """The trigger moves the model into a stage before that stage's handler starts."""
        for stage in ("first", "second"):
            GATE[stage] = asyncio.Event()
            GATE[stage].set()
        async with runtime_for(tmp_path) as runtime:
            await runtime.run(FLOW)
        assert STATES_SEEN == [("first", "first"), ("second", "second")]

    async def test_a_resumed_workflow_s_machine_is_at_its_stored_stage(
            self, tmp_path: Path) -> None:
        """Interrupted in "second", a resumed run's machine is put at "second" (not at
        pending): "first" is not run again and "second" runs with the machine there."""
        async with runtime_for(tmp_path) as runtime:
            task = asyncio.create_task(runtime.run(FLOW))
            await until_parked(1)
            GATE["first"].set()
            await until_parked(2)
            await runtime.cancel(PARKED[1])
            interrupted = await task
            assert interrupted.status == "interrupted"
            STATES_SEEN.clear()
            GATE["second"].set()
            resumed = await runtime.resume(interrupted.workflow_id)
        assert resumed.status == "completed" and resumed.resumed_from == "second"
        assert STATES_SEEN == [("second", "second")]
        assert FLOW._machine.models == []

    async def test_interrupted_workflows_leave_the_machine_too(self, tmp_path: Path) -> None:
        """A cancelled workflow's model is removed like a finished one's."""
        async with runtime_for(tmp_path) as runtime:
            tasks = [asyncio.create_task(runtime.run(FLOW)) for _ in range(3)]
            await until_parked(3)
            runtime.request_shutdown()
            results = await asyncio.gather(*tasks)
        assert {r.status for r in results} == {"interrupted"}
        assert FLOW._machine.models == []

    async def test_workflows_on_one_machine_run_their_stages_concurrently(
            self, tmp_path: Path) -> None:
        """20 workflows x 3 stages of 0.05 s take 0.15 s of virtual time, not 20 times that."""
        clock = FakeClock()
        async with clock.autojump(), runtime_for(tmp_path, clock=clock) as runtime:
            results = await asyncio.gather(*(runtime.run(NAPPING_FLOW) for _ in range(20)))
        assert {r.status for r in results} == {"completed"}
        assert clock.monotonic() == pytest.approx(0.15)
        assert NAPPING_FLOW._machine.models == []

    def test_each_definition_builds_one_machine_without_auto_transitions(self) -> None:
        """The machine has the stages as states, no to_<state> helpers, per-model queues."""
        machine = FLOW._machine
        assert {"pending", "first", "second", "completed", "failed", "timed_out", "cancelled",
                "interrupted"} <= set(machine.states)
        assert not machine.auto_transitions
        assert machine.has_queue == "model"

    async def test_a_transition_with_callbacks_takes_the_full_path(self) -> None:
        """The short path is only for transitions without callbacks or conditions: one
        with a condition and before/after callbacks still runs them, in order; a move its
        condition holds back raises instead of leaving the run where it was."""
        definition = WorkflowDefinition("guarded", [StageSpec(stage="a", handler=_noop),
                                                    StageSpec(stage="b", handler=_noop)])
        machine = definition._machine
        seen: list[str] = []
        allowed = [False]
        (into_b,) = machine.events["advance"].transitions["a"]
        into_b.add_callback("before", lambda event: seen.append(f"before {event.state.name}"))
        into_b.add_callback("after", lambda event: seen.append(f"after {event.model.state}"))
        into_b.conditions.append(AsyncCondition(lambda event: allowed[0]))
        run = WorkflowRun("workflow-20240101-000000-abcdef012345", definition_name="guarded",
                          definition_path=None, context={}, prompt_file=None, created_at=0.0)
        definition.attach(run, "a")
        with pytest.raises(InvalidTransitionError, match="cannot 'advance' from state 'a'"):
            await definition.advance(run)
        assert run.state == "a" and seen == []  # the condition held it back
        allowed[0] = True
        await definition.advance(run)
        assert run.state == "b" and seen == ["before a", "after b"]
        await definition.advance(run)  # b -> completed: no callbacks, the short path
        assert run.state == "completed"
        definition.detach(run)


async def _noop(ctx: object) -> None:
    return None


def _pair(stages: tuple[str, ...] = ("a", "b")) -> tuple[Any, AsyncMachine]:
    """A definition's machine and the stock AsyncMachine built from the same settings."""
    definition = WorkflowDefinition("paired", [StageSpec(stage=s, handler=_noop)
                                               for s in stages])
    return definition, AsyncMachine(**_machine_settings(stages))


class _StockModel:
    """A model for the stock machine, which wires its helpers onto it (a WorkflowRun has
    slots)."""

    state: str


def _model(workflow_id: str = "workflow-20240101-000000-abcdef012345") -> WorkflowRun:
    return WorkflowRun(workflow_id, definition_name="paired", definition_path=None,
                       context={}, prompt_file=None, created_at=0.0)


class TestShortPathMatchesStockMachine:
    """The runtime's machine sets states without transitions' event processing; these
    pin that it moves a model exactly as the stock AsyncMachine does."""

    async def test_every_advance_and_outcome_lands_where_the_stock_machine_does(self) -> None:
        """advance through every stage, and each outcome from pending and from each stage:
        the short path takes every move, and each ends in the stock machine's state."""
        definition, stock = _pair(("a", "b", "c"))
        machine = definition._machine
        moves = [["advance"] * 4]
        moves += [["advance"] * steps + [outcome] for steps in range(4)
                  for outcome in ("failed", "timed_out", "cancelled", "interrupted")]
        for sequence in moves:
            run, other = _model(), _StockModel()
            definition.attach(run, "pending")
            stock.add_model(other, initial="pending")
            for trigger in sequence:
                assert machine.move_now(machine.events[trigger], run), (sequence, trigger)
                assert await stock.events[trigger].trigger(other)
                assert run.state == other.state, (sequence, trigger)
            definition.detach(run)
            stock.remove_model(other)
        assert machine.models == []

    async def test_a_move_from_a_wrong_state_still_raises(self) -> None:
        """No short path for a move the machine lacks: transitions raises MachineError, as
        the stock machine does, and the definition reports it; the state is unchanged."""
        definition, stock = _pair()
        machine = definition._machine
        for state, trigger in [("completed", "advance"), ("failed", "advance"),
                               ("completed", "cancelled"), ("interrupted", "failed")]:
            run, other = _model(), _StockModel()
            machine.add_model(run, initial=state)
            stock.add_model(other, initial=state)
            assert not machine.move_now(machine.events[trigger], run)
            with pytest.raises(MachineError):
                await machine.events[trigger].trigger(run)
            with pytest.raises(MachineError):
                await stock.events[trigger].trigger(other)
            with pytest.raises(InvalidTransitionError):
                if trigger == "advance":
                    await definition.advance(run)
                else:
                    await definition.finish(run, trigger)
            assert run.state == other.state == state
            machine.remove_model(run)
            stock.remove_model(other)

    async def test_a_trigger_fired_inside_another_is_queued_as_the_stock_machine_does(
            self) -> None:
        """queued="model": a trigger fired from inside another trigger of the same model
        takes no short path; it is queued and runs once the first is done, as on the
        stock machine (both end at completed, the inner move after the outer)."""
        definition, stock = _pair()
        machine = definition._machine
        for subject, model in ((machine, _model()), (stock, _StockModel())):
            seen: list[tuple[str, object]] = []

            async def inner(event: Any, subject: Any = subject, seen: Any = seen) -> None:
                if isinstance(subject, type(machine)):
                    seen.append(("short path", subject.move_now(subject.events["advance"],
                                                                event.model)))
                seen.append(("queued", await subject.events["advance"].trigger(event.model)))
                seen.append(("state after queueing", event.model.state))

            (into_b,) = subject.events["advance"].transitions["a"]
            into_b.add_callback("after", inner)
            subject.add_model(model, initial="a")
            assert await subject.events["advance"].trigger(model)
            assert model.state == "completed"
            expected = [("queued", True), ("state after queueing", "b")]
            if subject is machine:
                expected.insert(0, ("short path", False))
            assert seen == expected
            subject.remove_model(model)

    @pytest.mark.parametrize("hook", ["prepare_event", "before_state_change",
                                      "after_state_change", "finalize_event", "on_exception"])
    async def test_a_callback_on_the_machine_takes_the_full_path(self, hook: str) -> None:
        """A callback list set on the machine sends every trigger down transitions' path,
        which runs it (the short path reads each list's attribute)."""
        definition, _ = _pair()
        machine = definition._machine
        called: list[str] = []
        setattr(machine, hook, lambda event: called.append(hook))
        run = _model()
        definition.attach(run, "pending")
        assert not machine.move_now(machine.events["advance"], run)
        await definition.advance(run)
        assert run.state == "a"
        if hook != "on_exception":  # runs only when a callback raises
            assert called == [hook]
        definition.detach(run)

    @pytest.mark.parametrize("where", ["exit", "enter", "final"])
    async def test_a_callback_on_a_state_takes_the_full_path(self, where: str) -> None:
        """on_exit of the source, on_enter of the destination, on_final of a final one:
        each takes the full path, which calls it."""
        definition, _ = _pair()
        machine = definition._machine
        called: list[str] = []
        if where == "exit":
            machine.get_state("a").add_callback("exit", lambda event: called.append(where))
        elif where == "enter":
            machine.get_state("b").add_callback("enter", lambda event: called.append(where))
        else:
            machine.get_state("b").final = True
            machine.on_final = lambda event: called.append(where)
        run = _model()
        machine.add_model(run, initial="a")
        assert not machine.move_now(machine.events["advance"], run)
        await definition.advance(run)
        assert run.state == "b" and called == [where]
        definition.detach(run)
