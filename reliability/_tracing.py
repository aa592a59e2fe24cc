"""OpenTelemetry traces of workflows and stage attempts (the optional ``[otel]`` extra).

``enable_tracing(runtime)`` listens to the runtime's events and keeps spans open while the
work they describe runs: ``workflow <name>`` from start to end in this process, and one
``stage <stage>`` span per attempt, its child. Attributes: ``workflow.id``,
``workflow.name``, ``stage.name``, ``stage.attempt``, ``outcome``. Span events: the
watchdog's warning threshold (``watchdog.warning``; ``watchdog.timeout`` and
``watchdog.heartbeat`` when it stops a stage), ``retry`` (with the delay and error
category) and ``breaker.rejected`` (a call refused by an open breaker).

A workflow remembers the trace it started in: its first span's ``traceparent`` is kept in
its context (``otel_traceparent``) and so in its stored state. A resumed workflow starts a
new trace whose workflow span links to that one, so a trace viewer joins the two.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ._logging import workflow_id_var

if TYPE_CHECKING:
    from opentelemetry.trace import Span, TracerProvider

    from ._runtime import Runtime
    from ._state import WorkflowRun

__all__ = ["TRACE_CONTEXT_KEY", "Tracing", "enable_tracing"]

TRACE_CONTEXT_KEY = "otel_traceparent"  # in the workflow's context: the trace it started in


def enable_tracing(runtime: Runtime, tracer_provider: TracerProvider | None = None) -> Tracing:
    """Trace ``runtime``'s workflows with ``tracer_provider`` (default: the global one the
    application configured). Needs ``pip install workflow-manager[otel]``."""
    tracing = Tracing(tracer_provider)
    runtime.add_listener(tracing.on_event)
    runtime.add_runtime_listener(tracing.on_runtime_event)
    return tracing


class Tracing:
    """The open spans of one runtime's workflows, driven by its events."""

    def __init__(self, tracer_provider: TracerProvider | None = None) -> None:
        from opentelemetry import trace

        from ._metrics import version

        self._trace = trace
        self._tracer = trace.get_tracer("workflow_manager", version(),
                                        tracer_provider=tracer_provider)
        self._workflows: dict[str, Span] = {}
        self._stages: dict[str, Span] = {}

    def on_event(self, event: str, run: WorkflowRun, **data: Any) -> None:
        if event == "stage":
            self._start_stage(run, data["stage"], data["attempt"])
        elif event == "stage_end":
            entry: Mapping[str, Any] = data["entry"]
            self._end_stage(run.workflow_id, str(entry["status"]))
        elif event == "retry":
            span = self._stages.get(run.workflow_id)
            if span is not None:
                category = str(run.errors[-1].get("category")) if run.errors else "unknown"
                span.add_event("retry", {"stage.attempt": int(data["attempt"]),
                                         "retry.delay_seconds": float(data["delay"]),
                                         "error.category": category})
            self._end_stage(run.workflow_id, "retried")
        elif event == "watchdog":
            span = self._stages.get(run.workflow_id)
            if span is not None:
                span.add_event(f"watchdog.{data['level']}", {"stage.name": data["stage"]})
        elif event == "started":
            self._start_workflow(run)
        elif event == "finished":
            self._end_stage(run.workflow_id, run.status)
            span = self._workflows.pop(run.workflow_id, None)
            if span is not None:
                span.set_attribute("outcome", run.status)
                if run.status not in ("completed", "interrupted"):
                    span.set_status(self._trace.Status(self._trace.StatusCode.ERROR,
                                                       run.error or run.status))
                span.end()

    def on_runtime_event(self, event: str, **data: Any) -> None:
        if event != "dependency_call" or data.get("outcome") != "rejected":
            return
        span = self._stages.get(workflow_id_var.get() or "")
        if span is not None:  # the refused call was made inside that stage's task
            span.add_event("breaker.rejected", {"dependency": str(data["dependency"])})

    def _start_workflow(self, run: WorkflowRun) -> None:
        from opentelemetry.trace import Link
        from opentelemetry.trace.propagation.tracecontext import (
            TraceContextTextMapPropagator,
        )

        propagator = TraceContextTextMapPropagator()
        links = []
        earlier = run.context.get(TRACE_CONTEXT_KEY)
        if isinstance(earlier, str):
            parent = self._trace.get_current_span(propagator.extract({"traceparent": earlier}))
            if parent.get_span_context().is_valid:
                links.append(Link(parent.get_span_context(), {"link.kind": "resumed_from"}))
        span = self._tracer.start_span(
            f"workflow {run.definition_name}", context=self._trace.set_span_in_context(
                self._trace.INVALID_SPAN), links=links,
            attributes={"workflow.id": run.workflow_id, "workflow.name": run.definition_name})
        if run.resumed_from:
            span.set_attribute("workflow.resumed_from", run.resumed_from)
        self._workflows[run.workflow_id] = span
        if not links:
            carrier: dict[str, str] = {}
            propagator.inject(carrier, self._trace.set_span_in_context(span))
            run.context[TRACE_CONTEXT_KEY] = carrier["traceparent"]

    def _start_stage(self, run: WorkflowRun, stage: str, attempt: int) -> None:
        self._end_stage(run.workflow_id, "abandoned")  # never left open by a missed event
        parent = self._workflows.get(run.workflow_id)
        context = self._trace.set_span_in_context(parent) if parent is not None else None
        self._stages[run.workflow_id] = self._tracer.start_span(
            f"stage {stage}", context=context,
            attributes={"workflow.id": run.workflow_id, "workflow.name": run.definition_name,
                        "stage.name": stage, "stage.attempt": attempt})

    def _end_stage(self, workflow_id: str, outcome: str) -> None:
        span = self._stages.pop(workflow_id, None)
        if span is None:
            return
        span.set_attribute("outcome", outcome)
        if outcome in ("failed", "timed_out"):
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, outcome))
        span.end()
