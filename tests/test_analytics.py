"""Performance analytics from a fake-clock run: exact durations, ratios, statuses, grade."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from workflows_for_tests import TIMED

from reliability import FakeClock, MemoryStore, Runtime, WorkflowConfiguration
from reliability._analytics import stage_statistics

# Baselines are 10 / 20 / 40 s: half, equal to, and twice the baseline.
DURATIONS = {"fetch": 5.0, "compute": 20.0, "store": 80.0}


async def run_timed(tmp_path: Path, durations: dict[str, float], count: int = 1,
                    store: MemoryStore | None = None) -> list[Any]:
    config = WorkflowConfiguration(enable_monitoring=False, enable_health_checks=False)
    clock = FakeClock()
    async with Runtime(config, tmp_path, store=store or MemoryStore(), clock=clock,
                       configure_logs=False) as runtime, clock.autojump():
        return [await runtime.run(TIMED, context={"durations": durations})
                for _ in range(count)]


async def test_report_has_exact_durations_ratios_and_statuses(tmp_path: Path) -> None:
    """Each stage's duration is its virtual sleep; ratio to baseline gives fast/normal/slow."""
    [result] = await run_timed(tmp_path, DURATIONS)
    stages = result.reliability_metrics["stage_performance"]
    assert {name: s["duration"] for name, s in stages.items()} == DURATIONS
    assert {name: s["performance_ratio"] for name, s in stages.items()} == {
        "fetch": 0.5, "compute": 1.0, "store": 2.0}
    assert {name: s["status"] for name, s in stages.items()} == {
        "fetch": "fast", "compute": "normal", "store": "slow"}
    assert result.reliability_metrics["total_duration"] == 105.0


async def test_score_and_grade_follow_from_the_stage_ratios(tmp_path: Path) -> None:
    """Scores 1, 1 and 1/2 average to 0.8333: grade B; no errors, recovery rate 1."""
    [result] = await run_timed(tmp_path, DURATIONS)
    metrics = result.reliability_metrics
    assert metrics["performance_score"] == 0.8333
    assert metrics["performance_grade"] == "B"
    assert (metrics["error_rate"], metrics["recovery_rate"]) == (0.0, 1.0)


async def test_on_baseline_everywhere_is_an_a_plus(tmp_path: Path) -> None:
    """Every stage exactly on its baseline scores 1.0, grade A+."""
    [result] = await run_timed(tmp_path, {"fetch": 10.0, "compute": 20.0, "store": 40.0})
    assert result.reliability_metrics["performance_score"] == 1.0
    assert result.reliability_metrics["performance_grade"] == "A+"


async def test_stage_statistics_across_workflows_find_the_bottleneck(tmp_path: Path) -> None:
    """Across three runs: exact percentiles per stage, and 'store' (always slow) is the
    only bottleneck."""
    store = MemoryStore()
    await run_timed(tmp_path, DURATIONS, count=3, store=store)
    # As 'workflow-manager list --stats' does: from the persisted histories.
    statistics = stage_statistics(s.state["monitoring_state"]["stage_history"]
                                  for s in await store.list_states())
    assert statistics["bottlenecks"] == ["store"]
    assert statistics["stages"]["store"] == {"runs": 3, "p50": 80.0, "p90": 80.0, "p99": 80.0,
                                             "baseline": 40.0, "slow_runs": 3}
