"""workflow-manager end to end: every command in a real subprocess, exit codes, JSON, errors."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
DEFINITION = "tests.workflows_for_tests:RECORDING"
TOKEN = "s3cr3tTOKENvalue42"
COMMANDS = ("run", "batch", "resume", "diagnostics", "list", "cancel", "bundle", "bench")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("WORKFLOW_") and k != "GITHUB_TOKEN"}
    env.update(extra)
    return env


def cli(root: Path, *args: str, env: dict[str, str] | None = None,
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "reliability", *args, "--project-root",
                           str(root)], cwd=REPO, env=env or clean_env(), capture_output=True,
                          text=True, timeout=60)


def as_json(completed: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(completed.stdout)


def write_prompts(root: Path, *names: str) -> Path:
    directory = root / "prompts"
    directory.mkdir(exist_ok=True)
    for name in names:
        (directory / name).write_text(f"# {name}\n\nDo {name}.\n")
    return directory


@pytest.fixture(scope="module")
def finished_batch(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One batch, shared by the read-only tests: two prompts complete, one fails.

    The failing prompt's name holds the token's value and a token-shaped string, so both
    reach the state files and logs that the bundle collects.
    """
    root = tmp_path_factory.mktemp("project")
    prompts = write_prompts(root, "a.md", "b.md", f"fail-{TOKEN}-ghp_abcdefghij0123456789.md")
    completed = cli(root, "batch", str(prompts), "--definition", DEFINITION, "--json",
                    env=clean_env(GITHUB_TOKEN=TOKEN))
    return {"root": root, "process": completed, "report": as_json(completed)}


def ids_by_status(batch: dict[str, Any], status: str) -> list[str]:
    return [row["workflow_id"] for row in batch["report"]["workflows"] if row["status"] == status]


class TestRunAndBatch:
    def test_run_completes_and_prints_the_result_as_json(self, tmp_path: Path) -> None:
        """run: exit 0, and --json prints the spec's result dict with the stage outputs."""
        write_prompts(tmp_path, "one.md")
        completed = cli(tmp_path, "run", str(tmp_path / "prompts" / "one.md"),
                        "--definition", DEFINITION, "--json", "--max-retries", "1")
        assert completed.returncode == 0, completed.stderr
        result = as_json(completed)
        assert result["status"] == "completed"
        assert result["pr_url"].endswith(result["workflow_id"])
        assert result["reliability_metrics"]["performance_grade"]

    def test_run_with_overlapped_durability_completes_and_records_every_stage(
            self, tmp_path: Path) -> None:
        """--durability overlapped: the run completes with every stage on record; a mode
        that does not exist is refused by name (exit 2)."""
        write_prompts(tmp_path, "one.md")
        completed = cli(tmp_path, "run", "prompts/one.md", "--definition", DEFINITION,
                        "--json", "--durability", "overlapped")
        assert completed.returncode == 0, completed.stderr
        workflow_id = as_json(completed)["workflow_id"]
        shown = as_json(cli(tmp_path, "diagnostics", workflow_id, "--json"))
        assert shown["status"] == "completed"
        assert shown["completed_stages"] == ["prepare", "build", "publish"]
        assert set(shown["stage_history"]) == {"prepare", "build", "publish"}
        refused = cli(tmp_path, "run", "prompts/one.md", "--durability", "eventual")
        assert refused.returncode == 2
        assert "--durability" in refused.stderr and "overlapped" in refused.stderr

    def test_run_of_a_failing_workflow_exits_1(self, tmp_path: Path) -> None:
        """run: a workflow that fails gives exit code 1 and says why."""
        write_prompts(tmp_path, "fail.md")
        completed = cli(tmp_path, "run", "prompts/fail.md", "--definition", DEFINITION)
        assert completed.returncode == 1
        assert "failed" in completed.stdout

    def test_batch_report_lists_every_prompt(self, finished_batch: dict[str, Any]) -> None:
        """batch: exit 1 when one failed; the report file and --json agree, row per prompt."""
        process, report = finished_batch["process"], finished_batch["report"]
        assert process.returncode == 1, process.stderr
        assert sorted(row["status"] for row in report["workflows"]) == [
            "completed", "completed", "failed"]
        on_disk = json.loads(Path(report["report_file"]).read_text())
        assert on_disk["counts"] == {"completed": 2, "failed": 1}
        assert Path(report["report_file"]).parent == (
            finished_batch["root"] / ".github" / "workflow-reports")

    def test_missing_prompt_is_a_usage_error(self, tmp_path: Path) -> None:
        """run and batch: a prompt path that does not exist is exit 2, naming the path."""
        for args in (("run", "absent.md"), ("batch", "absent-dir")):
            completed = cli(tmp_path, *args, "--definition", DEFINITION)
            assert completed.returncode == 2
            assert "absent" in completed.stderr and "Traceback" not in completed.stderr


