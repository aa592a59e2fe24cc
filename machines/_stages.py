"""The development workflow's stages, the outcomes every workflow ends in, and their timings."""

from __future__ import annotations

from enum import StrEnum

__all__ = ["DEFAULT_TIMEOUTS", "OUTCOMES", "StageTiming", "WorkflowStage"]


class WorkflowStage(StrEnum):
    """The spec's 19 stages, in order, then the outcomes a workflow can end in."""

    INITIALIZATION = "initialization"
    PROMPT_ANALYSIS = "prompt_analysis"
    TASK_PREPARATION = "task_preparation"
    ISSUE_CREATION = "issue_creation"
    BRANCH_SETUP = "branch_setup"
    RESEARCH_PLANNING = "research_planning"
    IMPLEMENTATION_START = "implementation_start"
    IMPLEMENTATION_PROGRESS = "implementation_progress"
    IMPLEMENTATION_COMPLETE = "implementation_complete"
    TESTING_START = "testing_start"
    TESTING_COMPLETE = "testing_complete"
    DOCUMENTATION_UPDATE = "documentation_update"
    PR_PREPARATION = "pr_preparation"
    PR_CREATION = "pr_creation"
    PR_VERIFICATION = "pr_verification"
    REVIEW_REQUEST = "review_request"
    REVIEW_PROCESSING = "review_processing"
    FINAL_CLEANUP = "final_cleanup"
    COMPLETION = "completion"
    # Outcomes: states a workflow's machine ends in (interrupted ones resume).
    COMPLETED = "completed"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"

    def __str__(self) -> str:
        return self.value


OUTCOMES = frozenset({WorkflowStage.COMPLETED, WorkflowStage.FAILED, WorkflowStage.TIMED_OUT,
                      WorkflowStage.CANCELLED, WorkflowStage.INTERRUPTED})


class StageTiming(tuple[float, float, float, tuple[str, ...]]):
    """(timeout_seconds, warning_threshold_seconds, baseline_seconds, recovery_actions)."""

    __slots__ = ()

    def __new__(cls, timeout: float, warning: float, baseline: float,
                actions: tuple[str, ...] = ()) -> StageTiming:
        return super().__new__(cls, (timeout, warning, baseline, actions))

    @property
    def timeout_seconds(self) -> float:
        return self[0]

    @property
    def warning_threshold_seconds(self) -> float:
        return self[1]

    @property
    def baseline_seconds(self) -> float:
        return self[2]

    @property
    def recovery_actions(self) -> tuple[str, ...]:
        return self[3]


_S = WorkflowStage
# The spec gives initialization, implementation_progress and pr_creation; the others are
# set from what each stage really does (API calls: minutes; agent and tests: up to 30 min).
DEFAULT_TIMEOUTS: dict[str, StageTiming] = {
    _S.INITIALIZATION: StageTiming(120, 60, 10, ("restart_initialization", "check_system_health")),
    _S.PROMPT_ANALYSIS: StageTiming(60, 30, 5),
    _S.TASK_PREPARATION: StageTiming(60, 30, 5),
    _S.ISSUE_CREATION: StageTiming(120, 60, 30, (
        "retry_github_api_call", "check_github_rate_limits", "verify_repository_access")),
    _S.BRANCH_SETUP: StageTiming(120, 60, 10, ("verify_branch_state",)),
    _S.RESEARCH_PLANNING: StageTiming(300, 180, 30),
    _S.IMPLEMENTATION_START: StageTiming(120, 60, 10, ("check_system_health",)),
    _S.IMPLEMENTATION_PROGRESS: StageTiming(1800, 1200, 1200, (
        "checkpoint_progress", "simplify_implementation")),
    _S.IMPLEMENTATION_COMPLETE: StageTiming(120, 60, 10, ("create_implementation_checkpoint",)),
    _S.TESTING_START: StageTiming(120, 60, 10),
    _S.TESTING_COMPLETE: StageTiming(1800, 1200, 300, ("check_system_health",)),
    _S.DOCUMENTATION_UPDATE: StageTiming(600, 300, 60),
    _S.PR_PREPARATION: StageTiming(300, 180, 30, ("verify_branch_state",)),
    _S.PR_CREATION: StageTiming(120, 90, 60, ("retry_pr_creation", "check_branch_status")),
    _S.PR_VERIFICATION: StageTiming(120, 60, 10, ("check_pr_requirements",)),
    _S.REVIEW_REQUEST: StageTiming(120, 60, 10, ("check_github_rate_limits",)),
    _S.REVIEW_PROCESSING: StageTiming(600, 300, 60),
    _S.FINAL_CLEANUP: StageTiming(120, 60, 10),
    _S.COMPLETION: StageTiming(60, 30, 5),
}
# A stage a user names that the spec does not know gets these.
FALLBACK_TIMING = StageTiming(300, 200, 60)
