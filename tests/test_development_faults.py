"""The development workflow under faults: SIGKILL in side-effecting stages, a GitHub outage.

Crashes are real: the workflow runs in a child process that is killed with SIGKILL, and a
new process resumes it. The outage is real HTTP 502s from the GitHub emulator on loopback.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from dev_helpers import (
    AGENT_COMMAND,
    PROJECT_ROOT,
    PROMPTS,
    TOKEN,
    assert_one_marked_commit,
    assert_worktree_removed,
    bare_branches,
    dev_config,
    example_repo,
    forge_records,
    git,
    github_setup,
    read_state,
    stored_state,
    workflow_ids,
)
from github_emulator import GitHubEmulator

from machines.development import marker_for
from reliability import Runtime

__all__ = ["example_repo", "github_setup"]  # fixtures used by name below

pytestmark = pytest.mark.timeout(90)

# The child: `run REPO PROMPT HOOK SENTINEL` or `resume REPO WORKFLOW_ID`. A hook wraps one
# real side-effecting call: the call runs for real, then the child writes SENTINEL and
# stops dead, so the parent's SIGKILL lands after the effect and before any record of it.
_CHILD = """
import asyncio, json, sys
from pathlib import Path

sys.path.insert(0, {tests!r})
from dev_helpers import dev_config
from machines.development import _git
from machines.development._forge import LocalForge
from reliability import resume_workflow, run_workflow

HOOKS = {{"create_issue": LocalForge, "ensure_worktree": _git, "commit_all": _git,
         "push": _git, "create_pull": LocalForge}}


def pause_after(name, sentinel):
    owner = HOOKS[name]
    original = getattr(owner, name)

    async def paused(*args, **kwargs):
        result = await original(*args, **kwargs)
        Path(sentinel).write_text(name)
        await asyncio.Event().wait()  # until SIGKILL

    setattr(owner, name, paused)


async def main(argv):
    config = dev_config()
    if argv[0] == "run":
        _, repo, prompt, hook, sentinel = argv
        if hook != "none":
            pause_after(hook, sentinel)
        result = await run_workflow(prompt, config=config, project_root=repo)
    else:
        _, repo, workflow_id = argv
        result = await resume_workflow(workflow_id, config=config, project_root=repo)
    print("RESULT " + json.dumps(result.to_dict(), default=str))


asyncio.run(main(sys.argv[1:]))
"""


def _child_script(tmp_path: Path) -> Path:
    script = tmp_path / "child.py"
    script.write_text(_CHILD.format(tests=str(PROJECT_ROOT / "tests")))
    return script


def _result_of(process: subprocess.CompletedProcess[str]) -> dict[str, object]:
    lines = [ln for ln in process.stdout.splitlines() if ln.startswith("RESULT ")]
    assert process.returncode == 0 and lines, process.stderr[-3000:]
    result: dict[str, object] = json.loads(lines[-1].removeprefix("RESULT "))
    return result


def _run_until(script: Path, repo: Path, hook: str, ready: Callable[[], bool]) -> None:
    """Start the workflow in a child and SIGKILL it once ``ready()`` is true.

    With ``hook`` (a call to pause after) the child writes ``ready-file`` beside the script.
    """
    log = script.with_name("crashed-child.log")
    with open(log, "wb") as output:  # a file, not a pipe: a full pipe would stall the child
        child = subprocess.Popen([sys.executable, str(script), "run", str(repo),
                                  str(PROMPTS[0]), hook, str(script.with_name("ready-file"))],
                                 cwd=PROJECT_ROOT,
                                 stdout=output, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 45
        while not ready():
            assert child.poll() is None, f"child ended early: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "the child never got to the crash point"
            time.sleep(0.01)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL


def _any(folder: Path) -> bool:
    return folder.is_dir() and any(folder.iterdir())


_FORGE = Path(".github") / "workflow-forge"
# The parent's view of each side effect, polled every 10 ms.
_EFFECTS: dict[str, Callable[[Path], bool]] = {
    "issue": lambda repo: (repo / _FORGE / "issues" / "1.json").exists(),
    "branch": lambda repo: _any(repo / ".git" / "refs" / "heads" / "feature"),
    "pushed": lambda repo: _any(repo / _FORGE / "remote.git" / "refs" / "heads" / "feature"),
    "pull": lambda repo: (repo / _FORGE / "pulls" / "1.json").exists(),
}


class TestCrashInSideEffectingStage:
    @pytest.mark.parametrize(("stage", "hook", "unrecorded"), [
        ("issue_creation", "create_issue", "issue_number"),
        ("branch_setup", "ensure_worktree", "branch_name"),
        ("pr_preparation", "commit_all", "commit_sha"),
        ("pr_preparation", "push", "remote"),
        ("pr_creation", "create_pull", "pr_number"),
    ])
    def test_sigkill_after_the_effect_then_resume_makes_it_exactly_once(
        self, stage: str, hook: str, unrecorded: str, example_repo: Path, tmp_path: Path
    ) -> None:
        """SIGKILL right after a stage's effect; a new process resumes without repeating it."""
        script = _child_script(tmp_path)
        _run_until(script, example_repo, hook, script.with_name("ready-file").exists)
        [workflow_id] = workflow_ids(example_repo)
        crashed = asyncio.run(stored_state(example_repo, workflow_id))
        assert crashed["status"] == "running"
        assert crashed["current_stage"] == stage
        assert stage not in crashed["completed_stages"]
        # The effect exists but the crashed run never recorded it: resume must find it.
        assert unrecorded not in crashed["progress_data"]

        resumed = _result_of(subprocess.run(
            [sys.executable, str(script), "resume", str(example_repo), workflow_id],
            cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60))

        assert resumed["status"] == "completed", resumed["error"]
        assert resumed["resumed_from"] == stage
        _assert_exactly_once(example_repo, workflow_id, resumed)

    @pytest.mark.parametrize("effect", list(_EFFECTS))
    def test_sigkill_soon_after_an_effect_appears_then_resume_completes_once(
        self, effect: str, example_repo: Path, tmp_path: Path
    ) -> None:
        """A kill timed from outside (it may land mid-git); ``resume --all`` finishes it once."""
        script = _child_script(tmp_path)
        _run_until(script, example_repo, "none", lambda: _EFFECTS[effect](example_repo))
        [workflow_id] = workflow_ids(example_repo)
        config = tmp_path / "config.json"
        config.write_text(json.dumps({"agent_command": AGENT_COMMAND, "forge": "local",
                                      "retry_base_delay": 0.01}))
        env = {k: v for k, v in os.environ.items()
               if k != "GITHUB_TOKEN" and not k.startswith("WORKFLOW_")}

        cli = subprocess.run(
            [sys.executable, "-m", "reliability", "resume", "--all", "--project-root",
             str(example_repo), "--config", str(config)],
            cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=60)

        assert cli.returncode == 0, cli.stdout[-2000:] + cli.stderr[-2000:]
        state = read_state(example_repo, workflow_id)
        assert state["status"] == "completed"
        _assert_exactly_once(example_repo, workflow_id, {"outputs": state["progress_data"]})


