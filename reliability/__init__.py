"""A reliable asyncio runtime for many long-lived, failure-prone workflows.

Each workflow is an explicit state machine whose states are its stages; around every
stage the runtime puts a watchdog, classified retries and recovery, shared circuit
breakers and a durable checkpoint, so an interrupted workflow resumes where it stopped.
"""

from ._breaker import Breaker
from ._clock import Clock, FakeClock, SystemClock
from ._config import (
    BreakerSettings,
    SettingsSection,
    WorkflowConfiguration,
    load_configuration,
    register_settings_section,
    setting_error,
)
from ._errors import (
    CircuitOpenError,
    ConfigurationError,
    CriticalError,
    ErrorCategory,
    InvalidTransitionError,
    InvalidWorkflowIdError,
    RateLimitedError,
    ResourceError,
    SignalRefusedError,
    SignalTimeout,
    StageTimeoutError,
    StateCorruptedError,
    TransientError,
    WorkflowError,
    WorkflowLockedError,
    WorkflowNotFoundError,
    classify,
)
from ._health import HealthStatus, SystemHealthCheck
from ._ids import new_workflow_id, validate_workflow_id
from ._metrics import RuntimeMetrics, serve_metrics
from ._plugins import ResolvedTarget, TargetResolver, register_target_resolver
from ._retry import RetryPolicy
from ._runtime import Runtime, WorkflowResult, resume_workflow, run_workflow
from ._store import FileStore, MemoryStore, Store
from ._tracing import enable_tracing

__all__ = [
    "Breaker",
    "BreakerSettings",
    "CircuitOpenError",
    "Clock",
    "ConfigurationError",
    "CriticalError",
    "ErrorCategory",
    "FakeClock",
    "FileStore",
    "HealthStatus",
    "InvalidTransitionError",
    "InvalidWorkflowIdError",
    "MemoryStore",
    "RateLimitedError",
    "ResolvedTarget",
    "ResourceError",
    "RetryPolicy",
    "Runtime",
    "RuntimeMetrics",
    "SettingsSection",
    "SignalRefusedError",
    "SignalTimeout",
    "StageTimeoutError",
    "StateCorruptedError",
    "Store",
    "SystemClock",
    "SystemHealthCheck",
    "TargetResolver",
    "TransientError",
    "WorkflowConfiguration",
    "WorkflowError",
    "WorkflowLockedError",
    "WorkflowNotFoundError",
    "WorkflowResult",
    "classify",
    "enable_tracing",
    "load_configuration",
    "new_workflow_id",
    "register_settings_section",
    "register_target_resolver",
    "resume_workflow",
    "run_workflow",
    "serve_metrics",
    "setting_error",
    "validate_workflow_id",
]
