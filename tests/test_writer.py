"""FileStore's writer process: killed while writes are in flight, killed with its parent,
unable to start, and the reads that must see what only its journal holds.

Everything here uses the real writer (a child process fed through a pipe) and real
signals; nothing is mocked except, in one test, the directory preparation that would
otherwise stop the failure before the writer sees it.
"""

from __future__ import annotations

import asyncio
import errno
import os
import select
import signal
import subprocess
from pathlib import Path

import psutil
import pytest
from test_store import (
    OTHER,
    WID,
    children,
    kill,
    portable,
    replayed_on_open,
    start_child,
    state_of,
    wait_for_line,
)

from reliability import FileStore
from reliability._store import UNREAD_LIMIT, WAKE_CHUNK, WRITER_RESTARTS
from reliability._store._protocol import canonical, decode_document
from reliability._store._writer import ZEROED_AHEAD, ZEROED_GROUPS, Writer, _write_group

__all__ = ["children", "portable"]  # the fixtures, imported for the tests below

IDS = [f"workflow-20240115-142315-{n:04x}" for n in range(40)]


def _state(workflow_id: str, revision: int) -> dict[str, object]:
    return {"workflow_id": workflow_id, "revision": revision, "status": "running"}


async def _save_rounds(store: FileStore, rounds: range, stage: str | None = None) -> None:
    """Each workflow of IDS saves revision r for every r in ``rounds``, all concurrently."""
    for revision in rounds:
        await asyncio.gather(*(store.save(w, lambda w=w, r=revision: _state(w, r),
                                          checkpoint_stage=stage) for w in IDS))


def _kill_writer(store: FileStore) -> int:
    pid = store.writer_pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    return pid


