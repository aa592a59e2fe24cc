"""Async git helpers for the development workflow, built on ``run_command``.

Every helper runs ``git -C <dir> ...`` in a subprocess (so a watchdog timeout kills it) and
turns a failure into the runtime's error taxonomy, with git's own output in the message:

- ``TransientError``: a lock held by another git process, or a network failure;
- ``ResourceError``: the disk is full;
- ``ConfigurationError``: not a repository, unknown branch or revision, bad remote or
  credentials: retrying cannot help;
- ``CriticalError``: anything else (a rejected push, a failing hook): a human must look.

Operations that change a repository's shared state (worktrees, remotes, the exclude file)
are serialised per repository within the event loop, because many workflows may share one
repository and git answers concurrent writers with lock errors.
"""

from __future__ import annotations

import asyncio
import os
import re
import weakref
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import anyio.to_thread

from machines.development._commands import run_command
from reliability._errors import (
    ConfigurationError,
    CriticalError,
    ResourceError,
    TransientError,
    WorkflowError,
)

__all__ = [
    "COMMITTER_EMAIL",
    "COMMITTER_NAME",
    "STATE_EXCLUDE_PATTERN",
    "DiffStat",
    "branch_exists",
    "commit_all",
    "diff_numstat",
    "ensure_bare_remote",
    "ensure_repository",
    "ensure_worktree",
    "git",
    "head_sha",
    "push",
    "remove_worktree",
    "repository_files",
    "status",
]

COMMITTER_NAME = "workflow-manager"
COMMITTER_EMAIL = "workflow-manager@localhost"
STATE_EXCLUDE_PATTERN = ".github/workflow-*/"
"""Added to ``.git/info/exclude`` so the runtime's state files never make a tree dirty."""

_ERROR_TAIL_LINES = 20

# Never wait for a human (credentials, editors, pagers); English messages for the
# classification below; read-only commands must not take the index lock.
_GIT_ENV = {
    "GIT_TERMINAL_PROMPT": "0",
    "GIT_ASKPASS": "true",
    "GIT_EDITOR": "true",
    "GIT_PAGER": "cat",
    "GIT_OPTIONAL_LOCKS": "0",
    "LC_ALL": "C",
    "LANGUAGE": "C",
}
# Identity and signing come from us, not from the machine's (possibly missing) config.
_COMMIT_CONFIG = (
    "-c", f"user.name={COMMITTER_NAME}",
    "-c", f"user.email={COMMITTER_EMAIL}",
    "-c", "commit.gpgsign=false",
)  # fmt: skip

_TRANSIENT_PATTERNS = (
    r"\.lock'?:? file exists",
    r"unable to create .*\.lock",
    r"cannot lock ref",
    r"could not lock",
    r"another git process seems to be running",
    r"could not resolve host",
    r"connection (timed out|refused|reset)",
    r"operation timed out",
    r"the remote end hung up unexpectedly",
    r"early eof",
    r"rpc failed",
    r"unable to access",
    r"failed to connect",
    r"network is unreachable",
    r"temporary failure in name resolution",
    r"gnutls|ssl_error|tls",
)
_RESOURCE_PATTERNS = (r"no space left on device", r"disk quota exceeded", r"out of memory")
_CONFIGURATION_PATTERNS = (
    r"not a git repository",
    r"does not appear to be a git repository",
    r"not a valid object name",
    r"unknown revision",
    r"invalid reference",
    r"bad revision",
    r"ambiguous argument",
    r"is not a valid branch name",
    r"no such remote",
    r"authentication failed",
    r"could not read (username|password)",
    r"permission denied",
    r"repository .* not found",
    r"already exists",
    r"is already checked out",
    r"is already used by worktree",
)


@dataclass(frozen=True, slots=True)
class DiffStat:
    """Lines added and deleted per the whole change of a branch (commits and working tree).

    Binary files are listed in ``files_changed`` but add no lines.
    """

    files_changed: tuple[str, ...]
    lines_added: int
    lines_deleted: int

    def __post_init__(self) -> None:
        if self.lines_added < 0 or self.lines_deleted < 0:
            raise ValueError("line counts cannot be negative")


@dataclass(frozen=True, slots=True)
class _GitOutput:
    returncode: int
    stdout: list[str]
    stderr_tail: str


async def git(repo: Path, *args: str) -> str:
    """The stripped stdout of ``git -C repo args...``; raises a classified error on failure."""
    result = await _run_git(repo, args)
    return "\n".join(result.stdout).strip()


