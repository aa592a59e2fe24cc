"""The development workflow's review wait: parked at review_processing until a review.

Real repositories, the example agent and real pytest, on the local forge and on the GitHub
emulator. The review poller is driven by calling it (``poll_reviews``), never by waiting
for its 60 s timer; the ``signal`` command runs as a real subprocess.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import urllib.request
from pathlib import Path

import pytest
from dev_helpers import PROMPTS, TOKEN, dev_config, example_repo, github_setup
from github_emulator import GitHubEmulator

from machines.development._forge import LocalForge
from machines.development._stages import poll_reviews
from reliability import Runtime, WorkflowConfiguration, WorkflowResult

__all__ = ["example_repo", "github_setup"]  # fixtures used by name below

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent


async def _parked_at_review(runtime: Runtime) -> WorkflowResult:
    """Run the first example prompt until it parks; check it waits for signal review."""
    result = await runtime.run(PROMPTS[0])
    assert (result.status, result.success) == ("waiting", False), result.error
    state = (await runtime.store.load(result.workflow_id)).state
    assert state["status"] == "waiting"
    assert state["wait"]["stage"] == "review_processing"
    assert state["wait"]["signal"] == "review"
    assert runtime.waker.parked_count == 1 and runtime.live(result.workflow_id) is None
    return result


async def _poll_finds_nothing(runtime: Runtime, workflow_id: str) -> None:
    """No review yet: the poller sends nothing, and nothing wakes."""
    await poll_reviews(runtime, [workflow_id])
    assert await runtime.store.read_signal(workflow_id, "review", 0) is None  # type: ignore[attr-defined]
    assert await runtime.settle_woken() == []


def _completed_approved(woken: list[WorkflowResult], workflow_id: str) -> None:
    assert [r.workflow_id for r in woken] == [workflow_id]
    assert woken[0].status == "completed", woken[0].error
    assert woken[0].outputs["review_state"] == "approved"


def _local(**changes: object) -> WorkflowConfiguration:
    return dev_config(**{"reviewers": ["alice"], **changes})


class TestLocalForge:
    async def test_a_review_added_on_the_forge_wakes_the_workflow_via_the_poller(
            self, example_repo: Path) -> None:
        """Parked at review_processing; alice approves on the local forge; one poll
        signals it and it completes with review_state approved."""
        async with Runtime(_local(), example_repo) as runtime:
            parked = await _parked_at_review(runtime)
            await _poll_finds_nothing(runtime, parked.workflow_id)
            forge = LocalForge(example_repo)
            await forge.add_review(int(parked.outputs["pr_number"]), "alice", "APPROVED")
            await poll_reviews(runtime, [parked.workflow_id])
            woken = await runtime.settle_woken()
        _completed_approved(woken, parked.workflow_id)

    async def test_the_signal_command_wakes_the_workflow_with_its_verdict(
            self, example_repo: Path) -> None:
        """``workflow-manager signal ID review --data '{"state": "approved"}'`` from
        another process: the runtime's next notice scan wakes the workflow, approved
        (no review is on the forge: the payload decides)."""
        async with Runtime(_local(), example_repo) as runtime:
            parked = await _parked_at_review(runtime)
            await runtime.store.list_states()  # the state file is written for the command
            command = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "reliability", "signal", "--project-root",
                str(example_repo), parked.workflow_id, "review", "--data",
                json.dumps({"state": "approved"}), stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
            out, err = await command.communicate()
            assert command.returncode == 0, err.decode()
            assert "sent" in out.decode()
            # This call or the runtime's own notice scan (whichever reads the notice
            # first) wakes it: one of them exactly.
            assert await runtime.wake_due() in (0, 1)
            woken = await runtime.settle_woken()
        _completed_approved(woken, parked.workflow_id)

    async def test_without_reviewers_review_processing_does_not_wait(
            self, example_repo: Path) -> None:
        """No reviewers requested: the workflow never parks; review_state is pending."""
        async with Runtime(_local(reviewers=[]), example_repo) as runtime:
            result = await runtime.run(PROMPTS[0])
            assert runtime.waker.parked_count == 0
        assert result.status == "completed", result.error
        assert result.outputs["review_state"] == "pending"
        assert result.outputs["reviewers_requested"] == []


def _post_review(gh: GitHubEmulator, number: int, token: str, event: str) -> int:
    request = urllib.request.Request(
        f"{gh.url}/repos/acme/widgets/pulls/{number}/reviews", method="POST",
        data=json.dumps({"event": event, "body": "looks good"}).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


class TestGitHubForge:
    async def test_a_review_posted_to_the_api_wakes_the_workflow_via_the_poller(
            self, github_setup: tuple[Path, Path, GitHubEmulator]) -> None:
        """Parked at review_processing; alice POSTs an approval; one poll signals it
        (through the github guard: two 502s on the reviews list are retried) and it
        completes with review_state approved."""
        repo, _, gh = github_setup
        config = dev_config(forge="github", github_api_url=gh.url,
                            github_repository="acme/widgets", github_token=TOKEN,
                            reviewers=["alice"])
        async with Runtime(config, repo) as runtime:
            parked = await _parked_at_review(runtime)
            number = int(parked.outputs["pr_number"])
            await _poll_finds_nothing(runtime, parked.workflow_id)
            # The bot cannot approve its own pull request; alice can.
            assert await asyncio.to_thread(_post_review, gh, number, TOKEN, "APPROVE") == 422
            alice = gh.token_for("alice")
            assert await asyncio.to_thread(_post_review, gh, number, alice, "APPROVE") == 200
            reviews = f"/repos/acme/widgets/pulls/{number}/reviews"
            gh.fail_next(2, 502, paths=[reviews], method="GET")
            await poll_reviews(runtime, [parked.workflow_id])
            woken = await runtime.settle_woken()
        _completed_approved(woken, parked.workflow_id)
        failed = [r for r in gh.requests if r.path == reviews and r.status == 502]
        assert len(failed) == 2
