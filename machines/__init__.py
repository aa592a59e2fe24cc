"""Workflow definitions for the reliability runtime.

``WorkflowStage`` names the development workflow's stages; ``WorkflowDefinition`` and
``StageSpec`` define machines of your own; ``StageContext`` is what a handler receives.
"""

from reliability._context import StageContext

from ._definition import StageSpec, WorkflowDefinition
from ._stages import DEFAULT_TIMEOUTS, WorkflowStage

__all__ = ["DEFAULT_TIMEOUTS", "StageContext", "StageSpec", "WorkflowDefinition",
           "WorkflowStage"]
