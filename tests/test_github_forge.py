"""GitHubForge against the GitHub emulator: real HTTP over loopback, nothing patched."""

from __future__ import annotations

import asyncio
import logging
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest
from _fixtures_github import bare_remote, gh, git, work_repo
from github_emulator import GitHubEmulator

from machines.development._forge import WORKFLOW_LABEL
from machines.development._github import GitHubForge
from reliability._clock import FakeClock
from reliability._errors import (
    ConfigurationError,
    RateLimitedError,
    TransientError,
    WorkflowError,
)

__all__ = ["bare_remote", "gh", "work_repo"]  # fixtures used by name below

T = TypeVar("T")
MARKER = "<!-- workflow-manager:workflow-20240115-142315-a7b3 -->"
ISSUES = "/repos/acme/widgets/issues"
PULLS = "/repos/acme/widgets/pulls"


def retrying(attempts: int = 4) -> Callable[[Callable[[], Awaitable[T]]], Awaitable[T]]:
    """A minimal stand-in for the runtime's guard: retry transient errors a few times."""

    async def guard(attempt: Callable[[], Awaitable[T]]) -> T:
        for remaining in range(attempts - 1, -1, -1):
            try:
                return await attempt()
            except TransientError:
                if remaining == 0:
                    raise
                await asyncio.sleep(0.01)
        raise AssertionError("unreachable")

    return guard


@pytest.fixture
async def forge(gh: GitHubEmulator) -> AsyncIterator[GitHubForge]:
    async with GitHubForge("acme/widgets", gh.token, api_url=gh.url,
                           timeout_seconds=2) as forge:
        yield forge


class TestIssues:
    async def test_find_then_create_then_find_makes_exactly_one_issue(
        self, forge: GitHubForge, gh: GitHubEmulator
    ) -> None:
        """A re-run that looks up its marker first finds the issue the first run made."""
        assert await forge.find_issue(MARKER) is None
        created = await forge.create_issue("Add widgets", f"Body\n\n{MARKER}", ["feature"])
        for _ in range(2):  # two re-runs of the stage
            found = await forge.find_issue(MARKER)
            if found is None:
                await forge.create_issue("Add widgets", f"Body\n\n{MARKER}", ["feature"])
        assert found == created
        assert list(gh.issues) == [created.number]
        labels = [label["name"] for label in gh.issues[created.number]["labels"]]
        assert labels == [WORKFLOW_LABEL, "feature"]
        assert created.url.endswith(f"/acme/widgets/issues/{created.number}")

    async def test_find_issue_follows_link_pagination_to_older_issues(
        self, forge: GitHubForge, gh: GitHubEmulator
    ) -> None:
        """An issue older than the first page of 100 is still found via the Link header."""
        old = gh.add_issue("old", f"x {MARKER}", [WORKFLOW_LABEL])
        for n in range(120):
            gh.add_issue(f"newer {n}", "other", [WORKFLOW_LABEL])
        found = await forge.find_issue(MARKER)
        assert found is not None and found.number == old
        assert [r.path for r in gh.requests] == [ISSUES, ISSUES]

    async def test_find_issue_ignores_unlabelled_issues_and_pull_requests(
        self, forge: GitHubForge, gh: GitHubEmulator
    ) -> None:
        """Only workflow-labelled issues count; pull requests in the issue list never do."""
        gh.add_issue("hand-made", f"copied {MARKER}", ["bug"])
        await forge.create_pull("PR", f"refs {MARKER}", "feature", "main")
        assert await forge.find_issue(MARKER) is None

    async def test_retry_after_lost_response_does_not_duplicate_the_issue(
        self, gh: GitHubEmulator
    ) -> None:
        """When GitHub created the issue but the response was lost, the retry returns it."""
        gh.drop_next(1, after_handling=True, method="POST")
        async with GitHubForge("acme/widgets", gh.token, api_url=gh.url,
                               guard=retrying()) as forge:
            issue = await forge.create_issue("T", f"B {MARKER}", [])
        assert list(gh.issues) == [issue.number]
        assert [(r.method, r.status) for r in gh.requests] == [
            ("POST", 0), ("GET", 200)]

    async def test_empty_marker_is_refused(self, forge: GitHubForge) -> None:
        """An empty marker would match every issue, so it is a configuration error."""
        with pytest.raises(ConfigurationError, match="marker"):
            await forge.find_issue("  ")


