"""Prometheus metrics: the issue's names, types and labels, counted from live events, on a
registry of the runtime's own, served over HTTP by run and batch with --metrics-port."""

from __future__ import annotations

import asyncio
import os
import re
import urllib.request
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("prometheus_client")

from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from machines import StageContext, StageSpec, WorkflowDefinition
from reliability import FakeClock, MemoryStore, Runtime, WorkflowConfiguration
from reliability._errors import TransientError
from reliability._metrics import RuntimeMetrics, serve_metrics
from reliability._observe import SAVE_SAMPLE_SECONDS

HANG_FIRST: list[bool] = []


async def fetch(ctx: StageContext) -> dict[str, Any]:
    await ctx.sleep(0.3)
    return {"fetched": True}


async def build(ctx: StageContext) -> dict[str, Any]:
    if ctx.attempt == 1 and HANG_FIRST:
        await ctx.sleep(3600)
    return {"built": ctx.attempt}


async def flaky(ctx: StageContext) -> None:
    if ctx.attempt == 1:
        raise TransientError("the forge answered 503")


FLOW = WorkflowDefinition("metered", [
    StageSpec("fetch", fetch, baseline_seconds=1.0),
    StageSpec("build", build, timeout_seconds=10, warning_threshold_seconds=4),
    StageSpec("flaky", flaky)])


def families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v
                                           for k, v in labels.items()):
                return float(sample.value)
    raise AssertionError(f"no sample {name} {labels} in:\n{text}")


async def run_flow(tmp_path: Path, hang: bool) -> tuple[str, str]:
    HANG_FIRST[:] = [True] if hang else []
    clock = FakeClock()
    config = WorkflowConfiguration(enable_health_checks=False, retry_base_delay=0.0)
    async with clock.autojump(), Runtime(config, tmp_path, clock=clock, store=MemoryStore(),
                                         configure_logs=False) as runtime:
        metrics = RuntimeMetrics(runtime)
        result = await runtime.run(FLOW)
        await asyncio.sleep(0)  # the last save's done-callback
        return result.workflow_id, metrics.exposition().decode()


