"""The GitHub forge: GitHub's REST API v3 over one shared ``httpx.AsyncClient``.

Every HTTP request is one attempt. The runtime passes a ``guard`` (backoff outside, the
``github`` circuit breaker inside) that retries attempts; this module never retries by
itself. Responses are mapped to the project's error taxonomy:

- 5xx, timeouts, refused or dropped connections: ``TransientError``;
- 403/429 with ``Retry-After``, or 403/429 with ``X-RateLimit-Remaining: 0``:
  ``RateLimitedError`` whose ``retry_after`` is the server's wait, exactly;
- 401: ``ConfigurationError`` telling the user to fix ``GITHUB_TOKEN``;
- any other 4xx: ``ConfigurationError`` carrying GitHub's ``message`` and ``errors``.

The token never appears in a message, a repr or a log line.
"""

from __future__ import annotations

import email.utils
import functools
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

import httpx

from machines.development._forge import (
    WORKFLOW_LABEL,
    ForgeHealth,
    IssueRef,
    PullRef,
    run_git,
    summarize_reviews,
)
from reliability._clock import Clock, SystemClock
from reliability._errors import (
    ConfigurationError,
    RateLimitedError,
    TransientError,
    WorkflowError,
)

__all__ = ["CallGuard", "GitHubForge"]

_T = TypeVar("_T")
_log = logging.getLogger(__name__)

_REPOSITORY = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,38})/[A-Za-z0-9._-]{1,100}")
_MAX_ISSUE_PAGES = 10  # 1,000 newest workflow issues: far more than any re-run looks back
_MAX_REVIEW_PAGES = 10
# GitHub's advice for a secondary rate limit that names no wait: at least one minute.
_DEFAULT_RATE_LIMIT_WAIT = 60.0


class CallGuard(Protocol):
    """Runs one attempt of a call, e.g. with retries and a circuit breaker around it."""

    def __call__(self, attempt: Callable[[], Awaitable[_T]], /) -> Awaitable[_T]: ...


async def _unguarded(attempt: Callable[[], Awaitable[_T]]) -> _T:
    return await attempt()


