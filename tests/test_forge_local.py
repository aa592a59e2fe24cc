"""LocalForge: the offline forge's records, numbering, remote and exactly-once lookups."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest
from _fixtures_github import git, work_repo

from machines.development._forge import (
    WORKFLOW_LABEL,
    LocalForge,
    summarize_reviews,
)
from reliability._clock import FakeClock
from reliability._errors import ConfigurationError, StateCorruptedError

__all__ = ["work_repo"]  # fixture used by name below

MARKER = "<!-- workflow-manager:workflow-20240115-142315-a7b3 -->"
PROJECT_ROOT = Path(__file__).resolve().parents[1]

_CREATE_20 = """
import asyncio, sys, time
from pathlib import Path
from machines.development._forge import LocalForge

async def main() -> None:
    root, name = Path(sys.argv[1]), sys.argv[2]
    forge = LocalForge(root)
    # A start barrier, so the two processes really contend for numbers.
    (root.parent / f"ready-{name}").touch()
    while len(list(root.parent.glob("ready-*"))) < 2:
        time.sleep(0.002)
    for i in range(20):
        issue = await forge.create_issue(f"{name}-{i}", "body", [])
        print(issue.number)

asyncio.run(main())
"""


@pytest.fixture
def forge(tmp_path: Path) -> LocalForge:
    return LocalForge(tmp_path / "project", clock=FakeClock(wall_start=1_705_328_595.0))


def forge_dir(forge: LocalForge) -> Path:
    return forge.root / ".github" / "workflow-forge"


class TestIssues:
    async def test_find_then_create_then_find_makes_exactly_one_issue(
        self, forge: LocalForge
    ) -> None:
        """A re-run that looks up its marker first finds the issue the first run made."""
        assert await forge.find_issue(MARKER) is None
        created = await forge.create_issue("Add widgets", f"Body\n{MARKER}", ["feature"])
        found = await forge.find_issue(MARKER)
        assert found == created and created.number == 1
        assert await forge.find_issue("<!-- workflow-manager:other -->") is None
        record = json.loads((forge_dir(forge) / "issues" / "1.json").read_text())
        assert record["labels"] == [WORKFLOW_LABEL, "feature"]
        assert record["created_at"] == "2024-01-15T14:23:15Z"
        assert created.url == (forge_dir(forge) / "issues" / "1.json").as_uri()

    async def test_fifty_concurrent_creates_get_numbers_one_to_fifty(
        self, forge: LocalForge
    ) -> None:
        """Concurrent workflows in one loop never share an issue number."""
        issues = await asyncio.gather(
            *(forge.create_issue(f"t{i}", f"b{i}", []) for i in range(50)))
        assert sorted(issue.number for issue in issues) == list(range(1, 51))
        names = os.listdir(forge_dir(forge) / "issues")
        assert sorted(names) == sorted(f"{n}.json" for n in range(1, 51))  # no temp files

    async def test_two_processes_creating_twenty_each_get_forty_unique_numbers(
        self, forge: LocalForge
    ) -> None:
        """The file lock makes numbering safe across processes, not just tasks."""
        env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
        processes = [
            await asyncio.create_subprocess_exec(
                sys.executable, "-c", _CREATE_20, str(forge.root), name, env=env,
                stdout=asyncio.subprocess.PIPE)
            for name in ("a", "b")
        ]
        outputs = await asyncio.gather(*(p.communicate() for p in processes))
        assert [p.returncode for p in processes] == [0, 0]
        numbers = [int(n) for out, _ in outputs for n in out.split()]
        assert sorted(numbers) == list(range(1, 41))
        titles = [json.loads((forge_dir(forge) / "issues" / f"{n}.json").read_text())["title"]
                  for n in range(1, 41)]
        assert sorted(titles) == sorted(f"{p}-{i}" for p in "ab" for i in range(20))

    async def test_torn_record_is_reported_not_skipped(self, forge: LocalForge) -> None:
        """A corrupt record stops the lookup: skipping it could duplicate an issue."""
        await forge.create_issue("t", MARKER, [])
        (forge_dir(forge) / "issues" / "1.json").write_text('{"number": 1, "bo')
        with pytest.raises(StateCorruptedError, match=r"1\.json"):
            await forge.find_issue(MARKER)


class TestPulls:
    async def test_prepare_remote_creates_the_bare_repo_and_remote_once(
        self, forge: LocalForge, work_repo: Path
    ) -> None:
        """prepare_remote is idempotent and points 'workflow-forge' at the bare repo."""
        assert await forge.prepare_remote(work_repo) == "workflow-forge"
        assert await forge.prepare_remote(work_repo) == "workflow-forge"
        remote = forge_dir(forge) / "remote.git"
        assert git(work_repo, "remote", "get-url", "workflow-forge") == str(remote)
        assert (remote / "HEAD").is_file()
        assert not [p for p in os.listdir(forge_dir(forge)) if p.startswith(".remote-")]

    async def test_concurrent_prepare_remote_agrees_on_one_remote(
        self, forge: LocalForge, work_repo: Path
    ) -> None:
        """Several workflows preparing the same repository at once all succeed."""
        names = await asyncio.gather(*(forge.prepare_remote(work_repo) for _ in range(5)))
        assert names == ["workflow-forge"] * 5

    async def test_pull_reports_the_pushed_head_sha_and_is_created_once(
        self, forge: LocalForge, work_repo: Path
    ) -> None:
        """create/find/get agree on the pull, whose head is the pushed branch's commit."""
        remote = await forge.prepare_remote(work_repo)
        git(work_repo, "push", "-q", remote, "main", "feature")
        sha = git(work_repo, "rev-parse", "feature")
        assert await forge.find_open_pull("feature") is None
        pull = await forge.create_pull("Add widgets", "Closes #1", "feature", "main")
        assert (pull.number, pull.head_branch, pull.head_sha, pull.state) == (
            1, "feature", sha, "open")
        assert await forge.find_open_pull("feature") == pull
        assert await forge.get_pull(1) == pull
        assert await forge.create_pull("again", "x", "feature", "main") == pull

    async def test_get_pull_follows_a_later_push(
        self, forge: LocalForge, work_repo: Path
    ) -> None:
        """Pushing more commits moves an open pull's head sha, as on GitHub."""
        remote = await forge.prepare_remote(work_repo)
        git(work_repo, "push", "-q", remote, "feature")
        pull = await forge.create_pull("T", "B", "feature", "main")
        git(work_repo, "checkout", "-q", "feature")
        git(work_repo, "commit", "-q", "--allow-empty", "-m", "more")
        git(work_repo, "push", "-q", remote, "feature")
        new_sha = git(work_repo, "rev-parse", "HEAD")
        assert new_sha != pull.head_sha
        assert (await forge.get_pull(pull.number)).head_sha == new_sha

    async def test_pull_from_unpushed_branch_is_a_configuration_error(
        self, forge: LocalForge, work_repo: Path
    ) -> None:
        """The branch must be pushed to the forge's remote before its pull is opened."""
        await forge.prepare_remote(work_repo)
        with pytest.raises(ConfigurationError, match=r"'feature'.*was not pushed"):
            await forge.create_pull("T", "B", "feature", "main")

    async def test_unknown_pull_is_a_configuration_error(self, forge: LocalForge) -> None:
        """Asking for a pull that does not exist says which one."""
        with pytest.raises(ConfigurationError, match="pull #7 does not exist"):
            await forge.get_pull(7)

    async def test_reviewers_and_review_state_come_from_the_record(
        self, forge: LocalForge, work_repo: Path
    ) -> None:
        """Requested reviewers are recorded; reviews a person adds decide the state."""
        remote = await forge.prepare_remote(work_repo)
        git(work_repo, "push", "-q", remote, "feature")
        pull = await forge.create_pull("T", "B", "feature", "main")
        await forge.request_reviewers(pull.number, ["alice", "alice", "bob"])
        path = forge_dir(forge) / "pulls" / "1.json"
        record = json.loads(path.read_text())
        assert record["requested_reviewers"] == ["alice", "bob"]
        assert await forge.review_state(pull.number) == "pending"
        record["reviews"] = [{"user": "alice", "state": "APPROVED"}]
        path.write_text(json.dumps(record))
        assert await forge.review_state(pull.number) == "approved"


class TestHealthAndLabels:
    async def test_health_and_label_say_offline(self, forge: LocalForge) -> None:
        """The local forge is labelled offline and healthy when its folder is writable."""
        health = await forge.health()
        assert health.reachable and health.rate_limit_remaining is None
        assert forge.label == "local forge (offline)"


class TestSummarizeReviews:
    @pytest.mark.parametrize(("reviews", "expected"), [
        ([], "pending"),
        ([("a", "COMMENTED")], "commented"),
        ([("a", "APPROVED"), ("b", "COMMENTED")], "approved"),
        ([("a", "APPROVED"), ("b", "CHANGES_REQUESTED")], "changes_requested"),
        ([("a", "CHANGES_REQUESTED"), ("a", "APPROVED")], "approved"),
        ([("a", "APPROVED"), ("a", "DISMISSED")], "pending"),
        ([("a", "PENDING")], "pending"),
    ])
    def test_latest_decisive_review_per_user_wins(
        self, reviews: list[tuple[str, str]], expected: str
    ) -> None:
        """Each reviewer's latest approval or change request counts; dismissals cancel."""
        assert summarize_reviews(reviews) == expected
