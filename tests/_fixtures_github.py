"""Fixtures for the forge tests: real git repositories and the GitHub emulator.

Import the fixtures into a test module (``from _fixtures_github import ...``); they are kept
out of ``conftest.py`` on purpose.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from github_emulator import GitHubEmulator

__all__ = ["GIT_ENV", "bare_remote", "gh", "git", "work_repo"]

GIT_ENV = {
    **os.environ,
    "GIT_AUTHOR_NAME": "Test", "GIT_AUTHOR_EMAIL": "test@example.invalid",
    "GIT_COMMITTER_NAME": "Test", "GIT_COMMITTER_EMAIL": "test@example.invalid",
    "GIT_CONFIG_NOSYSTEM": "1", "GIT_TERMINAL_PROMPT": "0",
}


def git(repo: Path, *args: str) -> str:
    """Run git in ``repo`` (synchronously: fixtures only) and return its stdout."""
    result = subprocess.run(["git", "-C", str(repo), *args], env=GIT_ENV, check=True,
                            capture_output=True, text=True)
    return result.stdout.strip()


def commit(repo: Path, name: str, content: str) -> str:
    """Write a file, commit it, and return the new commit's sha."""
    (repo / name).write_text(content)
    git(repo, "add", name)
    git(repo, "commit", "-q", "-m", f"add {name}")
    return git(repo, "rev-parse", "HEAD")


@pytest.fixture
def work_repo(tmp_path: Path) -> Path:
    """A git work tree on ``main`` with one commit, and a branch ``feature`` one ahead."""
    repo = tmp_path / "work"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    commit(repo, "README.md", "hello\n")
    git(repo, "checkout", "-q", "-b", "feature")
    commit(repo, "feature.txt", "feature\n")
    git(repo, "checkout", "-q", "main")
    return repo


@pytest.fixture
def bare_remote(tmp_path: Path, work_repo: Path) -> Path:
    """A bare repository holding ``main`` and ``feature`` pushed from ``work_repo``."""
    bare = tmp_path / "remote.git"
    subprocess.run(["git", "init", "-q", "--bare", str(bare)], check=True, env=GIT_ENV)
    git(work_repo, "push", "-q", str(bare), "main", "feature")
    return bare


@pytest.fixture
def gh(bare_remote: Path) -> Iterator[GitHubEmulator]:
    """A running GitHub emulator for acme/widgets backed by ``bare_remote``."""
    with GitHubEmulator(owner="acme", repo="widgets", bare_repo=bare_remote) as emulator:
        yield emulator