async def ensure_repository(repo: Path) -> None:
    """Check that ``repo`` is a git work tree with at least one commit, and exclude state files.

    Idempotent. Raises ``ConfigurationError`` for a non-repository or an empty repository.
    """
    if await git(repo, "rev-parse", "--is-inside-work-tree") != "true":
        raise ConfigurationError(f"{repo} is not a git work tree (it may be a bare repository)")
    head = await _run_git(repo, ("rev-parse", "--verify", "--quiet", "HEAD^{commit}"), check=False)
    if head.returncode != 0:
        raise ConfigurationError(
            f"{repo}: the repository has no commits yet; make an initial commit first"
        )
    exclude = Path(await git(repo, "rev-parse", "--git-path", "info/exclude"))
    exclude = exclude if exclude.is_absolute() else repo / exclude
    async with _repository_lock(repo):
        await anyio.to_thread.run_sync(_add_exclude_line, exclude, STATE_EXCLUDE_PATTERN)


async def ensure_worktree(repo: Path, worktree_path: Path, branch: str, base: str) -> Path:
    """A worktree of ``repo`` at ``worktree_path`` with ``branch`` checked out; returns its path.

    Idempotent and crash-tolerant: an existing worktree on ``branch`` is reused, an existing
    ``branch`` without a worktree gets one (its commits are kept), a stale registration (the
    directory was deleted) is pruned first. A new branch starts at ``base``.
    Raises ``ConfigurationError`` if ``base`` does not exist, the branch name is invalid, the
    path holds something else, or the branch is checked out elsewhere.
    """
    worktree_path = _canonical(worktree_path)
    await _check_branch_name(repo, branch)
    async with _repository_lock(repo):
        await git(repo, "worktree", "prune")
        registered = await _worktrees(repo)
        existing = registered.get(worktree_path)
        if existing is not None:
            if existing != branch:
                raise ConfigurationError(
                    f"{worktree_path} is already a worktree of {repo} on branch {existing!r}, "
                    f"not {branch!r}; remove it with 'git worktree remove'"
                )
            return worktree_path
        _check_not_checked_out(registered, branch, worktree_path)
        if await branch_exists(repo, branch):
            await git(repo, "worktree", "add", str(worktree_path), branch)
        else:
            await _check_revision(repo, base, what="base branch")
            await git(repo, "worktree", "add", "-b", branch, str(worktree_path), base)
    return worktree_path


async def commit_all(worktree: Path, message: str, marker: str) -> str | None:
    """Commit every change in ``worktree`` once; return the commit's sha, or None if unchanged.

    Exactly once across crashes: if HEAD's message already contains ``marker``, HEAD's sha is
    returned and nothing is committed. ``marker`` is appended to ``message`` if missing.
    Author and committer are ``workflow-manager``, whatever the machine's git identity.
    """
    if not marker.strip():
        raise ConfigurationError("commit marker must not be empty")
    if marker in await git(worktree, "log", "-1", "--format=%B", "HEAD"):
        return await head_sha(worktree)
    await git(worktree, "add", "-A")
    staged = await _run_git(worktree, ("diff", "--cached", "--quiet"), check=False)
    if staged.returncode == 0:
        return None
    if staged.returncode != 1:
        raise _classify_failure(worktree, ("diff", "--cached", "--quiet"), staged)
    full_message = message if marker in message else f"{message.rstrip()}\n\n{marker}\n"
    await git(worktree, *_COMMIT_CONFIG, "commit", "--quiet", "-m", full_message)
    return await head_sha(worktree)


async def push(worktree: Path, remote: str, branch: str) -> None:
    """Push ``branch`` to the same name on ``remote`` and track it; pushing again is a no-op.

    A rejected push (the remote branch has other commits) raises ``CriticalError``.
    """
    ref = f"refs/heads/{branch}"
    await git(worktree, "push", "--quiet", "--set-upstream", remote, f"{ref}:{ref}")


async def head_sha(worktree: Path) -> str:
    """The full sha of HEAD in ``worktree``."""
    return await git(worktree, "rev-parse", "--verify", "HEAD^{commit}")


async def diff_numstat(worktree: Path, base: str) -> DiffStat:
    """What the branch in ``worktree`` changes relative to its merge-base with ``base``.

    Counts committed and uncommitted changes, and untracked files not ignored by git (they
    are marked intent-to-add in the index for this; ``commit_all`` stages them fully).
    """
    await _check_revision(worktree, base, what="base branch")
    merge_base = await git(worktree, "merge-base", base, "HEAD")
    await git(worktree, "add", "--intent-to-add", "--all")
    output = await git(
        worktree, "-c", "core.quotePath=false", "diff", "--numstat", "--no-renames", merge_base
    )
    return _parse_numstat(output)


