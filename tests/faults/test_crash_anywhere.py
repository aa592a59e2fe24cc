"""Crash anywhere: the CLI is SIGKILLed at seeded random moments, then ``resume --all``.

Everything is real: ``python -m reliability`` in a child process, SIGKILL, the file store's
journal and state files, and (for the development workflow) git repositories and the
local forge. Kill points are seeded, so a failure replays the same schedule.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
from dev_helpers import bare_branches, commits_on_top, forge_records, git, make_example_repo
from fault_flows import SIX_STAGES, effect_counts
from fault_helpers import (
    AGENT_COMMAND,
    CLAIM_LOCKS,
    Snapshots,
    cli,
    cli_env,
    decode_every_state_file,
    kill_when,
    resume_all_completes,
    stages_started,
    start_cli,
    stored_states,
    write_prompts,
)

from machines.development import marker_for

SEED = 20240115


@pytest.mark.parametrize("portable", **CLAIM_LOCKS)
def test_batch_sigkilled_twenty_times_then_resume_all_runs_completed_stages_once(
    tmp_path: Path, portable: str,
) -> None:
    """40 six-stage workflows, 20 SIGKILLs at seeded points: all complete, no durably
    completed stage ever runs again, at most the in-flight stage re-runs per kill (both
    kinds of claim locks and writer ends)."""
    workflows, kills_wanted = 40, 20
    rng = random.Random(SEED)
    root = tmp_path / "project"
    root.mkdir()
    prompts = write_prompts(tmp_path / "prompts", workflows)
    env = cli_env(WORKFLOW_CONCURRENCY="40", WORKFLOW_STORE_PORTABLE=portable)
    snapshots = Snapshots()
    log = tmp_path / "child.log"
    kills = 0
    command = ["batch", str(prompts), "--definition", "fault_flows:LEDGER", "--json"]
    while kills < kills_wanted:
        start = stages_started(root)
        with open(log, "wb") as output:
            child = start_cli(root, *command, output=output, env=env)
        if kills > 0 and rng.random() < 0.25:
            # Anywhere, including start-up, journal replay and claiming.
            at = time.monotonic() + rng.uniform(0.0, 0.5)
            killed = kill_when(child, lambda at=at: time.monotonic() >= at, log=log)
        else:
            target = start + rng.randint(1, 4)
            killed = kill_when(child, lambda target=target: stages_started(root) >= target, log=log)
        if not killed:
            break  # everything finished before this kill point
        kills += 1
        snapshots.take(root)
        command = ["resume", "--all", "--json"]

    states = resume_all_completes(root, env, workflows=workflows)
    assert kills == kills_wanted
    counts = effect_counts(root)
    for workflow_id, state in states.items():
        assert state["completed_stages"] == list(SIX_STAGES)
        assert all(counts[workflow_id][s] >= 1 for s in SIX_STAGES)
        # One kill re-runs at most the one stage that was in flight.
        assert sum(counts[workflow_id].values()) - len(SIX_STAGES) <= kills
    snapshots.assert_completed_stages_never_ran_again(counts)
    assert decode_every_state_file(root) >= workflows


@pytest.mark.timeout(240)
def test_development_batch_sigkilled_then_resume_all_makes_one_of_each(tmp_path: Path) -> None:
    """Six development workflows killed three times mid-batch: per workflow exactly one
    issue, one branch, one commit and one pull request, and every state file validates."""
    rng = random.Random(SEED)
    repo = make_example_repo(tmp_path / "repo")
    examples = sorted((Path(__file__).resolve().parents[2] / "examples" / "prompts")
                      .glob("*.md"))
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    for copy in range(2):
        for example in examples:
            (prompts / f"{example.stem}-{copy}.md").write_text(example.read_text())
    env = cli_env(WORKFLOW_AGENT_COMMAND=AGENT_COMMAND, WORKFLOW_FORGE="local",
                  WORKFLOW_CONCURRENCY="6")
    forge = repo / ".github" / "workflow-forge"

    def effects() -> int:
        remote = forge / "remote.git"
        pushed = len(bare_branches(remote)) if (remote / "HEAD").exists() else 0
        return len(forge_records(repo, "issues")) + len(forge_records(repo, "pulls")) + pushed

    log = tmp_path / "child.log"
    command = ["batch", str(prompts), "--json"]
    kills = 0
    for _ in range(3):
        target = effects() + rng.randint(1, 4)
        with open(log, "wb") as output:
            child = start_cli(repo, *command, output=output, env=env)
        if not kill_when(child, lambda target=target: effects() >= target, log=log,
                          limit=120):
            break
        kills += 1
        decode_every_state_file(repo)
        command = ["resume", "--all", "--json"]

    final = cli(repo, "resume", "--all", "--json", env=env, timeout=150)

    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
    assert kills == 3
    states = stored_states(repo)
    assert len(states) == 6 and {s["status"] for s in states.values()} == {"completed"}
    main = git(repo, "rev-parse", "main")
    bare = forge / "remote.git"
    branches = bare_branches(bare)
    issues, pulls = forge_records(repo, "issues"), forge_records(repo, "pulls")
    assert len(issues) == len(pulls) == len(branches) == 6
    for workflow_id, state in states.items():
        outputs, marker = state["progress_data"], marker_for(workflow_id)
        assert [i["number"] for i in issues if marker in i["body"]] == [outputs["issue_number"]]
        assert [p["number"] for p in pulls if marker in p["body"]] == [outputs["pr_number"]]
        messages = commits_on_top(bare, outputs["branch_name"], main)
        assert len(messages) == 1 and marker in messages[0]
        assert branches[outputs["branch_name"]] == outputs["commit_sha"]
    assert decode_every_state_file(repo) >= 6
