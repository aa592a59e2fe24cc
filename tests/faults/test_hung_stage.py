"""A hung stage: an agent that never exits and ignores SIGTERM, with a grandchild.

Real processes and signals: the watchdog warns at the threshold, cancels the stage at its
timeout, the command's whole process group gets SIGTERM then SIGKILL, the stage's recovery
action runs, and the retry succeeds. Other workflows in the same loop are not slowed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import psutil
from fault_flows import HUNG, effect_lines
from fault_helpers import Records

from reliability import Runtime, WorkflowConfiguration, WorkflowResult


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def _run_one_hung_and_three_neighbours(root: Path
                                             ) -> tuple[WorkflowResult, float,
                                                        list[WorkflowResult], float]:
    config = WorkflowConfiguration(enable_health_checks=False, enable_monitoring=False)
    async with Runtime(config, root, configure_logs=False) as runtime:
        started = time.monotonic()
        hung_task = asyncio.create_task(runtime.run(HUNG, context={"hang": True}))
        neighbours = await asyncio.gather(*(runtime.run(HUNG, context={"hang": False})
                                            for _ in range(3)))
        neighbours_done = time.monotonic() - started
        hung = await hung_task
        return hung, time.monotonic() - started, neighbours, neighbours_done


def test_hung_agent_is_killed_at_the_timeout_and_recovered_without_orphans(
    tmp_path: Path, records: Records
) -> None:
    """Warning at 0.7 s, group killed at 2 s (SIGTERM ignored, so SIGKILL), recovery runs,
    the retry completes, no process survives, and three neighbours finish on time."""
    hung, hung_done, neighbours, neighbours_done = asyncio.run(
        _run_one_hung_and_three_neighbours(tmp_path))

    assert hung.status == "completed", hung.error
    [pid_file] = tmp_path.glob("pids-*")
    pids = [int(p) for p in pid_file.read_text().split()]
    assert len(pids) == 2 and not any(_alive(p) for p in pids)  # agent and its grandchild
    leftovers = [p.pid for p in psutil.process_iter(["cmdline"])
                 if str(pid_file) in " ".join(p.info["cmdline"] or ()) and _alive(p.pid)]
    assert leftovers == []

    assert effect_lines(tmp_path, hung.workflow_id) == [
        "prepare 1", "agent 1 start", "recovery agent StageTimeoutError", "agent 2 start",
        "agent 2 done", "finish 1"]
    messages = records.about(hung.workflow_id)
    warned = [m for m in messages if m.startswith("Stage agent still running after")]
    timed_out = [m for m in messages if m.startswith("Stage agent timed out after")]
    assert len(warned) == 1 and len(timed_out) == 1, messages
    # 0.2 s prepare + 2 s timeout + 0.5 s grace + retry + 0.2 s finish, with slack for load.
    assert 2.5 <= hung_done < 10.0

    assert [n.status for n in neighbours] == ["completed"] * 3
    assert neighbours_done < 3.0  # never held up by the hung stage (about 0.5 s unloaded)
    for neighbour in neighbours:
        assert records.about(neighbour.workflow_id) == []
        assert "recovery" not in " ".join(effect_lines(tmp_path, neighbour.workflow_id))
    assert not records.about(hung.workflow_id, logging.CRITICAL)