class TestPulls:
    async def test_create_find_and_get_pull_report_the_pushed_head_sha(
        self, forge: GitHubForge, gh: GitHubEmulator, work_repo: Path
    ) -> None:
        """The pull's head sha is the commit the branch points at in the remote."""
        sha = git(work_repo, "rev-parse", "feature")
        assert await forge.find_open_pull("feature") is None
        created = await forge.create_pull("Add widgets", "Closes #1", "feature", "main")
        assert (created.head_branch, created.head_sha, created.state) == ("feature", sha, "open")
        assert await forge.find_open_pull("feature") == created
        assert await forge.get_pull(created.number) == created
        assert gh.pulls[created.number]["base"]["ref"] == "main"

    async def test_pull_from_unpushed_branch_is_a_configuration_error(
        self, forge: GitHubForge
    ) -> None:
        """GitHub's 422 Validation Failed is reported with its message and errors."""
        with pytest.raises(ConfigurationError) as caught:
            await forge.create_pull("T", "B", "never-pushed", "main")
        assert "422" in str(caught.value)
        assert "Validation Failed (PullRequest head invalid)" in str(caught.value)

    async def test_second_create_pull_for_the_same_head_returns_the_open_one(
        self, forge: GitHubForge, gh: GitHubEmulator
    ) -> None:
        """A repeated create (say, after a lost response) yields the existing pull."""
        first = await forge.create_pull("T", "B", "feature", "main")
        again = await forge.create_pull("T", "B", "feature", "main")
        assert again == first
        assert len(gh.pulls) == 1

    async def test_closed_pull_is_not_found_as_open(
        self, forge: GitHubForge, gh: GitHubEmulator
    ) -> None:
        """find_open_pull only reports open pull requests."""
        pull = await forge.create_pull("T", "B", "feature", "main")
        gh.close_pull(pull.number)
        assert await forge.find_open_pull("feature") is None
        assert (await forge.get_pull(pull.number)).state == "closed"

    async def test_request_reviewers_and_review_state(
        self, forge: GitHubForge, gh: GitHubEmulator
    ) -> None:
        """Review state goes pending -> approved -> changes_requested as reviews arrive."""
        pull = await forge.create_pull("T", "B", "feature", "main")
        await forge.request_reviewers(pull.number, ["alice", "bob"])
        logins = [r["login"] for r in gh.pulls[pull.number]["requested_reviewers"]]
        assert logins == ["alice", "bob"]
        assert await forge.review_state(pull.number) == "pending"
        gh.add_review(pull.number, state="APPROVED", user="alice")
        assert await forge.review_state(pull.number) == "approved"
        gh.add_review(pull.number, state="CHANGES_REQUESTED", user="bob")
        assert await forge.review_state(pull.number) == "changes_requested"

    async def test_422_carries_githubs_message(self, forge: GitHubForge) -> None:
        """A 4xx other than 401 becomes a ConfigurationError quoting GitHub's message."""
        pull = await forge.create_pull("T", "B", "feature", "main")
        with pytest.raises(ConfigurationError,
                           match="422: Review cannot be requested from pull request author"):
            await forge.request_reviewers(pull.number, ["workflow-bot"])

    async def test_unknown_pull_is_a_404_configuration_error(self, forge: GitHubForge) -> None:
        """A pull request number that does not exist is reported, not retried."""
        with pytest.raises(ConfigurationError, match="GET /repos/acme/widgets/pulls/99 "
                                                     "answered 404: Not Found"):
            await forge.get_pull(99)


