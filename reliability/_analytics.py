"""Performance analytics: the spec's ``PerformanceReport`` from a workflow's stage history.

Pure functions of recorded durations and baselines, so a report is reproducible from the
persisted state alone (from a fresh process too) and testable on a fake clock.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["grade", "performance_report", "stage_statistics", "stage_status"]

_FAST, _SLOW = 0.8, 1.2  # ratio to baseline below/above which a stage is fast/slow
_GRADES = ((0.97, "A+"), (0.93, "A"), (0.90, "A-"), (0.87, "B+"), (0.83, "B"), (0.80, "B-"),
           (0.77, "C+"), (0.73, "C"), (0.70, "C-"), (0.60, "D"))


def stage_status(ratio: float) -> str:
    return "fast" if ratio < _FAST else "slow" if ratio > _SLOW else "normal"


def grade(score: float) -> str:
    """Letter grade A+ .. F for a score in 0..1."""
    for threshold, letter in _GRADES:
        if score >= threshold:
            return letter
    return "F"


def _stage_score(ratio: float) -> float:
    # At or under baseline scores 1; twice the baseline scores 0.5; it never goes negative.
    return 1.0 if ratio <= 1.0 else 1.0 / ratio


def performance_report(history: Iterable[Mapping[str, Any]], *, error_count: int,
                       recovery_attempts: int, recovery_successes: int,
                       attempts: int) -> dict[str, Any]:
    """The spec's report: per-stage duration vs baseline, score, grade, error and recovery rates.

    ``history`` holds one entry per finished stage with ``stage``, ``duration``,
    ``baseline`` and ``status``; ``attempts`` counts every stage attempt made.
    """
    stages: dict[str, dict[str, Any]] = {}
    total = 0.0
    scores: list[float] = []
    # Runs once per finished workflow over its whole history (19 entries for the spec's
    # workflow): the status and score inlined, each key read once, float() only where the
    # value is not a float already (a stored state's integer duration).
    for entry in history:
        get = entry.get
        duration = get("duration") or 0.0
        if type(duration) is not float:
            duration = float(duration)
        baseline = get("baseline") or 0.0
        if type(baseline) is not float:
            baseline = float(baseline)
        total += duration
        ratio = duration / baseline if baseline > 0 else 0.0
        status = get("status")
        if status == "completed":
            shown = "fast" if ratio < _FAST else "slow" if ratio > _SLOW else "normal"
            scores.append(1.0 if ratio <= 1.0 else 1.0 / ratio)  # _stage_score
        else:
            shown = str(status)
            scores.append(0.5)
        stages[str(entry["stage"])] = {
            "duration": round(duration, 6),
            "baseline": baseline,
            "performance_ratio": round(ratio, 4),
            "status": shown,
            "attempts": get("attempts", 1),
        }
    error_rate = error_count / attempts if attempts else 0.0
    recovery_rate = recovery_successes / recovery_attempts if recovery_attempts else 1.0
    speed = sum(scores) / len(scores) if scores else 1.0
    score = max(0.0, min(1.0, speed * (1.0 - 0.5 * min(1.0, error_rate))))
    return {
        "total_duration": round(total, 6),
        "stage_performance": stages,
        "performance_score": round(score, 4),
        "performance_grade": grade(score),
        "error_rate": round(error_rate, 4),
        "recovery_rate": round(recovery_rate, 4),
    }


def _percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, max(0, round(fraction * (len(sorted_values) - 1))))
    return sorted_values[index]


def stage_statistics(histories: Iterable[Iterable[Mapping[str, Any]]]) -> dict[str, Any]:
    """Across workflows: per-stage p50/p90/p99 durations and the stages that are bottlenecks.

    A bottleneck is a stage slower than its baseline in more than half of its runs.
    """
    durations: dict[str, list[float]] = {}
    slow: dict[str, int] = {}
    baselines: dict[str, float] = {}
    for history in histories:
        for entry in history:
            if entry.get("status") != "completed":
                continue
            name = str(entry["stage"])
            duration = float(entry.get("duration") or 0.0)
            baseline = float(entry.get("baseline") or 0.0)
            durations.setdefault(name, []).append(duration)
            baselines[name] = baseline
            if baseline > 0 and duration / baseline > _SLOW:
                slow[name] = slow.get(name, 0) + 1
    stats: dict[str, Any] = {}
    for name, values in durations.items():
        values.sort()
        stats[name] = {"runs": len(values), "p50": _percentile(values, 0.5),
                       "p90": _percentile(values, 0.9), "p99": _percentile(values, 0.99),
                       "baseline": baselines[name], "slow_runs": slow.get(name, 0)}
    bottlenecks = sorted((n for n, s in stats.items() if s["slow_runs"] * 2 > s["runs"]),
                         key=lambda n: -stats[n]["p50"])
    return {"stages": stats, "bottlenecks": bottlenecks}