class TestInspection:
    def test_list_with_stats(self, finished_batch: dict[str, Any]) -> None:
        """list --stats --json: every stored workflow, and per-stage statistics."""
        completed = cli(finished_batch["root"], "list", "--stats", "--json")
        assert completed.returncode == 0, completed.stderr
        document = as_json(completed)
        assert len(document["workflows"]) == 3
        assert document["stage_statistics"]["stages"]["prepare"]["runs"] == 3
        assert document["stage_statistics"]["stages"]["publish"]["runs"] == 2

    def test_list_filters_by_status(self, finished_batch: dict[str, Any]) -> None:
        """list --status failed shows only the failed workflow."""
        completed = cli(finished_batch["root"], "list", "--status", "failed", "--json")
        assert [w["workflow_id"] for w in as_json(completed)["workflows"]] == ids_by_status(
            finished_batch, "failed")

    def test_diagnostics_from_a_fresh_process(self, finished_batch: dict[str, Any]) -> None:
        """diagnostics --json: the spec's shape, read from the store by a new process."""
        workflow_id = ids_by_status(finished_batch, "completed")[0]
        completed = cli(finished_batch["root"], "diagnostics", workflow_id, "--json")
        assert completed.returncode == 0, completed.stderr
        diagnostics = as_json(completed)
        assert diagnostics["workflow_id"] == workflow_id
        assert set(diagnostics["stage_history"]) == {"prepare", "build", "publish"}
        assert diagnostics["performance_report"]["performance_grade"]
        human = cli(finished_batch["root"], "diagnostics", workflow_id)
        assert human.returncode == 0 and workflow_id in human.stdout

    def test_bundle_is_private_and_redacted(self, finished_batch: dict[str, Any]) -> None:
        """bundle: one 0600 JSON file with every part, and no secret anywhere in it."""
        workflow_id = ids_by_status(finished_batch, "failed")[0]
        output = finished_batch["root"] / "bundle.json"
        completed = cli(finished_batch["root"], "bundle", workflow_id, "--output", str(output),
                        env=clean_env(GITHUB_TOKEN=TOKEN))
        assert completed.returncode == 0, completed.stderr
        assert stat.S_IMODE(output.stat().st_mode) == 0o600
        text = output.read_text()
        assert TOKEN not in text and "ghp_abcdefghij" not in text
        bundle = json.loads(text)
        assert {"workflow_diagnostics", "system_health", "configuration", "log_files",
                "state_files", "performance_metrics"} <= set(bundle)
        assert bundle["log_files"] and all(workflow_id in line for line in bundle["log_files"])
        assert any(path.endswith("state.json") for path in bundle["state_files"])
        # GITHUB_TOKEN is read by the GitHub forge when it starts, never into the settings.
        assert bundle["configuration"]["github_token"] == ""

    def test_cancel_a_stored_workflow(self, tmp_path: Path) -> None:
        """cancel: a stopped workflow becomes cancelled (exit 0); again, nothing to do (1)."""
        write_prompts(tmp_path, "fail.md")
        failed = as_json(cli(tmp_path, "run", "prompts/fail.md", "--definition", DEFINITION,
                             "--json"))
        first = cli(tmp_path, "cancel", failed["workflow_id"], "--json")
        assert first.returncode == 0, first.stderr
        assert as_json(first)["status"] == "cancelled"
        second = cli(tmp_path, "cancel", failed["workflow_id"])
        assert second.returncode == 1 and "already cancelled" in second.stderr
        resumed = cli(tmp_path, "resume", "--all", "--json")
        assert resumed.returncode == 0 and as_json(resumed) == []


