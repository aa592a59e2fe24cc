"""The forge interface (issues, pull requests, reviews, the remote) and the offline backend.

A forge is where the development workflow files its issue and opens its pull request:
GitHub (``_github.GitHubForge``) or ``LocalForge``, which keeps numbered JSON records and a
bare git repository under the project, so the whole flow runs with no network.

Exactly-once: the issue body carries a hidden marker chosen by the caller (an HTML comment
such as ``<!-- workflow-manager:workflow-20240115-142315-a7b3 -->``). A stage that is
re-run first calls ``find_issue(marker)`` / ``find_open_pull(branch)`` and creates only when
nothing is found, so no issue or pull request is ever created twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import anyio.to_thread

from reliability._clock import Clock, SystemClock
from reliability._errors import (
    ConfigurationError,
    StateCorruptedError,
    TransientError,
)

__all__ = [
    "WORKFLOW_LABEL",
    "Forge",
    "ForgeHealth",
    "IssueRef",
    "LocalForge",
    "PullRef",
    "summarize_reviews",
]

WORKFLOW_LABEL = "workflow-manager"
"""The label every workflow issue carries; ``find_issue`` only looks at issues with it."""

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class IssueRef:
    """An issue on a forge: its number and a URL a person can open."""

    number: int
    url: str


@dataclass(frozen=True, slots=True)
class PullRef:
    """A pull request; ``state`` is ``open``, ``closed`` or ``merged``."""

    number: int
    url: str
    head_branch: str
    head_sha: str | None
    state: str


@dataclass(frozen=True, slots=True)
class ForgeHealth:
    """The result of a forge health probe; ``detail`` says what was checked or what failed."""

    reachable: bool
    detail: str
    rate_limit_remaining: int | None


class Forge(Protocol):
    """What the development workflow needs of a forge.

    Errors follow the project's taxonomy: ``TransientError`` (including
    ``RateLimitedError``) may be retried; ``ConfigurationError`` may not.
    """

    @property
    def label(self) -> str:
        """A human label, e.g. ``GitHub acme/widgets`` or ``local forge (offline)``."""
        ...

    @property
    def remote_name(self) -> str:
        """The git remote the workflow pushes branches to."""
        ...

    async def find_issue(self, marker: str) -> IssueRef | None:
        """The newest workflow issue whose body contains ``marker``, or None."""
        ...

    async def create_issue(self, title: str, body: str, labels: Sequence[str]) -> IssueRef:
        """Open an issue; it always carries ``WORKFLOW_LABEL`` besides ``labels``."""
        ...

    async def find_open_pull(self, head_branch: str) -> PullRef | None:
        """The open pull request from ``head_branch``, or None."""
        ...

    async def create_pull(
        self, title: str, body: str, head_branch: str, base_branch: str
    ) -> PullRef:
        """Open a pull request; if one is already open for ``head_branch``, return it."""
        ...

    async def get_pull(self, number: int) -> PullRef: ...

    async def request_reviewers(self, number: int, reviewers: Sequence[str]) -> None: ...

    async def review_state(self, number: int) -> str:
        """``approved``, ``changes_requested``, ``commented`` or ``pending``."""
        ...

    async def health(self) -> ForgeHealth:
        """Probe the forge; never raises for an unreachable forge, reports it instead."""
        ...

    async def prepare_remote(self, repo: Path) -> str:
        """Make sure ``repo`` can push to this forge; returns the remote name."""
        ...

    async def aclose(self) -> None: ...


def summarize_reviews(reviews: Iterable[tuple[str, str]]) -> str:
    """Fold ``(user, state)`` reviews, oldest first, into one review state.

    As on GitHub, each reviewer's latest approving or blocking review counts; a dismissal
    cancels it; comments only count when nobody approved or asked for changes.
    """
    verdicts: dict[str, str] = {}
    commented = False
    for user, state in reviews:
        state = state.upper()
        if state in ("APPROVED", "CHANGES_REQUESTED"):
            verdicts[user] = state
        elif state == "DISMISSED":
            verdicts.pop(user, None)
        elif state == "COMMENTED":
            commented = True
    if "CHANGES_REQUESTED" in verdicts.values():
        return "changes_requested"
    if "APPROVED" in verdicts.values():
        return "approved"
    return "commented" if commented else "pending"


async def run_git(*args: str, cwd: Path | None = None) -> tuple[int, str, str]:
    """Run ``git args`` (in ``cwd`` if given); returns (exit code, stdout, stderr).

    A small private helper for the forges only; the workflow's git work uses ``_git``.
    """
    command = ("git", "-C", str(cwd), *args) if cwd is not None else ("git", *args)
    try:
        process = await asyncio.create_subprocess_exec(
            *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            stdin=asyncio.subprocess.DEVNULL,
        )
    except FileNotFoundError as error:
        raise ConfigurationError("git is not installed or not on PATH") from error
    try:
        out, err = await process.communicate()
    except BaseException:
        # Cancelled: don't leave a git process behind holding the repository's locks.
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await asyncio.shield(process.wait())
        raise
    return process.returncode or 0, out.decode().strip(), err.decode().strip()


async def resolve_branch(git_dir: Path, branch: str) -> str | None:
    """The commit sha of ``refs/heads/branch`` in the repository at ``git_dir``, or None."""
    code, out, _ = await run_git(
        "--git-dir", str(git_dir), "rev-parse", "--verify", "--quiet",
        f"refs/heads/{branch}^{{commit}}",
    )
    return out if code == 0 and out else None


_RECORD_NAME = re.compile(r"(\d+)\.json")


class LocalForge:
    """The offline forge: JSON records and a bare git remote under the project.

    Layout under ``root / ".github/workflow-forge"``: ``issues/N.json``, ``pulls/N.json``
    and ``remote.git``. Records are written atomically (temp file, fsync, rename). Numbers
    are allocated under an ``fcntl.flock`` on ``.lock``, so concurrent workflows in one
    loop and in several processes never get the same number.
    """

    remote_name = "workflow-forge"

    def __init__(self, root: Path, clock: Clock | None = None) -> None:
        self.root = Path(root)
        self.directory = self.root / ".github" / "workflow-forge"
        self.remote_path = self.directory / "remote.git"
        self._clock: Clock = clock or SystemClock()
        # Keeps at most one worker thread of this forge blocked on the flock, so a burst of
        # creates does not occupy the whole thread pool.
        self._lock = asyncio.Lock()
        # Concurrent `git remote add` in one repository fight over .git/config's lock.
        self._remote_lock = asyncio.Lock()

    @property
    def label(self) -> str:
        return "local forge (offline)"

    def __repr__(self) -> str:
        return f"LocalForge({str(self.root)!r})"

    # -- issues ---------------------------------------------------------------------------

    async def find_issue(self, marker: str) -> IssueRef | None:
        _check_marker(marker)
        records = await anyio.to_thread.run_sync(self._read_all, "issues")
        for record in records:
            if marker in (record.get("body") or ""):
                return self._issue_ref(record)
        return None

    async def create_issue(self, title: str, body: str, labels: Sequence[str]) -> IssueRef:
        all_labels = [WORKFLOW_LABEL, *(name for name in labels if name != WORKFLOW_LABEL)]
        fields = {"title": title, "body": body, "labels": all_labels, "state": "open"}
        record = await self._locked(lambda: self._append("issues", fields))
        return self._issue_ref(record)

    # -- pull requests ----------------------------------------------------------------------

    async def find_open_pull(self, head_branch: str) -> PullRef | None:
        records = await anyio.to_thread.run_sync(self._read_all, "pulls")
        for record in records:
            if record["state"] == "open" and record["head_branch"] == head_branch:
                return self._pull_ref(record)
        return None

    async def create_pull(
        self, title: str, body: str, head_branch: str, base_branch: str
    ) -> PullRef:
        head_sha = await resolve_branch(self.remote_path, head_branch)
        if head_sha is None:
            raise ConfigurationError(
                f"cannot open a pull request from {head_branch!r}: the branch was not pushed "
                f"to the local forge remote {self.remote_path} (push it to remote "
                f"{self.remote_name!r} first)"
            )
        fields = {"title": title, "body": body, "head_branch": head_branch,
                  "head_sha": head_sha, "base_branch": base_branch, "state": "open",
                  "requested_reviewers": [], "reviews": []}

        def find_or_append() -> dict[str, Any]:
            # Like GitHub, one open pull per head branch; a re-run gets the existing one.
            for record in self._read_all("pulls"):
                if record["state"] == "open" and record["head_branch"] == head_branch:
                    return record
            return self._append("pulls", fields)

        return self._pull_ref(await self._locked(find_or_append))

    async def get_pull(self, number: int) -> PullRef:
        record = await anyio.to_thread.run_sync(self._read, "pulls", number)
        if record["state"] == "open":
            # A later push moves an open pull's head, as on GitHub.
            current = await resolve_branch(self.remote_path, record["head_branch"])
            record["head_sha"] = current or record["head_sha"]
        return self._pull_ref(record)

    async def request_reviewers(self, number: int, reviewers: Sequence[str]) -> None:
        def update() -> None:
            record = self._read("pulls", number)
            requested = record.setdefault("requested_reviewers", [])
            requested.extend(name for name in reviewers if name not in requested)
            self._write(self._path("pulls", number), record)

        await self._locked(update)

    async def add_review(self, number: int, user: str, state: str) -> None:
        """Record a review of pull ``number`` by ``user`` (``APPROVED``,
        ``CHANGES_REQUESTED``, ``COMMENTED`` or ``DISMISSED``): what a person does on
        this forge, here or by editing ``pulls/N.json``."""
        if state.upper() not in ("APPROVED", "CHANGES_REQUESTED", "COMMENTED", "DISMISSED"):
            raise ValueError(f"unknown review state {state!r}")

        def update() -> None:
            record = self._read("pulls", number)
            record.setdefault("reviews", []).append({"user": user, "state": state.upper()})
            self._write(self._path("pulls", number), record)

        await self._locked(update)

    async def review_state(self, number: int) -> str:
        """Reviews are ``{"user", "state"}`` entries a person adds to ``pulls/N.json``
        (or ``add_review``)."""
        record = await anyio.to_thread.run_sync(self._read, "pulls", number)
        reviews = record.get("reviews") or []
        return summarize_reviews((str(r.get("user", "")), str(r.get("state", "")))
                                 for r in reviews)

    # -- remote, health, lifecycle ------------------------------------------------------------

    async def prepare_remote(self, repo: Path) -> str:
        """Create the bare remote if needed and point remote ``workflow-forge`` at it."""
        async with self._remote_lock:
            return await self._prepare_remote(repo)

    async def _prepare_remote(self, repo: Path) -> str:
        await self._ensure_bare_remote()
        url = str(self.remote_path)
        code, current, _ = await run_git("remote", "get-url", self.remote_name, cwd=repo)
        if code == 0 and current == url:
            return self.remote_name
        verb = "set-url" if code == 0 else "add"
        code, _, err = await run_git("remote", verb, self.remote_name, url, cwd=repo)
        if code != 0:
            # Another workflow on the same repository may have added it a moment ago.
            again, current, _ = await run_git("remote", "get-url", self.remote_name, cwd=repo)
            if again != 0 or current != url:
                raise TransientError(f"git remote {verb} {self.remote_name} in {repo}: {err}")
        return self.remote_name

    async def health(self) -> ForgeHealth:
        writable = await anyio.to_thread.run_sync(self._writable)
        detail = (f"local forge at {self.directory} is writable" if writable
                  else f"local forge directory {self.directory} is not writable")
        return ForgeHealth(reachable=writable, detail=detail, rate_limit_remaining=None)

    async def aclose(self) -> None:
        """Nothing to release; present for the Forge interface."""

    # -- internals --------------------------------------------------------------------------

    async def _ensure_bare_remote(self) -> None:
        if await anyio.to_thread.run_sync(self._remote_exists, True):
            return
        # Init beside it, then rename: a concurrent creator in another process either
        # wins the rename or finds a complete repository, never a half-made one.
        staging = self.directory / f".remote-{uuid.uuid4().hex}.git"
        code, _, err = await run_git("init", "--quiet", "--bare", str(staging))
        if code != 0:
            raise ConfigurationError(f"cannot create the local forge remote: {err}")
        await anyio.to_thread.run_sync(self._install_remote, staging)

    def _remote_exists(self, create_directory: bool) -> bool:
        if create_directory:
            self.directory.mkdir(parents=True, exist_ok=True)
        return (self.remote_path / "HEAD").exists()

    def _install_remote(self, staging: Path) -> None:
        try:
            os.rename(staging, self.remote_path)
        except OSError:
            if not self._remote_exists(False):
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    async def _locked(self, action: Callable[[], _T]) -> _T:
        """Run ``action`` in a worker thread holding the forge's cross-process lock."""
        def run() -> _T:
            self.directory.mkdir(parents=True, exist_ok=True)
            with open(self.directory / ".lock", "a+b") as lock_file:
                fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX)
                try:
                    return action()
                finally:
                    fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)

        async with self._lock:
            return await anyio.to_thread.run_sync(run)

    def _path(self, kind: str, number: int) -> Path:
        return self.directory / kind / f"{number}.json"

    def _numbers(self, kind: str) -> list[int]:
        folder = self.directory / kind
        if not folder.is_dir():
            return []
        return [int(m.group(1)) for name in os.listdir(folder)
                if (m := _RECORD_NAME.fullmatch(name))]

    def _append(self, kind: str, fields: dict[str, Any]) -> dict[str, Any]:
        """Write a new record numbered one past the highest; call with the lock held."""
        number = max(self._numbers(kind), default=0) + 1
        path = self._path(kind, number)
        record = {"number": number, "url": path.as_uri(), **fields,
                  "created_at": _iso(self._clock.time())}
        self._write(path, record)
        return record

    def _read(self, kind: str, number: int) -> dict[str, Any]:
        path = self._path(kind, number)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigurationError(
                f"{kind[:-1]} #{number} does not exist in the local forge ({path})"
            ) from None
        except ValueError as error:
            # Never skip a torn record: skipping it could create a duplicate issue.
            raise StateCorruptedError(str(path), f"not valid JSON: {error}") from None
        if not isinstance(data, dict) or data.get("number") != number:
            raise StateCorruptedError(str(path), "not a local forge record")
        return data

    def _read_all(self, kind: str) -> list[dict[str, Any]]:
        """Every record of ``kind``, newest first."""
        return [self._read(kind, n) for n in sorted(self._numbers(kind), reverse=True)]

    @staticmethod
    def _write(path: Path, record: dict[str, Any]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(record, handle, indent=2, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename itself must survive a crash
        finally:
            os.close(directory)

    def _writable(self) -> bool:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError:
            return False
        return os.access(self.directory, os.W_OK)

    @staticmethod
    def _issue_ref(record: dict[str, Any]) -> IssueRef:
        return IssueRef(number=record["number"], url=record["url"])

    @staticmethod
    def _pull_ref(record: dict[str, Any]) -> PullRef:
        return PullRef(number=record["number"], url=record["url"],
                       head_branch=record["head_branch"], head_sha=record.get("head_sha"),
                       state=record["state"])


def _check_marker(marker: str) -> None:
    if not marker.strip():
        raise ConfigurationError("an issue marker must not be empty: it would match every issue")


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))
