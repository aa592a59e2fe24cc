"""One workflow, two processes: ``resume ID`` twice at once; exactly one runs it."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from fault_flows import effect_lines
from fault_helpers import CLAIM_LOCKS, ROOT, cli, cli_env, stored_states


def _start(root: Path, env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "reliability", *args, "--project-root",
                             str(root)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("portable", **CLAIM_LOCKS)
def test_two_resumes_of_one_workflow_at_once_run_it_once(tmp_path: Path, portable: str) -> None:
    """Both start together: one holds the claim and completes (exit 0); the other is
    refused at once with exit 1 and a line naming the held lock; cancel from a third
    process is refused too; every stage ran once (both kinds of claim locks)."""
    env = cli_env(WORKFLOW_STORE_PORTABLE=portable)
    root = tmp_path / "project"
    root.mkdir()
    prompt = tmp_path / "p.md"
    prompt.write_text("# p\n")
    # A run parked in its "hold" stage, then stopped: interrupted, resumable.
    first = _start(root, env, "run", str(prompt), "--definition", "fault_flows:PARK")
    deadline = time.monotonic() + 60
    while not any("hold 1" in effect_lines(root, w) for w in _workflow_ids(root)):
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.02)
    first.terminate()  # SIGTERM: a safe stop, checkpointed as interrupted
    first.communicate(timeout=60)
    assert first.returncode == 130
    [workflow_id] = _workflow_ids(root)

    racers = [_start(root, env, "resume", workflow_id, "--json") for _ in range(2)]
    while all(r.poll() is None for r in racers):  # the loser ends; the winner holds
        assert time.monotonic() < deadline, "neither resume ended"
        time.sleep(0.02)
    [loser] = [r for r in racers if r.poll() is not None]
    [winner] = [r for r in racers if r is not loser]
    stderr = loser.communicate()[1]
    cancel = cli(root, "cancel", workflow_id, env=env)
    (root / "release").touch()
    err = winner.communicate(timeout=60)[1]

    assert loser.returncode == 1
    assert "Traceback" not in stderr
    assert f"workflow {workflow_id} is already running (its lock " in stderr
    assert "is held); not starting it twice" in stderr
    assert winner.returncode == 0, err
    assert cancel.returncode == 1 and "running in another process" in cancel.stderr
    assert stored_states(root)[workflow_id]["status"] == "completed"
    # one and two ran in the first process; hold ran there (interrupted) and once more.
    assert effect_lines(root, workflow_id) == ["one 1", "two 1", "hold 1", "hold 1", "four 1"]


def _workflow_ids(root: Path) -> list[str]:
    states = root / ".github" / "workflow-states"
    return sorted(p.name for p in states.glob("workflow-*")) if states.is_dir() else []