class GitHubForge:
    """A ``Forge`` on a GitHub repository (``owner/name``) through the REST API.

    Holds one HTTP client; call ``aclose()`` (or use ``async with``) when done.
    """

    remote_name = "origin"

    def __init__(
        self,
        repository: str,
        token: str,
        *,
        api_url: str = "https://api.github.com",
        clock: Clock | None = None,
        guard: CallGuard | None = None,
        timeout_seconds: float = 30,
    ) -> None:
        # "." and ".." would turn API paths into traversals; GitHub refuses them as names.
        if not _REPOSITORY.fullmatch(repository or "") or repository.endswith(("/.", "/..")):
            raise ConfigurationError(
                f"github_repository must look like 'owner/name' (e.g. 'acme/widgets'), "
                f"got {repository!r}"
            )
        if not token or not token.strip():
            raise ConfigurationError(
                f"no GitHub token for {repository}: set GITHUB_TOKEN to a token that may "
                f"write issues and pull requests, or use forge 'local' to work offline"
            )
        self.repository = repository
        self.api_url = api_url.rstrip("/")
        self._clock: Clock = clock or SystemClock()
        self._guard: CallGuard = guard or _unguarded
        self._timeout = timeout_seconds
        # The token lives only in the client's headers; httpx masks it in their repr.
        self._client = httpx.AsyncClient(
            base_url=self.api_url,
            timeout=timeout_seconds,
            headers={
                "Accept": "application/vnd.github+json",
                "X-GitHub-Api-Version": "2022-11-28",
                "Authorization": f"Bearer {token.strip()}",
                "User-Agent": "workflow-manager (+https://github.com/)",
            },
        )

    @property
    def label(self) -> str:
        return f"GitHub {self.repository}"

    def __repr__(self) -> str:
        return f"GitHubForge({self.repository!r}, api_url={self.api_url!r})"

    async def __aenter__(self) -> GitHubForge:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()

    # -- issues ---------------------------------------------------------------------------

    async def find_issue(self, marker: str) -> IssueRef | None:
        """The newest workflow-labelled issue whose body contains ``marker``, or None.

        Lists issues rather than using the search API on purpose: GitHub's search index is
        eventually consistent, so an issue created seconds ago may not be found, and the
        re-run would create a second one. The issue list is read from the primary store.
        """
        if not marker.strip():
            raise ConfigurationError("an issue marker must not be empty: it would match "
                                     "every issue")
        item = await self._scan_issues(lambda body, _: marker in body, _MAX_ISSUE_PAGES,
                                       guarded=True)
        return _issue_ref(item) if item else None

    async def create_issue(self, title: str, body: str, labels: Sequence[str]) -> IssueRef:
        """Open an issue labelled ``WORKFLOW_LABEL`` (so ``find_issue`` can see it).

        If an attempt fails after it may have reached GitHub (a dropped connection, a
        timeout), the next attempt first looks for an issue with this exact title and body
        and returns it instead of opening a second one.
        """
        payload = {"title": title, "body": body,
                   "labels": [WORKFLOW_LABEL, *(n for n in labels if n != WORKFLOW_LABEL)]}
        first_attempt = True

        async def attempt() -> IssueRef:
            nonlocal first_attempt
            if not first_attempt:
                same = await self._scan_issues(
                    lambda b, t: b == body and t == title, 1, guarded=False)
                if same:
                    return _issue_ref(same)
            first_attempt = False
            return _issue_ref(await self._json("POST", self._repo("issues"), json=payload))

        return await self._guard(attempt)

    # -- pull requests ----------------------------------------------------------------------

    async def find_open_pull(self, head_branch: str) -> PullRef | None:
        owner = self.repository.split("/")[0]
        params = {"state": "open", "head": f"{owner}:{head_branch}", "per_page": "100"}
        items = await self._call("GET", self._repo("pulls"), params=params)
        for item in items:
            if item["head"]["ref"] == head_branch:
                return _pull_ref(item)
        return None

    async def create_pull(
        self, title: str, body: str, head_branch: str, base_branch: str
    ) -> PullRef:
        """Open a pull request; if one is already open for ``head_branch``, return it.

        That makes a retried attempt whose first response was lost harmless: GitHub answers
        the second POST with 422 "A pull request already exists".
        """
        payload = {"title": title, "body": body, "head": head_branch, "base": base_branch}
        try:
            return _pull_ref(await self._call("POST", self._repo("pulls"), json=payload))
        except ConfigurationError as error:
            if "already exists" not in str(error):
                raise
            existing = await self.find_open_pull(head_branch)
            if existing is None:
                raise
            return existing

    async def get_pull(self, number: int) -> PullRef:
        return _pull_ref(await self._call("GET", self._repo(f"pulls/{number}")))

    async def request_reviewers(self, number: int, reviewers: Sequence[str]) -> None:
        if reviewers:
            await self._call("POST", self._repo(f"pulls/{number}/requested_reviewers"),
                             json={"reviewers": list(reviewers)})

    async def review_state(self, number: int) -> str:
        reviews: list[Any] = []
        url: str | None = self._repo(f"pulls/{number}/reviews")
        params: dict[str, str] | None = {"per_page": "100"}
        for _ in range(_MAX_REVIEW_PAGES):
            if url is None:
                break
            page, url = await self._guard(functools.partial(self._page, "GET", url, params))
            reviews.extend(page)
            params = None  # the next-page URL carries its own query
        return summarize_reviews(
            (str((r.get("user") or {}).get("login", "")), str(r.get("state", "")))
            for r in reviews)

    # -- remote, health -----------------------------------------------------------------------

    async def prepare_remote(self, repo: Path) -> str:
        """Check that ``repo`` has remote ``origin`` (the workflow pushes there)."""
        code, _, _ = await run_git("remote", "get-url", self.remote_name, cwd=repo)
        if code != 0:
            raise ConfigurationError(
                f"{repo} has no git remote 'origin'; add it for {self.repository} "
                f"(git remote add origin https://github.com/{self.repository}.git)"
            )
        return self.remote_name

    async def health(self) -> ForgeHealth:
        """Probe ``GET /rate_limit``; reports failures instead of raising them.

        Not guarded: a probe must see GitHub itself, not the breaker's view of it, and it
        must not count towards opening the breaker.
        """
        try:
            data = await self._json("GET", "/rate_limit")
        except WorkflowError as error:
            return ForgeHealth(reachable=False, detail=str(error), rate_limit_remaining=None)
        data = data if isinstance(data, dict) else {}
        core = (data.get("resources") or {}).get("core") or data.get("rate") or {}
        remaining = core.get("remaining")
        remaining = remaining if isinstance(remaining, int) else None
        return ForgeHealth(reachable=True, rate_limit_remaining=remaining,
                           detail=f"{self.label} reachable at {self.api_url}; "
                                  f"{remaining} API calls left this hour")

    # -- one attempt ---------------------------------------------------------------------------

    def _repo(self, tail: str) -> str:
        return f"/repos/{self.repository}/{tail}"

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        """One guarded request; returns the decoded JSON."""
        return await self._guard(lambda: self._json(method, path, **kwargs))

    async def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return _decode(await self._send(method, path, **kwargs), method, path)

    async def _page(
        self, method: str, url: str, params: dict[str, str] | None
    ) -> tuple[list[Any], str | None]:
        """One page of a list and the URL of the next page (None on the last)."""
        response = await self._send(method, url, params=params)
        items = _decode(response, method, url)
        if not isinstance(items, list):
            raise TransientError(f"GitHub {method} {_path(url)} did not answer with a list")
        return items, self._next_page(response)

    def _next_page(self, response: httpx.Response) -> str | None:
        url = response.links.get("next", {}).get("url")
        if url is None:
            return None
        # The token goes with every request: never follow a link off the API host.
        if urlsplit(url).netloc != urlsplit(self.api_url).netloc:
            raise TransientError(f"GitHub pagination pointed off the API host: {_path(url)}")
        return url

    async def _send(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        path = _path(url)
        try:
            response = await self._client.request(method, url, **kwargs)
        except httpx.TimeoutException as error:
            raise TransientError(
                f"GitHub {method} {path} timed out after {self._timeout:g}s "
                f"({type(error).__name__})") from error
        except httpx.TransportError as error:
            raise TransientError(
                f"GitHub {method} {path} failed before a response "
                f"({type(error).__name__}: {error})") from error
        _log.debug("GitHub %s %s -> %d", method, path, response.status_code)
        if response.is_success:
            return response
        raise self._error_for(response, method, path)

    async def _scan_issues(
        self, matches: Callable[[str, str], bool], max_pages: int, *, guarded: bool
    ) -> dict[str, Any] | None:
        """The newest workflow issue (not pull request) for which ``matches(body, title)``."""
        url: str | None = self._repo("issues")
        params: dict[str, str] | None = {
            "labels": WORKFLOW_LABEL, "state": "all", "sort": "created",
            "direction": "desc", "per_page": "100"}
        for _ in range(max_pages):
            if url is None:
                return None
            fetch = functools.partial(self._page, "GET", url, params)
            items, url = await (self._guard(fetch) if guarded else fetch())
            params = None  # the next-page URL carries its own query
            for item in items:
                if "pull_request" not in item and matches(item.get("body") or "",
                                                          item.get("title") or ""):
                    return dict(item)
        return None

    # -- errors -----------------------------------------------------------------------------

    def _error_for(self, response: httpx.Response, method: str, path: str) -> WorkflowError:
        status = response.status_code
        where = f"GitHub {method} {path} answered {status}"
        message, details = _github_message(response)
        wait = self._rate_limit_wait(response, message)
        if wait is not None:
            return RateLimitedError(f"{where} (rate limited: {message}); retry in "
                                    f"{wait:.0f}s", retry_after=wait)
        if status >= 500 or status == 408:
            return TransientError(f"{where}: {message}")
        if status == 401:
            return ConfigurationError(
                f"GitHub rejected the token (401 Bad credentials) for {self.repository}: "
                f"set GITHUB_TOKEN to a valid token with access to issues and pull requests")
        return ConfigurationError(f"{where}: {message}{details}")

    def _rate_limit_wait(self, response: httpx.Response, message: str) -> float | None:
        """Seconds GitHub asks us to wait, or None when this is not a rate limit."""
        if response.status_code not in (403, 429):
            return None
        headers = response.headers
        if "retry-after" in headers:
            return self._retry_after(headers["retry-after"])
        if headers.get("x-ratelimit-remaining") == "0" and "x-ratelimit-reset" in headers:
            try:
                return float(headers["x-ratelimit-reset"]) - self._clock.time()
            except ValueError:
                return _DEFAULT_RATE_LIMIT_WAIT
        if response.status_code == 429 or "rate limit" in message.lower():
            return _DEFAULT_RATE_LIMIT_WAIT
        return None

    def _retry_after(self, value: str) -> float:
        """``Retry-After`` is delta-seconds, or (rarely) an HTTP date."""
        try:
            return float(value)
        except ValueError:
            pass
        try:
            return email.utils.parsedate_to_datetime(value).timestamp() - self._clock.time()
        except (TypeError, ValueError):
            return _DEFAULT_RATE_LIMIT_WAIT


def _path(url: str) -> str:
    """The path of a request URL, for messages (never the query, never credentials)."""
    return urlsplit(url).path or url


def _decode(response: httpx.Response, method: str, path: str) -> Any:
    try:
        return response.json()
    except ValueError:
        # A 2xx that is not JSON comes from a proxy or a broken gateway, not from GitHub.
        raise TransientError(f"GitHub {method} {_path(path)} answered "
                             f"{response.status_code} with a body that is not JSON") from None


def _github_message(response: httpx.Response) -> tuple[str, str]:
    """GitHub's ``message`` and a rendering of its ``errors`` list (or "")."""
    try:
        data = response.json()
    except ValueError:
        return response.reason_phrase or "no message", ""
    if not isinstance(data, dict):
        return response.reason_phrase or "no message", ""
    message = str(data.get("message") or response.reason_phrase or "no message")
    errors = data.get("errors") or []
    rendered = [_render_error(e) for e in errors] if isinstance(errors, list) else []
    return message, (f" ({'; '.join(rendered)})" if rendered else "")


def _render_error(error: Any) -> str:
    if not isinstance(error, dict):
        return str(error)
    if "message" in error:
        return str(error["message"])
    parts = (error.get(k) for k in ("resource", "field", "code"))
    return " ".join(str(p) for p in parts if p)


def _issue_ref(item: dict[str, Any]) -> IssueRef:
    return IssueRef(number=int(item["number"]), url=str(item["html_url"]))


def _pull_ref(item: dict[str, Any]) -> PullRef:
    state = "merged" if item.get("merged_at") else str(item["state"])
    head = item.get("head") or {}
    return PullRef(number=int(item["number"]), url=str(item["html_url"]),
                   head_branch=str(head.get("ref", "")), head_sha=head.get("sha"), state=state)
