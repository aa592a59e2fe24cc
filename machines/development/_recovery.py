"""Recovery actions of the development workflow, named in its stages' recovery lists."""

from __future__ import annotations

from pathlib import Path

from reliability._context import RecoveryAction, StageContext

from . import _git
from ._stages import forge_for

__all__ = ["DEVELOPMENT_ACTIONS"]


async def check_github_rate_limits(ctx: StageContext, error: BaseException | None) -> None:
    """Ask the forge how many calls are left, and wait for open breakers if none are."""
    health = await (await forge_for(ctx)).health()
    ctx.logger.info("Forge: %s (rate limit remaining: %s)", health.detail,
                    health.rate_limit_remaining)


async def verify_repository_access(ctx: StageContext, error: BaseException | None) -> None:
    """Check the forge answers; a failure is logged with the forge's own words."""
    health = await (await forge_for(ctx)).health()
    level = ctx.logger.info if health.reachable else ctx.logger.warning
    level("Repository access: %s", health.detail)


async def retry_github_api_call(ctx: StageContext, error: BaseException | None) -> None:
    """Before the retry, wait until the GitHub breaker is due for its probe (max 5 min)."""
    wait = min(300.0, ctx.breaker("github").retry_in())
    if wait > 0:
        ctx.logger.info("Waiting %.1fs for the GitHub circuit breaker", wait)
        await ctx.sleep(wait)


async def verify_branch_state(ctx: StageContext, error: BaseException | None) -> None:
    """Log whether the workflow's worktree (or the repository) is clean."""
    where = ctx.context.get("worktree") or str(ctx.project_root)
    state = await _git.status(Path(str(where)))
    ctx.logger.info("Branch state of %s: %s", where, state)


async def check_pr_requirements(ctx: StageContext, error: BaseException | None) -> None:
    """Log the pull request's state and head as the forge sees them."""
    number = ctx.context.get("pr_number")
    if number is None:
        return
    pull = await (await forge_for(ctx)).get_pull(int(number))
    ctx.logger.info("Pull request #%d: %s at %s", pull.number, pull.state, pull.head_sha)


DEVELOPMENT_ACTIONS: dict[str, RecoveryAction] = {
    "check_github_rate_limits": check_github_rate_limits,
    "verify_repository_access": verify_repository_access,
    "retry_github_api_call": retry_github_api_call,
    "retry_pr_creation": retry_github_api_call,
    "verify_branch_state": verify_branch_state,
    "check_branch_status": verify_branch_state,
    "check_pr_requirements": check_pr_requirements,
}