class TestWriterKilled:
    async def test_a_killed_writer_is_replaced_and_no_write_is_lost(
            self, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
        """SIGKILL the writer with saves in flight: every save still completes (a new writer
        gets the batches the dead one never acknowledged), and after close every workflow's
        state file holds its last revision."""
        store = FileStore(tmp_path / "states", tmp_path / "checkpoints")
        await store.open()
        try:
            await _save_rounds(store, range(1, 4))
            in_flight = asyncio.gather(*(store.save(w, lambda w=w: _state(w, 4)) for w in IDS))
            await asyncio.sleep(0)  # queued and sent, not yet acknowledged
            dead = _kill_writer(store)
            await in_flight
            await _save_rounds(store, range(5, 8), stage="s7")
            assert store.writer_pid not in (None, dead)
        finally:
            await store.close()
        assert f"The state writer process {dead} stopped" in caplog.text
        reopened = FileStore(tmp_path / "states", tmp_path / "checkpoints")
        revisions = {w: (await reopened.load(w)).state["revision"] for w in IDS}
        assert revisions == dict.fromkeys(IDS, 7)
        assert not list((tmp_path / "states" / "_journal").glob("journal-*.log"))

    async def test_a_writer_that_keeps_dying_fails_writes_with_one_clear_error(
            self, tmp_path: Path) -> None:
        """Past WRITER_RESTARTS replacements, a save fails with an OSError that names the
        journal and says what happens to the writes; what was durable before stays."""
        store = FileStore(tmp_path / "states", tmp_path / "checkpoints")
        await store.open()
        try:
            await store.save(WID, lambda: _state(WID, 1), checkpoint_stage="s1")
            for _ in range(WRITER_RESTARTS):
                _kill_writer(store)
                await store.save(OTHER, lambda: _state(OTHER, 1))  # replaced each time
            journal = store.journal_path
            _kill_writer(store)
            with pytest.raises(OSError, match="stopped unexpectedly") as failure:
                await store.save(WID, lambda: _state(WID, 2))
            assert journal in str(failure.value)
            assert "resuming the workflows continues them" in str(failure.value)
        finally:
            await store.close()
        reopened = FileStore(tmp_path / "states", tmp_path / "checkpoints")
        assert (await reopened.load(WID)).state["revision"] == 1

    def test_the_writer_dies_with_its_parent_and_its_journal_is_replayed(
            self, tmp_path: Path, children: list[subprocess.Popen[str]],
            portable: bool) -> None:
        """SIGKILL the process that owns a store: its writer ends too (Linux's kernel
        kills it; portable, without that signal, it exits at the end of its input), so
        the journal's lock drops and the next store replays the record only it held."""
        child = start_child("journal", str(tmp_path), WID)
        children.append(child)
        wait_for_line(child, "saved")
        (writer,) = psutil.Process(child.pid).children()
        assert "_writer.py" in " ".join(writer.cmdline())
        kill(child)
        gone, alive = psutil.wait_procs([writer], timeout=10)
        assert gone and not alive, "the writer outlived its parent"
        assert replayed_on_open(tmp_path) == 1
        store = FileStore(tmp_path / "states", tmp_path / "checkpoints")
        assert asyncio.run(store.load(WID)).state["revision"] == 1


class TestWriterStart:
    async def test_a_writer_that_cannot_open_its_journal_is_one_clear_error(
            self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """The journal directory vanished before the writer started: open() raises an
        OSError naming the directory and the cause, and no writer is left running and no
        descriptor open (the claims files it opened first are closed again)."""
        monkeypatch.setattr(FileStore, "_prepare_journal_directory", lambda self: None)
        store = FileStore(tmp_path / "missing" / "states", tmp_path / "checkpoints")
        descriptors = len(os.listdir("/proc/self/fd"))
        # Children of the test run itself (a PostgreSQL server's reaper) are not the store's.
        before = {child.pid for child in psutil.Process().children()}
        with pytest.raises(OSError, match="No such file or directory") as failure:
            await store.open()
        assert str(tmp_path / "missing" / "states" / "_journal") in str(failure.value)
        assert store.writer_pid is None
        assert {child.pid for child in psutil.Process().children()} <= before
        assert len(os.listdir("/proc/self/fd")) == descriptors


class TestReads:
    async def test_a_read_sees_a_state_only_the_journal_holds(self, tmp_path: Path) -> None:
        """A save with no checkpoint reaches only the journal; load and list_states in the
        same process still return it (the writer writes the state files first)."""
        store = FileStore(tmp_path / "states", tmp_path / "checkpoints")
        await store.open()
        try:
            await store.save(WID, lambda: _state(WID, 1), checkpoint_stage="s1")
            await store.save(WID, lambda: _state(WID, 2))
            loaded = await store.load(WID)
            listed = await store.list_states({"running"})
        finally:
            await store.close()
        assert loaded.state["revision"] == 2
        assert loaded.source == str(store.state_path(WID))
        assert [s.state["revision"] for s in listed] == [2]


class TestJournalRotation:
    async def test_rotated_journals_are_deleted_once_their_states_are_in_files(
            self, tmp_path: Path) -> None:
        """A 4 KiB journal limit: the writer moves to fresh journals as it goes, deletes
        each full one only after its states are in state files, and leaves none at close;
        every state file holds its workflow's last revision."""
        store = FileStore(tmp_path / "states", tmp_path / "checkpoints", journal_limit=4096)
        await store.open()
        journals: set[str] = set()
        try:
            for revision in range(1, 31):
                await asyncio.gather(*(store.save(w, lambda w=w, r=revision: _state(w, r))
                                       for w in IDS))
                journals.add(store.journal_path)
        finally:
            await store.close()
        assert len(journals) > 10  # it did rotate, many times
        assert not list((tmp_path / "states" / "_journal").glob("journal-*.log"))
        reopened = FileStore(tmp_path / "states", tmp_path / "checkpoints")
        assert {w: (await reopened.load(w)).state["revision"] for w in IDS} == dict.fromkeys(
            IDS, 30)

    def test_sigkill_while_rotating_loses_no_acknowledged_revision(
            self, tmp_path: Path, children: list[subprocess.Popen[str]]) -> None:
        """SIGKILL a process whose journal rotates every 4 KiB: after replay, every
        workflow's state holds at least the last revision the process saw acknowledged."""
        child = start_child("rotate", str(tmp_path), "20")
        children.append(child)
        acknowledged = 40  # dozens of rotations: 20 states of ~250 bytes fill 4 KiB
        for revision in range(1, acknowledged + 1):
            wait_for_line(child, f"acked {revision}")
        kill(child)
        ids = [f"workflow-20240115-142315-{n:04x}" for n in range(20)]
        store = FileStore(tmp_path / "states", tmp_path / "checkpoints")

        async def recovered() -> dict[str, int]:
            await store.open()
            try:
                return {w: (await store.load(w)).state["revision"] for w in ids}
            finally:
                await store.close()

        revisions = asyncio.run(recovered())
        assert all(revision >= acknowledged for revision in revisions.values()), revisions


class TestLazyWrites:
    async def test_lazy_answers_wait_in_the_pipe_until_someone_waits(
            self, tmp_path: Path) -> None:
        """A lazy write's answer is left unread (it would wake the loop mid-sleep) until
        expedite(), which completes it at once from the pipe; an eager write is read."""
        store = FileStore(tmp_path / "states", tmp_path / "checkpoints")
        await store.open()
        try:
            lazy = store.save_nowait(WID, lambda: _state(WID, 1), lazy=True)
            answers = store._link._answers if store._link is not None else -1
            await asyncio.to_thread(select.select, [answers], [], [], 10.0)
            await asyncio.sleep(0.05)  # the loop runs on: nothing reads the answer
            assert not lazy.done()
            store.expedite()
            assert lazy.done() and lazy.exception() is None  # no await in between

            eager = store.save_nowait(OTHER, lambda: _state(OTHER, 1))
            await asyncio.wait_for(asyncio.shield(eager), 10.0)  # read without expedite()
            assert eager.exception() is None
        finally:
            await store.close()

    async def test_unanswered_lazy_batches_are_read_past_the_limit(self, tmp_path: Path) -> None:
        """Lazy writes nobody expedites: once more than UNREAD_LIMIT batches are
        unanswered, the answers are read anyway (the writer never blocks on a full pipe,
        the store never holds more than that many sent batches)."""
        store = FileStore(tmp_path / "states", tmp_path / "checkpoints")
        await store.open()
        try:
            lazy = []
            for revision in range(1, UNREAD_LIMIT + 10):
                lazy.append(store.save_nowait(WID, lambda r=revision: _state(WID, r),
                                              lazy=True))
                await asyncio.sleep(0)  # one batch per loop iteration
            await asyncio.wait_for(asyncio.shield(lazy[0]), 20.0)
            assert lazy[0].exception() is None
        finally:
            await store.close()

    async def test_lazy_writes_survive_the_writer_dying_unnoticed(self, tmp_path: Path) -> None:
        """The writer dies with lazy writes unanswered: the next wait notices, a new writer
        gets them, and they complete."""
        store = FileStore(tmp_path / "states", tmp_path / "checkpoints")
        await store.open()
        try:
            await store.save(OTHER, lambda: _state(OTHER, 1))
            lazy = [store.save_nowait(w, lambda w=w: _state(w, 1), lazy=True) for w in IDS]
            await asyncio.sleep(0)  # sent
            dead = _kill_writer(store)
            await asyncio.to_thread(psutil.Process(dead).wait, 10.0)
            store.expedite()
            await asyncio.wait_for(asyncio.gather(*lazy), 20.0)
            assert store.writer_pid not in (None, dead)
        finally:
            await store.close()
        for workflow_id in IDS:
            assert state_of(tmp_path / "states" / workflow_id / "state.json")["revision"] == 1


class TestWakeUps:
    """Durable waiters are woken in the callback that reads their answer, a chunk at most."""

    @staticmethod
    async def _answer_in_pipe(store: FileStore) -> None:
        """Stop the loop reading answers and wait until the writer's is in the pipe."""
        link = store._link
        assert link is not None
        link.read_answers(False)
        await asyncio.to_thread(select.select, [link._answers], [], [], 10.0)

    async def test_a_strict_save_is_woken_by_the_read_of_its_answer(
            self, tmp_path: Path) -> None:
        """The read that brings a save's answer completes its future there and then: no
        loop iteration more between the answer and the waiting task's step."""
        store = FileStore(tmp_path / "states", tmp_path / "checkpoints")
        await store.open()
        try:
            saved = store.save_nowait(WID, lambda: _state(WID, 1))
            await asyncio.sleep(0)  # sent
            await self._answer_in_pipe(store)
            assert not saved.done()
            assert store._link is not None
            store._link.read_available()  # what the loop's reader callback calls
            assert saved.done() and saved.exception() is None
        finally:
            await store.close()

    async def test_one_answer_for_many_waiters_wakes_a_chunk_per_iteration(
            self, tmp_path: Path) -> None:
        """An answer for WAKE_CHUNK + 44 waiters wakes WAKE_CHUNK in its read, in the order
        they saved, and the rest in the next iteration."""
        store = FileStore(tmp_path / "states", tmp_path / "checkpoints")
        ids = [f"workflow-20240115-142315-{n:04x}" for n in range(WAKE_CHUNK + 44)]
        await store.open()
        try:
            saved = [store.save_nowait(w, lambda w=w: _state(w, 1)) for w in ids]
            await asyncio.sleep(0)  # sent, as one batch
            await self._answer_in_pipe(store)
            assert store._link is not None
            store._link.read_available()
            assert [f.done() for f in saved] == [True] * WAKE_CHUNK + [False] * 44
            await asyncio.sleep(0)
            assert all(f.done() and f.exception() is None for f in saved)
        finally:
            await store.close()


class TestHandOff:
    """The writer's state files from durable records, fed to its ``Writer`` directly."""

    @staticmethod
    def _writer(tmp_path: Path) -> Writer:
        (tmp_path / "journal").mkdir()
        return Writer(os.getpid(), str(tmp_path / "journal"), str(tmp_path / "states"),
                      str(tmp_path / "checkpoints"), False, 1 << 30)

    @staticmethod
    def _group(tmp_path: Path, writes: list[tuple[int, tuple[str, ...]]]
               ) -> tuple[object, ...]:
        items = [(WID, canonical(_state(WID, revision)),
                  str(tmp_path / "states" / WID / "state.json"),
                  [str(tmp_path / "checkpoints" / f"{name}.json") for name in checkpoints])
                 for revision, checkpoints in writes]
        return ("W", 1, items, [])

    def test_a_torn_group_leaves_none_of_its_lines_behind_a_shorter_next_one(
            self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """A group whose append fails after two of its three lines is zeroed again: the
        one-line group written next over it leaves no line of it (none was acknowledged)
        for a replay to find."""
        writer = self._writer(tmp_path)
        writer.start_journal()
        sent: list[tuple[object, ...]] = []
        channel = type("Channel", (), {"send": staticmethod(sent.append)})()
        try:
            _write_group(writer, channel, [self._group(tmp_path, [(1, ())])])
            real_pwrite = os.pwrite
            torn = self._group(tmp_path, [(2, ()), (3, ()), (5, ())])
            two_lines = 2 * (writer.journal_size)  # every line here is as long as the first

            calls = []

            def failing(fd: int, data: bytes, offset: int) -> int:
                calls.append(offset)
                if len(calls) == 1:  # two lines of the three
                    return real_pwrite(fd, memoryview(data)[:two_lines], offset)
                if len(calls) == 2:  # the third
                    raise OSError(errno.ENOSPC, "No space left on device")
                return real_pwrite(fd, data, offset)  # zeroing them again

            monkeypatch.setattr(os, "pwrite", failing)
            _write_group(writer, channel, [torn])
            monkeypatch.setattr(os, "pwrite", real_pwrite)
            assert sent[-1][0] == "E"
            _write_group(writer, channel, [self._group(tmp_path, [(4, ())])])
            records = Path(writer.journal_path).read_bytes().rstrip(b"\0")
            assert [decode_document(line, "journal")["revision"]
                    for line in records.splitlines(keepends=True)] == [1, 4]
        finally:
            writer.finish()

    def test_zeros_are_written_ahead_after_small_groups_only(self, tmp_path: Path) -> None:
        """After a group of ZEROED_GROUPS bytes or more the journal ends at its records (the
        zeros would cost more than they save); the next small group puts them ahead."""
        writer = self._writer(tmp_path)
        writer.start_journal()
        sent: list[tuple[object, ...]] = []
        channel = type("Channel", (), {"send": staticmethod(sent.append)})()
        journal = Path(writer.journal_path)
        try:
            one = len(canonical(_state(WID, 1)))  # a line is longer: enough lines for sure
            big = self._group(tmp_path, [(n, ()) for n in range(ZEROED_GROUPS // one)])
            _write_group(writer, channel, [big])
            assert writer.journal_size >= ZEROED_GROUPS
            assert journal.stat().st_size == writer.journal_size
            _write_group(writer, channel, [self._group(tmp_path, [(10**6, ())])])
            assert journal.stat().st_size == writer.journal_size + ZEROED_AHEAD
        finally:
            writer.finish()

    @staticmethod
    def _revision(path: Path) -> int:
        return int(decode_document(path.read_bytes(), str(path))["revision"])

    def test_a_record_without_checkpoint_waits_for_one_and_the_newest_wins(
            self, tmp_path: Path) -> None:
        """A record that wants no checkpoint writes no file; one that does writes the
        state and checkpoint files, from a newer record of the same group if one came;
        the journal has every record as a checksummed line, the bytes a state file gets."""
        writer = self._writer(tmp_path)
        writer.start_journal()
        sent: list[tuple[object, ...]] = []
        channel = type("Channel", (), {"send": staticmethod(sent.append)})()
        state = tmp_path / "states" / WID / "state.json"
        try:
            _write_group(writer, channel, [self._group(tmp_path, [(1, ())])])
            writer._materializer.submit(lambda: None).result()  # whatever it queued
            assert not state.exists() and sent == [("A", 1)]
            _write_group(writer, channel, [self._group(tmp_path, [(2, ("s4",)), (3, ())])])
            writer._materializer.submit(lambda: None).result()
            assert self._revision(state) == 3
            assert self._revision(tmp_path / "checkpoints" / "s4.json") == 3
            _write_group(writer, channel, [self._group(tmp_path, [(4, ())])])
            writer.flush()  # what only the journal holds
            assert self._revision(state) == 4
            data = Path(writer.journal_path).read_bytes()
            records, zeros = data[:writer.journal_size], data[writer.journal_size:]
            lines = records.splitlines(keepends=True)
            assert [decode_document(line, "journal")["revision"] for line in lines] == [
                1, 2, 3, 4]  # every record, checksummed, one line each
            assert state.read_bytes() == lines[-1]  # a state file is its journal line
            # Then zeros, written ahead so a group's sync writes no new size.
            assert zeros == bytes(len(zeros)) and len(zeros) >= ZEROED_AHEAD // 2
        finally:
            writer.finish()
        assert not Path(writer.journal_path).exists()  # every state in a file: deleted
