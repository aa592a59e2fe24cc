"""The benchmark harness: ``--quick --json`` runs and writes a well-formed document.

Only the output's shape is pinned (figures, rows, finite metrics), never a measured value:
timing assertions belong to the benchmarks themselves, not to tests. The runs here pass
``--no-wait-idle``: the harness otherwise waits for idle CPUs before each figure, which a
busy machine (or another test run) never gives it.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import benchmarks._cli
import benchmarks._measure
import benchmarks._overhead
from benchmarks import FIGURES
from benchmarks._measure import settle
from benchmarks._plan import Plan
from benchmarks._results import Figure
from benchmarks._workloads import Peer

ROOT = Path(__file__).resolve().parent.parent
FIGURE_KEYS = set(FIGURES)
META_KEYS = {"started_at", "python", "implementation", "cores", "platform", "plan", "seconds",
             "packages"}


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "benchmarks", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=110, check=False)


@pytest.fixture(scope="module")
def quick_document(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One ``--quick --json`` run, shared by the shape tests below (it takes seconds)."""
    directory = tmp_path_factory.mktemp("bench")
    output = directory / "quick.json"
    result = _run("--quick", "--no-wait-idle", "--json", str(output), "--scratch",
                  str(directory), cwd=ROOT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    document: dict[str, Any] = json.loads(output.read_text())
    return document


def test_quick_run_reports_machine_and_python(quick_document: dict[str, Any]) -> None:
    """The document says which machine and interpreter produced the numbers."""
    meta = quick_document["meta"]
    assert set(meta) >= META_KEYS
    assert isinstance(meta["cores"], int) and meta["cores"] >= 1
    assert meta["python"].count(".") == 2
    assert meta["plan"]["quick"] is True
    assert meta["plan"]["wait_idle"] is False


def test_quick_run_has_every_figure_in_order(quick_document: dict[str, Any]) -> None:
    """Every figure appears once, in the issue's order, run or skipped with a reason."""
    keys = [figure["key"] for figure in quick_document["figures"]]
    assert keys == list(FIGURES)
    for figure in quick_document["figures"]:
        assert {"key", "title", "rows", "skipped", "seconds", "notes"} <= set(figure)
        assert figure["skipped"] is None or figure["skipped"].strip()
        if figure["skipped"] is None:
            assert figure["rows"], figure["key"]


def test_every_metric_is_a_finite_number_with_a_unit(quick_document: dict[str, Any]) -> None:
    """Rows carry finite numbers (JSON has no NaN) or say why they were skipped."""
    for figure in quick_document["figures"]:
        for row in figure["rows"]:
            assert {"key", "label", "metrics", "targets", "skipped"} <= set(row)
            assert row["metrics"] or row["skipped"], (figure["key"], row["key"])
            for name, metric in row["metrics"].items():
                value = metric["value"]
                assert isinstance(value, (int, float)) and not isinstance(value, bool), name
                assert math.isfinite(value), (figure["key"], row["key"], name)
                assert isinstance(metric["unit"], str)
                assert isinstance(metric["higher_is_better"], bool)
            for target in row["targets"]:
                assert target["metric"] in row["metrics"]
                assert target["met"] in (True, False)


def test_throughput_has_reference_and_store_rows(quick_document: dict[str, Any]) -> None:
    """Throughput separates the disk floor, bare asyncio, triggers only, MemoryStore and
    FileStore."""
    figure = next(f for f in quick_document["figures"] if f["key"] == "throughput")
    prefixes = {row["key"].split("-")[0] for row in figure["rows"]}
    assert prefixes == {"disk", "bare", "transitions", "memory", "file"}
    for row in figure["rows"]:
        if row["key"].startswith(("memory", "file")):
            assert {"rate", "checkpoint_p50", "checkpoint_p99", "lag_p99"} <= set(row["metrics"])


def test_overhead_rows_carry_the_loop_s_cpu_and_the_machine_s_wake_cost(
        quick_document: dict[str, Any]) -> None:
    """Each overhead row says what the loop thread spent per stage (so a wall-time gap can
    be told from waiting), with one workflow also measured hot, and the machine's cost of
    waking from idle is measured beside them."""
    figure = next(f for f in quick_document["figures"] if f["key"] == "overhead")
    rows = {row["key"]: row["metrics"] for row in figure["rows"]}
    timed = [key for key in rows if key not in ("idle-wake",) and not key.endswith("-hot")]
    assert {"bare", "engine", "all", "all-overlapped", "all-1", "all-overlapped-1"} <= set(timed)
    for key in timed:
        assert rows[key]["loop_cpu"]["value"] > 0, key
    assert {"engine-1-hot", "all-1-hot", "all-overlapped-1-hot"} <= set(rows)
    assert all(rows[key]["loop_cpu"]["unit"] == "us/stage" for key in rows if key != "idle-wake")
    wake = rows["idle-wake"]
    assert wake["hot"]["value"] > 0 and wake["after_idle"]["value"] > 0
    assert wake["ratio"]["value"] == pytest.approx(
        wake["after_idle"]["value"] / wake["hot"]["value"])


def test_compare_prints_a_ratio_per_metric(quick_document: dict[str, Any],
                                           tmp_path: Path) -> None:
    """``compare OLD NEW`` of a document with itself reads every metric as the same."""
    path = tmp_path / "results.json"
    path.write_text(json.dumps(quick_document))
    result = _run("compare", str(path), str(path), cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "1.00x" in result.stdout
    assert "worse" not in result.stdout


def test_workflow_manager_bench_is_the_harness(quick_document: dict[str, Any],
                                              tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """``workflow-manager bench ...`` hands its arguments to the harness unchanged."""
    from reliability._cli import main as workflow_manager

    path = tmp_path / "results.json"
    path.write_text(json.dumps(quick_document))
    assert workflow_manager(["bench", "compare", str(path), str(path)]) == 0
    assert "1.00x" in capsys.readouterr().out
    with pytest.raises(SystemExit) as usage_error:
        workflow_manager(["bench", "compare", str(path)])
    assert usage_error.value.code == 2
    assert "workflow-manager bench compare" in capsys.readouterr().err


def test_no_wait_idle_starts_a_figure_without_asking_the_machine(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Without waiting, settling neither syncs the disk nor reads the CPUs (either could
    hold a figure for seconds on a busy machine); by default it does both."""
    asked: list[str] = []

    def cpu_percent(interval: float | None = None) -> float:
        asked.append("cpu")
        return 0.0

    monkeypatch.setattr(benchmarks._measure.psutil, "cpu_percent", cpu_percent)
    monkeypatch.setattr(benchmarks._measure.os, "sync", lambda: asked.append("sync"))
    settle(wait_idle=False)
    assert asked == []
    settle()
    assert asked == ["sync", "cpu"]


def test_no_wait_idle_reaches_every_plan_a_figure_settles_by(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--no-wait-idle`` is in the plan the figures get, and in the plan the overhead
    figure makes for its saturated row (a fresh plan there waited for idle CPUs again)."""
    parser = benchmarks._cli._run_parser("bench")
    plan = benchmarks._cli._plan(parser.parse_args(["--quick", "--no-wait-idle"]), tmp_path)
    assert plan.wait_idle is False and plan.quick is True
    assert benchmarks._cli._plan(parser.parse_args([]), tmp_path).wait_idle is True
    seen: list[Plan] = []

    def measure_cases(plan: Plan, cases: Any, count: int) -> dict[str, Any]:
        seen.append(plan)
        timing = benchmarks._overhead._Timing(1.0, 0.1)
        return {"bare": timing, **{case.key: timing for case in cases}}

    monkeypatch.setattr(benchmarks._overhead, "_measure_cases", measure_cases)
    benchmarks._overhead._add_saturated_row(plan, Figure("overhead", "overhead"))
    assert [p.wait_idle for p in seen] == [False]


def test_unknown_figure_is_refused_by_name() -> None:
    """A typo in --only names the figures that exist instead of running nothing."""
    result = _run("--quick", "--only", "thruput", cwd=ROOT)
    assert result.returncode != 0
    assert "thruput" in result.stderr and "throughput" in result.stderr


def test_before_measures_each_figure_on_both_sides(tmp_path: Path) -> None:
    """``--before REV`` runs each figure in REV's exported code and in this checkout's,
    prints them side by side and writes both documents."""
    output = tmp_path / "side.json"
    result = _run("--quick", "--only", "health,resume", "--before", "HEAD", "--no-wait-idle",
                  "--json", str(output), cwd=ROOT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "HEAD -> this checkout" in result.stdout
    for path in (output, tmp_path / "side.before.json"):
        document = json.loads(path.read_text())
        assert [f["key"] for f in document["figures"]] == ["health", "resume"]
    # Alternating: the first figure before then after, the second after then before.
    sides = re.findall(r"^(health|resume), (before|after)", result.stdout, re.MULTILINE)
    assert sides == [("health", "before"), ("health", "after"), ("resume", "after"),
                     ("resume", "before")]


def test_before_refuses_a_revision_that_is_not_a_commit() -> None:
    """A mistyped --before names itself and runs nothing."""
    result = _run("--quick", "--only", "health", "--before", "no-such-revision", cwd=ROOT)
    assert result.returncode == 2
    assert "'no-such-revision': not a commit" in result.stdout


def test_case_prints_one_line_per_run(tmp_path: Path) -> None:
    """``case`` runs one throughput case per line, for A/B runs across checkouts."""
    result = _run("case", "--store", "memory", "--workflows", "20", "--runs", "2",
                  "--no-wait-idle", "--scratch", str(tmp_path), cwd=ROOT)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2
    assert all(line.startswith("memory 20 workflows: ") and "transitions/s" in line
               for line in lines)
    refused = _run("case", "--runs", "0", cwd=ROOT)
    assert refused.returncode == 2 and "--runs must be >= 1" in refused.stderr


def test_stagecost_prints_the_loop_s_cpu_per_stage_per_run(tmp_path: Path) -> None:
    """``stagecost`` prints one line per run with the loop's CPU per stage, with every
    feature on or the engine alone."""
    for extra, label in (((), "every feature (strict)"), (("--engine",), "engine alone")):
        result = _run("stagecost", *extra, "--workflows", "5", "--runs", "2", "--scratch",
                      str(tmp_path), cwd=ROOT)
        assert result.returncode == 0, result.stderr
        lines = result.stdout.strip().splitlines()
        assert len(lines) == 2
        assert all(line.startswith(f"{label}, 5 workflows: ") and " us of loop CPU per "
                   "stage (" in line and " us for the process), " in line for line in lines)
    refused = _run("stagecost", "--workflows", "0", cwd=ROOT)
    assert refused.returncode == 2 and "--workflows and --runs must be >= 1" in refused.stderr


def test_parts_prints_each_part_and_the_budgets_they_bound(tmp_path: Path) -> None:
    """``parts`` prints a p50 and p90 for every part, the lines that set them against
    issue 17's budgets, and writes the same parts as JSON; too few samples are refused."""
    out = tmp_path / "parts.json"
    result = _run("parts", "--samples", "10", "--scratch", str(tmp_path), "--json", str(out),
                  cwd=ROOT)
    assert result.returncode == 0, result.stderr
    document = json.loads(out.read_text())
    names = [part["name"] for part in document["parts"]]
    assert names == ["fdatasync", "fdatasync_after_gap", "pipe", "pipe_after_gap",
                     "save_after_gap", "encoding", "trigger", "short_move", "asyncio_stage",
                     "bare_stage_wall"]
    for part in document["parts"]:
        assert 0 < part["p50_us"] <= part["p90_us"] and math.isfinite(part["p90_us"])
        assert re.search(rf"^{re.escape(part['label'])} +p50 ", result.stdout, re.MULTILINE)
    assert "one workflow, strict: a stage waits for one sync: " in result.stdout
    assert "engine alone: a save's encoding + the machine's move + " in result.stdout
    refused = _run("parts", "--samples", "3", cwd=ROOT)
    assert refused.returncode == 2 and "--samples must be >= 10" in refused.stderr


async def test_the_overhead_figure_s_peer_answers_each_request_and_ends_with_its_input(
) -> None:
    """Each byte sent to the loopback peer is answered with one byte (the stages' I/O);
    when its input ends (the benchmark exited or died) it exits too, leaving nothing."""
    peer = Peer(delay=0.001)
    try:
        async def round_trips() -> bytes:
            return await _first(*await asyncio.open_connection("127.0.0.1", peer.port))

        async def _first(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
            writer.write(b"qq")
            answer = await asyncio.wait_for(reader.readexactly(2), 10)
            writer.close()
            return answer

        assert await round_trips() == b"rr"
        process = peer._process
        assert process.stdin is not None
        process.stdin.close()
        assert process.wait(timeout=10) == 0
    finally:
        peer.close()


def test_durable_prints_the_write_path_s_costs_per_run(tmp_path: Path) -> None:
    """``durable`` runs the file and the memory store alternately, one line each: the
    loop's CPU per transition, and for the file store the writer's CPU, the bytes sent,
    the files written per workflow (19 stages: 4 checkpoints, 1 to 4 state files) and the
    close."""
    result = _run("durable", "--workflows", "5", "--runs", "2", "--no-wait-idle",
                  "--scratch", str(tmp_path), cwd=ROOT)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines] == ["file", "memory", "memory", "file"]
    for line in lines:
        assert " transitions/s; per transition: loop " in line and "(load average " in line
        if line.startswith("file"):
            assert ", writer " in line and "journal thread " in line and " bytes, " in line
            assert ", 0 bytes, " not in line and "close " in line
            # Each workflow's 4 checkpoint files and at least its final state file; at
            # most a state file with each checkpoint (fewer when the writer coalesces).
            files = re.search(r", ([\d.]+) files per workflow; ", line)
            assert files is not None and 5.0 <= float(files[1]) <= 8.0, line
    refused = _run("durable", "--runs", "0", cwd=ROOT)
    assert refused.returncode == 2 and "--workflows and --runs must be >= 1" in refused.stderr
