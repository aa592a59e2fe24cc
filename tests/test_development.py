"""The development workflow end to end: real git repositories, the example agent, real pytest.

Both forges are exercised: the offline local forge (JSON records and a bare remote under the
project) and GitHub, through the REST emulator over loopback HTTP.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest
from dev_helpers import (
    AGENT_COMMAND,
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
    workflow_ids,
)
from github_emulator import GitHubEmulator

from machines.development import marker_for
from reliability import Runtime, WorkflowConfiguration, run_workflow

EXAMPLE_AGENT = Path(__file__).resolve().parents[1] / "examples" / "agent.py"

__all__ = ["example_repo", "github_setup"]  # fixtures used by name below

pytestmark = pytest.mark.timeout(60)

ISSUES = "/repos/acme/widgets/issues"


def _files_under(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _assert_token_absent(repo: Path, *texts: str) -> None:
    """The token is nowhere in the logs, state files, checkpoints or the given texts."""
    github = repo / ".github"
    searched = [p for d in ("workflow-logs", "workflow-states", "workflow-checkpoints")
                for p in (github / d).rglob("*") if p.is_file()]
    assert any(p.suffix == ".log" for p in searched), "no log file was written"
    leaks = [str(p) for p in searched if TOKEN.encode() in p.read_bytes()]
    assert leaks == []
    for text in texts:
        assert TOKEN not in text


class TestLocalForge:
    async def test_every_example_prompt_completes_with_one_issue_pr_and_commit(
        self, example_repo: Path
    ) -> None:
        """Three concurrent workflows each leave one issue, one PR and one marked commit."""
        async with Runtime(dev_config(), example_repo) as runtime:
            results = await asyncio.gather(*(runtime.run(p) for p in PROMPTS))

        assert [r.status for r in results] == ["completed"] * 3, [r.error for r in results]
        issues, pulls = forge_records(example_repo, "issues"), forge_records(example_repo,
                                                                            "pulls")
        assert len(issues) == len(pulls) == 3
        bare = example_repo / ".github" / "workflow-forge" / "remote.git"
        branches = bare_branches(bare)
        assert set(branches) == {r.outputs["branch_name"] for r in results}
        main = git(example_repo, "rev-parse", "main")
        for result in results:
            out, marker = result.outputs, marker_for(result.workflow_id)
            assert out["branch_name"] == f"feature/{out['slug']}-{out['issue_number']}"
            assert [i["number"] for i in issues if marker in i["body"]] == [out["issue_number"]]
            mine = [p for p in pulls if p["head_branch"] == out["branch_name"]]
            assert [p["number"] for p in mine] == [out["pr_number"]]
            assert mine[0]["head_sha"] == out["commit_sha"] == branches[out["branch_name"]]
            assert_one_marked_commit(bare, out["branch_name"], result.workflow_id, main)
            assert out["worktree_removed"] is True
            assert_worktree_removed(example_repo, out["worktree"])
            assert out["test_counts"].get("passed", 0) >= 2
            assert out["test_counts"].get("failed", 0) == 0
            assert read_state(example_repo, result.workflow_id)["status"] == "completed"
        assert sorted(workflow_ids(example_repo)) == sorted(r.workflow_id for r in results)


class TestGitHubForge:
    async def test_run_opens_one_issue_and_one_pr_at_the_pushed_commit(
        self, github_setup: tuple[Path, Path, GitHubEmulator]
    ) -> None:
        """On GitHub: one issue, one PR whose head is our commit, reviewers requested."""
        repo, bare, gh = github_setup
        # Issues and pull requests share one sequence: issue #1, then pull request #2.
        gh.add_review(2, "APPROVED", user="alice")
        config = dev_config(forge="github", github_api_url=gh.url,
                            github_repository="acme/widgets", github_token=TOKEN,
                            reviewers=["alice", "bob"])

        result = await run_workflow(PROMPTS[0], config=config, project_root=repo)

        assert result.status == "completed", result.error
        out = result.outputs
        assert list(gh.issues) == [out["issue_number"]] == [1]
        assert marker_for(result.workflow_id) in gh.issues[1]["body"]
        assert list(gh.pulls) == [out["pr_number"]] == [2]
        pull = gh.pulls[2]
        assert pull["head"]["ref"] == out["branch_name"]
        assert pull["head"]["sha"] == out["commit_sha"] == bare_branches(bare)[out["branch_name"]]
        assert [r["login"] for r in pull["requested_reviewers"]] == ["alice", "bob"]
        assert out["review_state"] == "approved"
        assert_one_marked_commit(bare, out["branch_name"], result.workflow_id,
                                 git(repo, "rev-parse", "main"))
        assert_worktree_removed(repo, out["worktree"])
        assert read_state(repo, result.workflow_id)["status"] == "completed"
        _assert_token_absent(repo, json.dumps(result.to_dict(), default=str))

    async def test_configuration_built_in_python_takes_the_token_from_the_environment(
        self, github_setup: tuple[Path, Path, GitHubEmulator], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """WorkflowConfiguration(forge="github", github_repository=...) with GITHUB_TOKEN in
        the environment runs on GitHub; the token shows nowhere."""
        repo, _, gh = github_setup
        monkeypatch.setenv("GITHUB_TOKEN", TOKEN)
        config = WorkflowConfiguration(forge="github", github_repository="acme/widgets",
                                       github_api_url=gh.url, agent_command=AGENT_COMMAND,
                                       retry_base_delay=0.01, retry_max_delay=0.5)
        assert TOKEN not in repr(config) + json.dumps(config.redacted())

        result = await run_workflow(PROMPTS[0], config=config, project_root=repo)

        assert result.status == "completed", result.error
        assert list(gh.pulls) == [result.outputs["pr_number"]]
        _assert_token_absent(repo, json.dumps(result.to_dict(), default=str))


BAD_PROMPTS = {
    "missing": None,
    "empty": b"",
    "binary": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)),
    "no-requirements": b"# Add a thing\n\n## Overview\n\nIt would be nice to have a thing.\n",
    "huge-sparse": "sparse",
}


def _write_prompt(path: Path, content: bytes | str | None) -> Path:
    if content == "sparse":
        with open(path, "wb") as handle:
            handle.truncate(50 * 1024 * 1024)  # 50 MB of holes: no disk used
    elif isinstance(content, bytes):
        path.write_bytes(content)
    return path


class TestBadPrompts:
    @pytest.mark.parametrize("kind", list(BAD_PROMPTS))
    async def test_bad_prompt_fails_as_configuration_before_any_side_effect(
        self, kind: str, github_setup: tuple[Path, Path, GitHubEmulator], tmp_path: Path
    ) -> None:
        """A bad prompt fails the run (configuration, file named), creating nothing."""
        repo, _, gh = github_setup
        config = dev_config(forge="github", github_api_url=gh.url,
                            github_repository="acme/widgets", github_token=TOKEN)
        async with Runtime(config, repo) as runtime:  # another workflow, stored before
            other = await runtime.register(PROMPTS[0])
        states = repo / ".github" / "workflow-states"
        before = _files_under(states / other)
        prompt = _write_prompt(tmp_path / f"{kind}.md", BAD_PROMPTS[kind])

        result = await run_workflow(prompt, config=config, project_root=repo)

        assert (result.status, result.error_category) == ("failed", "configuration")
        assert result.error is not None and str(prompt) in result.error
        assert result.current_stage == "initialization"
        assert gh.issues == {} and gh.pulls == {}
        assert not any(r.path.startswith(ISSUES) for r in gh.requests)
        assert _files_under(states / other) == before
        assert sorted(workflow_ids(repo)) == sorted([other, result.workflow_id])
        assert read_state(repo, result.workflow_id)["status"] == "failed"
        assert read_state(repo, other)["status"] == "pending"
        _assert_token_absent(repo, result.error, json.dumps(result.to_dict(), default=str))


class TestHealthProbes:
    async def test_run_registers_forge_git_and_agent_probes(self, example_repo: Path) -> None:
        """After a run, health checks report the forge, git status and the agent command."""
        async with Runtime(dev_config(), example_repo, configure_logs=False) as runtime:
            result = await runtime.run(PROMPTS[0])
            health = await runtime.perform_health_check()
        assert result.status == "completed"
        probes = health.custom["development_health"]
        assert probes["git_status"] == "clean"
        assert probes["github_connectivity"] is True
        assert probes["claude_availability"] is True
        assert probes["forge"] == "local forge (offline)"

    async def test_agent_gone_from_disk_degrades_health(self, example_repo: Path,
                                                         tmp_path: Path) -> None:
        """An agent command that disappears after the run makes health DEGRADED, naming it."""
        agent = tmp_path / "bin" / "my-agent"
        agent.parent.mkdir()
        agent.write_text(f"#!/bin/sh\nexec {sys.executable} {EXAMPLE_AGENT} \"$@\"\n")
        agent.chmod(0o755)
        config = dev_config(agent_command=f"{agent} {{prompt_file}}",
                            enable_health_checks=False)  # nothing cached during the run
        async with Runtime(config, example_repo, configure_logs=False) as runtime:
            assert (await runtime.run(PROMPTS[0])).status == "completed"
            agent.unlink()
            health = await runtime.perform_health_check()
        assert health.status.value == "DEGRADED"
        assert health.custom["development_health"]["claude_availability"] is False
        assert any(str(agent) in advice for advice in health.recommendations)
