"""Torn and hostile state files, seen through the CLI: clear messages, fallback or refusal,
and no other workflow touched.

Seven interrupted workflows are stored by a real runtime; then each state.json is damaged
in its own way (truncated, wrong checksum, wrong schema version, a symlink to a file
outside the state directory, a sparse file over the 16 MiB limit), one is left alone, and
one loses its state and every checkpoint.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from fault_flows import PARK, effect_lines
from fault_helpers import CHECKPOINTS, STATES, cli, cli_env

from reliability import Runtime, WorkflowConfiguration
from reliability._state import WorkflowRun
from reliability._store import MAX_STATE_BYTES, decode_document

KINDS = ("truncated", "checksum", "schema", "symlink", "huge", "pristine", "hopeless")


async def _park_and_interrupt(root: Path, count: int) -> list[str]:
    config = WorkflowConfiguration(enable_health_checks=False, enable_monitoring=False,
                                   checkpoint_frequency=1)
    holding: set[str] = set()
    all_holding = asyncio.Event()

    def listen(event: str, run: WorkflowRun, **data: Any) -> None:
        if event == "stage" and data["stage"] == "hold":
            holding.add(run.workflow_id)
            if len(holding) == count:
                all_holding.set()

    async with Runtime(config, root, configure_logs=False) as runtime:
        runtime.add_listener(listen)
        tasks = [asyncio.create_task(runtime.run(PARK)) for _ in range(count)]
        await all_holding.wait()
        await asyncio.sleep(0.05)  # into the hold stage's handler
        runtime.request_shutdown()
        results = await asyncio.gather(*tasks)
    assert {r.status for r in results} == {"interrupted"}
    return [r.workflow_id for r in results]


def _damage(root: Path, kind: str, workflow_id: str, outside: Path) -> None:
    state = root / STATES / workflow_id / "state.json"
    raw = state.read_bytes()
    if kind == "truncated":
        state.write_bytes(raw[: len(raw) // 2])
    elif kind == "checksum":
        state.write_bytes(raw.replace(b'"status":"interrupted"', b'"status":"interruptec"'))
    elif kind == "schema":
        state.write_bytes(raw.replace(b'"schema_version":1,', b'"schema_version":99,'))
    elif kind == "symlink":
        outside.write_bytes(raw)  # a valid document, but not inside the state directory
        state.unlink()
        state.symlink_to(outside)
    elif kind == "huge":
        with open(state, "r+b") as handle:
            handle.truncate(MAX_STATE_BYTES + 1024 * 1024)  # sparse: nothing is written
    elif kind == "hopeless":
        state.write_bytes(b"")
        for checkpoint in (root / CHECKPOINTS).glob(f"{workflow_id}_checkpoint_*.json"):
            checkpoint.write_bytes(b'{"schema_version":1,"checksum":"sha256:0","state":{}}')


@pytest.fixture(scope="module")
def damaged(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A project with one interrupted workflow per kind of damage, and its bytes before."""
    root = tmp_path_factory.mktemp("hostile")
    ids = asyncio.run(_park_and_interrupt(root, len(KINDS)))
    by_kind = dict(zip(KINDS, ids, strict=True))
    outside = root.parent / f"{root.name}-outside-state.json"
    for kind, workflow_id in by_kind.items():
        _damage(root, kind, workflow_id, outside)
    (root / "release").touch()  # the parked stage may finish when resumed
    return {"root": root, "ids": by_kind, "outside": outside,
            "outside_bytes": outside.read_bytes(),
            "pristine_bytes": (root / STATES / by_kind["pristine"] / "state.json").read_bytes()}


def _one_line_error(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("workflow-manager")]
    assert len(lines) == 1, stderr
    return lines[0]