async def remove_worktree(repo: Path, worktree_path: Path) -> None:
    """Remove the worktree at ``worktree_path`` (even with uncommitted changes); keep its branch.

    Idempotent: a path that is not (or no longer) a worktree of ``repo`` is left alone.
    """
    worktree_path = _canonical(worktree_path)
    async with _repository_lock(repo):
        await git(repo, "worktree", "prune")
        if worktree_path in await _worktrees(repo):
            await git(repo, "worktree", "remove", "--force", "--force", str(worktree_path))


async def status(repo: Path) -> Literal["clean", "dirty", "error"]:
    """``"clean"`` or ``"dirty"`` (changes or untracked files); ``"error"`` instead of raising."""
    try:
        output = await git(repo, "status", "--porcelain")
    except (WorkflowError, OSError):
        return "error"
    return "dirty" if output else "clean"


async def branch_exists(repo: Path, branch: str) -> bool:
    """Whether the local branch ``branch`` exists in ``repo``."""
    args = ("show-ref", "--verify", "--quiet", f"refs/heads/{branch}")
    result = await _run_git(repo, args, check=False)
    if result.returncode in (0, 1):
        return result.returncode == 0
    raise _classify_failure(repo, args, result)


async def ensure_bare_remote(
    repo: Path, bare_path: Path, remote_name: str, *, base: str | None = None
) -> None:
    """Make ``remote_name`` of ``repo`` a bare repository at ``bare_path`` holding ``base``.

    Creates the bare repository if missing, adds or re-points the remote, and pushes ``base``
    (default: the branch checked out in ``repo``). Idempotent. Raises ``ConfigurationError``
    if ``bare_path`` exists but is not a bare repository.
    """
    bare_path = _canonical(bare_path)
    base = base or await git(repo, "symbolic-ref", "--short", "HEAD")
    async with _repository_lock(repo):
        await _ensure_bare(repo, bare_path, base)
        current = await _run_git(repo, ("remote", "get-url", remote_name), check=False)
        if current.returncode != 0:
            await git(repo, "remote", "add", remote_name, str(bare_path))
        elif "\n".join(current.stdout).strip() != str(bare_path):
            await git(repo, "remote", "set-url", remote_name, str(bare_path))
    ref = f"refs/heads/{base}"
    await git(repo, "push", "--quiet", remote_name, f"{ref}:{ref}")


async def repository_files(repo: Path, limit: int) -> list[str]:
    """The first ``limit`` tracked files of ``repo`` (paths relative to its root, as git sorts)."""
    if limit < 0:
        raise ConfigurationError(f"limit must be >= 0, got {limit}")
    result = await _run_git(repo, ("-c", "core.quotePath=false", "ls-files", "--full-name"))
    return [line for line in result.stdout if line][:limit]


# --- internals ---------------------------------------------------------------------------


async def _run_git(repo: Path, args: Sequence[str], *, check: bool = True) -> _GitOutput:
    stdout: list[str] = []
    stderr: deque[str] = deque(maxlen=_ERROR_TAIL_LINES)
    result = await run_command(
        ["git", "-C", str(repo), *args],
        cwd=repo,
        env=_GIT_ENV,
        on_line=stdout.append,
        on_stderr_line=stderr.append,
    )
    output = _GitOutput(result.returncode, stdout, "\n".join(stderr))
    if check and output.returncode != 0:
        raise _classify_failure(repo, args, output)
    return output


def _classify_failure(repo: Path, args: Sequence[str], output: _GitOutput) -> WorkflowError:
    detail = output.stderr_tail or "\n".join(output.stdout[-_ERROR_TAIL_LINES:]) or "no output"
    message = (
        f"git {' '.join(args)} failed in {repo} (exit {output.returncode}):\n{detail.strip()}"
    )
    lowered = detail.lower()
    for patterns, kind in (
        (_RESOURCE_PATTERNS, ResourceError),
        (_TRANSIENT_PATTERNS, TransientError),
        (_CONFIGURATION_PATTERNS, ConfigurationError),
    ):
        if any(re.search(pattern, lowered) for pattern in patterns):
            return kind(message)
    return CriticalError(message)


