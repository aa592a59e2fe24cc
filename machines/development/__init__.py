"""The development workflow: a prompt file to a reviewed pull request, in 19 real stages.

``DEVELOPMENT_WORKFLOW`` is what ``run_workflow("prompts/feature.md")`` and
``workflow-manager run`` use. It works on GitHub (``forge = "github"``, a token in
``GITHUB_TOKEN``) or offline on the local forge (the default without a token).

Importing this package registers, for the runtime: the development settings section
(``forge``, ``github_repository``, ``agent_command``, ``reviewers``, ...) and the target
resolver that makes a path given to ``run_workflow`` / ``Runtime.run`` a prompt file for
this workflow. The package's ``workflow_manager.plugins`` entry point imports it when the
runtime first needs either, so users need not import it themselves.
"""

import os
from collections.abc import Mapping
from typing import Any

from reliability import ResolvedTarget, register_target_resolver

from .._definition import StageSpec, WorkflowDefinition
from .._stages import WorkflowStage
from ._recovery import DEVELOPMENT_ACTIONS
from ._settings import DevelopmentSettings, settings_of
from ._stages import HANDLERS, forge_for, marker_for, parse_test_counts

__all__ = ["DEVELOPMENT_WORKFLOW", "DevelopmentSettings", "forge_for", "marker_for",
           "parse_test_counts", "resolve_prompt", "settings_of"]

_S = WorkflowStage
# Health is checked before the stages that cost the most when the machine is unwell.
_HEALTH_FIRST = {_S.IMPLEMENTATION_START, _S.PR_CREATION, _S.REVIEW_REQUEST}
# Stages that create something outside get a checkpoint file of their own.
_SIDE_EFFECTS = {_S.ISSUE_CREATION, _S.BRANCH_SETUP, _S.PR_PREPARATION, _S.PR_CREATION}
_NON_CRITICAL = {_S.DOCUMENTATION_UPDATE, _S.REVIEW_REQUEST, _S.REVIEW_PROCESSING}

DEVELOPMENT_WORKFLOW = WorkflowDefinition(
    "development",
    [StageSpec(stage, HANDLERS[stage.value],
               health_check=stage in _HEALTH_FIRST, checkpoint=stage in _SIDE_EFFECTS,
               critical=stage not in _NON_CRITICAL)
     for stage in list(WorkflowStage)[:19]],
    recovery_actions=DEVELOPMENT_ACTIONS,
)


def resolve_prompt(target: str | os.PathLike[str], context: Mapping[str, Any]) -> ResolvedTarget:
    """A path is a prompt file for ``DEVELOPMENT_WORKFLOW`` (the input ``prompt_file``)."""
    prompt = os.path.abspath(os.fspath(target))  # resumable from any directory
    inputs = dict(context)
    inputs.setdefault("prompt_file", prompt)
    return ResolvedTarget(DEVELOPMENT_WORKFLOW, inputs, prompt)


register_target_resolver(resolve_prompt)
