"""A workflow's state encoded for the file store: entry by entry once, the same bytes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

import reliability._state
from reliability import MemoryStore
from reliability._state import WorkflowRun
from reliability._store._file import _encode
from reliability._store._protocol import canonical, decode_document, encode_document

WID = "workflow-20240115-142315-a7b3"


def _run() -> WorkflowRun:
    return WorkflowRun(WID, definition_name="flow", definition_path="tests:FLOW",
                       context={"repo": "r", "3": "numbered"}, prompt_file=None,
                       created_at=1.0)


def _both(run: WorkflowRun) -> tuple[bytes, bytes]:
    """The plain and the fragment encoding of the same snapshot (same revision)."""
    plain = canonical(run.to_state())
    run.revision -= 1
    return plain, canonical(run.to_state(encoded=True))


def _grow(run: WorkflowRun, stage: int) -> None:
    run.stage_history.append({"stage": f"s{stage}", "started_at": float(stage),
                              "duration": 0.5, "baseline": None, "attempts": 1,
                              "status": "completed"})
    run.record_health_check({"status": "HEALTHY", "cpu_usage": 12.5, "timestamp": stage,
                             "recommendations": [], "custom": {1: "int key", "z": [stage]}})
    if stage % 3 == 0:
        run.record_error({"stage": f"s{stage}", "message": "boom", "at": float(stage)})
    if stage % 5 == 0:
        run.record_watchdog({"stage": f"s{stage}", "level": "warning", "at": float(stage)})


def test_the_fragment_encoding_is_the_canonical_bytes_at_every_stage() -> None:
    """Through windows that slide (10 health checks, 20 errors kept) and entries with
    non-string keys, the encoded snapshot is byte for byte the canonical one."""
    run = _run()
    for stage in range(70):
        _grow(run, stage)
        run.completed_stages.append(f"s{stage}")
        run.outputs[f"out{stage}"] = stage
        plain, encoded = _both(run)
        assert encoded == plain, f"stage {stage}"
    assert len(run.health_checks) == 10 and len(run.errors) == 20


def test_each_entry_is_encoded_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A save re-encodes only the entries added since the one before, not the history."""
    encoded: list[Any] = []
    real = reliability._state._canonical_entry

    def counting(entry: Any) -> bytes:
        encoded.append(entry)
        return real(entry)

    monkeypatch.setattr(reliability._state, "_canonical_entry", counting)
    run = _run()
    for stage in range(19):
        _grow(run, stage)
        _encode(run.to_state)
    entries = 19 + 19 + 7 + 4  # history, health checks, errors, watchdog events
    assert len(encoded) == entries


def test_lists_changed_other_than_at_their_ends_are_encoded_anew() -> None:
    """A list replaced (equal entries, new objects), reordered or edited in the middle
    still encodes to the canonical bytes: the cache is matched by identity and order."""
    run = _run()
    for stage in range(6):
        _grow(run, stage)
    plain, encoded = _both(run)
    assert encoded == plain
    run.stage_history[2] = {"stage": "replaced in place"}
    plain, encoded = _both(run)
    assert encoded == plain
    run.stage_history = [dict(entry) for entry in run.stage_history]
    run.stage_history[2] = {"stage": "replaced"}
    plain, encoded = _both(run)
    assert encoded == plain
    run.health_checks.reverse()
    run.errors.insert(0, {"stage": "earlier"})
    plain, encoded = _both(run)
    assert encoded == plain
    run.watchdog_events.clear()
    plain, encoded = _both(run)
    assert encoded == plain


def test_another_snapshot_is_encoded_as_it_is() -> None:
    """A snapshot that is not a workflow's own to_state goes through canonical as is."""
    state = {"workflow_id": WID, "b": [1, 2], "a": {"y": 1, "x": 2}}
    assert _encode(lambda: state) == canonical(state)


async def test_a_finished_workflow_keeps_no_encoding(tmp_path: Path) -> None:
    """The runtime remembers recent finished runs; their encoding cache is dropped once
    the final state is saved (it would only hold memory)."""
    from machines import StageContext, StageSpec, WorkflowDefinition
    from reliability import Runtime, WorkflowConfiguration

    async def step(ctx: StageContext) -> dict[str, int]:
        return {"n": 1}

    flow = WorkflowDefinition("encoded", [StageSpec("a", step), StageSpec("b", step)])
    async with Runtime(WorkflowConfiguration(), project_root=tmp_path, configure_logs=False,
                       handle_signals=False) as runtime:
        result = await runtime.run(flow)
        run = runtime._finished[result.workflow_id]
    assert result.status == "completed" and len(run.stage_history) == 2
    assert run._encoded is None


async def test_the_memory_store_keeps_the_documents_encode_document_makes() -> None:
    """MemoryStore takes a workflow's snapshot with its lists pre-encoded and wraps it
    (checksum) only when read: what a reader gets, at every stage and in the checkpoints,
    is byte for byte encode_document of the plain snapshot; a document written into it
    is kept as it is."""
    store = MemoryStore()
    run = _run()
    for stage in range(1, 8):
        _grow(run, stage)
        await store.save(WID, run.to_state, checkpoint_stage=f"s{stage}")
        run.revision -= 1  # the plain snapshot of the same revision
        expected = encode_document(run.to_state())
        assert store.documents[WID] == expected
        assert store.checkpoints[(WID, f"s{stage}")] == expected
        assert decode_document(store.documents[WID], "memory")["revision"] == run.revision
    assert (await store.load(WID)).state == orjson.loads(expected)["state"]
    store.documents[WID] = b"as written"
    assert store.documents[WID] == b"as written" and len(store.documents) == 1
    assert list(store.documents) == [WID]


def test_an_entry_recorded_many_times_in_a_row_is_encoded_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A health result shared by the stages of one sample, then the next sample's, fills
    the sliding window with repeats: each result is encoded once, and every save is the
    canonical bytes."""
    encoded: list[Any] = []
    real = reliability._state._canonical_entry

    def counting(entry: Any) -> bytes:
        encoded.append(entry)
        return real(entry)

    monkeypatch.setattr(reliability._state, "_canonical_entry", counting)
    run = _run()
    results = [{"status": "HEALTHY", "timestamp": float(sample), "recommendations": []}
               for sample in range(4)]
    for result in results:
        for _ in range(5):  # five stages within one sample
            run.record_health_check(result)
            plain, fragment = _both(run)
            assert fragment == plain
    assert run.health_checks == [results[2]] * 5 + [results[3]] * 5
    assert encoded == results
