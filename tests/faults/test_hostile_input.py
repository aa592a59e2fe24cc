"""Hostile input at the edges: workflow IDs, prompt files and configuration.

The ID and configuration matrices call the CLI's ``main()`` in this process (the same code
as ``python -m reliability``, without a second of interpreter start-up per case); a few
cases run as real subprocesses to pin the process exit code and stderr as users see them.
Lower layers are covered elsewhere: ``tests/test_ids.py`` (Runtime and FileStore refuse
hostile IDs), ``tests/test_prompt.py`` (the prompt loader), ``tests/test_config.py``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from fault_helpers import cli, cli_env

from reliability import (
    FakeClock,
    InvalidWorkflowIdError,
    MemoryStore,
    Runtime,
    WorkflowConfiguration,
    resume_workflow,
)
from reliability._cli import main

HOSTILE_IDS = [
    pytest.param("../../etc/passwd", id="traversal"),
    pytest.param("..", id="dot-dot"),
    pytest.param("/etc/passwd", id="absolute"),
    pytest.param("workflow-20240115-142315-a7b3/../../x", id="valid-prefix-traversal"),
    pytest.param("workflow-" + "\uff12\uff10\uff12\uff14" * 2 + "-142315-a7b3",
                 id="fullwidth-digits"),
    pytest.param("workflow-20240115-" + "\u0967\u096a" * 3 + "-a7b3", id="devanagari-digits"),
    pytest.param("w" * 10_240, id="10kb"),
    pytest.param("workflow-20240115-142315-a7b3\nworkflow-x", id="newline"),
]
ID_COMMANDS = ["resume", "diagnostics", "cancel", "bundle"]


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No developer settings; and main()'s logging set-up (a process-wide logger made not
    to propagate) is undone afterwards, so later tests' log capture still works."""
    for name in list(os.environ):
        if name.startswith("WORKFLOW_") or name == "GITHUB_TOKEN":
            monkeypatch.delenv(name)
    monkeypatch.setenv("WORKFLOW_ENABLE_HEALTH_CHECKS", "false")
    log = logging.getLogger("workflow_manager")
    propagate, level = log.propagate, log.level
    yield
    log.propagate = propagate
    log.setLevel(level)  # setLevel, not assignment: it also clears the level cache


def _run_main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


class TestHostileWorkflowIds:
    @pytest.mark.parametrize("command", ID_COMMANDS)
    @pytest.mark.parametrize("value", HOSTILE_IDS)
    def test_every_id_command_refuses_with_exit_2_and_builds_no_path(
            self, tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str,
            value: str) -> None:
        """resume/diagnostics/cancel/bundle ID: exit 2, one short line, nothing created."""
        code, stderr = _run_main(capsys, command, value, "--project-root", str(tmp_path))
        assert code == 2
        [line] = stderr.strip().splitlines() if "\n" not in value else [stderr.strip()]
        assert line.startswith(f"workflow-manager {command}: error: invalid workflow ID ")
        assert "expected the form workflow-YYYYMMDD-HHMMSS-xxxx" in line
        assert len(stderr) < 400  # a 10 KB ID is shortened, not echoed
        assert list(tmp_path.iterdir()) == []

    def test_subprocess_exit_code_and_message(self, tmp_path: Path) -> None:
        """The real process: exit 2, the message on stderr, nothing on stdout."""
        completed = cli(tmp_path, "resume", "..")
        assert completed.returncode == 2 and completed.stdout == ""
        assert completed.stderr.startswith("workflow-manager resume: error: invalid workflow "
                                           "ID '..'")

    @pytest.mark.parametrize("value", HOSTILE_IDS)
    async def test_api_entry_points_refuse_before_any_file_exists(
            self, tmp_path: Path, value: str) -> None:
        """resume_workflow() and perform_health_check() refuse the ID, creating nothing."""
        config = WorkflowConfiguration(enable_health_checks=False, enable_monitoring=False)
        with pytest.raises(InvalidWorkflowIdError):
            await resume_workflow(value, config=config, project_root=tmp_path,
                                  clock=FakeClock(), store=MemoryStore())
        async with Runtime(config, tmp_path, store=MemoryStore(), clock=FakeClock(),
                           configure_logs=False) as runtime:
            with pytest.raises(InvalidWorkflowIdError):
                await runtime.perform_health_check(value)
        assert list(tmp_path.iterdir()) == []  # noqa: ASYNC240 - a tmp_path listing