async def _check_branch_name(repo: Path, branch: str) -> None:
    result = await _run_git(repo, ("check-ref-format", "--branch", branch), check=False)
    if result.returncode != 0 or branch.startswith("-"):
        raise ConfigurationError(f"{branch!r} is not a valid git branch name")


async def _check_revision(repo: Path, revision: str, *, what: str) -> None:
    args = ("rev-parse", "--verify", "--quiet", "--end-of-options", f"{revision}^{{commit}}")
    if (await _run_git(repo, args, check=False)).returncode != 0:
        raise ConfigurationError(f"{repo}: {what} {revision!r} does not exist")


async def _worktrees(repo: Path) -> dict[Path, str | None]:
    """Registered worktrees of ``repo``: path -> checked-out branch (None when detached)."""
    worktrees: dict[Path, str | None] = {}
    current: Path | None = None
    for line in (await _run_git(repo, ("worktree", "list", "--porcelain"))).stdout:
        if line.startswith("worktree "):
            current = _canonical(line.removeprefix("worktree "))
            worktrees[current] = None
        elif line.startswith("branch refs/heads/") and current is not None:
            worktrees[current] = line.removeprefix("branch refs/heads/")
    return worktrees


def _check_not_checked_out(
    registered: dict[Path, str | None], branch: str, worktree_path: Path
) -> None:
    for path, checked_out in registered.items():
        if checked_out == branch and path != worktree_path:
            raise ConfigurationError(
                f"branch {branch!r} is already checked out at {path}; "
                f"it cannot also be checked out at {worktree_path}"
            )


async def _ensure_bare(repo: Path, bare_path: Path, base: str) -> None:
    if not await anyio.Path(bare_path).exists():
        await git(repo, "init", "--quiet", "--bare", f"--initial-branch={base}", str(bare_path))
        return
    probe = await _run_git(bare_path, ("rev-parse", "--is-bare-repository"), check=False)
    if probe.returncode != 0 or probe.stdout[-1:] != ["true"]:
        raise ConfigurationError(
            f"{bare_path} exists but is not a bare git repository; remove it or choose another "
            "path for the remote"
        )


def _add_exclude_line(exclude: Path, pattern: str) -> None:
    """Append ``pattern`` to the exclude file unless a line equal to it is already there."""
    exclude.parent.mkdir(parents=True, exist_ok=True)
    existing = exclude.read_text(encoding="utf-8") if exclude.exists() else ""
    if pattern in (line.strip() for line in existing.splitlines()):
        return
    separator = "" if not existing or existing.endswith("\n") else "\n"
    with exclude.open("a", encoding="utf-8") as file:
        file.write(f"{separator}{pattern}\n")


def _parse_numstat(output: str) -> DiffStat:
    files: list[str] = []
    added = deleted = 0
    for line in output.splitlines():
        match = re.fullmatch(r"(\d+|-)\t(\d+|-)\t(.+)", line)
        if match is None:
            continue  # e.g. a warning git printed between entries
        files.append(_unquote(match.group(3)))
        added += int(match.group(1)) if match.group(1) != "-" else 0
        deleted += int(match.group(2)) if match.group(2) != "-" else 0
    return DiffStat(files_changed=tuple(files), lines_added=added, lines_deleted=deleted)


def _unquote(path: str) -> str:
    """A path as git prints it (C-quoted when it holds special characters) back to text."""
    if not (len(path) >= 2 and path.startswith('"') and path.endswith('"')):
        return path
    raw = bytearray()
    for token in re.findall(r"\\[0-7]{3}|\\.|[^\\]", path[1:-1], flags=re.DOTALL):
        if len(token) == 4:
            raw.append(int(token[1:], 8))  # one byte of a UTF-8 sequence, in octal
        elif len(token) == 2:
            raw += _C_ESCAPES.get(token[1], token[1]).encode()
        else:
            raw += token.encode()
    return raw.decode("utf-8", errors="replace")


_C_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}


def _canonical(path: str | Path) -> Path:
    """``path`` made absolute with symlinks resolved, as git records worktree paths.

    A few lstat calls on local paths: cheap enough to run on the loop.
    """
    return Path(os.path.realpath(path))


# Invariant: one lock per (event loop, repository); a lock is never shared across loops.
_LOCKS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, asyncio.Lock]] = (
    weakref.WeakKeyDictionary()
)


def _repository_lock(repo: Path) -> asyncio.Lock:
    locks = _LOCKS.setdefault(asyncio.get_running_loop(), {})
    return locks.setdefault(os.path.realpath(repo), asyncio.Lock())
