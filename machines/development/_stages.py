"""The development workflow's stage handlers: prompt file to pull request, for real.

Each handler does its stage's real work (files, git, the forge's API, the configured
agent and test commands) and returns the outputs later stages need.

Exactly-once: a stage may run again after a crash or a retry, so every side-effecting
stage first reconciles with the world (issue found by the hidden marker, branch and
worktree reused, commit found by the marker, open pull request found by branch) and
records an effect's identity with ``ctx.save_output`` the moment it exists.
"""

from __future__ import annotations

import re
import shlex
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from reliability import ConfigurationError, CriticalError, SignalTimeout, TransientError
from reliability._context import StageContext
from reliability._logging import register_secret
from reliability._waits import SignalSource, register_signal_source

from .._stages import DEFAULT_TIMEOUTS, WorkflowStage
from . import _git
from ._commands import format_command, run_command
from ._forge import Forge, LocalForge
from ._github import GitHubForge
from ._prompt import Prompt, load_prompt_async
from ._settings import TOKEN_VARIABLE, settings_of

__all__ = ["HANDLERS", "forge_for", "marker_for"]

Outputs = Mapping[str, Any]
_FORGE_KEY = "development.forge"
_HEALTH_KEY = "development.health-probes"
_PROBE_REUSE_SECONDS = 30.0
_WORKTREES = Path(".github") / "workflow-worktrees"
_REVIEW_TIMING = DEFAULT_TIMEOUTS[WorkflowStage.REVIEW_PROCESSING]
_PYTEST_SUMMARY = re.compile(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed)")


def marker_for(workflow_id: str) -> str:
    """The hidden marker that ties an issue, commit and pull request to one workflow."""
    return f"<!-- workflow-manager:{workflow_id} -->"


async def forge_for(ctx: StageContext) -> Forge:
    """The runtime's one forge (made on first use), as the configuration chooses."""
    return await runtime_forge(ctx.runtime)


async def runtime_forge(runtime: Any) -> Forge:
    """The runtime's one forge, shared by the stages and the review poller: every GitHub
    call of either goes through the same ``github`` breaker and retries."""

    async def make() -> Forge:
        settings = settings_of(runtime.config)
        if settings.resolved_forge() == "github":
            # Read when the forge starts, not when the configuration is built: a token not
            # given explicitly never sits in a configuration object.
            token = settings.token()
            if not (token and settings.github_repository):
                raise ConfigurationError(
                    "forge 'github' needs github_repository (owner/name) and a token: "
                    f"github_token, or {TOKEN_VARIABLE} in the environment")
            register_secret(token)  # never in a log line or a stored error
            return GitHubForge(settings.github_repository, token,
                               api_url=settings.github_api_url, clock=runtime.clock,
                               guard=_GitHubGuard(runtime))
        return LocalForge(runtime.project_root, runtime.clock)

    forge: Forge = await runtime.shared(_FORGE_KEY, make)
    return forge


class _GitHubGuard:
    """Every GitHub call: retries (outer) around the shared ``github`` breaker (inner)."""

    def __init__(self, runtime: Any) -> None:
        self._runtime = runtime

    def __call__(self, attempt: Any, /) -> Any:
        return self._runtime.guarded_call("github", attempt)


