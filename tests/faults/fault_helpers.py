"""Helpers of the fault-injection suite: the CLI in a real subprocess, state checks, logs."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import pytest
from fault_flows import effect_counts

from reliability import FileStore
from reliability._logging import current_workflow_id
from reliability._store import decode_document

ROOT = Path(__file__).resolve().parents[2]
FAULTS = Path(__file__).resolve().parent
STATES = Path(".github") / "workflow-states"
CHECKPOINTS = Path(".github") / "workflow-checkpoints"
AGENT_COMMAND = f"{{python}} {ROOT / 'examples' / 'agent.py'} {{prompt_file}}"


# Parametrizes a test over the two kinds of claim locks (and writer ends): Linux's, and
# the portable ones macOS and the BSDs use, forced here by WORKFLOW_STORE_PORTABLE=1.
CLAIM_LOCKS: dict[str, Any] = {
    "argvalues": [pytest.param("0", marks=pytest.mark.skipif(
        not sys.platform.startswith("linux"), reason="OFD byte locks are Linux's")), "1"],
    "ids": ["byte-locks", "portable"]}


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a CLI child: no developer WORKFLOW_* or token; quiet; imports
    ``fault_flows``. Health checks are off: on this loaded 2-core machine the CPU reading
    would hold new workflows at admission and make timings meaningless."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("WORKFLOW_") and k != "GITHUB_TOKEN"}
    env.update({"PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), str(FAULTS)]),
                "WORKFLOW_ENABLE_HEALTH_CHECKS": "false", "WORKFLOW_LOG_LEVEL": "WARNING",
                "WORKFLOW_RETRY_BASE_DELAY": "0.01", "WORKFLOW_RETRY_MAX_DELAY": "0.2"})
    env.update(extra)
    return env


def cli(root: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 90,
        **popen: Any) -> subprocess.CompletedProcess[str]:
    """``python -m reliability ARGS --project-root ROOT``, waited for."""
    return subprocess.run([sys.executable, "-m", "reliability", *args, "--project-root",
                           str(root)], cwd=ROOT, env=env or cli_env(), capture_output=True,
                          text=True, timeout=timeout, **popen)


def start_cli(root: Path, *args: str, output: BinaryIO, env: dict[str, str] | None = None,
              ) -> subprocess.Popen[bytes]:
    """The CLI started in the background; its output goes to a file (a pipe could fill)."""
    return subprocess.Popen([sys.executable, "-m", "reliability", *args, "--project-root",
                             str(root)], cwd=ROOT, env=env or cli_env(), stdout=output,
                            stderr=subprocess.STDOUT)


def write_prompts(directory: Path, count: int, stem: str = "prompt") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        (directory / f"{stem}-{i:03d}.md").write_text(f"# {stem} {i}\n\nDo {i}.\n")
    return directory


def state_files(root: Path) -> list[Path]:
    """Every state.json and checkpoint file under ``root``'s default directories."""
    return [*sorted((root / STATES).glob("workflow-*/state.json")),
            *sorted((root / CHECKPOINTS).glob("*.json"))]


def decode_every_state_file(root: Path) -> int:
    """Decode and validate every state and checkpoint file; raise on the first bad one."""
    files = state_files(root)
    for path in files:
        state = decode_document(path.read_bytes(), str(path))
        assert path.name == "state.json" or path.name.startswith(state["workflow_id"])
    return len(files)


def stored_states(root: Path) -> dict[str, dict[str, Any]]:
    """Every workflow's state as a new process sees it (a journal left by a dead process is
    replayed first)."""
    async def read() -> dict[str, dict[str, Any]]:
        store = FileStore(root / STATES, root / CHECKPOINTS, durable=False)
        await store.open()
        try:
            return {s.state["workflow_id"]: s.state for s in await store.list_states()}
        finally:
            await store.close()

    return asyncio.run(read())


def resume_all_completes(root: Path, env: dict[str, str], *, workflows: int
                         ) -> dict[str, dict[str, Any]]:
    """A last ``resume --all`` exits 0 and leaves exactly ``workflows`` completed states."""
    final = cli(root, "resume", "--all", "--json", env=env)
    assert final.returncode == 0, final.stdout[-2000:] + final.stderr[-2000:]
    states = stored_states(root)
    assert len(states) == workflows
    assert {s["status"] for s in states.values()} == {"completed"}
    return states


class Records(logging.Handler):
    """Collects the runtime's log records."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if not hasattr(record, "workflow_id"):
            record.workflow_id = current_workflow_id()  # as the runtime's own filter does
        self.records.append(record)

    def about(self, workflow_id: str, level: int = logging.WARNING) -> list[str]:
        return [r.getMessage() for r in self.records
                if r.levelno >= level and getattr(r, "workflow_id", None) == workflow_id]

    def messages(self, level: int = logging.DEBUG) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno >= level]


def stages_started(root: Path) -> int:
    """Progress: distinct (workflow, stage) pairs whose work has begun; re-runs don't count."""
    return sum(len(c) for c in effect_counts(root).values())


def kill_when(child: subprocess.Popen[bytes], ready: Callable[[], bool], *, log: Path,
               limit: float = 60.0) -> bool:
    """SIGKILL ``child`` as soon as ``ready()``; False if it ended by itself first."""
    deadline = time.monotonic() + limit
    while not ready():
        if child.poll() is not None:
            return False
        assert time.monotonic() < deadline, f"no progress: {log.read_text()[-2000:]}"
        time.sleep(0.005)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    return True


class Snapshots:
    """What the store held after each kill: completed stages and effect counts so far."""

    def __init__(self) -> None:
        self.taken: list[tuple[dict[str, set[str]], dict[str, Counter[str]]]] = []

    def take(self, root: Path) -> None:
        decode_every_state_file(root)  # before any replay: no torn file on disk
        states = stored_states(root)
        self.taken.append(({w: set(s.get("completed_stages") or ()) for w, s in states.items()},
                           effect_counts(root)))

    def assert_completed_stages_never_ran_again(self, final: dict[str, Counter[str]]) -> None:
        for completed, counts in self.taken:
            for workflow_id, stages in completed.items():
                for stage in stages:
                    assert final[workflow_id][stage] == counts[workflow_id][stage], (
                        f"{workflow_id}: {stage} was durably completed, yet ran again")
