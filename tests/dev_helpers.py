"""Shared helpers for the development-workflow tests: real repositories, configs, forge records.

Everything here is real: example repositories made by ``examples/make_repo.py``, bare git
remotes, the GitHub emulator over loopback HTTP, and the example agent as a subprocess.
Import the fixtures into a test module by name (they are kept out of ``conftest.py``).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _fixtures_github import GIT_ENV, git
from github_emulator import GitHubEmulator

from machines.development import marker_for
from reliability import WorkflowConfiguration, load_configuration
from reliability._store import FileStore

__all__ = [
    "AGENT_COMMAND",
    "PROJECT_ROOT",
    "PROMPTS",
    "TOKEN",
    "assert_one_marked_commit",
    "assert_worktree_removed",
    "bare_branches",
    "commits_on_top",
    "dev_config",
    "example_repo",
    "forge_records",
    "git",
    "github_setup",
    "make_example_repo",
    "read_state",
    "stored_state",
    "workflow_ids",
]

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PROMPTS = sorted((PROJECT_ROOT / "examples" / "prompts").glob("*.md"))
AGENT_COMMAND = f"{{python}} {PROJECT_ROOT / 'examples' / 'agent.py'} {{prompt_file}}"
TOKEN = "ghp_TESTSECRET123"
"""A recognisable token: it must never show up in a log, a state file or a message."""

def make_example_repo(directory: Path) -> Path:
    """The example project (one commit on ``main``) made by ``examples/make_repo.py``."""
    subprocess.run([sys.executable, str(PROJECT_ROOT / "examples" / "make_repo.py"),
                    str(directory)], check=True, capture_output=True, env=GIT_ENV)
    return directory


@pytest.fixture
def example_repo(tmp_path: Path) -> Path:
    """A fresh example repository under ``tmp_path``."""
    return make_example_repo(tmp_path / "repo")


def dev_config(**overrides: Any) -> WorkflowConfiguration:
    """A configuration for tests: the example agent, the local forge, fast retries.

    The environment is ignored (``environ={}``), so a developer's ``GITHUB_TOKEN`` or
    ``WORKFLOW_*`` variables never change what a test does.
    """
    settings: dict[str, Any] = {
        "agent_command": AGENT_COMMAND, "forge": "local", "retry_base_delay": 0.01,
        "retry_max_delay": 0.5, "log_level": "INFO",
    }
    settings.update(overrides)
    return load_configuration(environ={}, **settings)


def forge_records(repo: Path, kind: str) -> list[dict[str, Any]]:
    """The local forge's ``issues`` or ``pulls`` records, by number."""
    folder = repo / ".github" / "workflow-forge" / kind
    paths = sorted(folder.glob("*.json"), key=lambda p: int(p.stem)) if folder.is_dir() else []
    return [json.loads(p.read_text()) for p in paths]


def bare_branches(bare: Path) -> dict[str, str]:
    """Branch name to commit sha in the bare repository ``bare``."""
    out = git(bare, "for-each-ref", "--format=%(refname:short) %(objectname)", "refs/heads")
    return dict(line.split(" ", 1) for line in out.splitlines() if line)


def commits_on_top(bare: Path, branch: str, base: str) -> list[str]:
    """The full messages of the commits on ``branch`` that revision ``base`` lacks, newest
    first (the local forge's remote holds no ``main``, so pass a sha there)."""
    out = git(bare, "log", "--format=%B%x00", f"{base}..{branch}")
    return [m.strip() for m in out.split("\x00") if m.strip()]


def workflow_ids(repo: Path) -> list[str]:
    """The IDs of the workflows stored under ``repo``: a directory each, or, before their
    first state file is written, records in a journal (one JSON document per line)."""
    states = repo / ".github" / "workflow-states"
    if not states.is_dir():
        return []
    found = {p.name for p in states.iterdir() if p.name.startswith("workflow-")}
    for journal in (states / "_journal").glob("journal-*.log"):
        for line in journal.read_bytes().splitlines():
            with contextlib.suppress(ValueError):  # a torn last line
                found.add(json.loads(line)["state"]["workflow_id"])
    return sorted(found)


def read_state(repo: Path, workflow_id: str) -> dict[str, Any]:
    """The workflow's current state from its ``state.json`` (the ``state`` document)."""
    path = repo / ".github" / "workflow-states" / workflow_id / "state.json"
    state: dict[str, Any] = json.loads(path.read_text())["state"]
    return state


async def stored_state(repo: Path, workflow_id: str) -> dict[str, Any]:
    """The workflow's state as a new process sees it: a ``FileStore`` is opened (replaying
    the journal of a process that died) and the state loaded through it."""
    github = repo / ".github"
    store = FileStore(github / "workflow-states", github / "workflow-checkpoints")
    await store.open()
    try:
        return (await store.load(workflow_id)).state
    finally:
        await store.close()


def assert_one_marked_commit(bare: Path, branch: str, workflow_id: str, main: str) -> None:
    """``branch`` in ``bare`` is exactly one commit on top of ``main`` (a sha), with the marker."""
    messages = commits_on_top(bare, branch, main)
    assert len(messages) == 1, messages
    assert marker_for(workflow_id) in messages[0]


def assert_worktree_removed(repo: Path, worktree: str) -> None:
    """The workflow's worktree directory is gone and git no longer lists it."""
    assert not Path(worktree).exists()
    listed = git(repo, "worktree", "list", "--porcelain")
    assert f"worktree {worktree}\n" not in f"{listed}\n"


@pytest.fixture
def github_setup(tmp_path: Path) -> Iterator[tuple[Path, Path, GitHubEmulator]]:
    """An example repo whose ``origin`` is a bare repo, and an emulator serving it.

    The emulator resolves pull request heads in the same bare repository the workflow
    pushes to, and accepts only ``TOKEN``.
    """
    repo = make_example_repo(tmp_path / "repo")
    bare = tmp_path / "origin.git"
    subprocess.run(["git", "init", "-q", "--bare", str(bare)], check=True, env=GIT_ENV)
    git(repo, "remote", "add", "origin", str(bare))
    git(repo, "push", "-q", "origin", "main")
    with GitHubEmulator(owner="acme", repo="widgets", token=TOKEN, bare_repo=bare) as gh:
        yield repo, bare, gh
