"""The error taxonomy: every error the runtime raises, and ``classify()``.

Four categories decide what the engine does with a failure:

- ``TRANSIENT``: retry with exponential backoff and jitter (network blips, 5xx, 429).
- ``RESOURCE``: run resource recovery, then retry (disk full, memory, too many files).
- ``CONFIGURATION``: fail at once with guidance; retrying cannot help.
- ``CRITICAL``: stop safely, state preserved, resumable after a human looks.
"""

from __future__ import annotations

import asyncio
import errno
import json
from enum import StrEnum

__all__ = [
    "CircuitOpenError",
    "ConfigurationError",
    "CriticalError",
    "DatabaseUnavailableError",
    "ErrorCategory",
    "FencedError",
    "InvalidTransitionError",
    "InvalidWorkflowIdError",
    "RateLimitedError",
    "ResourceError",
    "SchemaVersionError",
    "SignalRefusedError",
    "SignalTimeout",
    "StageTimeoutError",
    "StateCorruptedError",
    "TransientError",
    "WorkflowError",
    "WorkflowLockedError",
    "WorkflowNotFoundError",
    "classify",
]


class ErrorCategory(StrEnum):
    TRANSIENT = "transient"
    RESOURCE = "resource"
    CONFIGURATION = "configuration"
    CRITICAL = "critical"


class WorkflowError(Exception):
    """Base of every error the runtime raises; ``category`` says how it is handled."""

    category: ErrorCategory = ErrorCategory.CRITICAL


class TransientError(WorkflowError):
    """Raised when an operation failed in a way that retrying later may fix."""

    category = ErrorCategory.TRANSIENT


class RateLimitedError(TransientError):
    """Raised when a server asked us to wait ``retry_after`` seconds before calling again.

    The wait is the server's, so retries honour it exactly: no jitter, no shortening.
    """

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = max(0.0, retry_after)


class ResourceError(WorkflowError):
    """Raised when the machine ran short of a resource (disk, memory, file handles)."""

    category = ErrorCategory.RESOURCE


class ConfigurationError(WorkflowError, ValueError):
    """Raised when a setting, input file or credential is wrong; retrying cannot help.

    The message names what is wrong, where it came from, and what is accepted.
    """

    category = ErrorCategory.CONFIGURATION


class CriticalError(WorkflowError):
    """Raised when a workflow cannot safely go on; its state is kept for a resume."""

    category = ErrorCategory.CRITICAL


class StageTimeoutError(TransientError, TimeoutError):
    """Raised when a stage ran past its ``timeout_seconds`` and was cancelled."""

    def __init__(self, stage: str, timeout_seconds: float, *,
                 reason: str = "ran past its timeout of") -> None:
        super().__init__(f"stage {stage!r} {reason} {timeout_seconds:g}s")
        self.stage = stage
        self.timeout_seconds = timeout_seconds


class CircuitOpenError(TransientError):
    """Raised when a call was refused because the named circuit breaker is open."""

    def __init__(self, name: str, retry_in: float) -> None:
        super().__init__(f"circuit breaker {name!r} is open; next probe in {retry_in:.1f}s")
        self.name = name
        self.retry_in = retry_in


class InvalidTransitionError(CriticalError):
    """Raised when a workflow's state machine does not allow the move asked of it (a stage
    out of order, an outcome after the workflow ended): a bug, never retried."""

    def __init__(self, workflow_id: str, trigger: str, state: str, definition: str) -> None:
        super().__init__(f"workflow {workflow_id} cannot {trigger!r} from state {state!r} "
                         f"of definition {definition!r}")
        self.workflow_id = workflow_id
        self.trigger = trigger
        self.state = state


class InvalidWorkflowIdError(ConfigurationError):
    """Raised when a string is not a valid workflow ID; no path is ever built from it."""


class WorkflowNotFoundError(ConfigurationError, LookupError):
    """Raised when no saved state exists for a workflow ID."""


class WorkflowLockedError(WorkflowError):
    """Raised when another process or task already runs this workflow."""

    category = ErrorCategory.CONFIGURATION