class TestDamagedStateThroughTheCli:
    def test_list_falls_back_per_workflow_and_marks_the_hopeless_one(
            self, damaged: dict[str, Any]) -> None:
        """list: damaged workflows show their checkpoint's status; the one with nothing
        valid is 'corrupted' with the reason; exit 0."""
        completed = cli(damaged["root"], "list", "--json")
        assert completed.returncode == 0, completed.stderr
        rows = {r["workflow_id"]: r for r in json.loads(completed.stdout)["workflows"]}
        ids = damaged["ids"]
        assert set(rows) == set(ids.values())
        for kind in KINDS[:-1]:
            assert rows[ids[kind]]["status"] == "interrupted", kind
        hopeless = rows[ids["hopeless"]]
        assert hopeless["status"] == "corrupted"
        assert "no valid state or checkpoint" in hopeless["error"]
        assert "the file is empty (torn write?)" in hopeless["error"]

    @pytest.mark.parametrize(("kind", "problem"), [
        ("truncated", "not valid JSON (truncated or damaged)"),
        ("checksum", "checksum mismatch"),
        ("schema", "schema version 99 is not 1"),
        ("symlink", "is a symbolic link; refused"),
        ("huge", f"over the {MAX_STATE_BYTES}-byte limit"),
    ])
    def test_diagnostics_names_the_file_and_the_checkpoint_used(
            self, damaged: dict[str, Any], kind: str, problem: str) -> None:
        """diagnostics: exit 0, the damaged file's path and what is wrong with it, and the
        checkpoint read instead."""
        workflow_id = damaged["ids"][kind]
        completed = cli(damaged["root"], "diagnostics", workflow_id, "--json")
        assert completed.returncode == 0, completed.stderr
        diagnostics = json.loads(completed.stdout)
        [reported] = diagnostics["state_problems"]
        assert reported.startswith(str(damaged["root"] / STATES / workflow_id / "state.json"))
        assert problem in reported
        assert diagnostics["state_source"].endswith(f"{workflow_id}_checkpoint_final.json")
        assert diagnostics["status"] == "interrupted"

    def test_nothing_valid_left_is_refused_with_one_clear_line(
            self, damaged: dict[str, Any]) -> None:
        """diagnostics and resume of the hopeless workflow: exit 1, one line naming the
        state file and every damaged checkpoint."""
        workflow_id = damaged["ids"]["hopeless"]
        for command in ("diagnostics", "resume"):
            completed = cli(damaged["root"], command, workflow_id)
            assert completed.returncode == 1
            line = _one_line_error(completed.stderr)
            assert str(damaged["root"] / STATES / workflow_id / "state.json") in line
            assert "no valid state or checkpoint" in line
            assert "checksum mismatch" in line

    def test_resume_all_completes_every_recoverable_one_and_touches_nothing_else(
            self, damaged: dict[str, Any]) -> None:
        """resume --all: each damaged workflow resumes from its checkpoint (a warning names
        the problem) and completes, the hopeless one is reported failed (exit 1); the
        outside file and the hopeless one's files are untouched, and the pristine one's
        bytes were untouched by the earlier commands."""
        root, ids = damaged["root"], damaged["ids"]
        pristine = root / STATES / ids["pristine"] / "state.json"
        assert pristine.read_bytes() == damaged["pristine_bytes"]
        hopeless_files = {p: p.read_bytes() for p in
                          (root / CHECKPOINTS).glob(f"{ids['hopeless']}_checkpoint_*.json")}

        completed = cli(root, "resume", "--all", "--json",
                        env=cli_env(WORKFLOW_LOG_LEVEL="WARNING"))

        results = {r["workflow_id"]: r for r in json.loads(completed.stdout)}
        assert completed.returncode == 1, completed.stderr  # the hopeless one cannot finish
        assert set(results) == set(ids.values())
        hopeless = results.pop(ids["hopeless"])
        assert hopeless["status"] == "failed"
        assert "no valid state or checkpoint" in hopeless["error"]
        assert f"Cannot resume {ids['hopeless']}: " in completed.stderr
        assert {r["status"] for r in results.values()} == {"completed"}
        for kind in ("truncated", "checksum", "schema", "symlink", "huge"):
            assert f"State problem for {ids[kind]}: " in completed.stderr, kind
            # The parked stage re-ran once; the two stages before it never did.
            assert effect_lines(root, ids[kind]) == ["one 1", "two 1", "hold 1", "hold 1",
                                                     "four 1"]
        assert damaged["outside"].read_bytes() == damaged["outside_bytes"]
        symlinked = root / STATES / ids["symlink"] / "state.json"
        assert not symlinked.is_symlink()
        assert decode_document(symlinked.read_bytes(), str(symlinked))["status"] == "completed"
        assert {p: p.read_bytes() for p in hopeless_files} == hopeless_files
        for kind in KINDS[:-1]:
            state = root / STATES / ids[kind] / "state.json"
            assert os.path.getsize(state) < MAX_STATE_BYTES
            assert decode_document(state.read_bytes(), str(state))["status"] == "completed"


def test_workflow_directory_symlinked_outside_is_refused(tmp_path: Path) -> None:
    """A workflow's directory that is a symlink out of the state directory is neither read
    nor written through: resume refuses it with a clear line; nothing outside changes."""
    root = tmp_path / "project"
    root.mkdir()
    [workflow_id] = asyncio.run(_park_and_interrupt(root, 1))
    (root / "release").touch()
    directory = root / STATES / workflow_id
    outside = tmp_path / "elsewhere"
    shutil.move(directory, outside)
    directory.symlink_to(outside, target_is_directory=True)
    shutil.rmtree(root / CHECKPOINTS)
    before = {p.name: p.read_bytes() for p in outside.iterdir()}

    completed = cli(root, "resume", workflow_id)

    assert completed.returncode != 0
    line = _one_line_error(completed.stderr)
    assert workflow_id in line and "symbolic link" in line
    assert {p.name: p.read_bytes() for p in outside.iterdir()} == before
