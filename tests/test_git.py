"""Git helpers on real repositories: idempotent worktrees, exactly-once commits, diffs."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from machines.development._commands import run_command
from machines.development._git import (
    COMMITTER_NAME,
    STATE_EXCLUDE_PATTERN,
    branch_exists,
    commit_all,
    diff_numstat,
    ensure_bare_remote,
    ensure_repository,
    ensure_worktree,
    git,
    head_sha,
    push,
    remove_worktree,
    repository_files,
    status,
)
from reliability._errors import ConfigurationError, TransientError

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
MARKER = "Workflow-Id: workflow-20240115-142315-a7b3"


def sh_git(repo: Path, *args: str) -> str:
    """git run directly (not through the code under test), for assertions."""
    completed = subprocess.run(
        ["git", "-C", str(repo), *args], check=True, capture_output=True, text=True
    )
    return completed.stdout.strip()


def exists(path: Path) -> bool:
    return path.exists()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A fresh example repository made by examples/make_repo.py (one commit on main)."""
    path = tmp_path / "repo"
    subprocess.run([sys.executable, str(EXAMPLES / "make_repo.py"), str(path)], check=True,
                   capture_output=True)
    return path


@pytest.fixture
async def worktree(repo: Path, tmp_path: Path) -> Path:
    """A worktree of ``repo`` on a new branch ``feature/x`` started from main."""
    return await ensure_worktree(repo, tmp_path / "wt", "feature/x", "main")


class TestBasics:
    async def test_git_returns_stripped_stdout(self, repo: Path) -> None:
        """git() gives stdout without surrounding whitespace."""
        assert await git(repo, "rev-parse", "--abbrev-ref", "HEAD") == "main"

    async def test_not_a_repository_is_a_configuration_error(self, tmp_path: Path) -> None:
        """Outside a repository the error is ConfigurationError carrying git's message."""
        with pytest.raises(ConfigurationError, match="not a git repository"):
            await git(tmp_path, "status")

    async def test_held_index_lock_is_transient(self, repo: Path) -> None:
        """Another git process's index.lock is a TransientError (retrying may succeed)."""
        (repo / ".git" / "index.lock").touch()
        (repo / "new.txt").write_text("x\n")
        with pytest.raises(TransientError, match=r"index\.lock"):
            await git(repo, "add", "new.txt")

    async def test_status_and_branch_exists(self, repo: Path, tmp_path: Path) -> None:
        """status() reports clean/dirty/error without raising; branch_exists() is exact."""
        assert await status(repo) == "clean"
        (repo / "scratch.txt").write_text("x\n")
        assert await status(repo) == "dirty"
        assert await status(tmp_path / "missing") == "error"
        assert await status(tmp_path) == "error"
        assert await branch_exists(repo, "main")
        assert not await branch_exists(repo, "mai")

    async def test_repository_files_are_limited(self, repo: Path) -> None:
        """repository_files lists tracked files only, at most ``limit`` of them."""
        (repo / "untracked.txt").write_text("x\n")
        files = await repository_files(repo, 100)
        assert files == sorted([".gitignore", "README.md", "pytest.ini", "tests/test_smoke.py"])
        assert await repository_files(repo, 2) == files[:2]
        assert await repository_files(repo, 0) == []


class TestEnsureRepository:
    async def test_state_directories_never_make_the_tree_dirty(self, repo: Path) -> None:
        """After ensure_repository, files under .github/workflow-*/ are ignored, once."""
        await ensure_repository(repo)
        await ensure_repository(repo)
        exclude = (repo / ".git" / "info" / "exclude").read_text().splitlines()
        assert exclude.count(STATE_EXCLUDE_PATTERN) == 1
        state = repo / ".github" / "workflow-states" / "w1"
        state.mkdir(parents=True)
        (state / "state.json").write_text("{}")
        assert await status(repo) == "clean"
        (repo / ".github" / "other.yml").write_text("x: 1\n")
        assert await status(repo) == "dirty"

    async def test_repository_without_commits_is_refused(self, tmp_path: Path) -> None:
        """An empty repository cannot host a workflow: ConfigurationError says so."""
        sh_git(tmp_path, "init", "--quiet")
        with pytest.raises(ConfigurationError, match="no commits"):
            await ensure_repository(tmp_path)

    async def test_plain_directory_is_refused(self, tmp_path: Path) -> None:
        """A directory that is no repository gives ConfigurationError."""
        with pytest.raises(ConfigurationError, match="not a git repository"):
            await ensure_repository(tmp_path)