async def _register_health_probes(ctx: StageContext) -> bool:
    """Once per runtime: forge connectivity and rate limit, git status, agent on PATH."""
    runtime, forge, root = ctx.runtime, await forge_for(ctx), ctx.project_root
    agent = settings_of(ctx.config).agent_command

    clock = ctx.clock
    cached: list[tuple[float, dict[str, Any]]] = []

    async def development_health(workflow_id: str | None) -> dict[str, Any]:
        # A git subprocess and a forge request: reused for a while, since health is asked
        # before critical stages of every workflow.
        if cached and clock.monotonic() - cached[0][0] < _PROBE_REUSE_SECONDS:
            return cached[0][1]
        answer = await _probe()
        cached[:] = [(clock.monotonic(), answer)]
        return answer

    async def _probe() -> dict[str, Any]:
        forge_health = await forge.health()
        git_state = await _git.status(root)
        try:
            _program_on_path(agent, "agent_command")
            agent_ok = True
        except ConfigurationError:
            agent_ok = False
        advice = [] if forge_health.reachable else [f"Forge: {forge_health.detail}"]
        if not agent_ok:
            advice.append(f"agent_command {agent!r} is not on PATH")
        if git_state == "error":
            advice.append(f"git cannot read the repository at {root}")
        status = "HEALTHY" if forge_health.reachable and agent_ok and git_state != "error" \
            else "DEGRADED"
        return {"status": status, "github_connectivity": forge_health.reachable,
                "claude_availability": agent_ok, "git_status": git_state,
                "rate_limit_remaining": forge_health.rate_limit_remaining,
                "forge": forge.label, "recommendations": advice}

    runtime.register_health_check(development_health)
    return True


def _prompt_path(ctx: StageContext) -> Path:
    raw = ctx.context.get("prompt_file")
    if not isinstance(raw, str) or not raw:
        raise ConfigurationError("the development workflow needs a prompt_file input")
    path = Path(raw)
    return path if path.is_absolute() else ctx.project_root / path


async def _prompt(ctx: StageContext) -> Prompt:
    return await load_prompt_async(_prompt_path(ctx))


def _worktree(ctx: StageContext) -> Path:
    return Path(str(ctx.context["worktree"]))


# ------------------------------------------------------------------ preparation


async def initialization(ctx: StageContext) -> Outputs:
    """Validate the prompt file, the repository and the commands before anything happens."""
    prompt = await _prompt(ctx)
    await _git.ensure_repository(ctx.project_root)
    settings = settings_of(ctx.config)
    if not settings.agent_command.strip():
        raise ConfigurationError("agent_command is empty: set it to the command that "
                                 "implements a prompt, e.g. 'claude -p {prompt_file}'")
    _program_on_path(settings.agent_command, "agent_command")
    _program_on_path(settings.test_command, "test_command")
    forge = await forge_for(ctx)  # the GitHub forge checks its repository and token
    await ctx.shared(_HEALTH_KEY, lambda: _register_health_probes(ctx))
    ctx.logger.info("Prompt %s: %r; forge: %s", prompt.path, prompt.title, forge.label)
    return {"prompt_file": str(prompt.path), "feature_name": prompt.title,
            "slug": prompt.slug, "forge": forge.label}


async def prompt_analysis(ctx: StageContext) -> Outputs:
    """Parse the prompt's requirements, success criteria and sections."""
    prompt = await _prompt(ctx)
    return {"requirements": list(prompt.requirements),
            "success_criteria": list(prompt.success_criteria),
            "sections": list(prompt.sections), "complexity": prompt.complexity}


async def task_preparation(ctx: StageContext) -> Outputs:
    """One task per requirement, then tests after all of them, then docs after tests."""
    requirements = list(ctx.context.get("requirements") or [])
    tasks: list[dict[str, Any]] = [
        {"id": f"task-{i}", "title": f"Implement: {text}", "depends_on": []}
        for i, text in enumerate(requirements, 1)]
    implementation_ids = [t["id"] for t in tasks]
    tasks.append({"id": "task-tests", "title": "Make the tests pass",
                  "depends_on": implementation_ids})
    tasks.append({"id": "task-docs", "title": "Update the documentation",
                  "depends_on": ["task-tests"]})
    return {"tasks": tasks}


# ------------------------------------------------------------------ issue and branch


def _issue_body(ctx: StageContext) -> str:
    requirements = "\n".join(f"- {r}" for r in ctx.context.get("requirements") or [])
    criteria = "\n".join(f"- {c}" for c in ctx.context.get("success_criteria") or [])
    prompt = Path(str(ctx.context["prompt_file"])).name
    return (f"Implementation of the prompt `{prompt}`, run by workflow `{ctx.workflow_id}`."
            f"\n\n## Requirements\n\n{requirements}\n\n## Success criteria\n\n{criteria}\n\n"
            f"{marker_for(ctx.workflow_id)}\n")