class TestFailures:
    async def test_502_is_transient(self, forge: GitHubForge, gh: GitHubEmulator) -> None:
        """A 5xx names the method, path and status, and may be retried."""
        gh.fail_next(1, status=502)
        with pytest.raises(TransientError, match="GET /repos/acme/widgets/issues answered 502"):
            await forge.find_issue(MARKER)

    async def test_dropped_connection_is_transient(
        self, forge: GitHubForge, gh: GitHubEmulator
    ) -> None:
        """A connection closed without a response is a transient error."""
        gh.drop_next(1)
        with pytest.raises(TransientError, match="failed before a response"):
            await forge.get_pull(1)

    async def test_slow_response_times_out_as_transient(self, gh: GitHubEmulator) -> None:
        """A response slower than timeout_seconds becomes a TransientError."""
        gh.latency(0.5)
        async with GitHubForge("acme/widgets", gh.token, api_url=gh.url,
                               timeout_seconds=0.1) as forge:
            with pytest.raises(TransientError, match=r"timed out after 0\.1s"):
                await forge.get_pull(1)

    async def test_secondary_rate_limit_honours_retry_after(
        self, forge: GitHubForge, gh: GitHubEmulator
    ) -> None:
        """429 with Retry-After: 2 gives retry_after == 2 exactly."""
        gh.rate_limit_next("secondary", retry_after=2)
        with pytest.raises(RateLimitedError) as caught:
            await forge.find_open_pull("feature")
        assert caught.value.retry_after == 2

    async def test_primary_rate_limit_waits_until_reset(self, gh: GitHubEmulator) -> None:
        """403 with X-RateLimit-Remaining: 0 waits until X-RateLimit-Reset on our clock."""
        clock = FakeClock(wall_start=1_700_000_000.0)
        gh.rate_limit_next("primary", reset_at=1_700_000_003)
        async with GitHubForge("acme/widgets", gh.token, api_url=gh.url,
                               clock=clock) as forge:
            with pytest.raises(RateLimitedError) as caught:
                await forge.find_open_pull("feature")
        assert caught.value.retry_after == 3.0

    async def test_plain_403_is_a_configuration_error(
        self, forge: GitHubForge, gh: GitHubEmulator
    ) -> None:
        """A 403 that is not a rate limit (no permission) is not retried."""
        gh.fail_next(1, status=403)
        with pytest.raises(ConfigurationError, match="403: Injected failure"):
            await forge.get_pull(1)

    async def test_outage_answers_every_request_until_it_ends(self, gh: GitHubEmulator) -> None:
        """During gh.outage every call fails transiently; once it ends calls succeed again."""
        assert gh.url.startswith("http://127.0.0.1:")
        inner = retrying(attempts=100)

        async def ending_after_three(attempt: Callable[[], Awaitable[T]]) -> T:
            async def counted() -> T:
                if len(gh.requests) == 3:  # three refused: end the outage (an event, no clock)
                    gh.outage(0)
                return await attempt()
            return await inner(counted)

        gh.outage(3600, status=503)
        async with GitHubForge("acme/widgets", gh.token, api_url=gh.url,
                               guard=ending_after_three) as forge:
            assert await forge.find_open_pull("feature") is None
        assert [r.status for r in gh.requests] == [503, 503, 503, 200]

    async def test_guard_sees_one_attempt_per_request(self, gh: GitHubEmulator) -> None:
        """Each guard call is exactly one HTTP request, so the guard owns every retry."""
        calls: list[int] = []
        inner = retrying(attempts=5)

        async def counting(attempt: Callable[[], Awaitable[T]]) -> T:
            async def counted() -> T:
                calls.append(1)
                return await attempt()
            return await inner(counted)

        gh.fail_next(2, status=503)
        async with GitHubForge("acme/widgets", gh.token, api_url=gh.url,
                               guard=counting) as forge:
            assert await forge.find_open_pull("feature") is None
        assert len(calls) == 3 == len(gh.requests)
        assert [r.status for r in gh.requests] == [503, 503, 200]