class TestWorktrees:
    async def test_new_branch_starts_at_base(self, repo: Path, worktree: Path) -> None:
        """A new branch is created from base and checked out in the worktree."""
        assert sh_git(worktree, "rev-parse", "--abbrev-ref", "HEAD") == "feature/x"
        assert sh_git(worktree, "rev-parse", "HEAD") == sh_git(repo, "rev-parse", "main")
        assert (worktree / "README.md").is_file()

    async def test_second_call_reuses_the_worktree(self, repo: Path, worktree: Path) -> None:
        """Calling ensure_worktree again changes nothing and keeps uncommitted work."""
        (worktree / "work.txt").write_text("in progress\n")
        again = await ensure_worktree(repo, worktree, "feature/x", "main")
        assert again == worktree
        assert (worktree / "work.txt").read_text() == "in progress\n"

    async def test_deleted_worktree_directory_is_recreated_on_its_branch(
        self, repo: Path, worktree: Path
    ) -> None:
        """After the directory was deleted by hand, the stale entry is pruned and the
        worktree recreated on the existing branch, with its commits."""
        (worktree / "feature.txt").write_text("done\n")
        sha = await commit_all(worktree, "Add feature", MARKER)
        shutil.rmtree(worktree)
        again = await ensure_worktree(repo, worktree, "feature/x", "main")
        assert sh_git(again, "rev-parse", "HEAD") == sha
        assert (again / "feature.txt").read_text() == "done\n"

    async def test_existing_branch_without_worktree_is_attached(
        self, repo: Path, tmp_path: Path
    ) -> None:
        """A branch left by a crash (no worktree) is checked out, not recreated from base."""
        sh_git(repo, "branch", "feature/y", "main")
        sh_git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "--allow-empty",
               "-qm", "later on main")
        path = await ensure_worktree(repo, tmp_path / "wy", "feature/y", "main")
        assert sh_git(path, "rev-parse", "HEAD") == sh_git(repo, "rev-parse", "feature/y")
        assert sh_git(path, "rev-parse", "HEAD") != sh_git(repo, "rev-parse", "main")

    async def test_missing_base_branch(self, repo: Path, tmp_path: Path) -> None:
        """A base that does not exist is a ConfigurationError naming it."""
        with pytest.raises(ConfigurationError, match="'develop' does not exist"):
            await ensure_worktree(repo, tmp_path / "wt", "feature/z", "develop")

    async def test_invalid_branch_name(self, repo: Path, tmp_path: Path) -> None:
        """A branch name git refuses is a ConfigurationError."""
        with pytest.raises(ConfigurationError, match="not a valid git branch name"):
            await ensure_worktree(repo, tmp_path / "wt", "bad..name", "main")

    async def test_worktree_on_another_branch_is_refused(
        self, repo: Path, worktree: Path
    ) -> None:
        """A path already used by a worktree on another branch is not silently reused."""
        with pytest.raises(ConfigurationError, match="feature/x"):
            await ensure_worktree(repo, worktree, "feature/other", "main")

    async def test_remove_keeps_the_branch_and_is_idempotent(
        self, repo: Path, worktree: Path
    ) -> None:
        """remove_worktree deletes the checkout (even dirty), keeps the branch; twice is fine."""
        (worktree / "dirty.txt").write_text("x\n")
        await remove_worktree(repo, worktree)
        await remove_worktree(repo, worktree)
        assert not exists(worktree)
        assert await branch_exists(repo, "feature/x")
        assert str(worktree) not in sh_git(repo, "worktree", "list")