async def issue_creation(ctx: StageContext) -> Outputs:
    """Create the issue, unless an earlier run of this stage already did."""
    forge = await forge_for(ctx)
    marker = marker_for(ctx.workflow_id)
    issue = await forge.find_issue(marker)
    if issue is None:
        issue = await forge.create_issue(str(ctx.context["feature_name"]), _issue_body(ctx),
                                         ["enhancement"])
        ctx.logger.info("Created issue #%d: %s", issue.number, issue.url)
    else:
        ctx.logger.info("Reusing issue #%d created by an earlier attempt", issue.number)
    await ctx.save_output_durably(issue_number=issue.number, issue_url=issue.url)
    return {"issue_number": issue.number, "issue_url": issue.url}


async def branch_setup(ctx: StageContext) -> Outputs:
    """A branch ``feature/<slug>-<issue>`` in a git worktree of this workflow's own."""
    branch = f"feature/{ctx.context['slug']}-{ctx.context['issue_number']}"
    path = ctx.project_root / _WORKTREES / ctx.workflow_id
    worktree = await _git.ensure_worktree(ctx.project_root, path, branch,
                                          settings_of(ctx.config).base_branch)
    return {"branch_name": branch, "worktree": str(worktree)}


async def research_planning(ctx: StageContext) -> Outputs:
    """The repository files whose names share words with the requirements."""
    files = await _git.repository_files(_worktree(ctx), 5000)
    words = {w for r in ctx.context.get("requirements") or []
             for w in re.findall(r"[a-z]{4,}", str(r).lower())}
    scored = sorted(((sum(w in f.lower() for w in words), f) for f in files), reverse=True)
    relevant = [f for score, f in scored if score > 0][:20]
    return {"repository_files": len(files), "relevant_files": relevant}


# ------------------------------------------------------------------ implementation


def _program_on_path(command: str, setting: str) -> None:
    """Refuse early a command whose program is missing, before any side effect happens."""
    try:
        program = shlex.split(command.replace("{python}", sys.executable))[0]
    except (ValueError, IndexError):
        raise ConfigurationError(f"{setting} {command!r} is not a valid command") from None
    if "{" not in program and shutil.which(program) is None:
        raise ConfigurationError(f"{setting} {command!r}: program {program!r} is not on PATH "
                                 f"(set {setting} in the configuration or WORKFLOW_"
                                 f"{setting.upper()})")


def _command(ctx: StageContext, template: str, setting: str) -> str:
    command = format_command(template, prompt_file=str(ctx.context["prompt_file"]),
                             worktree=str(_worktree(ctx)), python=sys.executable)
    _program_on_path(command, setting)
    return command


async def implementation_start(ctx: StageContext) -> Outputs:
    """Check the agent command can run before handing it the worktree."""
    return {"agent_command": _command(ctx, settings_of(ctx.config).agent_command, "agent_command")}


async def implementation_progress(ctx: StageContext) -> Outputs:
    """Run the agent in the worktree; each line it prints is logged and is a heartbeat."""
    command = str(ctx.context["agent_command"])

    def on_line(line: str) -> None:
        ctx.heartbeat()
        ctx.logger.info("agent: %s", line)

    result = await run_command(command, cwd=_worktree(ctx), on_line=on_line)
    if not result.ok:
        raise TransientError(f"agent command {command!r} exited with {result.returncode} in "
                             f"{_worktree(ctx)}: {result.output_tail[-500:]}")
    return {"agent_exit_code": result.returncode,
            "agent_duration": round(result.duration_seconds, 3)}


