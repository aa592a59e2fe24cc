"""OpenTelemetry traces: a workflow span and one stage span per attempt, opened and closed
as the work runs, with the watchdog, retry and breaker events; a resumed workflow links to
the trace it started in."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from machines import StageContext, StageSpec, WorkflowDefinition
from reliability import (
    FakeClock,
    MemoryStore,
    Runtime,
    TransientError,
    WorkflowConfiguration,
)
from reliability._tracing import TRACE_CONTEXT_KEY, enable_tracing

STOP_IN_BUILD: list[bool] = []


async def fetch(ctx: StageContext) -> dict[str, Any]:
    await ctx.sleep(1)
    return {"fetched": True}


async def build(ctx: StageContext) -> dict[str, Any]:
    if STOP_IN_BUILD:
        STOP_IN_BUILD.clear()
        await ctx.runtime.cancel(ctx.workflow_id)  # interrupted here, resumable
        await ctx.sleep(3600)
    if ctx.attempt == 1:
        await ctx.sleep(3600)  # warned at 4 s, stopped at 10 s
    return {"built": ctx.attempt}


async def guarded(ctx: StageContext) -> None:
    async def down() -> None:
        raise TransientError("503")

    if ctx.attempt == 1:
        for _ in range(2):
            with pytest.raises(TransientError):
                await ctx.breaker("forge").call(down)
        await ctx.breaker("forge").call(down)  # refused: the breaker is open


FLOW = WorkflowDefinition("traced", [
    StageSpec("fetch", fetch),
    StageSpec("build", build, timeout_seconds=10, warning_threshold_seconds=4)])
BREAKER_FLOW = WorkflowDefinition("traced-breaker", [StageSpec("guarded", guarded)])


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


def provider_for(exporter: InMemorySpanExporter) -> TracerProvider:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


def config() -> WorkflowConfiguration:
    return WorkflowConfiguration(enable_health_checks=False, retry_base_delay=0.0,
                                 circuit_breakers={"forge": {"failure_threshold": 2,
                                                             "recovery_timeout": 30.0}})


async def run_traced(tmp_path: Path, exporter: InMemorySpanExporter, flow: WorkflowDefinition,
                     store: MemoryStore | None = None, resume: str | None = None) -> Any:
    clock = FakeClock()
    async with clock.autojump(), Runtime(config(), tmp_path, clock=clock,
                                         store=store or MemoryStore(),
                                         configure_logs=False) as runtime:
        enable_tracing(runtime, provider_for(exporter))
        return await (runtime.resume(resume) if resume else runtime.run(flow))


def by_name(spans: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


async def test_spans_per_workflow_and_stage_attempt_with_watchdog_and_retry_events(
        tmp_path: Path, exporter: InMemorySpanExporter) -> None:
    """One workflow span; stage spans for fetch, build attempt 1 (retried, with the warning,
    timeout and retry events) and build attempt 2 (completed), all its children."""
    result = await run_traced(tmp_path, exporter, FLOW)
    assert result.success
    spans = exporter.get_finished_spans()
    (workflow,) = by_name(spans, "workflow traced")
    assert workflow.attributes == {"workflow.id": result.workflow_id,
                                   "workflow.name": "traced", "outcome": "completed"}
    builds = sorted(by_name(spans, "stage build"), key=lambda s: s.attributes["stage.attempt"])
    (fetched,) = by_name(spans, "stage fetch")
    assert [s.attributes["outcome"] for s in (fetched, *builds)] == [
        "completed", "retried", "completed"]
    for span in (fetched, *builds):
        assert span.parent is not None and span.parent.span_id == workflow.context.span_id
        assert span.context.trace_id == workflow.context.trace_id
        assert span.attributes["workflow.id"] == result.workflow_id
    assert builds[0].attributes["stage.name"] == "build"
    assert [e.name for e in builds[0].events] == ["watchdog.warning", "watchdog.timeout",
                                                  "retry"]
    assert builds[0].events[2].attributes["error.category"] == "transient"
    assert builds[1].events == ()


async def test_spans_start_and_end_while_the_work_runs(
        tmp_path: Path, exporter: InMemorySpanExporter) -> None:
    """During the build stage, fetch's span is finished and the workflow's is not."""
    seen: list[list[str]] = []

    async def watching(ctx: StageContext) -> None:
        seen.append([s.name for s in exporter.get_finished_spans()])

    flow = WorkflowDefinition("watched", [StageSpec("fetch", fetch),
                                          StageSpec("watch", watching)])
    await run_traced(tmp_path, exporter, flow)
    assert seen == [["stage fetch"]]
    assert [s.name for s in exporter.get_finished_spans()] == [
        "stage fetch", "stage watch", "workflow watched"]


async def test_a_breaker_rejection_is_an_event_on_the_stage_span(
        tmp_path: Path, exporter: InMemorySpanExporter) -> None:
    """A call refused by the open breaker inside a stage adds breaker.rejected to its span."""
    result = await run_traced(tmp_path, exporter, BREAKER_FLOW)
    first = min(by_name(exporter.get_finished_spans(), "stage guarded"),
                key=lambda s: s.attributes["stage.attempt"])
    rejected = [e for e in first.events if e.name == "breaker.rejected"]
    assert [e.attributes["dependency"] for e in rejected] == ["forge"]
    assert first.attributes["outcome"] == "retried" and result.success


async def test_a_resumed_workflow_links_to_the_trace_it_started_in(
        tmp_path: Path, exporter: InMemorySpanExporter) -> None:
    """Interrupted in build, resumed by another runtime: the new workflow span links to the
    first trace, whose context was kept in the stored state."""
    store = MemoryStore()
    STOP_IN_BUILD.append(True)
    first = await run_traced(tmp_path, exporter, FLOW, store=store)
    assert first.status == "interrupted"
    (original,) = by_name(exporter.get_finished_spans(), "workflow traced")
    assert original.attributes["outcome"] == "interrupted"
    stored = (await store.load(first.workflow_id)).state
    assert stored["context"][TRACE_CONTEXT_KEY].split("-")[1] == (
        f"{original.context.trace_id:032x}")
    exporter.clear()
    second = await run_traced(tmp_path, exporter, FLOW, store=store, resume=first.workflow_id)
    assert second.success
    (resumed,) = by_name(exporter.get_finished_spans(), "workflow traced")
    assert resumed.context.trace_id != original.context.trace_id
    assert [link.context.trace_id for link in resumed.links] == [original.context.trace_id]
    assert [link.context.span_id for link in resumed.links] == [original.context.span_id]
