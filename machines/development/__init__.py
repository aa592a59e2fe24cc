"""The development workflow: a prompt file to a reviewed pull request, in 19 real stages.

``DEVELOPMENT_WORKFLOW`` is what ``run_workflow("prompts/feature.md")`` and
``workflow-manager run`` use. It works on GitHub (``forge = "github"``, a token in
``GITHUB_TOKEN``) or offline on the local forge (the default without a token).
"""

from .._definition import StageSpec, WorkflowDefinition
from .._stages import WorkflowStage
from ._recovery import DEVELOPMENT_ACTIONS
from ._stages import HANDLERS, forge_for, marker_for, parse_test_counts

__all__ = ["DEVELOPMENT_WORKFLOW", "forge_for", "marker_for", "parse_test_counts"]

_S = WorkflowStage
# Health is checked before the stages that cost the most when the machine is unwell.
_HEALTH_FIRST = {_S.IMPLEMENTATION_START, _S.PR_CREATION, _S.REVIEW_REQUEST}
# Stages that create something outside get a checkpoint file of their own.
_SIDE_EFFECTS = {_S.ISSUE_CREATION, _S.BRANCH_SETUP, _S.PR_PREPARATION, _S.PR_CREATION}
_NON_CRITICAL = {_S.DOCUMENTATION_UPDATE, _S.REVIEW_REQUEST, _S.REVIEW_PROCESSING}

DEVELOPMENT_WORKFLOW = WorkflowDefinition(
    "development",
    [StageSpec(stage=stage, handler=HANDLERS[stage.value],
               health_check=stage in _HEALTH_FIRST, checkpoint=stage in _SIDE_EFFECTS,
               critical=stage not in _NON_CRITICAL)
     for stage in list(WorkflowStage)[:19]],
    recovery_actions=DEVELOPMENT_ACTIONS,
)
