"""Workflow definitions for the reliability runtime.

``WorkflowStage`` names the development workflow's stages; ``WorkflowDefinition`` and
``StageSpec`` define machines of your own; ``StageContext`` is what a handler receives.
Importing ``machines`` also imports ``machines.development``, which registers the
development workflow's settings section and its prompt-file target resolver (the
``workflow_manager.plugins`` entry point does the same when the runtime needs them).
"""

from reliability._context import StageContext

from . import development as development  # registers its settings and target resolver
from ._definition import StageSpec, WorkflowDefinition
from ._stages import DEFAULT_TIMEOUTS, WorkflowStage

__all__ = ["DEFAULT_TIMEOUTS", "StageContext", "StageSpec", "WorkflowDefinition",
           "WorkflowStage"]