def _hostile_prompt(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.md"
    if kind == "binary":
        path.write_bytes(b"# Title\n\x00\x01\x02\xff\xfe binary")
    elif kind == "huge":
        with open(path, "wb") as handle:
            handle.truncate(64 * 1024 * 1024)  # sparse, never read
    elif kind == "dev-zero":
        path.symlink_to("/dev/zero")
    elif kind == "dev-urandom":
        path.symlink_to("/dev/urandom")
    elif kind == "directory":
        path.mkdir()
    return path


class TestHostilePromptFiles:
    @pytest.mark.parametrize("kind", ["dev-zero", "dev-urandom", "directory"])
    def test_a_prompt_that_is_not_a_regular_file_is_a_usage_error(
            self, tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str) -> None:
        """run PROMPT where PROMPT is (a link to) a device or a directory: exit 2 at once,
        never reading it, saying it is not a regular file."""
        prompt = _hostile_prompt(tmp_path, kind)
        code, stderr = _run_main(capsys, "run", str(prompt), "--project-root", str(tmp_path))
        assert code == 2
        assert stderr.startswith(f"workflow-manager run: error: prompt file {prompt} ")
        assert "not a regular file" in stderr
        assert not (tmp_path / ".github").exists()

    @pytest.mark.parametrize(("kind", "reason"), [
        ("binary", "the prompt file is binary (it contains NUL bytes)"),
        ("huge", "more than the limit of"),
    ])
    def test_binary_or_huge_prompt_fails_in_initialization_before_any_effect(
            self, tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str,
            reason: str) -> None:
        """run PROMPT with a binary or 64 MiB (sparse) prompt: the development workflow
        fails in its first stage as a configuration error (exit 1), naming the file."""
        prompt = _hostile_prompt(tmp_path, kind)
        code = main(["run", str(prompt), "--project-root", str(tmp_path), "--json"])
        result = json.loads(capsys.readouterr().out)
        assert code == 1
        assert result["status"] == "failed" and result["error_category"] == "configuration"
        assert result["current_stage"] == "initialization"
        assert str(prompt) in result["error"] and reason in result["error"]
        assert not (tmp_path / ".github" / "workflow-forge").exists()  # no issue, no branch


class TestHostileConfiguration:
    @pytest.mark.parametrize(("content", "field"), [
        ('{"max_retries": "3"}', "max_retries"),
        ('{"timeout_multiplier": -1.5}', "timeout_multiplier"),
        ('{"retry_base_delay": NaN}', "retry_base_delay"),
        ('{"health_check_interval": Infinity}', "health_check_interval"),
        ('{"retry_budget_seconds": -0.0}', "retry_budget_seconds"),
        ('{"circuit_breakers": {"github": {"failure_threshold": 3, "recovery_timeout": -5}}}',
         "circuit_breakers.github"),
        ('{"concurrency": 1.5}', "concurrency"),
        ('{"reviewers": [1, 2]}', "reviewers"),
    ], ids=["string-int", "negative-timeout", "nan", "infinity", "negative-zero",
            "negative-breaker-timeout", "float-int", "reviewer-types"])
    def test_bad_config_file_is_refused_with_one_line(
            self, tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str,
            field: str) -> None:
        """--config with a wrong type, a negative timeout, NaN or infinity: exit 2, one line
        naming the field and the file, before anything is created."""
        config = tmp_path / "config.json"
        config.write_text(content)
        project = tmp_path / "project"
        project.mkdir()
        code, stderr = _run_main(capsys, "list", "--config", str(config), "--project-root",
                                 str(project))
        assert code == 2
        [line] = stderr.strip().splitlines()
        assert f"invalid {field} = " in line
        assert f"(from configuration file {config})" in line
        assert list(project.iterdir()) == []

    @pytest.mark.parametrize(("variable", "raw"), [
        ("WORKFLOW_TIMEOUT_MULTIPLIER", "-1"), ("WORKFLOW_RETRY_MAX_DELAY", "nan"),
        ("WORKFLOW_CONCURRENCY", "0"), ("WORKFLOW_CIRCUIT_BREAKERS", '{"github": 3}'),
    ])
    def test_bad_environment_value_is_refused_by_the_real_process(
            self, tmp_path: Path, variable: str, raw: str) -> None:
        """A bad WORKFLOW_* value: the process exits 2 with one line naming the variable."""
        completed = cli(tmp_path, "list", env=cli_env(**{variable: raw}))
        assert completed.returncode == 2
        [line] = completed.stderr.strip().splitlines()
        assert f"(from environment variable {variable})" in line
