"""Health checks: one cheap sampler per runtime, plus checks workflows and users register.

Sampling never blocks the loop (docs/architecture.md, invariant 5):
``psutil.cpu_percent(interval=None)`` compares against the previous call (primed at
start, so the first real reading is not 0.0), memory and disk are single syscalls, and a
sample is reused for ``min_interval`` seconds so thousands of workflows asking at once
cost one reading.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import psutil

from ._clock import Clock

__all__ = ["HealthCheckFunction", "HealthSampler", "HealthStatus", "SystemHealthCheck",
           "assess", "assess_loop_lag", "worst"]


class HealthStatus(StrEnum):
    HEALTHY = "HEALTHY"
    WARNING = "WARNING"
    DEGRADED = "DEGRADED"
    CRITICAL = "CRITICAL"
    FAILED = "FAILED"

    def __str__(self) -> str:
        return self.value


# Rank and value by status, looked up in a dict: every stage's health check merges two
# statuses and records one (``list.index`` and the enum's ``value`` property cost ~1 us
# each there).
_RANK = {status: rank for rank, status in enumerate(HealthStatus)}
_VALUE = {status: status.value for status in HealthStatus}


def worst(*statuses: HealthStatus) -> HealthStatus:
    if len(statuses) == 2:  # the common case, without max()'s machinery
        first, second = statuses
        return second if _RANK[second] > _RANK[first] else first
    return max(statuses, key=_RANK.__getitem__, default=HealthStatus.HEALTHY)


HealthCheckFunction = Callable[[str | None], "Mapping[str, Any] | Awaitable[Mapping[str, Any]]"]


@dataclass(frozen=True, slots=True)
class SystemHealthCheck:
    """The health result. ``custom`` holds what each registered check reported, by the
    check's name (a workflow package's own probes: its services, tools, repository).

    ``timestamp`` is when the result was built (wall clock): with no registered checks
    one result is shared by every check within a resource sample's ``min_interval`` (and
    the same loop lag), so it says when the readings were taken, not when a given stage
    asked. With registered checks each call builds its own."""

    status: HealthStatus
    cpu_usage: float
    memory_usage: float
    disk_usage: float
    recommendations: tuple[str, ...] = ()
    timestamp: float = 0.0
    loop_lag_ms: float | None = None
    custom: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"status": _VALUE[self.status], "cpu_usage": self.cpu_usage,
                "memory_usage": self.memory_usage, "disk_usage": self.disk_usage,
                "recommendations": list(self.recommendations), "timestamp": self.timestamp,
                "loop_lag_ms": self.loop_lag_ms, "custom": dict(self.custom)}


@dataclass(frozen=True, slots=True)
class _Sample:
    at: float
    cpu: float
    memory: float
    disk: float


class HealthSampler:
    """Resource readings shared by every workflow of a runtime."""

    def __init__(self, disk_path: Path, clock: Clock, *, min_interval: float = 1.0) -> None:
        self._disk_path = disk_path
        self._clock = clock
        self._min_interval = min_interval
        self._last: _Sample | None = None
        self._assessment: tuple[_Sample, HealthStatus, tuple[str, ...]] | None = None
        psutil.cpu_percent(interval=None)  # prime: the next call measures since now

    def assessed(self) -> tuple[_Sample, HealthStatus, list[str]]:
        """``sample()`` and what ``assess`` makes of it, worked out once per sample (every
        stage's health check within ``min_interval`` shares one); the advice is a new
        list each call, for the caller to extend."""
        sample = self.sample()
        cached = self._assessment
        if cached is None or cached[0] is not sample:
            status, advice = assess(sample)
            cached = self._assessment = (sample, status, tuple(advice))
        return sample, cached[1], list(cached[2])

    def sample(self) -> _Sample:
        now = self._clock.monotonic()
        last = self._last
        if last is not None and now - last.at < self._min_interval:
            return last
        try:
            disk = psutil.disk_usage(str(self._disk_path)).percent
        except OSError:
            disk = 0.0
        self._last = _Sample(now, psutil.cpu_percent(interval=None),
                             psutil.virtual_memory().percent, disk)
        return self._last


def assess(sample: _Sample) -> tuple[HealthStatus, list[str]]:
    """The status the resource readings alone give, with what to do about them."""
    status = HealthStatus.HEALTHY
    advice: list[str] = []
    if sample.memory >= 97:
        status = worst(status, HealthStatus.CRITICAL)
        advice.append("Free up memory or restart services")
    elif sample.memory >= 90:
        status = worst(status, HealthStatus.DEGRADED)
        advice.append("Memory is short: lower --concurrency")
    if sample.disk >= 98:
        status = worst(status, HealthStatus.CRITICAL)
        advice.append("Free disk space: checkpoints cannot be written when it is full")
    elif sample.disk >= 90:
        status = worst(status, HealthStatus.DEGRADED)
        advice.append("Disk is nearly full: free space before it stops checkpoints")
    if sample.cpu >= 95:
        status = worst(status, HealthStatus.WARNING)
        advice.append("CPU is saturated: stages will run slower than their baselines")
    return status, advice


async def run_custom_check(check: HealthCheckFunction,
                           workflow_id: str | None) -> Mapping[str, Any]:
    answer = check(workflow_id)
    if inspect.isawaitable(answer):
        answer = await answer
    if not isinstance(answer, Mapping):
        raise TypeError(f"health check {getattr(check, '__name__', check)!r} returned "
                        f"{type(answer).__name__}, not a mapping with a 'status'")
    return answer


def parse_status(value: object) -> HealthStatus:
    try:
        return HealthStatus(str(value).upper())
    except ValueError:
        return HealthStatus.WARNING


def assess_loop_lag(lag_ms: float | None) -> tuple[HealthStatus, list[str]]:
    """The status the event loop's lag (p99, milliseconds) gives: blocking code is a defect."""
    if lag_ms is None or lag_ms < 250:
        return HealthStatus.HEALTHY, []
    status = HealthStatus.DEGRADED if lag_ms >= 1000 else HealthStatus.WARNING
    return status, [f"Event loop lag p99 is {lag_ms:.0f} ms: a handler blocks the loop (see the "
                    "'Event loop blocked' warning in the log); move blocking calls to "
                    "asyncio.to_thread or a subprocess"]
