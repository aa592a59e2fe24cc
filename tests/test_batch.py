"""The batch runner: prompt expansion, the concurrency limit, and Ctrl-C then resume --all."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from batch_workflows import GATE_AFTER
from workflows_for_tests import RECORDING

from reliability import ConfigurationError, FakeClock, MemoryStore, Runtime, WorkflowConfiguration
from reliability._batch import NOT_STARTED, expand_prompt_paths, run_batch

REPO = Path(__file__).resolve().parents[1]
GATED = "tests.batch_workflows:GATED"


def make_prompts(directory: Path, count: int) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / f"p{index:02d}.md" for index in range(count)]
    for path in paths:
        path.write_text(f"# {path.stem}\n")
    return paths


class TestExpansion:
    def test_directories_expand_to_sorted_markdown_files(self, tmp_path: Path) -> None:
        """A directory gives its *.md files sorted; files are kept in order, each once."""
        prompts = make_prompts(tmp_path / "prompts", 3)
        (tmp_path / "prompts" / "notes.txt").write_text("not a prompt")
        extra = make_prompts(tmp_path / "more", 1)[0]
        found = expand_prompt_paths([str(extra), str(tmp_path / "prompts"), str(prompts[0])])
        assert found == [extra.resolve(), *(p.resolve() for p in prompts)]

    def test_missing_path_is_named(self, tmp_path: Path) -> None:
        """A path that does not exist raises ConfigurationError naming it."""
        with pytest.raises(ConfigurationError, match=r"nowhere\.md"):
            expand_prompt_paths([str(tmp_path / "nowhere.md")])


async def test_batch_runs_at_most_concurrency_workflows_at_once(tmp_path: Path) -> None:
    """run_batch: every prompt completes, and never more than `concurrency` run together."""
    config = WorkflowConfiguration(enable_health_checks=False, enable_monitoring=False)
    clock = FakeClock()
    running: set[str] = set()
    most = 0

    def watch(event: str, run: Any, **data: Any) -> None:
        nonlocal most
        if event == "started":
            running.add(run.workflow_id)
            most = max(most, len(running))
        elif event == "finished":
            running.discard(run.workflow_id)

    async with Runtime(config, tmp_path, store=MemoryStore(), clock=clock,
                       configure_logs=False) as runtime:
        runtime.add_listener(watch)
        async with clock.autojump():
            items = await run_batch(runtime, make_prompts(tmp_path / "p", 12),
                                    definition=RECORDING, concurrency=3)
    assert [item.status for item in items] == ["completed"] * 12
    assert most == 3


def cli(root: Path, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "reliability", *args, "--project-root",
                           str(root)], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=60, **kwargs)


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("WORKFLOW_")}


def _wait_for_effects(root: Path, process: subprocess.Popen[bytes], count: int) -> None:
    """Until ``count`` side effects exist (pytest's timeout bounds a hung child)."""
    effects = root / "effects"
    while process.poll() is None:
        if effects.is_dir() and len(os.listdir(effects)) >= count:
            return
        time.sleep(0.01)
    pytest.fail(f"batch ended before {count} side effects (rc={process.poll()})")


@pytest.mark.parametrize("to_group", [False, True], ids=["to-process", "to-process-group"])
def test_ctrl_c_then_resume_all_finishes_every_workflow_once(
        tmp_path: Path, to_group: bool) -> None:
    """50 prompts, concurrency 10, two SIGINTs mid-batch: exit 130, then resume --all
    completes all 50, and no stage's side effect happened more than twice. Sent to the
    whole process group too, as a terminal's Ctrl-C is: the store's writer process must
    not die of it while the batch saves its interrupted states."""
    make_prompts(tmp_path / "prompts", 50)
    report = tmp_path / "report.json"
    with open(tmp_path / "batch.out", "wb") as out, open(tmp_path / "batch.err", "wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "reliability", "batch", str(tmp_path / "prompts"),
             "--definition", GATED, "--concurrency", "10", "--report", str(report),
             "--project-root", str(tmp_path)], cwd=REPO, env=_env(), stdout=out, stderr=err,
            start_new_session=to_group)  # its own group, so the test's is not signalled

        def ctrl_c() -> None:
            if to_group:
                os.killpg(process.pid, signal.SIGINT)
            else:
                process.send_signal(signal.SIGINT)

        try:
            # Stages wait at the gate from the 25th effect on: the batch is mid-way
            # whatever the machine's load, and cannot finish before the Ctrl-C.
            _wait_for_effects(tmp_path, process, GATE_AFTER)
            ctrl_c()
            time.sleep(0.05)
            ctrl_c()  # a second Ctrl-C must not corrupt anything
            assert process.wait(timeout=60) == 130, (tmp_path / "batch.err").read_text()
            assert "Traceback" not in (tmp_path / "batch.err").read_text()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    interrupted = json.loads(report.read_text())
    assert interrupted["interrupted"] is True
    assert interrupted["resume_command"] == "workflow-manager resume --all"
    assert {row["status"] for row in interrupted["workflows"]} <= {
        "completed", "interrupted", NOT_STARTED}

    (tmp_path / "gate").touch()
    resumed = cli(tmp_path, "resume", "--all", "--json")
    assert resumed.returncode == 0, resumed.stderr
    listed = json.loads(cli(tmp_path, "list", "--json").stdout)["workflows"]
    assert len(listed) == 50
    assert {w["status"] for w in listed} == {"completed"}
    effects = tmp_path / "effects"
    for workflow in listed:
        for stage in ("prepare", "build", "publish"):
            lines = (effects / f"{workflow['workflow_id']}.{stage}").read_text().splitlines()
            assert 1 <= len(lines) <= 2, (workflow["workflow_id"], stage, lines)
