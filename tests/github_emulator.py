"""A GitHub REST API v3 emulator: a real HTTP server on loopback, for tests.

It speaks the subset of GitHub's API the development workflow uses (repository, rate limit,
issues, pull requests, review requests, reviews), answers with GitHub-shaped JSON and
headers, and injects faults from a script: ``fail_next``, ``outage``, ``rate_limit_next``,
``latency``, ``drop_next``. It only ever binds 127.0.0.1.

    with GitHubEmulator(owner="acme", repo="widgets", bare_repo=tmp_path / "remote.git") as gh:
        forge = GitHubForge("acme/widgets", gh.token, api_url=gh.url)

Every request is recorded in ``gh.requests`` as ``(monotonic_time, method, path, status)``
(path without the query; status 0 for a dropped connection).
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import re
import subprocess
import threading
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple
from urllib.parse import parse_qs, urlencode, urlsplit

__all__ = ["GitHubEmulator", "RecordedRequest"]

DOCS = "https://docs.github.com/rest"
JSON = dict[str, Any]


class RecordedRequest(NamedTuple):
    at: float
    method: str
    path: str
    status: int


@dataclass
class _Reply:
    status: int
    payload: Any
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class _Fault:
    """One scripted fault; it applies to the next ``remaining`` matching requests."""

    remaining: int
    action: str  # "reply" | "drop" | "drop_after"
    reply: _Reply | None = None
    paths: Collection[str] | None = None
    method: str | None = None

    def matches(self, method: str, path: str) -> bool:
        if self.method is not None and self.method != method:
            return False
        return self.paths is None or any(path.startswith(prefix) for prefix in self.paths)


class _Server(ThreadingHTTPServer):
    # socketserver's default backlog of 5 overflows under 20+ concurrent clients, and an
    # overflowed connect is retried by the client's kernel a second later: fake latency.
    request_queue_size = 128
    daemon_threads = True
    emulator: GitHubEmulator

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that time out and hang up make the handler's write fail; that is expected.
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 5  # idle keep-alive connections end, so handler threads don't linger
    disable_nagle_algorithm = True  # headers and body go out as two writes
    server: _Server

    def _dispatch(self) -> None:
        self.server.emulator._handle(self)

    do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _dispatch

    def log_message(self, format: str, *args: Any) -> None:
        pass


class GitHubEmulator:
    """An in-memory GitHub for one repository, served over HTTP on 127.0.0.1."""

    def __init__(
        self,
        owner: str = "acme",
        repo: str = "widgets",
        *,
        token: str = "ghp_emulatorTestToken0123456789abcdef",
        bare_repo: Path | None = None,
        login: str = "workflow-bot",
    ) -> None:
        self.owner = owner
        self.repo = repo
        self.token = token
        self.bare_repo = bare_repo
        self.login = login
        self.rate_limit = 5000
        self._lock = threading.Lock()
        self._issues: dict[int, JSON] = {}
        self._pulls: dict[int, JSON] = {}
        self._reviews: dict[int, list[JSON]] = {}
        # GitHub numbers issues and pull requests from one sequence.
        self._numbers = itertools.count(1)
        self._ids = itertools.count(1_000_001)
        self._requests: list[RecordedRequest] = []
        self._faults: list[_Fault] = []
        self._user_tokens: dict[str, str] = {token: login}  # token -> the user it acts as
        self._caller = login  # the requesting user, set under the lock for each request
        self._outage_until = 0.0
        self._outage_status = 502
        self._latency = 0.0
        self._remaining = self.rate_limit
        self._reset_at = int(time.time()) + 3600
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> GitHubEmulator:
        server = _Server(("127.0.0.1", 0), _Handler)
        server.emulator = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> GitHubEmulator:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """The base URL, like ``http://127.0.0.1:PORT`` (use it as the API URL)."""
        if self._server is None:
            raise RuntimeError("GitHubEmulator is not running; use it as a context manager")
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    # -- state for assertions ------------------------------------------------------------

    @property
    def issues(self) -> dict[int, JSON]:
        """A snapshot of the issues (pull requests excluded), by number."""
        with self._lock:
            return copy.deepcopy(self._issues)

    @property
    def pulls(self) -> dict[int, JSON]:
        """A snapshot of the pull requests, by number."""
        with self._lock:
            return copy.deepcopy(self._pulls)

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def add_review(self, number: int, state: str = "APPROVED", user: str = "reviewer") -> None:
        """Record a review on pull ``number`` as if ``user`` had submitted it."""
        with self._lock:
            self._reviews.setdefault(number, []).append({
                "id": next(self._ids), "user": self._user(user), "body": "",
                "state": state, "submitted_at": _iso(time.time()),
            })

    def token_for(self, user: str) -> str:
        """A token that authenticates as ``user`` (a reviewer who is not the bot)."""
        token = f"ghp_{hashlib.sha1(user.encode()).hexdigest()[:20]}"
        with self._lock:
            self._user_tokens[token] = user
        return token

    def add_issue(self, title: str, body: str = "", labels: Collection[str] = ()) -> int:
        """Create an issue directly (no HTTP request); returns its number."""
        with self._lock:
            reply = self._new_issue({"title": title, "body": body, "labels": list(labels)})
        return int(reply.payload["number"])

    def close_pull(self, number: int) -> None:
        with self._lock:
            self._pulls[number]["state"] = "closed"

    # -- fault injection ----------------------------------------------------------------

    def fail_next(
        self, n: int = 1, status: int = 502, paths: Collection[str] | None = None,
        *, method: str | None = None,
    ) -> None:
        """Answer the next ``n`` matching requests with ``status`` (paths are prefixes)."""
        message = "Server Error" if status >= 500 else "Injected failure"
        self._add_fault(_Fault(n, "reply", _Reply(status, {"message": message}), paths, method))

    def outage(self, seconds: float, status: int = 502) -> None:
        """Answer every request with ``status`` until ``seconds`` of real time have passed."""
        with self._lock:
            self._outage_until = time.monotonic() + seconds
            self._outage_status = status

    def rate_limit_next(
        self, kind: str = "secondary", *, retry_after: int = 2, reset_in: int = 3,
        reset_at: int | None = None, status: int | None = None,
        paths: Collection[str] | None = None,
    ) -> None:
        """Rate-limit the next request like GitHub does.

        ``secondary``: 429 (or ``status``) with ``Retry-After``. ``primary``: 403 with
        ``X-RateLimit-Remaining: 0`` and ``X-RateLimit-Reset`` = ``reset_at`` (an epoch) or
        now + ``reset_in``.
        """
        if kind == "secondary":
            reply = _Reply(status or 429, {
                "message": "You have exceeded a secondary rate limit. Please wait a few "
                           "minutes before you try again.", "documentation_url": DOCS,
            }, {"Retry-After": str(retry_after)})
        elif kind == "primary":
            reset = reset_at if reset_at is not None else int(time.time()) + reset_in
            reply = _Reply(status or 403, {
                "message": "API rate limit exceeded for user ID 1.", "documentation_url": DOCS,
            }, {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": str(reset)})
        else:
            raise ValueError(f"kind must be 'secondary' or 'primary', not {kind!r}")
        self._add_fault(_Fault(1, "reply", reply, paths))

    def latency(self, seconds: float) -> None:
        """Delay every later response by ``seconds`` (0 turns it off)."""
        with self._lock:
            self._latency = seconds

    def drop_next(
        self, n: int = 1, *, after_handling: bool = False,
        paths: Collection[str] | None = None, method: str | None = None,
    ) -> None:
        """Close the connection without a response on the next ``n`` matching requests.

        With ``after_handling`` the request takes effect first (an issue is created, say)
        and only the response is lost: the ambiguous failure exactly-once code must survive.
        """
        self._add_fault(_Fault(n, "drop_after" if after_handling else "drop", None, paths,
                               method))

    def _add_fault(self, fault: _Fault) -> None:
        with self._lock:
            self._faults.append(fault)

    def _take_fault(self, method: str, path: str) -> _Fault | None:
        with self._lock:
            if time.monotonic() < self._outage_until:
                reply = _Reply(self._outage_status, {"message": "Service Unavailable"})
                return _Fault(1, "reply", reply)
            for fault in self._faults:
                if fault.remaining > 0 and fault.matches(method, path):
                    fault.remaining -= 1
                    return fault
            return None

    # -- HTTP plumbing --------------------------------------------------------------------

    def _handle(self, handler: _Handler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length else b""
        split = urlsplit(handler.path)
        method, path = handler.command, split.path
        with self._lock:
            latency = self._latency
        if latency:
            time.sleep(latency)
        fault = self._take_fault(method, path)
        if fault is not None and fault.action == "drop":
            self._drop(handler, method, path)
            return
        if fault is not None and fault.reply is not None:
            reply = fault.reply
        else:
            reply = self._respond(handler, method, path, parse_qs(split.query), raw)
        if fault is not None and fault.action == "drop_after":
            self._drop(handler, method, path)
            return
        self._send(handler, method, path, reply)

    def _drop(self, handler: _Handler, method: str, path: str) -> None:
        self._record(method, path, 0)
        handler.close_connection = True

    def _send(self, handler: _Handler, method: str, path: str, reply: _Reply) -> None:
        body = json.dumps(reply.payload).encode()
        # Recorded before the client can see the response, so assertions never race it.
        self._record(method, path, reply.status)
        handler.send_response(reply.status)
        headers = {
            "Content-Type": "application/json; charset=utf-8",
            "X-GitHub-Api-Version-Selected": "2022-11-28",
            **self._rate_headers(path),
            **reply.headers,
            "Content-Length": str(len(body)),
        }
        for name, value in headers.items():
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(body)

    def _rate_headers(self, path: str) -> dict[str, str]:
        with self._lock:
            if path != "/rate_limit":
                self._remaining = max(0, self._remaining - 1)
            return {
                "X-RateLimit-Limit": str(self.rate_limit),
                "X-RateLimit-Remaining": str(self._remaining),
                "X-RateLimit-Reset": str(self._reset_at),
                "X-RateLimit-Used": str(self.rate_limit - self._remaining),
                "X-RateLimit-Resource": "core",
            }

    def _record(self, method: str, path: str, status: int) -> None:
        with self._lock:
            self._requests.append(RecordedRequest(time.monotonic(), method, path, status))

    def _authorized(self, handler: _Handler) -> str | None:
        """The login the request's token acts as, or None."""
        scheme, _, credential = (handler.headers.get("Authorization") or "").partition(" ")
        if scheme.lower() not in ("bearer", "token"):
            return None
        with self._lock:
            return self._user_tokens.get(credential.strip())

    def _respond(
        self, handler: _Handler, method: str, path: str, query: dict[str, list[str]],
        raw: bytes,
    ) -> _Reply:
        caller = self._authorized(handler)
        if caller is None:
            return _Reply(401, {"message": "Bad credentials", "documentation_url": DOCS})
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            return _Reply(400, {"message": "Problems parsing JSON", "documentation_url": DOCS})
        for route_method, pattern, action in self._routes():
            match = pattern.fullmatch(path)
            if match and route_method == method:
                with self._lock:
                    self._caller = caller
                    return action(match, _Query(query), body)
        return _not_found()

    def _routes(self) -> Iterator[tuple[str, re.Pattern[str], _Action]]:
        base = f"/repos/{re.escape(self.owner)}/{re.escape(self.repo)}"
        yield "GET", re.compile("/rate_limit"), self._get_rate_limit
        yield "GET", re.compile(base), self._get_repo
        yield "GET", re.compile(f"{base}/issues"), self._list_issues
        yield "POST", re.compile(f"{base}/issues"), self._create_issue
        yield "GET", re.compile(rf"{base}/issues/(\d+)"), self._get_issue
        yield "GET", re.compile(f"{base}/pulls"), self._list_pulls
        yield "POST", re.compile(f"{base}/pulls"), self._create_pull
        yield "GET", re.compile(rf"{base}/pulls/(\d+)"), self._get_pull
        yield "POST", re.compile(rf"{base}/pulls/(\d+)/requested_reviewers"), self._request
        yield "GET", re.compile(rf"{base}/pulls/(\d+)/reviews"), self._list_reviews
        yield "POST", re.compile(rf"{base}/pulls/(\d+)/reviews"), self._create_review

    # -- endpoints (called with self._lock held) ------------------------------------------

    def _get_rate_limit(self, match: re.Match[str], query: _Query, body: JSON) -> _Reply:
        core = {"limit": self.rate_limit, "remaining": self._remaining,
                "reset": self._reset_at, "used": self.rate_limit - self._remaining}
        return _Reply(200, {"resources": {"core": core}, "rate": core})

    def _get_repo(self, match: re.Match[str], query: _Query, body: JSON) -> _Reply:
        return _Reply(200, {
            "id": 1296269, "name": self.repo, "full_name": f"{self.owner}/{self.repo}",
            "owner": self._user(self.owner), "private": False, "default_branch": "main",
            "html_url": f"{self._html}", "url": f"{self._api}",
            "permissions": {"admin": False, "push": True, "pull": True},
        })

    def _create_issue(self, match: re.Match[str], query: _Query, body: JSON) -> _Reply:
        return self._new_issue(body)

    def _new_issue(self, body: JSON) -> _Reply:
        if not isinstance(body.get("title"), str) or not body["title"]:
            return _validation_failed("Issue", "title", "missing_field")
        number = next(self._numbers)
        labels = [self._label(name) for name in body.get("labels") or []]
        issue = {
            **self._item(number, "issues", body["title"], body.get("body")),
            "labels": labels, "assignees": [], "comments": 0, "locked": False,
        }
        self._issues[number] = issue
        return _Reply(201, copy.deepcopy(issue))

    def _list_issues(self, match: re.Match[str], query: _Query, body: JSON) -> _Reply:
        wanted = {name for name in query.get("labels", "").split(",") if name}
        # GitHub's issue list includes pull requests, marked by a "pull_request" key.
        items = [*self._issues.values(), *(self._pull_as_issue(p) for p in self._pulls.values())]
        items = [
            item for item in items
            if _state_matches(item, query.get("state", "open"))
            and wanted <= {label["name"] for label in item["labels"]}
        ]
        return self._paginate(items, query, f"{self._api}/issues")

    def _get_issue(self, match: re.Match[str], query: _Query, body: JSON) -> _Reply:
        number = int(match.group(1))
        if number in self._issues:
            return _Reply(200, copy.deepcopy(self._issues[number]))
        if number in self._pulls:
            return _Reply(200, self._pull_as_issue(self._pulls[number]))
        return _not_found()

    def _create_pull(self, match: re.Match[str], query: _Query, body: JSON) -> _Reply:
        for name in ("title", "head", "base"):
            if not isinstance(body.get(name), str) or not body[name]:
                return _validation_failed("PullRequest", name, "missing_field")
        head = body["head"].split(":", 1)[-1]
        head_sha, base_sha = self._resolve(head), self._resolve(body["base"])
        if head_sha is None:
            return _validation_failed("PullRequest", "head", "invalid")
        if base_sha is None:
            return _validation_failed("PullRequest", "base", "invalid")
        if any(p["state"] == "open" and p["head"]["ref"] == head for p in self._pulls.values()):
            return _Reply(422, {
                "message": "Validation Failed", "documentation_url": DOCS,
                "errors": [{"resource": "PullRequest", "code": "custom",
                            "message": f"A pull request already exists for "
                                       f"{self.owner}:{head}."}],
            })
        number = next(self._numbers)
        pull = {
            **self._item(number, "pulls", body["title"], body.get("body")),
            "head": self._branch(head, head_sha), "base": self._branch(body["base"], base_sha),
            "mergeable": True, "merged": False, "merged_at": None, "draft": False,
            "requested_reviewers": [], "labels": [],
        }
        self._pulls[number] = pull
        return _Reply(201, copy.deepcopy(pull))

    def _list_pulls(self, match: re.Match[str], query: _Query, body: JSON) -> _Reply:
        head, base = query.get("head"), query.get("base")
        items = [
            pull for pull in self._pulls.values()
            if _state_matches(pull, query.get("state", "open"))
            and (head is None or pull["head"]["label"] == head)
            and (base is None or pull["base"]["ref"] == base)
        ]
        return self._paginate(items, query, f"{self._api}/pulls")

    def _get_pull(self, match: re.Match[str], query: _Query, body: JSON) -> _Reply:
        pull = self._pulls.get(int(match.group(1)))
        return _Reply(200, copy.deepcopy(pull)) if pull else _not_found()

    def _request(self, match: re.Match[str], query: _Query, body: JSON) -> _Reply:
        pull = self._pulls.get(int(match.group(1)))
        if pull is None:
            return _not_found()
        for login in body.get("reviewers") or []:
            if login == pull["user"]["login"]:
                return _Reply(422, {
                    "message": "Review cannot be requested from pull request author.",
                    "documentation_url": DOCS,
                })
            if all(r["login"] != login for r in pull["requested_reviewers"]):
                pull["requested_reviewers"].append(self._user(login))
        return _Reply(201, copy.deepcopy(pull))

    def _list_reviews(self, match: re.Match[str], query: _Query, body: JSON) -> _Reply:
        number = int(match.group(1))
        if number not in self._pulls:
            return _not_found()
        items = copy.deepcopy(self._reviews.get(number, []))
        return self._paginate(items, query, f"{self._api}/pulls/{number}/reviews",
                              newest_first=False)

    def _create_review(self, match: re.Match[str], query: _Query, body: JSON) -> _Reply:
        """Submit a review as the token's user: ``{"event": "APPROVE" | "REQUEST_CHANGES" |
        "COMMENT", "body": ...}``; as on GitHub, nobody approves their own pull request."""
        number = int(match.group(1))
        pull = self._pulls.get(number)
        if pull is None:
            return _not_found()
        states = {"APPROVE": "APPROVED", "REQUEST_CHANGES": "CHANGES_REQUESTED",
                  "COMMENT": "COMMENTED"}
        state = states.get(str(body.get("event")))
        if state is None:
            return _validation_failed("PullRequestReview", "event", "invalid")
        if state != "COMMENTED" and self._caller == pull["user"]["login"]:
            return _Reply(422, {"message": "Unprocessable Entity", "documentation_url": DOCS,
                                "errors": ["Can not approve your own pull request"]})
        review = {"id": next(self._ids), "user": self._user(self._caller),
                  "body": str(body.get("body") or ""), "state": state,
                  "submitted_at": _iso(time.time())}
        self._reviews.setdefault(number, []).append(review)
        return _Reply(200, copy.deepcopy(review))

    # -- helpers ------------------------------------------------------------------------

    @property
    def _api(self) -> str:
        return f"{self.url}/repos/{self.owner}/{self.repo}"

    @property
    def _html(self) -> str:
        return f"{self.url}/{self.owner}/{self.repo}"

    def _user(self, login: str) -> JSON:
        return {"login": login, "id": int(hashlib.sha1(login.encode()).hexdigest()[:6], 16),
                "type": "User", "html_url": f"{self.url}/{login}"}

    def _label(self, name: str) -> JSON:
        return {"id": int(hashlib.sha1(name.encode()).hexdigest()[:8], 16), "name": name,
                "color": "ededed", "default": False, "description": None}

    def _item(self, number: int, kind: str, title: str, body: str | None) -> JSON:
        now = _iso(time.time())
        html_kind = "issues" if kind == "issues" else "pull"
        return {
            "id": next(self._ids), "node_id": f"N_{number}", "number": number,
            "title": title, "body": body, "state": "open", "user": self._user(self.login),
            "url": f"{self._api}/{kind}/{number}",
            "html_url": f"{self._html}/{html_kind}/{number}",
            "created_at": now, "updated_at": now, "closed_at": None,
        }

    def _branch(self, ref: str, sha: str) -> JSON:
        return {"ref": ref, "sha": sha, "label": f"{self.owner}:{ref}",
                "repo": {"full_name": f"{self.owner}/{self.repo}"}}

    def _pull_as_issue(self, pull: JSON) -> JSON:
        issue = {key: copy.deepcopy(pull[key]) for key in (
            "id", "node_id", "number", "title", "body", "state", "user", "labels",
            "created_at", "updated_at", "closed_at")}
        issue["url"] = f"{self._api}/issues/{pull['number']}"
        issue["html_url"] = pull["html_url"]
        issue["pull_request"] = {"url": pull["url"], "html_url": pull["html_url"]}
        return issue

    def _resolve(self, branch: str) -> str | None:
        """The branch's commit in ``bare_repo``; a made-up sha when there is no repo."""
        if self.bare_repo is None:
            return hashlib.sha1(branch.encode()).hexdigest()
        result = subprocess.run(
            ["git", "-C", str(self.bare_repo), "rev-parse", "--verify", "--quiet",
             f"refs/heads/{branch}^{{commit}}"],
            capture_output=True, text=True, check=False,
        )
        return result.stdout.strip() if result.returncode == 0 else None

    def _paginate(
        self, items: list[JSON], query: _Query, url: str, *, newest_first: bool = True,
    ) -> _Reply:
        descending = query.get("direction", "desc" if newest_first else "asc") == "desc"
        items = sorted(items, key=lambda item: int(item.get("number") or item["id"]),
                       reverse=descending)
        per_page = max(1, min(100, int(query.get("per_page", "30"))))
        page = max(1, int(query.get("page", "1")))
        last = max(1, -(-len(items) // per_page))
        chunk = copy.deepcopy(items[(page - 1) * per_page: page * per_page])
        links = []
        for rel, target in (("prev", page - 1), ("next", page + 1), ("last", last),
                            ("first", 1)):
            if (rel in ("prev", "first") and page > 1) or (rel in ("next", "last")
                                                            and page < last):
                links.append(f'<{url}?{query.with_page(target)}>; rel="{rel}"')
        return _Reply(200, chunk, {"Link": ", ".join(links)} if links else {})


_Action = Callable[[re.Match[str], "_Query", JSON], _Reply]


class _Query:
    """A parsed query string: the first value of each parameter."""

    def __init__(self, raw: dict[str, list[str]]) -> None:
        self._raw = raw

    def get(self, name: str, default: str | None = None) -> Any:
        values = self._raw.get(name)
        return values[0] if values else default

    def with_page(self, page: int) -> str:
        return urlencode({**{k: v[0] for k, v in self._raw.items()}, "page": str(page)})


def _state_matches(item: JSON, state: str) -> bool:
    return state == "all" or item["state"] == state


def _not_found() -> _Reply:
    return _Reply(404, {"message": "Not Found", "documentation_url": DOCS})


def _validation_failed(resource: str, field_name: str, code: str) -> _Reply:
    return _Reply(422, {
        "message": "Validation Failed", "documentation_url": DOCS,
        "errors": [{"resource": resource, "field": field_name, "code": code}],
    })


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))
