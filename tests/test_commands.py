"""run_command: streaming output, and killing the whole process group on cancellation."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

import anyio
import psutil
import pytest

from machines.development._commands import (
    OUTPUT_TAIL_LINES,
    format_command,
    run_command,
)
from reliability._errors import ConfigurationError

PY = sys.executable

# A child that ignores SIGTERM and starts a grandchild (also ignoring SIGTERM), then sleeps.
STUBBORN = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
grandchild = subprocess.Popen([sys.executable, "-c", code])
print("grandchild", grandchild.pid, flush=True)
time.sleep(60)
"""


def living_members(pgid: int) -> list[int]:
    """Pids of processes in group ``pgid`` that are still running (zombies count as dead)."""
    alive = []
    for process in psutil.process_iter(["status"]):
        try:
            if os.getpgid(process.pid) == pgid and process.info["status"] != "zombie":
                alive.append(process.pid)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return alive


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def start_stubborn(tmp_path: Path, **options: float) -> tuple[asyncio.Task[object], int]:
    """Start STUBBORN under run_command; return its task and the grandchild's pid."""
    lines: asyncio.Queue[str] = asyncio.Queue()
    task = asyncio.create_task(
        run_command([PY, "-c", STUBBORN], cwd=tmp_path, on_line=lines.put_nowait, **options)
    )
    first = await asyncio.wait_for(lines.get(), timeout=10)
    return task, int(first.split()[1])


class TestRunning:
    async def test_result_carries_exit_status_and_output(self, tmp_path: Path) -> None:
        """A failing command is reported with its status and output, not raised."""
        code = "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"
        result = await run_command([PY, "-c", code], cwd=tmp_path)
        assert result.returncode == 3
        assert not result.ok
        assert result.output_tail.splitlines() == ["out", "err"]
        assert result.argv == (PY, "-c", code)
        assert result.duration_seconds > 0

    async def test_string_command_is_split_without_a_shell(self, tmp_path: Path) -> None:
        """A string is split with shlex: quotes group words, $VARS and ; are not expanded."""
        result = await run_command("echo 'a  b' $HOME ';' x", cwd=tmp_path)
        assert result.output_tail == "a  b $HOME ; x"

    async def test_cwd_and_env_are_applied_over_the_environment(self, tmp_path: Path) -> None:
        """The child runs in cwd, sees the extra variables and keeps the rest (PATH)."""
        code = (
            "import os; print(os.getcwd()); print(os.environ['EXTRA']); "
            "print('PATH' in os.environ)"
        )
        result = await run_command([PY, "-c", code], cwd=tmp_path, env={"EXTRA": "yes"})
        assert result.output_tail.splitlines() == [str(tmp_path), "yes", "True"]

    async def test_lines_reach_on_line_while_the_command_runs(self, tmp_path: Path) -> None:
        """on_line sees a line before the command ends (the child waits for our reaction)."""
        flag = tmp_path / "seen"
        code = (
            "import pathlib, sys, time\n"
            "print('first', flush=True)\n"
            "deadline = time.monotonic() + 10\n"
            f"while not pathlib.Path({str(flag)!r}).exists():\n"
            "    if time.monotonic() > deadline: sys.exit(7)\n"
            "    time.sleep(0.01)\n"
            "print('second')\n"
        )
        seen: list[str] = []

        def on_line(line: str) -> None:
            seen.append(line)
            flag.touch()

        result = await run_command([PY, "-c", code], cwd=tmp_path, on_line=on_line)
        assert result.returncode == 0
        assert seen == ["first", "second"]

    async def test_separate_stderr_goes_to_its_own_callback(self, tmp_path: Path) -> None:
        """With on_stderr_line, stderr lines are kept apart from stdout lines."""
        code = "import sys; print('o'); print('e', file=sys.stderr)"
        out: list[str] = []
        err: list[str] = []
        await run_command(
            [PY, "-c", code], cwd=tmp_path, on_line=out.append, on_stderr_line=err.append
        )
        assert (out, err) == (["o"], ["e"])

    async def test_tail_keeps_the_last_lines_and_replaces_bad_bytes(self, tmp_path: Path) -> None:
        """Only the last OUTPUT_TAIL_LINES lines are kept; invalid UTF-8 becomes U+FFFD."""
        code = (
            "import sys\n"
            "for i in range(1000): print(i)\n"
            "sys.stdout.flush(); sys.stdout.buffer.write(b'bad \\xff end')"
        )
        result = await run_command([PY, "-c", code], cwd=tmp_path)
        lines = result.output_tail.splitlines()
        assert len(lines) == OUTPUT_TAIL_LINES
        assert lines[0] == str(1000 - OUTPUT_TAIL_LINES + 1)
        assert lines[-1] == "bad \ufffd end"

    async def test_missing_command_names_command_and_cwd(self, tmp_path: Path) -> None:
        """A command that does not exist is a ConfigurationError naming it and the cwd."""
        with pytest.raises(ConfigurationError) as caught:
            await run_command("no-such-command-xyz --flag", cwd=tmp_path)
        assert "no-such-command-xyz" in str(caught.value)
        assert str(tmp_path) in str(caught.value)

    async def test_missing_working_directory(self, tmp_path: Path) -> None:
        """A missing cwd is a ConfigurationError naming the directory, not the command."""
        with pytest.raises(ConfigurationError, match="working directory"):
            await run_command([PY, "-V"], cwd=tmp_path / "absent")

    async def test_empty_command_is_refused(self, tmp_path: Path) -> None:
        """An empty command string is a ConfigurationError."""
        with pytest.raises(ConfigurationError, match="empty"):
            await run_command("   ", cwd=tmp_path)