async def implementation_complete(ctx: StageContext) -> Outputs:
    """Record what the agent changed; no change at all is a failure a person must see."""
    diff = await _git.diff_numstat(_worktree(ctx), settings_of(ctx.config).base_branch)
    if not diff.files_changed:
        raise CriticalError(f"the agent made no changes in {_worktree(ctx)}; check "
                            f"agent_command ({settings_of(ctx.config).agent_command!r})")
    return {"files_changed": list(diff.files_changed), "lines_added": diff.lines_added,
            "lines_deleted": diff.lines_deleted}


async def testing_start(ctx: StageContext) -> Outputs:
    return {"test_command": _command(ctx, settings_of(ctx.config).test_command, "test_command")}


def parse_test_counts(output: str) -> dict[str, int]:
    """Counts from pytest's summary line (``3 passed, 1 failed in 0.1s``); else empty."""
    counts: dict[str, int] = {}
    for line in reversed(output.splitlines()):
        found = _PYTEST_SUMMARY.findall(line)
        if found:
            for number, kind in found:
                counts[kind.rstrip("s") if kind.startswith("error") else kind] = int(number)
            break
    return counts


async def testing_complete(ctx: StageContext) -> Outputs:
    """Run the tests in the worktree; failing tests fail the stage."""
    command = str(ctx.context["test_command"])
    result = await run_command(command, cwd=_worktree(ctx),
                               on_line=lambda line: ctx.heartbeat())
    counts = parse_test_counts(result.output_tail)
    if not result.ok:
        raise CriticalError(f"tests failed ({command!r} exited with {result.returncode}, "
                            f"{counts or 'no summary'}): {result.output_tail[-800:]}")
    return {"tests_passed": True, "test_exit_code": result.returncode, "test_counts": counts}


async def documentation_update(ctx: StageContext) -> Outputs:
    """Run ``docs_command`` when one is configured (a non-critical stage)."""
    template = settings_of(ctx.config).docs_command
    if not template.strip():
        return {"docs_updated": False, "docs_note": "no docs_command configured"}
    command = _command(ctx, template, "docs_command")
    result = await run_command(command, cwd=_worktree(ctx), on_line=lambda _: ctx.heartbeat())
    if not result.ok:
        raise TransientError(f"docs command {command!r} exited with {result.returncode}")
    return {"docs_updated": True}


# ------------------------------------------------------------------ pull request


async def pr_preparation(ctx: StageContext) -> Outputs:
    """Commit once (found again by the marker after a crash) and push the branch."""
    worktree = _worktree(ctx)
    marker = marker_for(ctx.workflow_id)
    message = (f"{ctx.context['feature_name']}\n\nCloses #{ctx.context['issue_number']}.\n\n"
               f"{marker}")
    sha = await _git.commit_all(worktree, message, marker)
    if sha is None:
        raise CriticalError(f"nothing to commit in {worktree}")
    await ctx.save_output_durably(commit_sha=sha)
    forge = await forge_for(ctx)
    remote = await forge.prepare_remote(ctx.project_root)
    await _git.push(worktree, remote, str(ctx.context["branch_name"]))
    return {"commit_sha": sha, "remote": remote}


async def pr_creation(ctx: StageContext) -> Outputs:
    """Open the pull request, or reuse the open one for this branch."""
    forge = await forge_for(ctx)
    branch = str(ctx.context["branch_name"])
    pull = await forge.find_open_pull(branch)
    if pull is None:
        body = (f"Closes #{ctx.context['issue_number']}.\n\nFiles changed: "
                f"{len(ctx.context.get('files_changed') or [])}, lines added: "
                f"{ctx.context.get('lines_added', 0)}; tests: "
                f"{ctx.context.get('test_counts') or 'passed'}.\n\n"
                f"{marker_for(ctx.workflow_id)}\n")
        pull = await forge.create_pull(str(ctx.context["feature_name"]), body, branch,
                                       settings_of(ctx.config).base_branch)
        ctx.logger.info("Opened pull request #%d: %s", pull.number, pull.url)
    await ctx.save_output_durably(pr_number=pull.number, pr_url=pull.url)
    return {"pr_number": pull.number, "pr_url": pull.url}