class TestErrors:
    @pytest.mark.parametrize("command", ["diagnostics", "cancel", "bundle", "resume"])
    def test_invalid_workflow_ids_are_refused(self, tmp_path: Path, command: str) -> None:
        """A path-like workflow ID is exit 2 with one line naming it, and no file is made."""
        completed = cli(tmp_path, command, "../../etc/passwd")
        assert completed.returncode == 2
        assert "invalid workflow ID '../../etc/passwd'" in completed.stderr
        assert "Traceback" not in completed.stderr
        assert not (tmp_path / ".github" / "workflow-states").exists()

    def test_unknown_workflow_is_a_usage_error(self, tmp_path: Path) -> None:
        """diagnostics of a well-formed ID that was never stored: exit 2, naming it."""
        completed = cli(tmp_path, "diagnostics", "workflow-20240115-142315-a7b3")
        assert completed.returncode == 2
        assert "workflow-20240115-142315-a7b3" in completed.stderr

    def test_bad_configuration_value_names_field_and_source(self, tmp_path: Path) -> None:
        """WORKFLOW_MAX_RETRIES=-1: exit 2, naming the field and the variable."""
        completed = cli(tmp_path, "list", env=clean_env(WORKFLOW_MAX_RETRIES="-1"))
        assert completed.returncode == 2
        assert "max_retries" in completed.stderr
        assert "WORKFLOW_MAX_RETRIES" in completed.stderr
        assert len(completed.stderr.strip().splitlines()) == 1

    def test_command_line_beats_environment(self, tmp_path: Path) -> None:
        """--max-retries is checked as a command-line value even when the env is valid."""
        completed = cli(tmp_path, "run", "x.md", "--max-retries", "-3",
                        env=clean_env(WORKFLOW_MAX_RETRIES="2"))
        assert completed.returncode == 2
        assert "command-line option" in completed.stderr

    def test_help_of_every_command_has_examples(self, tmp_path: Path) -> None:
        """--help works for every command and shows examples."""
        for command in COMMANDS:
            completed = subprocess.run([sys.executable, "-m", "reliability", command, "--help"],
                                       cwd=REPO, capture_output=True, text=True, timeout=60)
            assert completed.returncode == 0
            assert f"workflow-manager {command}" in completed.stdout
            assert "examples:" in completed.stdout


class TestClosing:
    async def test_a_slow_close_says_what_it_waits_for_and_a_quick_one_says_nothing(
            self) -> None:
        """Closing that takes longer than the notice delay prints one line saying the
        state files are being written (already durable); a quick close prints nothing."""
        from rich.console import Console

        from reliability._cli import close_saying_why_it_waits

        class Closing:
            def __init__(self, gate: asyncio.Event) -> None:
                self.gate, self.closed = gate, False

            async def close(self) -> None:
                await self.gate.wait()
                self.closed = True

        quick, slow = asyncio.Event(), asyncio.Event()
        quick.set()
        console = Console(record=True, width=200)
        runtime = Closing(quick)
        await close_saying_why_it_waits(runtime, console, after=0.05)  # type: ignore[arg-type]
        assert runtime.closed and console.export_text() == ""

        runtime = Closing(slow)
        closing = asyncio.ensure_future(
            close_saying_why_it_waits(runtime, console, after=0.05))  # type: ignore[arg-type]
        await asyncio.sleep(0.2)  # the loop runs the 0.05 s notice timer before this one
        assert "Writing the state files" in console.export_text(clear=False)
        assert not closing.done()
        slow.set()
        await closing
        assert runtime.closed
        assert console.export_text().count("already durable in the journal") == 1


class TestInterpreterTuning:
    @pytest.mark.parametrize(("argv", "tuned"), [
        (["run", "p.md"], True), (["batch", "prompts"], True), (["resume", "--all"], True),
        (["list"], False), (["diagnostics", "workflow-20240115-142315-a7b3"], False),
    ])
    def test_long_running_commands_tune_the_interpreter(
            self, argv: list[str], tuned: bool, monkeypatch: pytest.MonkeyPatch) -> None:
        """run, batch and resume turn tune_interpreter on; short commands leave it off."""
        from reliability._cli import _load_config, build_parser

        monkeypatch.delenv("WORKFLOW_TUNE_INTERPRETER", raising=False)
        assert _load_config(build_parser().parse_args(argv)).tune_interpreter is tuned

    def test_the_configuration_may_still_turn_it_off(self,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
        """WORKFLOW_TUNE_INTERPRETER=false beats the command's default."""
        from reliability._cli import _load_config, build_parser

        monkeypatch.setenv("WORKFLOW_TUNE_INTERPRETER", "false")
        assert _load_config(build_parser().parse_args(["batch", "x"])).tune_interpreter is False
