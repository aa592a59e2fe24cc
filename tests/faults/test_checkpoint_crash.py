"""Crash during checkpoint writes: SIGKILL while the store's writer is mid-batch.

Two hundred workflows whose stages never wait keep the group-commit writer and the
state-file materializer busy without pause; every stage asks for a checkpoint file. The
child is killed at seeded moments inside that stream of writes.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

from fault_flows import BURST_STAGES, effect_counts
from fault_helpers import (
    STATES,
    Snapshots,
    cli_env,
    decode_every_state_file,
    kill_when,
    resume_all_completes,
    stages_started,
    start_cli,
    write_prompts,
)


def test_sigkill_mid_batch_leaves_no_torn_file_and_reruns_only_in_flight_stages(
    tmp_path: Path,
) -> None:
    """200 workflows x 8 checkpointed stages, killed 4 times while writing: every state
    and checkpoint file decodes, and at most each workflow's in-flight stage re-runs."""
    workflows, kills_wanted = 200, 4
    rng = random.Random(4242)
    root = tmp_path / "project"
    root.mkdir()
    prompts = write_prompts(tmp_path / "prompts", workflows)
    env = cli_env(WORKFLOW_CONCURRENCY=str(workflows), WORKFLOW_CHECKPOINT_FREQUENCY="1",
                  WORKFLOW_ENABLE_MONITORING="false")
    snapshots = Snapshots()
    log = tmp_path / "child.log"
    command = ["batch", str(prompts), "--definition", "fault_flows:BURST", "--json"]
    kills = 0
    for _ in range(kills_wanted):
        start = stages_started(root)
        with open(log, "wb") as output:
            child = start_cli(root, *command, output=output, env=env)
        kill_at: list[float] = []

        def writer_busy_a_while(start: int = start, kill_at: list[float] = kill_at) -> bool:
            # Once stages run, the writer is busy; then a seeded extra 0-40 ms (a resume of the
            # rest finishes in a few hundred ms, so the kill must land before that).
            if not kill_at:
                if stages_started(root) <= start:
                    return False
                kill_at.append(time.monotonic() + rng.uniform(0.0, 0.04))
            return time.monotonic() >= kill_at[0]

        if not kill_when(child, writer_busy_a_while, log=log):
            break
        kills += 1
        empty = [p for p in (root / STATES).glob("workflow-*/state.json")
                 if p.stat().st_size == 0]
        assert not empty, empty
        snapshots.take(root)  # decodes every file before and after the journal's replay
        command = ["resume", "--all", "--json"]

    states = resume_all_completes(root, env, workflows=workflows)
    assert kills == kills_wanted
    counts = effect_counts(root)
    reruns = 0
    for workflow_id in states:
        assert set(counts[workflow_id]) == set(BURST_STAGES)
        extra = sum(counts[workflow_id].values()) - len(BURST_STAGES)
        assert extra <= kills
        reruns += extra
    snapshots.assert_completed_stages_never_ran_again(counts)
    # Every state.json (and whatever checkpoint files exist) decodes. Checkpoint files
    # whose writes were pending at a kill are not re-created by the replay: the journal
    # was the durable copy, and state.json is brought up to date from it.
    assert len(list((root / STATES).glob("workflow-*/state.json"))) == workflows
    assert decode_every_state_file(root) >= workflows
    assert reruns > 0  # the kills did land mid-stage somewhere