async def pr_verification(ctx: StageContext) -> Outputs:
    """Read the pull request back: open, and its head is the commit we pushed."""
    forge = await forge_for(ctx)
    pull = await forge.get_pull(int(ctx.context["pr_number"]))
    expected = str(ctx.context["commit_sha"])
    if pull.state != "open" or pull.head_sha != expected:
        raise TransientError(f"pull request #{pull.number} is {pull.state} at "
                             f"{pull.head_sha}, expected open at {expected}")
    return {"pr_state": pull.state, "pr_head_sha": pull.head_sha}


async def review_request(ctx: StageContext) -> Outputs:
    reviewers = list(settings_of(ctx.config).reviewers)
    if reviewers:
        forge = await forge_for(ctx)
        await forge.request_reviewers(int(ctx.context["pr_number"]), reviewers)
    return {"reviewers_requested": reviewers}


async def review_processing(ctx: StageContext) -> Outputs:
    """Record the review state. With reviewers requested and no verdict yet, wait (parked,
    holding no slot) for signal ``review``, sent by the runtime's review poller or by
    ``workflow-manager signal ID review [--data '{"state": "approved"}']``, for at most
    ``review_wait_seconds``. Woken, the stage runs again from its start: reading the
    state first is idempotent."""
    forge = await forge_for(ctx)
    number = int(ctx.context["pr_number"])
    state = await forge.review_state(number)
    if ctx.context.get("reviewers_requested") and state == "pending":
        try:
            payload = await ctx.wait_for_signal(
                "review", timeout_seconds=settings_of(ctx.config).review_wait_seconds)
        except SignalTimeout:
            ctx.logger.info("No review within %.0fs; recording it pending",
                            settings_of(ctx.config).review_wait_seconds)
            payload = None
        given = payload.get("state") if isinstance(payload, dict) else None
        state = str(given) if given else await forge.review_state(number)
    return {"review_state": state}


async def poll_reviews(runtime: Any, workflow_ids: list[str]) -> None:
    """The review poller: signal ``review`` to each parked workflow whose pull request has
    a verdict (run by every runtime while workflows wait for it)."""
    forge: Forge | None = None
    for workflow_id in workflow_ids:
        state = (await runtime.store.load(workflow_id)).state
        number = (state.get("context") or {}).get("pr_number")
        if number is None:
            continue
        if forge is None:
            forge = await runtime_forge(runtime)
        verdict = await forge.review_state(int(number))
        if verdict != "pending":
            await runtime.signal(workflow_id, "review", {"state": verdict})


register_signal_source(SignalSource("review", poll_reviews, interval_seconds=60.0))


async def final_cleanup(ctx: StageContext) -> Outputs:
    """Remove the worktree; the branch stays for the pull request."""
    await _git.remove_worktree(ctx.project_root, _worktree(ctx))
    return {"worktree_removed": True}


async def completion(ctx: StageContext) -> Outputs:
    ctx.logger.info("Workflow complete: issue #%s, pull request #%s (%s)",
                    ctx.context.get("issue_number"), ctx.context.get("pr_number"),
                    ctx.context.get("pr_url"))
    return {"completed": True}


HANDLERS = {
    "initialization": initialization, "prompt_analysis": prompt_analysis,
    "task_preparation": task_preparation, "issue_creation": issue_creation,
    "branch_setup": branch_setup, "research_planning": research_planning,
    "implementation_start": implementation_start,
    "implementation_progress": implementation_progress,
    "implementation_complete": implementation_complete, "testing_start": testing_start,
    "testing_complete": testing_complete, "documentation_update": documentation_update,
    "pr_preparation": pr_preparation, "pr_creation": pr_creation,
    "pr_verification": pr_verification, "review_request": review_request,
    "review_processing": review_processing, "final_cleanup": final_cleanup,
    "completion": completion,
}