class StateCorruptedError(WorkflowError):
    """Raised when a state or checkpoint file is torn, tampered with, or of another schema."""

    category = ErrorCategory.CRITICAL

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


class FencedError(WorkflowError):
    """Raised when a write for a workflow was refused: this worker no longer owns it at that
    epoch (another worker claimed it after this one's lease ran out). Nothing more may be
    written for it here; the new owner carries it on (docs/architecture.md, invariant 9)."""

    category = ErrorCategory.CRITICAL

    def __init__(self, workflow_id: str, owner: str, epoch: int, reason: str) -> None:
        super().__init__(f"write for workflow {workflow_id} refused: worker {owner} at epoch "
                         f"{epoch} {reason}")
        self.workflow_id = workflow_id
        self.owner = owner
        self.epoch = epoch


class DatabaseUnavailableError(TransientError):
    """Raised when the database cannot be reached or refuses a connection; the message
    names the server with the password masked."""


class SignalTimeout(WorkflowError, TimeoutError):
    """Raised by ``ctx.wait_for_signal`` when the deadline passed before the signal came.

    Critical, so not retried: the wait's deadline is kept with the stage, and a retry
    would only meet it again. Catch it in the handler to go on without the signal.
    """

    category = ErrorCategory.CRITICAL

    def __init__(self, workflow_id: str, name: str, deadline: float) -> None:
        super().__init__(f"workflow {workflow_id}: no signal {name!r} came before the "
                         f"deadline (epoch {deadline:.0f})")
        self.workflow_id = workflow_id
        self.name = name
        self.deadline = deadline


class SignalRefusedError(ConfigurationError):
    """Raised when a signal cannot be sent: a finished workflow, a bad name, or a payload
    that is not JSON. Nothing was stored."""


class SchemaVersionError(ConfigurationError):
    """Raised when the database's schema is newer than this code knows: upgrade first."""


_TRANSIENT_ERRNOS = {errno.EAGAIN, errno.EINTR, errno.ETIMEDOUT, errno.ECONNRESET,
                     errno.ECONNREFUSED, errno.ECONNABORTED, errno.EPIPE,
                     errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN}
_RESOURCE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.ENOMEM, errno.EMFILE, errno.ENFILE,
                    errno.EFBIG}
_CONFIGURATION_ERRNOS = {errno.EACCES, errno.EPERM, errno.ENOENT, errno.EROFS,
                         errno.ENOTDIR, errno.EISDIR}


def _http_status(error: BaseException) -> int | None:
    """The HTTP status carried by an httpx-style error, found without importing httpx."""
    response = getattr(error, "response", None)
    status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None


def classify(error: BaseException) -> ErrorCategory:
    """The category that decides how ``error`` is handled (retry, recover, fail, stop)."""
    if isinstance(error, WorkflowError):
        return error.category
    status = _http_status(error)
    if status is not None:
        if status >= 500 or status in (408, 425, 429):
            return ErrorCategory.TRANSIENT
        return ErrorCategory.CONFIGURATION
    if isinstance(error, (TimeoutError, asyncio.TimeoutError, ConnectionError)):
        return ErrorCategory.TRANSIENT
    if isinstance(error, MemoryError):
        return ErrorCategory.RESOURCE
    if isinstance(error, OSError):
        if error.errno in _RESOURCE_ERRNOS:
            return ErrorCategory.RESOURCE
        if error.errno in _TRANSIENT_ERRNOS:
            return ErrorCategory.TRANSIENT
        if isinstance(error, PermissionError) or error.errno in _CONFIGURATION_ERRNOS:
            return ErrorCategory.CONFIGURATION
        return ErrorCategory.TRANSIENT
    if type(error).__module__.startswith(("httpx", "httpcore", "h11")):
        # Transport errors (connect, read, protocol) carry no response: the network failed.
        return ErrorCategory.TRANSIENT
    if isinstance(error, (ValueError, TypeError, KeyError, LookupError,
                          json.JSONDecodeError, UnicodeError)):
        return ErrorCategory.CONFIGURATION
    return ErrorCategory.CRITICAL