class TestStopping:
    async def test_cancel_kills_group_that_ignores_sigterm(self, tmp_path: Path) -> None:
        """Cancelling kills the child and its grandchild although both ignore SIGTERM."""
        task, grandchild = await start_stubborn(tmp_path, kill_grace_seconds=0.2)
        pgid = os.getpgid(grandchild)
        assert pgid != os.getpgid(0)  # the command leads its own group
        started = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert time.monotonic() - started < 5
        assert not running(grandchild)
        assert living_members(pgid) == []

    async def test_timeout_scope_kills_the_group(self, tmp_path: Path) -> None:
        """asyncio.timeout around run_command (how a watchdog stops a stage) kills the group."""
        lines: list[str] = []
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.5):
                await run_command(
                    [PY, "-c", STUBBORN], cwd=tmp_path, on_line=lines.append,
                    kill_grace_seconds=0.2,
                )
        grandchild = int(lines[0].split()[1])
        assert not running(grandchild)

    async def test_grace_period_survives_level_triggered_cancellation(
        self, tmp_path: Path
    ) -> None:
        """Under an anyio cancel scope the child still gets its grace period to clean up."""
        done = tmp_path / "cleaned-up"
        code = (
            "import pathlib, signal, sys, time\n"
            "def stop(*_):\n"
            "    time.sleep(0.3)\n"
            f"    pathlib.Path({str(done)!r}).touch()\n"
            "    sys.exit(0)\n"
            "signal.signal(signal.SIGTERM, stop)\n"
            "print('ready', flush=True)\n"
            "time.sleep(60)\n"
        )
        ready = anyio.Event()
        with anyio.move_on_after(5) as scope:
            async with anyio.create_task_group() as group:
                group.start_soon(
                    lambda: run_command(
                        [PY, "-c", code], cwd=tmp_path, on_line=lambda _: ready.set(),
                        kill_grace_seconds=3,
                    )
                )
                await ready.wait()
                group.cancel_scope.cancel()
        assert not scope.cancelled_caught
        assert done.exists()

    async def test_cooperative_child_does_not_wait_for_the_grace(self, tmp_path: Path) -> None:
        """A group that exits on SIGTERM ends the cancellation at once, not after the grace."""
        lines: asyncio.Queue[str] = asyncio.Queue()
        code = "import time; print('up', flush=True); time.sleep(60)"
        task = asyncio.create_task(
            run_command([PY, "-c", code], cwd=tmp_path, on_line=lines.put_nowait,
                        kill_grace_seconds=30)
        )
        await asyncio.wait_for(lines.get(), timeout=10)
        started = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert time.monotonic() - started < 5

    async def test_leftover_holding_the_output_is_killed_after_exit(self, tmp_path: Path) -> None:
        """A grandchild that keeps stdout open after the child exits is killed after the grace."""
        code = (
            "import subprocess, sys\n"
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
            "print(p.pid)\n"
        )
        started = time.monotonic()
        result = await run_command([PY, "-c", code], cwd=tmp_path, kill_grace_seconds=0.2)
        assert result.returncode == 0
        assert time.monotonic() - started < 10
        assert not running(int(result.output_tail))

    async def test_error_in_on_line_stops_the_command(self, tmp_path: Path) -> None:
        """An exception raised by on_line propagates and the command's group is killed."""
        def explode(line: str) -> None:
            raise RuntimeError(f"callback failed on {line}")

        code = "import os, time; print(os.getpid(), flush=True); time.sleep(60)"
        started = time.monotonic()
        with pytest.raises(RuntimeError, match="callback failed"):
            await run_command([PY, "-c", code], cwd=tmp_path, on_line=explode,
                              kill_grace_seconds=0.2)
        assert time.monotonic() - started < 10


class TestFormatCommand:
    def test_values_are_shell_quoted(self) -> None:
        """Each value is quoted, so spaces and metacharacters stay one argument."""
        command = format_command(
            "{python} agent.py {prompt_file} --cwd {worktree}",
            prompt_file="my prompt; rm -rf x.md",
            worktree="/tmp/w",
        )
        assert command == f"{PY} agent.py 'my prompt; rm -rf x.md' --cwd /tmp/w"

    def test_python_defaults_to_this_interpreter(self) -> None:
        """{python} is sys.executable unless given."""
        assert format_command("{python} -V") == f"{PY} -V"
        assert format_command("{python}", python="/usr/bin/python3") == "/usr/bin/python3"

    def test_double_braces_are_literal(self) -> None:
        """{{ and }} produce literal braces."""
        assert format_command("echo {{x}}") == "echo {x}"

    @pytest.mark.parametrize("template", ["{prompt}", "{python!r}", "{python:>10}", "{}"])
    def test_unknown_or_formatted_placeholder_is_refused(self, template: str) -> None:
        """A placeholder with no value (or with a conversion/spec) is a ConfigurationError."""
        with pytest.raises(ConfigurationError, match="unknown placeholder"):
            format_command(template, prompt_file="p.md")

    def test_unbalanced_brace_is_refused(self) -> None:
        """A lone brace is a malformed template."""
        with pytest.raises(ConfigurationError, match="malformed"):
            format_command("echo {python")
