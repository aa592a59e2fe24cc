"""batch --processes N and worker --processes N: real processes, real signals, one store.

The definition below (``tests.test_processes:PIDS``) records, per stage execution, one line
``{pid}`` in ``{project_root}/effects/{workflow_id}.{stage}`` and returns the pid as an
output, so a test sees which process ran each stage and how often. While the file
``{project_root}/hold`` exists and ``{project_root}/release`` does not, each stage waits
after its record: a test can stop a batch while every running stage is in flight.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import psutil
import pytest

from machines import StageContext, StageSpec, WorkflowDefinition

REPO = Path(__file__).resolve().parents[1]
DEFINITION = "tests.test_processes:PIDS"
STAGES = ("one", "two", "three")


async def pid_stage(ctx: StageContext) -> Mapping[str, Any]:
    effects = ctx.project_root / "effects"
    effects.mkdir(exist_ok=True)
    fd = os.open(effects / f"{ctx.workflow_id}.{ctx.stage}",
                 os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
    finally:
        os.close(fd)
    while (ctx.project_root / "hold").exists() and not (ctx.project_root / "release").exists():
        await ctx.sleep(0.01)  # cancelled by the stop the test sends
    return {f"{ctx.stage}_pid": os.getpid()}


PIDS = WorkflowDefinition("pids", [StageSpec(stage=stage, handler=pid_stage,
                                             timeout_seconds=600) for stage in STAGES])


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WORKFLOW_")}
    env["WORKFLOW_ENABLE_HEALTH_CHECKS"] = "false"
    return env


def cli(root: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "reliability", *args, "--project-root",
                           str(root)], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def write_prompts(root: Path, count: int) -> Path:
    directory = root / "prompts"
    directory.mkdir()
    for n in range(count):
        (directory / f"p{n:03d}.md").write_text(f"# p{n}\n\nDo {n}.\n")
    return directory


def executions(root: Path) -> dict[tuple[str, str], list[int]]:
    """(workflow ID, stage) -> the pid of each execution of that stage."""
    found: dict[tuple[str, str], list[int]] = {}
    effects = root / "effects"
    for path in effects.iterdir() if effects.exists() else ():
        workflow_id, stage = path.name.rsplit(".", 1)
        found[(workflow_id, stage)] = [int(line) for line in path.read_text().split()]
    return found


def stored(root: Path) -> dict[str, dict[str, Any]]:
    """Every workflow's state as ``diagnostics``-free ``list --json`` can't show it: the
    state files themselves (read after every process that wrote them has exited)."""
    states = {}
    for path in (root / ".github" / "workflow-states").glob("workflow-*/state.json"):
        document = json.loads(path.read_text())
        state = document.get("state", document)
        states[state["workflow_id"]] = state
    return states


def wait_for(check: Callable[[], bool], what: str, limit: float = 120.0) -> None:
    """Until ``check()`` holds; the limit only turns a hang into a failure."""
    deadline = time.monotonic() + limit
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def children_of(process: subprocess.Popen[str]) -> list[psutil.Process]:
    try:
        return psutil.Process(process.pid).children()
    except psutil.NoSuchProcess:
        return []


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[str]]]:
    processes: list[subprocess.Popen[str]] = []
    yield processes
    for process in processes:
        for child in children_of(process):
            child.kill()
        if process.poll() is None:
            process.kill()
        process.communicate()


def assert_each_stage_once_in_one_process(root: Path, ids: list[str]) -> set[int]:
    """Every stage of every workflow ran exactly once, all of a workflow's stages in one
    process; the set of processes that ran them."""
    runs = executions(root)
    assert set(runs) == {(w, s) for w in ids for s in STAGES}
    pids: set[int] = set()
    for workflow_id in ids:
        per_stage = [runs[(workflow_id, stage)] for stage in STAGES]
        assert all(len(p) == 1 for p in per_stage), (workflow_id, per_stage)
        assert len({p[0] for p in per_stage}) == 1, (workflow_id, per_stage)
        pids.add(per_stage[0][0])
    return pids


def test_batch_in_two_processes_runs_every_prompt_once_with_one_summary(
        tmp_path: Path) -> None:
    """batch --processes 2: every prompt's workflow completes, each stage once and all of
    a workflow's stages in one process; both processes ran some; one JSON summary."""
    prompts = write_prompts(tmp_path, 24)
    done = cli(tmp_path, "batch", str(prompts), "--definition", DEFINITION,
               "--processes", "2", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)  # one document: one summary
    assert report["processes"] == 2 and report["counts"] == {"completed": 24}
    assert report["run_seconds"] > 0 and report["run_cpu_seconds"] > 0
    ids = [row["workflow_id"] for row in report["workflows"]]
    assert len(set(ids)) == 24
    assert sorted(Path(row["prompt"]).name for row in report["workflows"]) == sorted(
        p.name for p in prompts.iterdir())
    pids = assert_each_stage_once_in_one_process(tmp_path, ids)
    assert len(pids) == 2 and os.getpid() not in pids
    states = stored(tmp_path)
    for workflow_id in ids:
        state = states[workflow_id]
        assert state["status"] == "completed"
        history = [e["stage"] for e in state["monitoring_state"]["stage_history"]
                   if e["status"] == "completed"]
        assert history == list(STAGES)
    assert json.loads(Path(report["report_file"]).read_text())["counts"] == report["counts"]