class TestCommits:
    async def test_commit_is_made_exactly_once(self, worktree: Path) -> None:
        """A second commit_all with the same marker returns the same sha and commits nothing."""
        (worktree / "a.py").write_text("A = 1\n")
        first = await commit_all(worktree, "Add a", MARKER)
        count = sh_git(worktree, "rev-list", "--count", "HEAD")
        (worktree / "b.py").write_text("B = 2\n")
        second = await commit_all(worktree, "Add a", MARKER)
        assert first is not None
        assert second == first
        assert sh_git(worktree, "rev-list", "--count", "HEAD") == count
        assert MARKER in sh_git(worktree, "log", "-1", "--format=%B")
        authors = sh_git(worktree, "log", "-1", "--format=%an|%cn")
        assert authors == f"{COMMITTER_NAME}|{COMMITTER_NAME}"

    async def test_nothing_to_commit_returns_none(self, worktree: Path) -> None:
        """With no change, commit_all returns None and HEAD stays."""
        before = await head_sha(worktree)
        assert await commit_all(worktree, "Nothing", MARKER) is None
        assert await head_sha(worktree) == before

    async def test_commit_includes_untracked_and_deleted_files(self, worktree: Path) -> None:
        """Everything is committed: new, changed and deleted files."""
        (worktree / "new.txt").write_text("new\n")
        (worktree / "README.md").unlink()
        sha = await commit_all(worktree, "Change all", MARKER)
        assert sha == sh_git(worktree, "rev-parse", "HEAD")
        assert sh_git(worktree, "status", "--porcelain") == ""
        changed = sh_git(worktree, "show", "--name-status", "--format=", "HEAD").splitlines()
        assert sorted(changed) == ["A\tnew.txt", "D\tREADME.md"]

    async def test_diff_counts_commits_and_untracked_files(self, worktree: Path) -> None:
        """diff_numstat covers committed work and a brand-new untracked file."""
        (worktree / "committed.py").write_text("a\nb\n")
        await commit_all(worktree, "Add committed", MARKER)
        (worktree / "untracked.py").write_text("x\ny\nz\n")
        with (worktree / "README.md").open("a") as readme:
            readme.write("more\n")
        stat = await diff_numstat(worktree, "main")
        assert sorted(stat.files_changed) == ["README.md", "committed.py", "untracked.py"]
        assert stat.lines_added == 6
        assert stat.lines_deleted == 0

    async def test_diff_against_missing_base(self, worktree: Path) -> None:
        """An unknown base is a ConfigurationError."""
        with pytest.raises(ConfigurationError, match="'nope' does not exist"):
            await diff_numstat(worktree, "nope")


class TestRemotes:
    async def test_bare_remote_and_push(self, repo: Path, worktree: Path, tmp_path: Path) -> None:
        """ensure_bare_remote is idempotent; push publishes the branch, twice without error."""
        bare = tmp_path / "remote.git"
        await ensure_bare_remote(repo, bare, "origin")
        await ensure_bare_remote(repo, bare, "origin")
        assert sh_git(repo, "remote", "get-url", "origin") == str(bare)
        assert sh_git(bare, "rev-parse", "main") == sh_git(repo, "rev-parse", "main")
        (worktree / "f.txt").write_text("f\n")
        sha = await commit_all(worktree, "Add f", MARKER)
        await push(worktree, "origin", "feature/x")
        await push(worktree, "origin", "feature/x")
        assert sh_git(bare, "rev-parse", "feature/x") == sha

    async def test_remote_is_repointed(self, repo: Path, tmp_path: Path) -> None:
        """An existing remote with another URL is re-pointed at the bare repository."""
        sh_git(repo, "remote", "add", "origin", "/elsewhere.git")
        await ensure_bare_remote(repo, tmp_path / "r.git", "origin")
        assert sh_git(repo, "remote", "get-url", "origin") == str(tmp_path / "r.git")

    async def test_non_bare_path_is_refused(self, repo: Path, tmp_path: Path) -> None:
        """A directory that is not a bare repository is never used as the remote."""
        (tmp_path / "plain").mkdir()
        (tmp_path / "plain" / "file").write_text("x")
        with pytest.raises(ConfigurationError, match="not a bare git repository"):
            await ensure_bare_remote(repo, tmp_path / "plain", "origin")


async def test_example_agent_output_passes_its_tests(repo: Path, tmp_path: Path) -> None:
    """The example agent, run in a worktree of a make_repo.py repo, writes code whose
    tests pass, and the work commits and diffs like real work."""
    await ensure_repository(repo)
    worktree = await ensure_worktree(repo, tmp_path / "wt", "feature/words", "main")
    prompt = EXAMPLES / "prompts" / "word-frequency.md"
    heartbeats: list[str] = []
    agent = await run_command(
        [sys.executable, str(EXAMPLES / "agent.py"), str(prompt)],
        cwd=worktree, on_line=heartbeats.append,
    )
    assert agent.returncode == 0, agent.output_tail
    assert any("word_frequency.py" in line for line in heartbeats)
    tests = await run_command(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=worktree
    )
    assert tests.returncode == 0, tests.output_tail
    assert "4 passed" in tests.output_tail
    stat = await diff_numstat(worktree, "main")
    assert sorted(stat.files_changed) == ["tests/test_word_frequency.py", "word_frequency.py"]
    assert await commit_all(worktree, "Add word frequency", MARKER) is not None
    again = await run_command(
        [sys.executable, str(EXAMPLES / "agent.py"), str(prompt)], cwd=worktree
    )
    assert again.returncode == 0
    assert await status(worktree) == "clean"  # idempotent: same bytes the second time