async def test_a_run_is_counted_under_the_issues_names_types_and_labels(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Started/finished, stage durations by outcome, a retry by category, the watchdog's
    warning and timeout, grades and checkpoints: each family with its type and labels."""
    monkeypatch.setattr("reliability._observe.SAVE_SAMPLE_SECONDS", 0.0)  # each iteration
    workflow_id, text = await run_flow(tmp_path, hang=True)
    found = families(text)
    expected = {
        "workflow_manager_workflows_started": ("counter", {"workflow"}),
        "workflow_manager_workflows_finished": ("counter", {"workflow", "outcome"}),
        "workflow_manager_workflow_duration_seconds": ("histogram", {"workflow", "outcome"}),
        "workflow_manager_stage_duration_seconds": ("histogram",
                                                    {"workflow", "stage", "outcome"}),
        "workflow_manager_stage_retries": ("counter", {"workflow", "stage", "category"}),
        "workflow_manager_watchdog_events": ("counter", {"workflow", "stage", "level"}),
        "workflow_manager_stage_grade": ("counter", {"workflow", "stage", "grade"}),
        "workflow_manager_checkpoint_duration_seconds": ("histogram", set()),
        "workflow_manager_build_info": ("gauge", {"version"}),
    }
    for name, (kind, labels) in expected.items():
        assert found[name].type == kind, name
        sample_labels = {k for s in found[name].samples for k in s.labels if k != "le"}
        assert sample_labels == labels, name
    assert workflow_id not in text  # IDs are never labels
    assert value(text, "workflow_manager_workflows_started_total", workflow="metered") == 1
    assert value(text, "workflow_manager_workflows_finished_total", workflow="metered",
                 outcome="completed") == 1
    assert value(text, "workflow_manager_stage_duration_seconds_count", workflow="metered",
                 stage="build", outcome="retried") == 1
    assert value(text, "workflow_manager_stage_duration_seconds_sum", workflow="metered",
                 stage="build", outcome="retried") == 10.0  # cancelled at its timeout
    assert value(text, "workflow_manager_stage_duration_seconds_sum", workflow="metered",
                 stage="fetch", outcome="completed") == pytest.approx(0.3)
    assert value(text, "workflow_manager_stage_retries_total", workflow="metered",
                 stage="build", category="transient") == 1
    assert value(text, "workflow_manager_stage_retries_total", workflow="metered",
                 stage="flaky", category="transient") == 1
    for level in ("warning", "timeout"):
        assert value(text, "workflow_manager_watchdog_events_total", workflow="metered",
                     stage="build", level=level) == 1
    assert value(text, "workflow_manager_stage_grade_total", workflow="metered",
                 stage="fetch", grade="fast") == 1  # 0.3 s against a 1 s baseline
    assert value(text, "workflow_manager_checkpoint_duration_seconds_count") >= 3
    assert value(text, "workflow_manager_workflow_duration_seconds_count", workflow="metered",
                 outcome="completed") == 1


async def test_one_save_per_sample_period_is_timed(tmp_path: Path) -> None:
    """Checkpoint timing samples: of 32 saves queued at once one is timed; the next save
    after the sample period is timed again, and the store's own method is back between."""
    async with Runtime(WorkflowConfiguration(enable_health_checks=False), tmp_path,
                       store=MemoryStore(), configure_logs=False) as runtime:
        metrics = RuntimeMetrics(runtime)
        await asyncio.gather(*(runtime.store.save("wf-1", dict) for _ in range(32)))
        assert metrics.telemetry.checkpoint_seconds.count == 1
        assert "save_nowait" not in vars(runtime.store)  # unwrapped until the next sample
        await asyncio.sleep(SAVE_SAMPLE_SECONDS * 1.5)  # the re-arm timer is due first
        await asyncio.gather(*(runtime.store.save("wf-1", dict) for _ in range(32)))
    assert metrics.telemetry.checkpoint_seconds.count == 2


async def test_a_scrape_counts_the_stages_a_running_workflow_has_finished(
        tmp_path: Path) -> None:
    """Stage metrics are live: while a workflow waits in its second stage, a scrape shows
    its first stage completed, and the end adds the rest exactly once."""
    entered, release = asyncio.Event(), asyncio.Event()

    async def hold(ctx: StageContext) -> None:
        entered.set()
        await release.wait()

    flow = WorkflowDefinition("held", [StageSpec("first", fetch), StageSpec("second", hold)])
    async with Runtime(WorkflowConfiguration(enable_health_checks=False), tmp_path,
                       store=MemoryStore(), configure_logs=False) as runtime:
        metrics = RuntimeMetrics(runtime)
        running = asyncio.ensure_future(runtime.run(flow))
        await entered.wait()
        during = metrics.exposition().decode()
        again = metrics.exposition().decode()
        release.set()
        await running
        after = metrics.exposition().decode()
    for text in (during, again):
        assert value(text, "workflow_manager_stage_duration_seconds_count", workflow="held",
                     stage="first", outcome="completed") == 1
        assert value(text, "workflow_manager_workflows_current", workflow="held",
                     state="running") == 1
        assert 'stage="second"' not in text
    assert value(after, "workflow_manager_stage_duration_seconds_count", workflow="held",
                 stage="first", outcome="completed") == 1
    assert value(after, "workflow_manager_stage_duration_seconds_count", workflow="held",
                 stage="second", outcome="completed") == 1


async def test_a_run_without_trouble_counts_no_retry_and_no_watchdog_event(
        tmp_path: Path) -> None:
    """The counters follow events, not the definition: no hang, no warning or timeout."""
    _, text = await run_flow(tmp_path, hang=False)
    assert "workflow_manager_watchdog_events_total{" not in text
    assert "stage=\"build\",category" not in text


async def test_metrics_live_on_the_runtimes_own_registry(tmp_path: Path) -> None:
    """Nothing is added to prometheus_client's process-wide default registry."""
    await run_flow(tmp_path, hang=False)
    assert not [n for n in REGISTRY._names_to_collectors if n.startswith("workflow_manager")]


async def test_breaker_state_and_dependency_outcomes_follow_an_outage(tmp_path: Path) -> None:
    """Failures open the breaker (gauge open=1), calls are refused while open, a good probe
    closes it again; each call's outcome is counted."""
    clock = FakeClock()
    config = WorkflowConfiguration(enable_health_checks=False, circuit_breakers={
        "forge": {"failure_threshold": 2, "recovery_timeout": 5.0}})
    async with clock.autojump(), Runtime(config, tmp_path, clock=clock, store=MemoryStore(),
                                         configure_logs=False) as runtime:
        metrics = RuntimeMetrics(runtime)
        breaker = runtime.breaker("forge")

        async def down() -> None:
            raise TransientError("503")

        async def up() -> str:
            return "ok"

        for _ in range(2):
            with pytest.raises(TransientError):
                await breaker.call(down)
        text = metrics.exposition().decode()
        assert value(text, "workflow_manager_breaker_state", dependency="forge",
                     state="open") == 1
        assert value(text, "workflow_manager_breaker_state", dependency="forge",
                     state="closed") == 0
        with pytest.raises(Exception, match="open"):
            await breaker.call(up)
        await clock.sleep(5.0)
        assert await breaker.call(up) == "ok"
        text = metrics.exposition().decode()
    assert value(text, "workflow_manager_breaker_state", dependency="forge", state="closed") == 1
    assert value(text, "workflow_manager_dependency_calls_total", dependency="forge",
                 outcome="error") == 2
    assert value(text, "workflow_manager_dependency_calls_total", dependency="forge",
                 outcome="rejected") == 1
    assert value(text, "workflow_manager_dependency_calls_total", dependency="forge",
                 outcome="ok") == 1


async def test_health_and_loop_lag_are_exposed(tmp_path: Path) -> None:
    """A health check sets the health gauge per check; the loop-lag monitor's samples fill
    the lag histogram."""
    config = WorkflowConfiguration(enable_health_checks=False, enable_monitoring=True)
    async with Runtime(config, tmp_path, store=MemoryStore(), configure_logs=False) as runtime:
        metrics = RuntimeMetrics(runtime)
        lagged = asyncio.Event()
        runtime.add_runtime_listener(lambda event, **_: lagged.set() if event == "loop_lag"
                                     else None)
        runtime.register_health_check(lambda _id: {"status": "CRITICAL"})
        await runtime.perform_health_check()
        await lagged.wait()
        text = metrics.exposition().decode()
    assert value(text, "workflow_manager_health_status", check="<lambda>") == 2
    assert value(text, "workflow_manager_health_status", check="system") == 2
    assert value(text, "workflow_manager_event_loop_lag_seconds_count") >= 1


async def test_metrics_are_served_over_http(tmp_path: Path) -> None:
    """serve_metrics answers GET /metrics on loopback in the exposition format."""
    async with Runtime(WorkflowConfiguration(enable_health_checks=False), tmp_path,
                       store=MemoryStore(), configure_logs=False) as runtime:
        _, server = serve_metrics(runtime, port=0)
        try:
            body = await asyncio.to_thread(
                lambda: urllib.request.urlopen(
                    f"http://127.0.0.1:{server.port}/metrics", timeout=10).read().decode())
        finally:
            server.close()
    assert re.search(r'^workflow_manager_build_info\{version="[^"]+"\} 1\.0$', body, re.M)


def test_run_batch_and_worker_take_the_metrics_options() -> None:
    """--metrics-port/--metrics-host parse on run, batch and worker; the host defaults to
    loopback."""
    from reliability._cli import build_parser

    parser = build_parser()
    run = parser.parse_args(["run", "p.md", "--metrics-port", "9464"])
    batch = parser.parse_args(["batch", "d", "--metrics-port", "0", "--metrics-host", "::"])
    worker = parser.parse_args(["worker", "--metrics-port", "9465"])
    assert (run.metrics_port, run.metrics_host) == (9464, "127.0.0.1")
    assert (batch.metrics_port, batch.metrics_host) == (0, "::")
    assert (worker.metrics_port, worker.metrics_host) == (9465, "127.0.0.1")
    with pytest.raises(SystemExit):
        parser.parse_args(["list", "--metrics-port", "1"])


async def test_commands_serve_metrics_and_publish_their_live_view(tmp_path: Path) -> None:
    """What run/batch/resume do (observed): /metrics over HTTP counts the workflow; the
    runtime file shows it running with its breaker, and stays marked stopped after."""
    import argparse
    import json

    from reliability._cli import observed
    from reliability._observe import runtime_directory

    entered, release = asyncio.Event(), asyncio.Event()

    async def hold(ctx: StageContext) -> None:
        ctx.breaker("forge")
        entered.set()
        await release.wait()

    flow = WorkflowDefinition("observed", [StageSpec("hold", hold)])
    args = argparse.Namespace(metrics_port=0, metrics_host="127.0.0.1")
    async with Runtime(WorkflowConfiguration(enable_health_checks=False), tmp_path,
                       store=MemoryStore(), configure_logs=False) as runtime:
        path = runtime_directory(runtime) / f"runtime-{os.getpid()}.json"
        async with observed(runtime, args) as server:
            assert server is not None
            running = asyncio.ensure_future(runtime.run(flow))
            await entered.wait()
            # Written by the publisher's task (each second): a file has no event to await.
            while not path.exists() or '"observed"' not in path.read_text():  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            live = json.loads(path.read_text())
            release.set()
            await running
            body = await asyncio.to_thread(lambda: urllib.request.urlopen(
                f"http://127.0.0.1:{server.port}/metrics", timeout=10).read().decode())
        ended = json.loads(path.read_text())
    (view,) = live["workflows"].values()
    assert (view["stage"], view["definition_name"]) == ("hold", "observed")
    assert live["breakers"]["forge"]["state"] == "closed"
    assert value(body, "workflow_manager_workflows_finished_total", workflow="observed",
                 outcome="completed") == 1
    assert ended["stopped"] is True and ended["workflows"] == {}
    assert oct(path.stat().st_mode & 0o777) == "0o600"
