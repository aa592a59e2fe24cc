"""Prometheus metrics of one runtime, on a registry of its own.

``RuntimeMetrics(runtime)`` attaches a ``Telemetry`` (plain counters on the loop) and
exposes it through a custom collector, so a scrape formats what was counted and a stage
pays only for counting. Each runtime gets its own ``CollectorRegistry``: a library does
not add to the process-wide default registry unless the application asks
(``RuntimeMetrics(runtime, registry=prometheus_client.REGISTRY)``).

Names, types and labels (never a workflow ID):

- ``workflow_manager_workflows_started_total`` counter {workflow}
- ``workflow_manager_workflows_finished_total`` counter {workflow, outcome}
- ``workflow_manager_workflows_current`` gauge {workflow, state} (running, waiting_retry,
  held; queued where a store has a queue)
- ``workflow_manager_workflow_duration_seconds`` histogram {workflow, outcome}
- ``workflow_manager_stage_duration_seconds`` histogram {workflow, stage, outcome}
  (completed, failed, degraded, or retried for an attempt that is retried)
- ``workflow_manager_stage_retries_total`` counter {workflow, stage, category}
- ``workflow_manager_watchdog_events_total`` counter {workflow, stage, level}
- ``workflow_manager_stage_grade_total`` counter {workflow, stage, grade} (fast, normal or
  slow against the stage's baseline; completed stages only)
- ``workflow_manager_breaker_state`` gauge {dependency, state} (1 for the current state)
- ``workflow_manager_dependency_calls_total`` counter {dependency, outcome}
- ``workflow_manager_checkpoint_duration_seconds`` histogram (save call to durable)
- ``workflow_manager_event_loop_lag_seconds`` histogram
- ``workflow_manager_health_status`` gauge {check} (0 healthy, 1 warning, 2 critical)
- ``workflow_manager_build_info`` gauge {version}
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from importlib import metadata
from typing import TYPE_CHECKING, Any

from ._observe import Histogram, Telemetry

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric

    from ._runtime import Runtime

__all__ = ["BREAKER_STATES", "PREFIX", "MetricsServer", "RuntimeMetrics", "TelemetryCollector",
           "serve_metrics", "version"]

PREFIX = "workflow_manager_"
BREAKER_STATES = ("closed", "open", "half-open")


def version() -> str:
    try:
        return metadata.version("workflow-manager")
    except metadata.PackageNotFoundError:
        return "unknown"


class TelemetryCollector:
    """A ``prometheus_client`` collector reading a ``Telemetry`` at scrape time.

    ``extra_current`` may add ``(workflow, state) -> count`` rows the runtime does not
    know (a dashboard's view of the store: queued workflows).
    """

    def __init__(self, telemetry: Telemetry, *,
                 extra_current: Callable[[], Mapping[tuple[str, str], int]] | None = None
                 ) -> None:
        self._telemetry = telemetry
        self._extra_current = extra_current

    def describe(self) -> list[Metric]:
        return []  # no fixed set: families appear as they are counted

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        t = self._telemetry
        t.fold_running()

        def counter(name: str, doc: str, labels: list[str],
                    values: Mapping[Any, int]) -> CounterMetricFamily:
            family = CounterMetricFamily(PREFIX + name, doc, labels=labels)
            for key, value in list(values.items()):
                family.add_metric(list(key) if isinstance(key, tuple) else [key], value)
            return family

        def histogram(name: str, doc: str, labels: list[str],
                      values: Iterable[tuple[list[str], Histogram]]) -> HistogramMetricFamily:
            family = HistogramMetricFamily(PREFIX + name, doc, labels=labels)
            for label_values, hist in values:
                family.add_metric(label_values, hist.cumulative(), hist.sum)
            return family

        yield counter("workflows_started", "Workflows started (resumes included).",
                      ["workflow"], t.started)
        yield counter("workflows_finished", "Workflows ended, by result status.",
                      ["workflow", "outcome"], t.finished)
        current = GaugeMetricFamily(PREFIX + "workflows_current",
                                    "Workflows in this process now, by state.",
                                    labels=["workflow", "state"])
        counts = dict(t.current())
        if self._extra_current is not None:
            counts.update(self._extra_current())
        for (workflow, state), count in counts.items():
            current.add_metric([workflow, state], count)
        yield current
        yield histogram("workflow_duration_seconds", "Workflow run time in this process.",
                        ["workflow", "outcome"],
                        ((list(k), h) for k, h in list(t.workflow_seconds.items())))
        yield histogram("stage_duration_seconds", "Stage attempt duration.",
                        ["workflow", "stage", "outcome"],
                        ((list(k), h) for k, h in list(t.stage_seconds.items())))
        yield counter("stage_retries", "Stage retries, by error category.",
                      ["workflow", "stage", "category"], t.retries)
        yield counter("watchdog_events", "Watchdog warnings, timeouts and missed heartbeats.",
                      ["workflow", "stage", "level"], t.watchdog)
        yield counter("stage_grade", "Completed stages graded against their baseline.",
                      ["workflow", "stage", "grade"], t.grades)
        breakers = GaugeMetricFamily(PREFIX + "breaker_state",
                                     "Circuit breaker state (1 for the current one).",
                                     labels=["dependency", "state"])
        for name, state in list(t.breaker_states.items()):
            for candidate in BREAKER_STATES:
                breakers.add_metric([name, candidate], 1.0 if candidate == state else 0.0)
        yield breakers
        yield counter("dependency_calls", "Calls through a dependency's breaker, by outcome.",
                      ["dependency", "outcome"], t.dependency_calls)
        yield histogram("checkpoint_duration_seconds", "A durable save, call to durable.", [],
                        [([], t.checkpoint_seconds)])
        yield histogram("event_loop_lag_seconds", "How late the event loop woke.", [],
                        [([], t.loop_lag_seconds)])
        health = GaugeMetricFamily(PREFIX + "health_status",
                                   "Health: 0 healthy, 1 warning, 2 critical.",
                                   labels=["check"])
        for check, level in list(t.health.items()):
            health.add_metric([check], level)
        yield health
        build = GaugeMetricFamily(PREFIX + "build_info", "The running version.",
                                  labels=["version"])
        build.add_metric([version()], 1.0)
        yield build


class RuntimeMetrics:
    """A runtime's metrics: ``RuntimeMetrics(runtime).registry`` is what to serve."""

    def __init__(self, runtime: Runtime, *, registry: CollectorRegistry | None = None,
                 telemetry: Telemetry | None = None) -> None:
        from prometheus_client import CollectorRegistry

        self.telemetry = telemetry or Telemetry().attach(runtime)
        self.registry = registry if registry is not None else CollectorRegistry(
            auto_describe=False)
        self.registry.register(TelemetryCollector(self.telemetry))

    def exposition(self) -> bytes:
        """The text format a scrape gets."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class MetricsServer:
    """``/metrics`` over HTTP from a thread (prometheus_client's server); ``close`` stops it."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        from prometheus_client import start_http_server

        server, thread = start_http_server(port, addr=host, registry=registry)
        self._server = server
        self._thread: threading.Thread = thread
        self.host, self.port = host, int(server.server_address[1])

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def serve_metrics(runtime: Runtime, *, host: str = "127.0.0.1", port: int = 0,
                  telemetry: Telemetry | None = None) -> tuple[RuntimeMetrics, MetricsServer]:
    """Attach metrics to ``runtime`` and serve them at ``http://host:port/metrics``; the
    ``worker`` command, ``run`` and ``batch`` call this for ``--metrics-port``."""
    metrics = RuntimeMetrics(runtime, telemetry=telemetry)
    return metrics, MetricsServer(metrics.registry, host, port)
