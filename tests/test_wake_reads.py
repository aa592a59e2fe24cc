"""Reads on the wake and resume path: served from the writer's memory where it holds the
newest state, from one ``read`` per state file otherwise, with the old answers.

Real FileStores and their writer processes throughout; the state files a test expects to
be missing are missing because the writer writes a record without a checkpoint only at
its next checkpoint, a flush or a release, and nothing here asks for one.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import orjson
import pytest
from test_store import WID

from reliability import FileStore
from reliability._errors import (
    InvalidWorkflowIdError,
    StateCorruptedError,
    WorkflowError,
    WorkflowNotFoundError,
)
from reliability._store import _reads
from reliability._store._protocol import decode_document, decode_written, encode_document
from reliability._store._reads import load_many_stored, load_stored
from reliability._store._waits import signals_ready, write_signal

IDS = [f"workflow-20240115-142315-{n:04x}" for n in range(80)]


def _state(workflow_id: str, revision: int, **extra: object) -> dict[str, object]:
    return {"workflow_id": workflow_id, "revision": revision, "status": "waiting", **extra}


def _store(root: Path) -> FileStore:
    return FileStore(root / "states", root / "checkpoints")


class TestServedByTheWriter:
    async def test_load_returns_a_state_whose_file_is_not_written_without_writing_it(
            self, tmp_path: Path) -> None:
        """load gets a state only the writer holds from the writer itself: no state file is
        written for the read (a wake no longer waits for thousands of file creations)."""
        store = _store(tmp_path)
        await store.open()
        try:
            await store.save(WID, lambda: _state(WID, 1))
            path = store.state_path(WID)
            loaded = await store.load(WID)
            written_by_the_read = path.exists()
        finally:
            await store.close()
        assert loaded.state == _state(WID, 1)
        assert loaded.source == str(path)
        assert not written_by_the_read
        assert decode_document(path.read_bytes(), str(path)) == _state(WID, 1)  # at close

    async def test_load_many_mixes_the_writers_records_and_files(self, tmp_path: Path) -> None:
        """load_many of workflows some of whose newest states only the writer holds and some
        in files (an earlier store's): each gets its newest, none is written for the read,
        and a write queued just before the read (not sent yet) is seen."""
        earlier = _store(tmp_path)
        await earlier.open()
        await asyncio.gather(*(earlier.save(w, lambda w=w: _state(w, 1)) for w in IDS))
        await earlier.close()
        store = _store(tmp_path)
        await store.open()
        try:
            newer = IDS[::2]
            await asyncio.gather(*(store.save(w, lambda w=w: _state(w, 2)) for w in newer))
            unsent = store.save_nowait(IDS[1], lambda: _state(IDS[1], 3))
            loaded = await store.load_many(IDS)
            on_disk = {w: decode_document(store.state_path(w).read_bytes(), "")["revision"]
                       for w in newer}
            await unsent
        finally:
            await store.close()
        revisions = {w: found.state["revision"] for w, found in loaded.items()
                     if not isinstance(found, WorkflowError)}
        expected = {w: 2 if w in newer else 1 for w in IDS} | {IDS[1]: 3}
        assert revisions == expected
        assert on_disk == dict.fromkeys(newer, 1)

    async def test_a_read_asked_while_the_writer_is_dead_is_answered_by_its_successor(
            self, tmp_path: Path) -> None:
        """SIGKILL the writer holding states it acknowledged but never wrote to files, then
        read: the read goes to the new writer after the dead one's journal is replayed,
        and returns every state."""
        store = _store(tmp_path)
        await store.open()
        try:
            await asyncio.gather(*(store.save(w, lambda w=w: _state(w, 5)) for w in IDS))
            pid = store.writer_pid
            assert pid is not None
            os.kill(pid, 9)
            # Bounded: a read lost with the dead writer would otherwise hang the test.
            loaded = await asyncio.wait_for(store.load_many(IDS), 120)
            one = await asyncio.wait_for(store.load(IDS[0]), 120)
            assert store.writer_pid not in (None, pid)
        finally:
            await store.close()
        assert {w: f.state["revision"] for w, f in loaded.items()
                if not isinstance(f, WorkflowError)} == dict.fromkeys(IDS, 5)
        assert one.state["revision"] == 5

    async def test_an_id_not_claimed_is_still_validated(self, tmp_path: Path) -> None:
        """Only IDs this store claimed skip validation: any other bad ID is refused before
        a path is built from it."""
        store = _store(tmp_path)
        await store.open()
        try:
            with pytest.raises(InvalidWorkflowIdError):
                await store.load_many(["../../etc/passwd"])
            with pytest.raises(InvalidWorkflowIdError):
                await store.load_claimed(["workflow-x"])
        finally:
            await store.close()


class TestOneReadPerFile:
    def test_decode_written_agrees_with_decode_document(self) -> None:
        """The fast decode returns what decode_document does for what the writer wrote,
        and None (the full check then says why) for every altered byte it guards."""
        state = _state(WID, 7, outputs={"a": [1, 2.5, None, "é"]}, nested={"z": 1, "b": {}})
        document = encode_document(state)
        assert decode_written(document) == decode_document(document, "p") == state
        altered = [document.replace(b"2.5", b"2.6"), document[:-1], document + b" ",
                   document.replace(b'"schema_version":1', b'"schema_version":2'),
                   document.replace(b'","state":', b'", "state":'), b"", b"[]\n"]
        for data in altered:
            assert decode_written(data) is None
        wrong_body = b'{"workflow_id":1'  # a checksum that matches a body that is no JSON
        digest = hashlib.sha256(wrong_body).hexdigest().encode()
        assert decode_written(b'{"schema_version":1,"checksum":"sha256:' + digest
                              + b'","state":' + wrong_body + b"}\n") is None

    def test_bulk_reads_say_what_load_stored_says(self, tmp_path: Path) -> None:
        """load_many_stored gives each workflow load_stored's answer: a good file, a large
        one, a damaged one falling back to its checkpoint, a missing one, a symlinked
        directory refused, and a record from memory in place of its stale file."""
        states, checkpoints = tmp_path / "states", tmp_path / "checkpoints"
        checkpoints.mkdir()
        for workflow_id in IDS:
            (states / workflow_id).mkdir(parents=True)
            (states / workflow_id / "state.json").write_bytes(
                encode_document(_state(workflow_id, 1)))
        large, damaged, missing, linked, in_memory = IDS[1], IDS[2], IDS[3], IDS[4], IDS[5]
        (states / large / "state.json").write_bytes(
            encode_document(_state(large, 1, blob="x" * 100_000)))
        (states / damaged / "state.json").write_bytes(b'{"schema_version":1,"che')
        (checkpoints / f"{damaged}_checkpoint_s1.json").write_bytes(
            encode_document(_state(damaged, 1)))
        outside = tmp_path / "outside"
        (states / linked).rename(outside)
        (states / linked).symlink_to(outside)
        records = {in_memory: orjson.dumps(_state(in_memory, 9))}
        asked = [*IDS, missing.replace("0003", "ffff")]
        assert len(asked) >= _reads._SCAN_FROM  # the scan's path, not one lstat each
        found = load_many_stored(states, checkpoints, asked, records)
        for workflow_id in asked:
            if workflow_id == in_memory:
                assert found[workflow_id].state == _state(in_memory, 9)  # type: ignore[union-attr]
                continue
            try:
                expected: object = load_stored(states, checkpoints, workflow_id)
            except WorkflowError as error:
                expected = error
            got = found[workflow_id]
            if isinstance(expected, WorkflowError):
                assert type(got) is type(expected) and str(got) == str(expected), workflow_id
            else:
                assert got == expected, workflow_id
        assert isinstance(found[linked], StateCorruptedError)
        assert found[damaged].problems  # type: ignore[union-attr]
        assert found[large].state["blob"] == "x" * 100_000  # type: ignore[union-attr]
        assert isinstance(found[asked[-1]], WorkflowNotFoundError)


class TestSignalsReady:
    def test_many_asked_finds_exactly_the_stored_signals(self, tmp_path: Path) -> None:
        """signals_ready of many: those whose index-th signal of that name is stored, no
        other (one listing of signalled workflows first)."""
        write_signal(tmp_path, IDS[0], "go", b"1", False)
        write_signal(tmp_path, IDS[1], "go", b"1", False)
        write_signal(tmp_path, IDS[2], "other", b"1", False)
        asked = [(w, "go", 0) for w in IDS[:5]] + [(IDS[1], "go", 1)]
        assert signals_ready(tmp_path, asked) == [IDS[0], IDS[1]]
        assert signals_ready(tmp_path, [(IDS[2], "other", 0)]) == [IDS[2]]
        assert signals_ready(tmp_path / "none", asked) == []
