"""One workflow's live record, and its persisted form (the spec's ``WorkflowState``).

Invariant: ``completed_stages`` lists, in order, exactly the stages whose outputs are in
``outputs``; a stage is added to it only together with its outputs, and a checkpoint of
that pair is durable before the next stage starts (``durability="overlapped"``: before the
one after it ends; docs/architecture.md, invariant 8).
Resume re-runs the first stage not in it.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Mapping
from typing import Any

import orjson

__all__ = ["COMPLETED", "NON_TERMINAL", "OUTCOMES", "PENDING", "RESUMABLE", "STATUSES",
           "TERMINAL", "WAITING", "WorkflowRun"]

# The machine's states around the stages: a new workflow starts at PENDING; it ends in one
# of OUTCOMES, each reached by a transition (docs/architecture.md, invariant 10). A status
# is "running" while the machine is at a stage, else the machine's state.
PENDING = "pending"
COMPLETED = "completed"
# WAITING: parked by a durable wait (``ctx.wait_for_signal``, ``ctx.sleep_durably``) inside
# a stage that has not completed; woken, it runs that stage again from its start.
WAITING = "waiting"
OUTCOMES = (COMPLETED, "failed", "timed_out", "cancelled", "interrupted", WAITING)
STATUSES = ("pending", "running", "completed", "failed", "timed_out", "cancelled",
            "interrupted", WAITING)
TERMINAL = frozenset({"completed", "failed", "timed_out", "cancelled"})
NON_TERMINAL = frozenset({"pending", "running", "interrupted", WAITING})
# Failed and timed-out workflows keep their state, so a person may resume them by ID.
RESUMABLE = frozenset({"pending", "running", "interrupted", "failed", "timed_out", WAITING})

_MAX_HEALTH_CHECKS = 10  # bounded: memory per workflow must not grow with its duration
_MAX_ERRORS = 20


class WorkflowRun:
    """The mutable record the engine keeps for one workflow, and the model on its machine.

    Models on a shared ``AsyncMachine`` must compare by identity (docs/architecture.md,
    invariant 1), which is ``object``'s default; ``__slots__`` keeps a workflow in flight
    small.
    """

    __slots__ = (
        "__weakref__", "_encoded", "attempt", "completed_stages", "context", "created_at",
        "current_stage", "deadline_passed", "definition_name", "definition_path", "error",
        "error_category", "error_count", "errors", "health_checks", "outputs", "prompt_file",
        "recovery_attempts", "recovery_successes", "resumed_from", "retry_count", "revision",
        "signals_absent", "signals_consumed", "stage_history", "stage_start_time",
        "stage_waits", "state", "status", "updated_at", "wait", "watchdog_events", "workflow_id",
    )

    def __init__(self, workflow_id: str, *, definition_name: str,
                 definition_path: str | None, context: Mapping[str, Any],
                 prompt_file: str | None, created_at: float) -> None:
        self.workflow_id = workflow_id
        self.definition_name = definition_name
        self.definition_path = definition_path
        self.prompt_file = prompt_file
        self.context: dict[str, Any] = dict(context)
        self.outputs: dict[str, Any] = {}
        self.status = "pending"
        # Where the workflow is: its machine's state (a stage, PENDING or an outcome), set
        # only by the definition's machine (docs/architecture.md, invariant 10).
        self.state = PENDING
        self.current_stage: str | None = None
        self.stage_start_time: float | None = None
        self.attempt = 0
        self.completed_stages: list[str] = []
        self.stage_history: list[dict[str, Any]] = []
        self.health_checks: list[dict[str, Any]] = []
        self.errors: list[dict[str, Any]] = []
        self.watchdog_events: list[dict[str, Any]] = []  # warnings and timeouts, with times
        self.error_count = 0
        self.retry_count = 0
        self.recovery_attempts = 0
        self.recovery_successes = 0
        self.error: str | None = None
        self.error_category: str | None = None
        self.resumed_from: str | None = None
        self.created_at = created_at
        self.updated_at = created_at
        self.revision = 0
        # Durable waits (``_waits.py``). ``wait``: what a parked workflow waits for
        # ({"stage", "signal", "deadline"}), None otherwise. ``stage_waits``: the deadline of
        # each wait the current stage began, in call order, so the stage run again after a
        # wake keeps its deadlines; cleared when the stage completes. ``signals_consumed``:
        # per signal name, how many of its signals completed stages have taken.
        self.wait: dict[str, Any] | None = None
        self.stage_waits: list[float] = []
        self.signals_consumed: dict[str, int] = {}
        # Not saved: the (signal, index) a wake found not stored after its wait's deadline
        # had passed, so the stage run again times out without reading it once more; used
        # once (``_waits.durable_wait``).
        self.signals_absent: set[tuple[str, int]] | None = None
        # Not saved: the deadline of the wait a store that keeps the clock for every
        # worker (PostgreSQL) found passed when it woke this run. That wait is over
        # whatever this process's clock says; used once (``_waits.durable_wait``).
        self.deadline_passed: float | None = None
        # The canonical JSON of each monitoring entry already encoded, by list (see
        # ``to_state(encoded=True)``); made at the first such snapshot.
        self._encoded: dict[str, tuple[list[object], list[bytes]]] | None = None

    def record_health_check(self, check: dict[str, Any]) -> None:
        self.health_checks.append(check)
        del self.health_checks[:-_MAX_HEALTH_CHECKS]

    def record_error(self, entry: dict[str, Any]) -> None:
        self.error_count += 1
        self.errors.append(entry)
        del self.errors[:-_MAX_ERRORS]

    def record_watchdog(self, event: dict[str, Any]) -> None:
        self.watchdog_events.append(event)
        del self.watchdog_events[:-_MAX_ERRORS]

    def to_state(self, *, encoded: bool = False) -> dict[str, Any]:
        """A snapshot in the spec's shape; safe to hand to another thread (no shared lists),
        unless ``encoded``.

        Each snapshot gets the next ``revision``, so of two copies the newer is known
        without trusting wall clocks.

        ``encoded``: for a canonical encoder only (``orjson.dumps`` with sorted keys, the
        file store's). The monitoring lists are then ``orjson.Fragment``s of their
        canonical JSON, each entry encoded once in the workflow's life instead of at every
        save: the same bytes, but a stage's save no longer re-encodes every earlier
        stage's history and health checks (40 -> 5 us for a 19-stage workflow's last
        save, measured). Entries are never changed once appended, which is what makes
        reusing their encoding safe. The snapshot then shares the run's own containers
        (no copy of the outputs, context and lists at every save): it must be encoded at
        once, before the run changes again.
        """
        self.revision += 1
        if encoded:
            monitoring: dict[str, Any] = {
                "error_count": self.error_count,
                "retry_count": self.retry_count,
                "recovery_attempts": self.recovery_attempts,
                "recovery_successes": self.recovery_successes,
                # An empty list is itself (no call): errors and watchdog events, as a rule.
                "health_checks": self._fragment("health_checks", self.health_checks)
                if self.health_checks else [],
                "stage_history": self._fragment("stage_history", self.stage_history)
                if self.stage_history else [],
                "errors": self._fragment("errors", self.errors) if self.errors else [],
                "watchdog_events": self._fragment("watchdog_events", self.watchdog_events)
                if self.watchdog_events else [],
            }
        else:
            monitoring = {
                "error_count": self.error_count,
                "retry_count": self.retry_count,
                "recovery_attempts": self.recovery_attempts,
                "recovery_successes": self.recovery_successes,
                "health_checks": list(self.health_checks),
                "stage_history": list(self.stage_history),
                "errors": list(self.errors),
                "watchdog_events": list(self.watchdog_events),
            }
        state = {
            "workflow_id": self.workflow_id,
            "revision": self.revision,
            "definition": self.definition_path,
            "definition_name": self.definition_name,
            "prompt_file": self.prompt_file,
            "status": self.status,
            "current_stage": self.current_stage,
            "stage_start_time": self.stage_start_time,
            "attempt": self.attempt,
            "completed_stages": self.completed_stages,
            "progress_data": self.outputs,
            "monitoring_state": monitoring,
            "context": self.context,
            "error": self.error,
            "error_category": self.error_category,
            "resumed_from": self.resumed_from,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "wait": self.wait,
            "stage_waits": self.stage_waits,
            "signals_consumed": self.signals_consumed,
        }
        if not encoded:  # it may outlive this call (another thread): no shared containers
            state.update(completed_stages=list(self.completed_stages),
                         progress_data=dict(self.outputs), context=dict(self.context),
                         wait=dict(self.wait) if self.wait is not None else None,
                         stage_waits=list(self.stage_waits),
                         signals_consumed=dict(self.signals_consumed))
        return state

    def forget_encoding(self) -> None:
        """Drop what ``to_state(encoded=True)`` kept (a finished workflow saves no more:
        the runtime remembers recent ones, and need not remember their encoding)."""
        self._encoded = None

    def _fragment(self, name: str, entries: list[dict[str, Any]]) -> Any:
        """``entries`` (not empty) as one ``orjson.Fragment`` of canonical JSON, reusing
        the encoding of every entry encoded before (matched by identity: a list only
        grows at its end and drops entries at its start)."""
        caches = self._encoded
        if caches is None:
            caches = self._encoded = {}
        cached = caches.get(name)
        if cached is None:
            objects: list[object] = []
            parts: list[bytes] = []
            caches[name] = (objects, parts)
        else:
            objects, parts = cached
            # At every save of a stage the cache is the list but its newest entries: one
            # identity test of each, in C. Anything else (a window that slid, a list
            # changed) finds where the cache still matches.
            if objects and (objects[0] is not entries[0] or len(objects) > len(entries)
                            or not all(map(operator.is_, objects, entries))):
                _realign(objects, parts, entries)
        count = len(objects)
        if count < len(entries):
            for entry in entries[count:]:
                # The same entry as the one before (stages sharing a health result): its
                # bytes.
                parts.append(parts[-1] if objects and objects[-1] is entry
                             else _canonical_entry(entry))
                objects.append(entry)
        return orjson.Fragment(b"[" + b",".join(parts) + b"]")

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> WorkflowRun:
        """Rebuild a run from ``to_state()`` output (already validated by the store)."""
        run = cls(state["workflow_id"], definition_name=state.get("definition_name") or "",
                  definition_path=state.get("definition"), context=state.get("context") or {},
                  prompt_file=state.get("prompt_file"),
                  created_at=float(state.get("created_at") or 0.0))
        run.outputs = dict(state.get("progress_data") or {})
        run.status = state.get("status") or "pending"
        run.current_stage = state.get("current_stage")
        run.stage_start_time = state.get("stage_start_time")
        run.attempt = int(state.get("attempt") or 0)
        run.completed_stages = list(state.get("completed_stages") or [])
        monitoring = state.get("monitoring_state") or {}
        run.error_count = int(monitoring.get("error_count", 0))
        run.retry_count = int(monitoring.get("retry_count", 0))
        run.recovery_attempts = int(monitoring.get("recovery_attempts", 0))
        run.recovery_successes = int(monitoring.get("recovery_successes", 0))
        run.health_checks = list(monitoring.get("health_checks") or [])
        run.stage_history = list(monitoring.get("stage_history") or [])
        run.errors = list(monitoring.get("errors") or [])
        run.watchdog_events = list(monitoring.get("watchdog_events") or [])
        run.error = state.get("error")
        run.error_category = state.get("error_category")
        run.resumed_from = state.get("resumed_from")
        run.updated_at = float(state.get("updated_at") or run.created_at)
        run.revision = int(state.get("revision") or 0)
        wait = state.get("wait")
        run.wait = dict(wait) if isinstance(wait, Mapping) else None
        run.stage_waits = [float(d) for d in state.get("stage_waits") or ()]
        run.signals_consumed = {str(k): int(v) for k, v in
                                (state.get("signals_consumed") or {}).items()}
        return run


def _realign(objects: list[object], parts: list[bytes], entries: list[Any]) -> None:
    """Drop the cached encodings (``objects``, ``parts``) up to where the cache is the
    start of ``entries`` again (a sliding window's start, past any repeats of one entry:
    a health result shared by stages); none left if it is nowhere."""
    first, start, count = entries[0], 0, len(objects)
    while start < count and not (
            objects[start] is first and count - start <= len(entries)
            and all(map(operator.is_, itertools.islice(objects, start, None), entries))):
        start += 1
    del objects[:start], parts[:start]


def _canonical_entry(entry: Any) -> bytes:
    # The options of the store's ``canonical`` (reliability/_store/_protocol.py), which a
    # test holds this to: an entry encodes to the same bytes inside the whole or alone.
    try:
        return orjson.dumps(entry, option=orjson.OPT_SORT_KEYS, default=str)
    except TypeError:
        return orjson.dumps(entry, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS,
                            default=str)