def test_a_batch_no_larger_than_its_concurrency_is_shared_by_both_processes(
        tmp_path: Path) -> None:
    """batch --processes 2 --concurrency N with N prompts: each process runs some (the
    first child ready used to be dealt up to twice its share: the whole batch)."""
    prompts = write_prompts(tmp_path, 8)
    done = cli(tmp_path, "batch", str(prompts), "--definition", DEFINITION,
               "--processes", "2", "--concurrency", "8", "--json")
    assert done.returncode == 0, done.stderr
    ids = [row["workflow_id"] for row in json.loads(done.stdout)["workflows"]]
    pids = assert_each_stage_once_in_one_process(tmp_path, ids)
    assert len(pids) == 2 and os.getpid() not in pids


def _held_batch_of_two(tmp_path: Path, started: list[subprocess.Popen[str]]
                       ) -> subprocess.Popen[str]:
    """batch --processes 2 of 12 held workflows, once both children have two stages each
    in flight (held until the test touches ``release``)."""
    prompts = write_prompts(tmp_path, 12)
    (tmp_path / "hold").touch()
    parent = subprocess.Popen(
        [sys.executable, "-m", "reliability", "batch", str(prompts), "--definition",
         DEFINITION, "--processes", "2", "--concurrency", "4", "--json", "--project-root",
         str(tmp_path)], cwd=REPO, env=_env(), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    started.append(parent)
    wait_for(lambda: len({p for pids in executions(tmp_path).values() for p in pids}) == 2
             and sum(len(p) for p in executions(tmp_path).values()) == 4,
             "both children to start their stages")
    return parent


def test_sigint_stops_every_process_and_resume_all_finishes_each_once(
        tmp_path: Path, started: list[subprocess.Popen[str]]) -> None:
    """SIGINT to the parent of batch --processes 2 mid-batch: every child exits, the parent
    exits 130, every workflow is interrupted or pending; resume --all completes them all,
    no completed stage running again."""
    parent = _held_batch_of_two(tmp_path, started)
    children = children_of(parent)
    worker_pids = {p for pids in executions(tmp_path).values() for p in pids}
    assert worker_pids <= {child.pid for child in children}
    parent.send_signal(signal.SIGINT)
    out, err = parent.communicate(timeout=120)
    assert parent.returncode == 130, err
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    report = json.loads(out)
    assert report["interrupted"] is True and report["resume_command"]
    assert report["counts"].get("interrupted") == 4
    assert report["counts"].get("not started") == 8
    ids = [row["workflow_id"] for row in report["workflows"]]
    states = stored(tmp_path)
    assert {states[w]["status"] for w in ids} <= {"interrupted", "pending"}
    before = executions(tmp_path)

    (tmp_path / "release").touch()
    resumed = cli(tmp_path, "resume", "--all", "--json")
    assert resumed.returncode == 0, resumed.stderr
    results = json.loads(resumed.stdout)
    assert sorted(r["workflow_id"] for r in results) == sorted(ids)
    assert {r["status"] for r in results} == {"completed"}
    after = executions(tmp_path)
    for workflow_id in ids:
        # The stage in flight at the stop ran once more; every other stage once.
        assert [len(after[(workflow_id, s)]) for s in STAGES] == (
            [2, 1, 1] if (workflow_id, "one") in before else [1, 1, 1])
    assert len(ids) == 12


def test_a_killed_child_s_unstarted_workflows_run_in_the_other(
        tmp_path: Path, started: list[subprocess.Popen[str]]) -> None:
    """SIGKILL one child of batch --processes 2 mid-batch: the other runs every workflow
    the dead one had not started; the batch ends (exit 1) with the dead one's started
    workflows reported interrupted, and resume --all finishes those, no completed stage
    running again."""
    parent = _held_batch_of_two(tmp_path, started)
    victim = min(p for pids in executions(tmp_path).values() for p in pids)
    killed = {w for (w, _), pids in executions(tmp_path).items() if victim in pids}
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: not psutil.pid_exists(victim)
             or psutil.Process(victim).status() == psutil.STATUS_ZOMBIE, "the victim to die")
    (tmp_path / "release").touch()
    out, err = parent.communicate(timeout=120)
    assert parent.returncode == 1, err
    report = json.loads(out)
    rows = {row["workflow_id"]: row for row in report["workflows"]}
    assert report["counts"] == {"completed": 10, "interrupted": 2}
    assert {w for w, row in rows.items() if row["status"] == "interrupted"} == killed
    assert report["resume_command"]

    resumed = cli(tmp_path, "resume", "--all", "--json")
    assert resumed.returncode == 0, resumed.stderr
    assert sorted(r["workflow_id"] for r in json.loads(resumed.stdout)) == sorted(killed)
    runs = executions(tmp_path)
    for workflow_id in rows:
        counts = [len(runs[(workflow_id, s)]) for s in STAGES]
        # The victim's stage in flight ran once more; every other stage once.
        assert counts == ([2, 1, 1] if workflow_id in killed else [1, 1, 1]), workflow_id
    assert {state["status"] for state in stored(tmp_path).values()} == {"completed"}


