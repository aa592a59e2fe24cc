"""Workflow IDs: their shape, and the check that stops hostile IDs before any path is built."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from reliability import (
    FakeClock,
    FileStore,
    InvalidWorkflowIdError,
    MemoryStore,
    Runtime,
    WorkflowConfiguration,
    new_workflow_id,
    validate_workflow_id,
)


def look_alike(workflow_id: str, zero: int) -> str:
    """``workflow_id`` with its ASCII digits swapped for another script's (``zero`` = '0')."""
    return "".join(chr(zero + int(c)) if c.isdigit() else c for c in workflow_id)


HOSTILE = [
    pytest.param("../x", id="parent-dir"),
    pytest.param("/etc", id="absolute"),
    pytest.param("", id="empty"),
    pytest.param("workflow-..", id="dots"),
    pytest.param("workflow-20240115-142315-a7b3/../../etc", id="traversal-suffix"),
    pytest.param("x" * 10_000, id="10kb"),
    pytest.param("workflow-" + "2" * 10_000, id="10kb-prefixed"),
    pytest.param(look_alike("workflow-20240115-142315-a7b3", 0xFF10), id="fullwidth-digits"),
    pytest.param(look_alike("workflow-20240115-142315-a7b3", 0x0660), id="arabic-indic-digits"),
    pytest.param("workflow-20240115-142315-a7b3\n", id="trailing-newline"),
    pytest.param("workflow-20240115-142315-A7B3", id="uppercase-hex"),
    pytest.param("workflow-20240115-142315-a7b", id="short-tail"),
    pytest.param("workflow-20240115-142315-a7b3\x00", id="nul"),
    pytest.param(" workflow-20240115-142315-a7b3", id="leading-space"),
]


class TestNewWorkflowId:
    def test_has_the_spec_s_shape(self) -> None:
        """IDs look like workflow-YYYYMMDD-HHMMSS-<hex>, stamped in UTC."""
        workflow_id = new_workflow_id(1705328595.0)  # 2024-01-15 14:23:15 UTC
        assert re.fullmatch(r"workflow-20240115-142315-[0-9a-f]{12}", workflow_id)
        assert validate_workflow_id(workflow_id) == workflow_id

    def test_ids_made_in_the_same_second_differ(self) -> None:
        """Thousands of workflows may start in one second; their IDs must not collide."""
        assert len({new_workflow_id(1705328595.0) for _ in range(100_000)}) == 100_000


class TestValidateWorkflowId:
    def test_accepts_the_spec_s_example(self) -> None:
        """The spec's own example ID is valid."""
        assert validate_workflow_id("workflow-20240115-142315-a7b3") == (
            "workflow-20240115-142315-a7b3")

    @pytest.mark.parametrize("value", HOSTILE)
    def test_refuses_hostile_ids(self, value: str) -> None:
        """Anything but the exact shape is refused with InvalidWorkflowIdError."""
        with pytest.raises(InvalidWorkflowIdError, match="invalid workflow ID"):
            validate_workflow_id(value)

    @pytest.mark.parametrize("value", [None, 42, b"workflow-20240115-142315-a7b3"])
    def test_refuses_non_strings(self, value: object) -> None:
        """Non-string values are refused, not coerced."""
        with pytest.raises(InvalidWorkflowIdError):
            validate_workflow_id(value)

    def test_huge_id_is_shortened_in_the_message(self) -> None:
        """A 10 KB ID is not echoed whole: the message stays short and says its length."""
        with pytest.raises(InvalidWorkflowIdError) as raised:
            validate_workflow_id("x" * 10_000)
        assert len(str(raised.value)) < 400
        assert "(10000 characters)" in str(raised.value)

    def test_refusal_is_a_value_error(self) -> None:
        """InvalidWorkflowIdError is a ValueError (and a configuration error)."""
        assert issubclass(InvalidWorkflowIdError, ValueError)


class TestIdsAtTheBoundaries:
    @pytest.mark.parametrize("value", HOSTILE)
    async def test_runtime_resume_refuses_hostile_ids(self, value: str, tmp_path: Path) -> None:
        """Runtime.resume refuses a hostile ID before touching the file system."""
        async with Runtime(WorkflowConfiguration(enable_health_checks=False), tmp_path,
                           configure_logs=False) as runtime:
            with pytest.raises(InvalidWorkflowIdError):
                await runtime.resume(value)
        states = tmp_path / ".github/workflow-states"
        assert sorted(p.name for p in states.iterdir()) == ["_claims", "_journal"]  # made at open

    @pytest.mark.parametrize("value", ["../x", "/etc", ""])
    async def test_cancel_and_diagnostics_refuse_hostile_ids(self, value: str,
                                                             tmp_path: Path) -> None:
        """cancel() and get_workflow_diagnostics() check IDs too."""
        async with Runtime(WorkflowConfiguration(enable_health_checks=False), tmp_path,
                           clock=FakeClock(), store=MemoryStore(),
                           configure_logs=False) as runtime:
            with pytest.raises(InvalidWorkflowIdError):
                await runtime.cancel(value, abandon=True)
            with pytest.raises(InvalidWorkflowIdError):
                runtime.get_workflow_diagnostics(value)

    @pytest.mark.parametrize("value", ["../x", "/etc", "workflow-.."])
    async def test_file_store_never_builds_a_path_from_a_hostile_id(
            self, value: str, tmp_path: Path) -> None:
        """FileStore paths, loads and claims all refuse hostile IDs."""
        store = FileStore(tmp_path / "states", tmp_path / "checkpoints")
        with pytest.raises(InvalidWorkflowIdError):
            store.state_path(value)
        with pytest.raises(InvalidWorkflowIdError):
            store.checkpoint_path(value, "stage")
        with pytest.raises(InvalidWorkflowIdError):
            await store.load(value)
        with pytest.raises(InvalidWorkflowIdError):
            await store.claim(value)
        assert not (tmp_path / "states").exists()

    async def test_hostile_directory_names_are_skipped_when_listing(
            self, tmp_path: Path) -> None:
        """A stray directory with a non-ID name under the state directory is never read."""
        store = FileStore(tmp_path / "states", tmp_path / "checkpoints")
        (tmp_path / "states" / "..evil").mkdir(parents=True)
        (tmp_path / "states" / "..evil" / "state.json").write_text("{}")
        await store.open()
        try:
            assert await store.list_states() == []
        finally:
            await store.close()