def _assert_exactly_once(repo: Path, workflow_id: str, result: dict[str, object]) -> None:
    outputs = result["outputs"]
    assert isinstance(outputs, dict)
    issues, pulls = forge_records(repo, "issues"), forge_records(repo, "pulls")
    assert [i["number"] for i in issues] == [outputs["issue_number"]] == [1]
    assert marker_for(workflow_id) in issues[0]["body"]
    assert [p["number"] for p in pulls] == [outputs["pr_number"]] == [1]
    bare = repo / ".github" / "workflow-forge" / "remote.git"
    branch = str(outputs["branch_name"])
    assert bare_branches(bare) == {branch: outputs["commit_sha"]}
    assert pulls[0]["head_sha"] == outputs["commit_sha"]
    assert_one_marked_commit(bare, branch, workflow_id, git(repo, "rev-parse", "main"))
    assert git(repo, "branch", "--list", "feature/*").strip(" *+") == branch
    assert_worktree_removed(repo, str(outputs["worktree"]))
    assert read_state(repo, workflow_id)["status"] == "completed"


class TestGitHubOutage:
    async def test_twenty_workflows_ride_out_an_outage_behind_one_breaker(
        self, github_setup: tuple[Path, Path, GitHubEmulator]
    ) -> None:
        """A 5 s outage in issue_creation: the breaker opens, probes sparsely, all complete."""
        repo, _, gh = github_setup
        threshold, recovery, outage = 3, 1.0, 5.0
        config = dev_config(
            forge="github", github_api_url=gh.url, github_repository="acme/widgets",
            github_token=TOKEN, concurrency=20, max_retries=20, retry_base_delay=0.05,
            retry_budget_seconds=120.0,
            circuit_breakers={"github": {"failure_threshold": threshold,
                                         "recovery_timeout": recovery}})
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(20)]

        def outage_at_issue_creation(event: str, run: object, **data: object) -> None:
            # Started when the first workflow enters the stage, so that a slow machine
            # cannot let the outage expire before any workflow reaches it.
            nonlocal started
            if event == "stage" and data.get("stage") == "issue_creation" and not started:
                started = True
                gh.outage(outage, status=502)

        started = False
        async with Runtime(config, repo) as runtime:
            runtime.add_listener(outage_at_issue_creation)
            results = await asyncio.gather(*(runtime.run(p) for p in prompts))
            breaker = runtime.breakers["github"]

        assert [r.status for r in results] == ["completed"] * 20, {r.error for r in results}
        assert breaker.open_count >= 1
        assert len(gh.issues) == 20 and len(gh.pulls) == 20
        markers = sorted(marker_for(r.workflow_id) for r in results)
        assert sorted(m for i in gh.issues.values() for m in markers if m in i["body"]) == markers
        # Health probes (GET /rate_limit) bypass the breaker on purpose; count API calls only.
        failed = [r for r in gh.requests if r.status >= 500 and r.path != "/rate_limit"]
        timeline = [round(r.at - failed[0].at, 3) for r in failed]
        # Requests already in flight when the breaker tripped all fail: at most about one
        # per workflow. After that, one probe per half-open window reaches the server.
        # (Without the breaker each workflow would retry every 50-500 ms: hundreds; a
        # half-open state letting every waiter through: about 20 per window.) Spacing on
        # the server's clock is not asserted: a loaded machine answers part of the first
        # burst a second late, which looks like a second burst.
        windows = int(outage / recovery) + 2
        assert breaker.probe_count <= windows
        assert len(failed) <= len(prompts) + threshold + windows, timeline