def test_worker_in_two_processes_drains_the_file_store_and_exits_when_idle(
        tmp_path: Path) -> None:
    """worker --processes 2 on the file store: every submitted workflow runs once, all its
    stages in one process, spread over both; it exits 0 once nothing is pending."""
    submitted = cli(tmp_path, "submit", "--definition", DEFINITION, "--count", "30", "--json")
    assert submitted.returncode == 0, submitted.stderr
    ids = json.loads(submitted.stdout)["workflow_ids"]
    done = cli(tmp_path, "worker", "--processes", "2", "--exit-when-idle", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"workflows_run": 30, "interrupted": False}
    pids = assert_each_stage_once_in_one_process(tmp_path, ids)
    assert len(pids) == 2
    assert {state["status"] for state in stored(tmp_path).values()} == {"completed"}


def test_worker_in_two_processes_on_postgres(tmp_path: Path, postgres_url: str) -> None:
    """worker --processes 2 on PostgreSQL: each child a worker of its own; every queued
    workflow runs once, all its stages in one process, and both exit when idle."""
    store = ["--store", postgres_url]
    submitted = cli(tmp_path, "submit", "--definition", DEFINITION, "--count", "30",
                    "--json", *store)
    assert submitted.returncode == 0, submitted.stderr
    ids = json.loads(submitted.stdout)["workflow_ids"]
    done = cli(tmp_path, "worker", "--processes", "2", "--exit-when-idle", "--json",
               "--concurrency", "4", *store)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"workflows_run": 30, "interrupted": False}
    assert_each_stage_once_in_one_process(tmp_path, ids)


def test_processes_must_be_positive(tmp_path: Path) -> None:
    """--processes 0 is a usage error (exit 2) naming the option."""
    prompts = write_prompts(tmp_path, 1)
    refused = cli(tmp_path, "batch", str(prompts), "--definition", DEFINITION,
                  "--processes", "0")
    assert refused.returncode == 2 and "--processes" in refused.stderr


def test_processes_benchmark_reports_every_process_count(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """python -m benchmarks processes: one line per run of each workload (no-op and
    loop-bound JSON stages) with its rate, wall, CPU per transition, CPU by role (and each
    loop process's) and load average, and the medians with the ratio to one process, also
    written as JSON."""
    from benchmarks import main as benchmarks
    output = tmp_path / "processes.json"
    assert benchmarks(["processes", "--workflows", "12", "--concurrency", "4", "--rounds",
                       "1", "--json", str(output)]) == 0
    printed = capsys.readouterr().out
    for workload in ("noop", "json"):
        assert f"{workload}, 1 process(es): median" in printed
        assert f"{workload}, 2 process(es): median" in printed
    assert "load average" in printed
    document = json.loads(output.read_text())
    assert [(run["workload"], run["processes"]) for run in document["runs"]] == [
        ("noop", 1), ("noop", 2), ("json", 1), ("json", 2)]
    for run in document["runs"]:
        assert run["transitions"] == 12 * 19 and run["transitions_per_s"] > 0
        assert run["cpu_seconds"] > 0 and run["loop_cpu_us_per_transition"] > 0
        # Sampled while the command runs, so a short run may miss a process (no timing is
        # asserted): what was read names known roles and never exceeds the reaped total.
        roles = run["cpu_by_role"]
        allowed = {"loops", "writers", "other"} | ({"parent"} if run["processes"] > 1 else set())
        assert set(roles) <= allowed and all(cpu >= 0 for cpu in roles.values())
        assert sum(roles.values()) <= run["cpu_seconds"] + 0.05
        # Each loop process's share, largest first, summing to the loops' role.
        each = run["loop_cpu_each"]
        assert len(each) <= run["processes"] and each == sorted(each, reverse=True)
        assert sum(each) == pytest.approx(roles.get("loops", 0.0) if run["processes"] > 1
                                          else sum(each), abs=0.05)


def test_the_loop_bound_workload_parses_and_serialises_about_20_kb_per_stage() -> None:
    """JSON19's stages each parse and re-serialise the ~20 KB API response, 19 of them."""
    from benchmarks._processes import API_RESPONSE, JSON19
    assert 18_000 <= len(API_RESPONSE) <= 22_000
    assert len(json.loads(API_RESPONSE)) == 24
    assert len(JSON19.stages) == 19