class TestConfigurationAndSecrets:
    @pytest.mark.parametrize("repository", ["", "acme", "acme/", "/widgets", "a/b/c",
                                            "acme/..", "https://github.com/acme/widgets"])
    def test_repository_must_be_owner_slash_name(self, repository: str) -> None:
        """A malformed repository is refused before any request is made."""
        with pytest.raises(ConfigurationError, match="owner/name"):
            GitHubForge(repository, "t")

    def test_empty_token_is_refused(self) -> None:
        """Without a token the user is told to set GITHUB_TOKEN or go offline."""
        with pytest.raises(ConfigurationError, match="GITHUB_TOKEN"):
            GitHubForge("acme/widgets", "")

    async def test_401_names_the_fix_and_never_the_token(self, gh: GitHubEmulator) -> None:
        """Bad credentials say to set GITHUB_TOKEN, without echoing the token."""
        secret = "ghp_wrongTokenThatMustNeverLeak42"
        async with GitHubForge("acme/widgets", secret, api_url=gh.url) as forge:
            with pytest.raises(ConfigurationError) as caught:
                await forge.find_issue(MARKER)
        assert "401 Bad credentials" in str(caught.value)
        assert "acme/widgets" in str(caught.value) and "GITHUB_TOKEN" in str(caught.value)
        assert secret not in _everything_about(caught.value)

    async def test_token_never_appears_in_errors_reprs_or_logs(
        self, gh: GitHubEmulator, caplog: pytest.LogCaptureFixture
    ) -> None:
        """No failure path puts the token in a message, a traceback, a repr or a log."""
        caplog.set_level(logging.DEBUG)
        errors: list[BaseException] = []
        async with GitHubForge("acme/widgets", gh.token, api_url=gh.url,
                               timeout_seconds=0.2) as forge:
            injections: list[Callable[[], None]] = [
                lambda: gh.fail_next(1, 502), lambda: gh.drop_next(1),
                lambda: gh.rate_limit_next("primary"), lambda: gh.fail_next(1, 422),
                lambda: gh.latency(0.4)]
            for inject in injections:
                inject()
                with pytest.raises(WorkflowError) as caught:
                    await forge.get_pull(1)
                errors.append(caught.value)
            text = repr(forge) + repr(forge.__dict__) + caplog.text
        assert len(errors) == 5
        for error in errors:
            assert gh.token not in _everything_about(error)
        assert gh.token not in text


class TestHealth:
    async def test_health_reports_remaining_rate_limit(
        self, forge: GitHubForge, gh: GitHubEmulator
    ) -> None:
        """A healthy forge is reachable and reports its remaining API calls."""
        await forge.find_open_pull("feature")
        health = await forge.health()
        assert health.reachable
        assert health.rate_limit_remaining == gh.rate_limit - 1
        assert forge.label == "GitHub acme/widgets"

    async def test_health_reports_an_outage_instead_of_raising(
        self, forge: GitHubForge, gh: GitHubEmulator
    ) -> None:
        """During an outage health() says unreachable and why."""
        gh.outage(5, status=503)
        health = await forge.health()
        assert not health.reachable and "503" in health.detail
        assert health.rate_limit_remaining is None

    async def test_prepare_remote_requires_origin(
        self, forge: GitHubForge, work_repo: Path, bare_remote: Path
    ) -> None:
        """The GitHub forge pushes to 'origin', which must already exist."""
        with pytest.raises(ConfigurationError, match="no git remote 'origin'"):
            await forge.prepare_remote(work_repo)
        git(work_repo, "remote", "add", "origin", str(bare_remote))
        assert await forge.prepare_remote(work_repo) == "origin"


def _everything_about(error: BaseException) -> str:
    """The error's message, repr, args and full formatted traceback chain."""
    return "".join([str(error), repr(error), repr(error.args),
                    *traceback.format_exception(error)])
