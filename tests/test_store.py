"""Durable state: the FileStore's journal, replay, claims, permissions and damaged files.

Cross-process behaviour (a journal or a claim held by a live process, a journal left by a
killed one) is tested with real child processes started from ``crash_workflows``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from crash_workflows import (
    CRASH_FLOW,
    CRASH_STAGES,
    PARK_IN,
    crash_config,
    effect_counts,
    subprocess_env,
)

from reliability import (
    FileStore,
    MemoryStore,
    Runtime,
    StateCorruptedError,
    WorkflowLockedError,
    WorkflowNotFoundError,
)
from reliability._logging import logger as runtime_logger
from reliability._store import (
    PORTABLE_VARIABLE,
    SCHEMA_VERSION,
    decode_document,
    encode_document,
)
from reliability._store._claims import FileLocks

WID = "workflow-20240115-142315-a7b3"
OTHER = "workflow-20240115-142316-b8c4"


def start_child(*args: str) -> subprocess.Popen[str]:
    code = "import crash_workflows; crash_workflows.main()"
    return subprocess.Popen([sys.executable, "-c", code, *args], env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_line(child: subprocess.Popen[str], expected: str, timeout: float = 20.0) -> None:
    assert child.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([child.stdout], [], [], 0.05)
        if ready:
            line = child.stdout.readline()
            if line.strip() == expected:
                return
            if not line:
                break
    child.kill()
    _, errors = child.communicate()
    raise AssertionError(f"child never printed {expected!r}; stderr:\n{errors}")


def kill(child: subprocess.Popen[str]) -> None:
    """SIGKILL ``child`` and wait until its store's writer process is gone too (the kernel
    kills it with its parent): only then is its journal's lock free for a replay."""
    try:
        writers = psutil.Process(child.pid).children()
    except psutil.NoSuchProcess:
        writers = []
    child.send_signal(signal.SIGKILL)
    # Bounded: its writer shares its stderr, so a writer that outlives it holds this open.
    child.communicate(timeout=10)
    assert child.returncode == -signal.SIGKILL
    _, alive = psutil.wait_procs(writers, timeout=10)
    assert not alive, f"processes outlived their parent: {alive}"


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[str]]]:
    """Child processes a test starts; any still running at the end are killed."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for child in started:
        if child.poll() is None:
            child.kill()
            child.communicate()


def replayed_on_open(root: Path) -> int:
    """How many workflows a store opening (and closing) under ``root`` replays from
    journals whose process died."""

    async def reopen() -> int:
        store = FileStore(root / "states", root / "checkpoints")
        await store.open()
        await store.close()
        return store.replayed_workflows

    return asyncio.run(reopen())


def journal_documents(journal: Path) -> dict[str, dict[str, Any]]:
    """The newest valid state per workflow in a journal file."""
    newest: dict[str, dict[str, Any]] = {}
    for line in journal.read_bytes().splitlines(keepends=True):
        try:
            state = decode_document(line, str(journal))
        except StateCorruptedError:
            continue
        if state["revision"] >= newest.get(state["workflow_id"], {"revision": -1})["revision"]:
            newest[state["workflow_id"]] = state
    return newest


def state_of(path: Path) -> dict[str, Any]:
    return decode_document(path.read_bytes(), str(path))


def states_dir(root: Path) -> Path:
    return root / ".github/workflow-states"


@pytest.fixture(params=["byte-locks", "portable"])
def portable(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Each claims test twice: Linux's OFD byte locks, and the flock file per workflow
    macOS and the BSDs use (forced here by WORKFLOW_STORE_PORTABLE, which child
    processes inherit)."""
    portable = request.param == "portable"
    if not portable and not sys.platform.startswith("linux"):
        pytest.skip("OFD byte locks are Linux's")
    monkeypatch.setenv(PORTABLE_VARIABLE, "1" if portable else "0")
    return portable


class TestRoundTrip:
    def test_outputs_keyed_by_numbers_encode_and_verify(self) -> None:
        """A handler's outputs may use non-string keys; they are stored as JSON strings
        and the document still verifies (the fast encoder falls back for them)."""
        state = {"workflow_id": WID, "progress_data": {1: "one", "two": 2, 3.5: None}}
        document = encode_document(state)
        assert decode_document(document, "t")["progress_data"] == {
            "1": "one", "two": 2, "3.5": None}
        plain = {"workflow_id": WID, "progress_data": {"b": 1, "a": [2.5, "x"]}}
        assert decode_document(encode_document(plain), "t") == plain
        assert encode_document(plain) == encode_document(dict(reversed(plain.items())))

    async def test_saved_state_loads_back(self, tmp_path: Path) -> None:
        """save() then load() returns the same state, from state.json once materialized."""
        store = FileStore(tmp_path / "states", tmp_path / "checkpoints")
        await store.open()
        state = {"workflow_id": WID, "revision": 1, "status": "running", "x": [1, 2]}
        await store.save(WID, lambda: state, checkpoint_stage="alpha")
        await store.close()
        await store.open()
        try:
            loaded = await store.load(WID)
        finally:
            await store.close()
        assert loaded.state == state and loaded.problems == ()
        assert loaded.source == str(tmp_path / "states" / WID / "state.json")
        assert (tmp_path / "checkpoints" / f"{WID}_checkpoint_alpha.json").exists()

    async def test_checkpoint_files_are_written_where_checkpoint_path_says(
            self, tmp_path: Path) -> None:
        """Stage names with spaces, separators and non-ASCII letters: the writer's file
        (its path built once per workflow and stage) is the one checkpoint_path names."""
        store = FileStore(tmp_path / "states", tmp_path / "checkpoints")
        await store.open()
        stages = ("alpha", "two words/and..a slash", "étape-1", "x" * 120)
        try:
            for stage in stages:
                await store.save(WID, lambda: {"workflow_id": WID, "revision": 1},
                                 checkpoint_stage=stage)
        finally:
            await store.close()
        expected = {store.checkpoint_path(WID, stage).name for stage in stages}
        assert {path.name for path in (tmp_path / "checkpoints").iterdir()} == expected
        assert len(expected) == len(stages)

    async def test_document_carries_schema_version_and_checksum(self) -> None:
        """The on-disk form is schema_version, sha256 checksum, state: decodable again."""
        document = encode_document({"workflow_id": WID, "revision": 3})
        assert document.startswith(b'{"schema_version":%d,"checksum":"sha256:' % SCHEMA_VERSION)
        assert decode_document(document, "x") == {"workflow_id": WID, "revision": 3}

    async def test_unknown_workflow_is_not_found(self, tmp_path: Path) -> None:
        """Loading an ID with no directory raises WorkflowNotFoundError."""
        store = FileStore(tmp_path / "states", tmp_path / "checkpoints")
        with pytest.raises(WorkflowNotFoundError, match=WID):
            await store.load(WID)

    async def test_list_states_filters_by_status(self, tmp_path: Path) -> None:
        """list_states({'running'}) returns only running workflows."""
        store = FileStore(tmp_path / "states", tmp_path / "checkpoints")
        await store.open()
        await store.save(WID, lambda: {"workflow_id": WID, "status": "running"})
        await store.save(OTHER, lambda: {"workflow_id": OTHER, "status": "completed"})
        await store.close()
        await store.open()
        try:
            running = await store.list_states({"running"})
            everything = await store.list_states()
        finally:
            await store.close()
        assert [s.state["workflow_id"] for s in running] == [WID]
        assert len(everything) == 2

    async def test_concurrent_saves_share_one_batch(self, tmp_path: Path) -> None:
        """100 workflows saving at once are written by one group commit, not 100."""
        store = FileStore(tmp_path / "states", tmp_path / "checkpoints")
        await store.open()
        ids = [f"workflow-20240115-142315-{n:04x}" for n in range(100)]
        try:
            await asyncio.gather(*(store.save(w, lambda w=w: {"workflow_id": w})
                                   for w in ids))
            assert store.batches_written <= 2
        finally:
            await store.close()
        assert all((tmp_path / "states" / w / "state.json").exists() for w in ids)

    async def test_informational_writes_wait_unless_prompt_and_yield_to_durable_ones(
            self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """A held-back write (a short stage's start) never reaches the journal if a durable
        save of its workflow comes first; a prompt one joins the next batch; a held-back one
        with nothing superseding it is written by close at the latest."""
        monkeypatch.setattr("reliability._store._file.INFORMATIONAL_DELAY", 3600.0)
        ids = [f"workflow-20240115-142315-{n:04x}" for n in range(4)]
        held, prompt, superseded, trigger = ids
        store = FileStore(tmp_path / "states", tmp_path / "checkpoints")
        await store.open()
        try:
            def state(workflow_id: str, status: str, revision: int = 1) -> Any:
                return lambda: {"workflow_id": workflow_id, "status": status,
                                "revision": revision}

            store.save_soon(held, state(held, "started"))
            store.save_soon(prompt, state(prompt, "started"), promptly=True)
            store.save_soon(superseded, state(superseded, "started"))
            await store.save(superseded, state(superseded, "completed", 2))
            await store.save(trigger, state(trigger, "running"))
            (journal,) = (tmp_path / "states" / "_journal").glob("journal-*.log")
            written = journal_documents(journal)
            assert set(written) == {prompt, superseded, trigger}
            assert written[superseded]["status"] == "completed"
        finally:
            await store.close()
        assert state_of(tmp_path / "states" / held / "state.json")["status"] == "started"
        assert state_of(tmp_path / "states" / superseded / "state.json")["status"] == "completed"

    async def test_a_held_back_write_sets_its_timer_only_if_still_held_when_writes_go(
            self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """A stage's start superseded in the same loop iteration (a handler that returns
        at once) leaves no timer and sends no frame of its own; one still held when the
        iteration's writes go is timed then, and written once its delay is over with no
        other write to carry it."""
        monkeypatch.setattr("reliability._store._file.INFORMATIONAL_DELAY", 0.01)
        quick, held = WID, OTHER
        store = FileStore(tmp_path / "states", tmp_path / "checkpoints")
        await store.open()
        try:
            store.save_soon(quick, lambda: {"workflow_id": quick, "revision": 1,
                                            "status": "running"})
            done = store.save_nowait(quick, lambda: {"workflow_id": quick, "revision": 2,
                                                     "status": "completed"})
            await done
            assert store._deferred_timer is None and store._sequence == 1
            store.save_soon(held, lambda: {"workflow_id": held, "revision": 1,
                                           "status": "running"})
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            assert store._deferred_timer is not None
            assert store._sequence == 1  # nothing sent for the held-back write alone
            (journal,) = (tmp_path / "states" / "_journal").glob("journal-*.log")
            for _ in range(4_000):  # the timer's 10 ms, however loaded the machine
                if held in journal_documents(journal):
                    break
                await asyncio.sleep(0.005)
            assert journal_documents(journal)[held]["status"] == "running"
        finally:
            await store.close()

    async def test_a_prompt_write_carries_a_pending_durable_one_forward(
            self, tmp_path: Path) -> None:
        """An output recorded mid-stage (prompt) while the previous stage's record is
        still queued: the batch writes the newer state and the earlier save still
        completes, so neither the record nor the output is lost."""
        store = FileStore(tmp_path / "states", tmp_path / "checkpoints")
        await store.open()
        try:
            queued = store.save_nowait(WID, lambda: {"workflow_id": WID, "revision": 1,
                                                     "status": "running"})
            store.save_soon(WID, lambda: {"workflow_id": WID, "revision": 2,
                                          "status": "running", "issue_number": 7},
                            promptly=True)
            await queued
            (journal,) = (tmp_path / "states" / "_journal").glob("journal-*.log")
            assert journal_documents(journal)[WID]["issue_number"] == 7
        finally:
            await store.close()

    async def test_memory_store_validates_like_a_file(self) -> None:
        """MemoryStore keeps encoded documents, lists by status and refuses double claims."""
        store = MemoryStore()
        await store.save(WID, lambda: {"workflow_id": WID, "status": "running"},
                         checkpoint_stage="a")
        store.save_soon(OTHER, lambda: {"workflow_id": OTHER, "status": "completed"})
        assert (await store.load(WID)).state["status"] == "running"
        assert [s.state["workflow_id"] for s in await store.list_states({"completed"})] == [
            OTHER]
        claim = await store.claim(WID)
        with pytest.raises(WorkflowLockedError):
            await store.claim(WID)
        claim.release()
        (await store.claim(WID)).release()


    async def test_memory_store_write_futures_are_done_and_run_each_callback_once(
            self) -> None:
        """A MemoryStore's save_nowait futures are done on return (one shared per loop):
        each callback added runs once, a cancel leaves them done, a later save is done."""
        store = MemoryStore()
        heard: list[int] = []
        first = store.save_nowait(WID, lambda: {"workflow_id": WID, "revision": 1})
        assert first.done() and first.result() is None
        first.add_done_callback(lambda _: heard.append(1))
        assert not first.cancel()
        await first
        second = store.save_nowait(WID, lambda: {"workflow_id": WID, "revision": 2})
        second.add_done_callback(lambda _: heard.append(2))
        await second
        await first
        await asyncio.sleep(0)  # callbacks of a done future are scheduled, not run inline
        assert heard == [1, 2]
        assert not second.cancelled() and second.result() is None
        assert (await store.load(WID)).state["revision"] == 2

class TestJournalReplay:
    def test_orphan_journal_is_replayed_into_state_files(
            self, tmp_path: Path, children: list[subprocess.Popen[str]]) -> None:
        """After SIGKILL, the next FileStore.open() brings every state.json up to the journal."""
        child = start_child("run", str(tmp_path), "parked", "3", "0")
        children.append(child)
        journal_dir = states_dir(tmp_path) / "_journal"
        deadline = time.monotonic() + 20
        newest: dict[str, dict[str, Any]] = {}
        while time.monotonic() < deadline:  # until every workflow's 'wait' start is journaled
            journals = list(journal_dir.glob("journal-*.log"))
            newest = journal_documents(journals[0]) if journals else {}
            if len(newest) == 3 and all(s["current_stage"] == "wait" for s in newest.values()):
                break
            time.sleep(0.01)
        assert len(newest) == 3, "the child never journaled three parked workflows"
        kill(child)
        (orphan,) = journal_dir.glob("journal-*.log")
        for workflow_id, state in newest.items():
            path = states_dir(tmp_path) / workflow_id / "state.json"
            before = state_of(path)["revision"] if path.exists() else -1
            assert before < state["revision"]  # the state file lags behind the journal

        async def reopen() -> FileStore:
            store = FileStore(states_dir(tmp_path), tmp_path / ".github/workflow-checkpoints")
            await store.open()
            await store.close()
            return store

        store = asyncio.run(reopen())
        assert store.replayed_workflows == 3
        assert not orphan.exists()
        for workflow_id, state in newest.items():
            on_disk = state_of(states_dir(tmp_path) / workflow_id / "state.json")
            assert on_disk == state
            assert on_disk["status"] == "running" and on_disk["current_stage"] == "wait"
            assert on_disk["completed_stages"] == ["one", "two", "three"]

    def test_live_journal_is_not_replayed(
            self, tmp_path: Path, children: list[subprocess.Popen[str]]) -> None:
        """A journal whose process is alive (flock held) is left alone; once it dies, replayed."""
        child = start_child("journal", str(tmp_path), WID)
        children.append(child)
        wait_for_line(child, "saved")
        journal_dir = tmp_path / "states" / "_journal"
        (live,) = journal_dir.glob("journal-*.log")

        assert replayed_on_open(tmp_path) == 0
        assert live.exists()
        assert not (tmp_path / "states" / WID / "state.json").exists()
        kill(child)
        assert replayed_on_open(tmp_path) == 1
        assert not live.exists()
        assert state_of(tmp_path / "states" / WID / "state.json")["revision"] == 1

    def test_torn_last_journal_line_is_skipped(self, tmp_path: Path) -> None:
        """A journal whose last document was cut off replays the one before it."""
        journal_dir = tmp_path / "states" / "_journal"
        journal_dir.mkdir(parents=True)
        first = encode_document({"workflow_id": WID, "revision": 1, "status": "running"})
        second = encode_document({"workflow_id": WID, "revision": 2, "status": "completed"})
        (journal_dir / "journal-1-dead.log").write_bytes(first + second[: len(second) // 2])

        async def reopen() -> None:
            store = FileStore(tmp_path / "states", tmp_path / "checkpoints")
            await store.open()
            await store.close()

        replayed_on_open(tmp_path)
        assert state_of(tmp_path / "states" / WID / "state.json")["revision"] == 1

    def test_replay_never_goes_back_to_an_older_revision(self, tmp_path: Path) -> None:
        """A journal older than state.json does not overwrite it."""
        directory = tmp_path / "states" / WID
        directory.mkdir(parents=True)
        (directory / "state.json").write_bytes(encode_document(
            {"workflow_id": WID, "revision": 5, "status": "completed"}))
        journal_dir = tmp_path / "states" / "_journal"
        journal_dir.mkdir()
        (journal_dir / "journal-1-dead.log").write_bytes(encode_document(
            {"workflow_id": WID, "revision": 4, "status": "running"}))

        assert replayed_on_open(tmp_path) == 0
        assert state_of(directory / "state.json")["revision"] == 5


    async def test_a_state_its_file_cannot_take_keeps_its_journal(
            self, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
        """A workflow's directory replaced by a link: nothing is written through it, the
        close says which file failed, and the journal (the state's only copy) is kept;
        once the directory is real again, the next start writes the state from it."""
        states, outside = tmp_path / "states", tmp_path / "outside"
        states.mkdir()
        outside.mkdir()
        (states / WID).symlink_to(outside)

        async def reopen() -> FileStore:
            store = FileStore(states, tmp_path / "checkpoints")
            await store.open()
            await store.close()
            return store

        store = FileStore(states, tmp_path / "checkpoints")
        await store.open()
        await store.save(WID, lambda: {"workflow_id": WID, "revision": 1, "status": "running"},
                         checkpoint_stage="one")
        await store.close()
        assert list(outside.iterdir()) == []
        assert f"{states / WID}/state.json: [Errno 40] is a symbolic link; refused" in caplog.text
        (journal,) = (states / "_journal").glob("journal-*.log")

        caplog.clear()
        assert (await reopen()).replayed_workflows == 0  # still a link: warned, kept
        assert journal.exists() and list(outside.iterdir()) == []
        assert f"Could not write {states / WID}/state.json from the journal {journal}" in (
            caplog.text)

        (states / WID).unlink()
        assert (await reopen()).replayed_workflows == 1
        assert not journal.exists()
        assert state_of(states / WID / "state.json")["revision"] == 1


@pytest.mark.usefixtures("portable")
class TestClaims:
    async def test_second_claim_in_one_process_is_refused(self, tmp_path: Path) -> None:
        """Two claims on one ID from one store: the second raises WorkflowLockedError."""
        store = FileStore(tmp_path / "states", tmp_path / "checkpoints")
        claim = await store.claim(WID)
        with pytest.raises(WorkflowLockedError, match=f"workflow {WID} is already running"):
            await store.claim(WID)
        claim.release()
        (await store.claim(WID)).release()

    async def test_concurrent_claims_in_one_loop_let_exactly_one_win(
            self, tmp_path: Path) -> None:
        """Ten tasks claiming one ID at once: one claim, nine refusals."""
        store = FileStore(tmp_path / "states", tmp_path / "checkpoints")
        outcomes = await asyncio.gather(*(store.claim(WID) for _ in range(10)),
                                        return_exceptions=True)
        claims = [o for o in outcomes if not isinstance(o, BaseException)]
        assert len(claims) == 1
        assert all(isinstance(o, WorkflowLockedError) for o in outcomes if o not in claims)
        claims[0].release()

    async def test_a_burst_of_claims_holds_real_locks_without_a_descriptor_each(
            self, tmp_path: Path, portable: bool) -> None:
        """200 claims: each is a lock another store (as another process) is refused by;
        with byte locks none opens a file descriptor of its own (the claims files are
        opened once), portable ones hold one each until released, and leave no file."""
        store = FileStore(tmp_path / "states", tmp_path / "checkpoints")
        await store.open()  # opens the claims files
        descriptors = len(os.listdir("/proc/self/fd"))
        ids = [f"workflow-20240115-142315-{i:04x}" for i in range(200)]
        claims = await asyncio.gather(*(store.claim(w) for w in ids))
        assert len(os.listdir("/proc/self/fd")) == descriptors + (200 if portable else 0)
        assert sorted(c.workflow_id for c in claims) == sorted(ids)
        other = FileStore(tmp_path / "states", tmp_path / "checkpoints")
        assert await other.claim_many(ids) == ([], ids)
        for claim in claims:
            claim.release()
        # (the other store holds its claims files open: byte locks only)
        assert len(os.listdir("/proc/self/fd")) == descriptors + (0 if portable else 256)
        freed, refused = await other.claim_many(ids)
        assert len(freed) == 200 and refused == []
        for claim in freed:
            claim.release()
        await store.close()
        if portable:
            assert list((tmp_path / "states" / "_claims").iterdir()) == []

    async def test_a_cancelled_claimer_gives_its_lock_back(self, tmp_path: Path) -> None:
        """Cancelled while the claims files were being opened: nothing is held after."""
        store = FileStore(tmp_path / "states", tmp_path / "checkpoints")
        claimer = asyncio.create_task(store.claim(WID))
        await asyncio.sleep(0)  # inside its thread hop, opening the claims files
        claimer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await claimer
        (await store.claim(WID)).release()
        assert not store._claimed

    async def test_a_claim_outlives_its_store_closing(self, tmp_path: Path) -> None:
        """A claim still held when its store closes stays held until it is released."""
        store = FileStore(tmp_path / "states", tmp_path / "checkpoints")
        await store.open()
        claim = await store.claim(WID)
        await store.close()
        other = FileStore(tmp_path / "states", tmp_path / "checkpoints")
        assert await other.claim_many([WID]) == ([], [WID])
        claim.release()
        claim.release()  # twice is harmless
        (await other.claim(WID)).release()

    def test_claim_held_by_another_process_is_refused(
            self, tmp_path: Path, children: list[subprocess.Popen[str]]) -> None:
        """A second process cannot claim a workflow another process holds; after it dies it can."""
        child = start_child("claim", str(tmp_path), WID)
        children.append(child)
        wait_for_line(child, "claimed")

        async def claim_here() -> None:
            store = FileStore(tmp_path / "states", tmp_path / "checkpoints")
            claim = await store.claim(WID)
            claim.release()

        claims = FileStore(tmp_path / "states", tmp_path / "checkpoints").claims_path(WID)
        assert claims.parent == tmp_path / "states" / "_claims"
        with pytest.raises(WorkflowLockedError, match=f"its lock in {claims} is held"):
            asyncio.run(claim_here())
        kill(child)  # the kernel drops a dead process's locks
        asyncio.run(claim_here())

    async def test_claim_many_splits_free_from_held(self, tmp_path: Path) -> None:
        """claim_many returns claims for free IDs and lists those already held."""
        store = FileStore(tmp_path / "states", tmp_path / "checkpoints")
        held = await store.claim(WID)
        claims, refused = await store.claim_many([WID, OTHER])
        assert [c.workflow_id for c in claims] == [OTHER] and refused == [WID]
        for claim in (*claims, held):
            claim.release()


class TestPortableClaims:
    def test_a_lock_taken_on_a_file_deleted_meanwhile_is_tried_again(
            self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """A contender that opened the lock file just before its holder deleted it gets a
        lock on the deleted file: it must notice, and find the new holder's file held."""
        first, second, third = (FileLocks(tmp_path) for _ in range(3))
        for locks in (first, second, third):
            locks.open()
        assert first.lock(WID)
        stale = os.open(first.path(WID), os.O_RDWR)  # the contender's open, then a pause
        first.unlock(WID)  # deleted, then unlocked
        assert not first.path(WID).exists()
        assert third.lock(WID)  # a new file at the same path
        real_open = os.open
        opens = iter([stale])
        with monkeypatch.context() as patch:
            patch.setattr(os, "open", lambda *a, **k: next(opens, None) or real_open(*a, **k))
            assert not second.lock(WID)  # its flock on the stale file succeeded: not enough
        third.unlock(WID)
        assert second.lock(WID)
        second.close()
        assert not second.path(WID).exists()

    def test_a_lock_file_left_by_a_dead_holder_is_claimed(self, tmp_path: Path) -> None:
        """A process that died holding a claim leaves its (unlocked) file: the next
        claim takes it, and its release deletes it."""
        locks = FileLocks(tmp_path)
        locks.open()
        locks.path(WID).touch(mode=0o600)
        assert locks.lock(WID)
        locks.unlock(WID)
        assert list(tmp_path.iterdir()) == []

    def test_portable_is_the_default_off_linux_and_forced_by_the_variable(
            self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """WORKFLOW_STORE_PORTABLE=1 (or portable=True) picks flock files; the argument
        beats the variable; elsewhere than Linux it is the only choice."""
        monkeypatch.setenv(PORTABLE_VARIABLE, "1")
        assert FileStore(tmp_path, tmp_path).portable
        assert not FileStore(tmp_path, tmp_path, portable=False).portable
        monkeypatch.setenv(PORTABLE_VARIABLE, "0")
        assert FileStore(tmp_path, tmp_path).portable is not sys.platform.startswith("linux")
        assert FileStore(tmp_path, tmp_path, portable=True).claims_path(WID) == (
            tmp_path / "_claims" / f"{WID}.lock")


class TestPlatforms:
    def test_without_fcntl_import_works_and_a_file_store_says_what_is_missing(
            self, tmp_path: Path) -> None:
        """As on Windows (no fcntl): the package imports, a MemoryStore works, and
        opening a FileStore raises one ConfigurationError naming fcntl."""
        code = (
            "import sys; sys.modules['fcntl'] = None\n"
            "import asyncio, reliability\n"
            "from reliability import ConfigurationError, FileStore, MemoryStore\n"
            "from pathlib import Path\n"
            "store = FileStore(Path(sys.argv[1]) / 'states', Path(sys.argv[1]) / 'checkpoints')\n"
            "async def main():\n"
            "    memory = MemoryStore(); await memory.open(); (await memory.claim("
            f"{WID!r})).release()\n"
            "    try:\n"
            "        await store.open()\n"
            "    except ConfigurationError as error:\n"
            "        print(error)\n"
            "asyncio.run(main())\n")
        done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=subprocess_env(),
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert "FileStore is not supported on this platform" in done.stdout
        assert "no fcntl" in done.stdout
        assert list(tmp_path.iterdir()) == []  # refused before anything was made


class TestPermissions:
    async def test_state_files_are_0600_and_directories_0700(self, tmp_path: Path) -> None:
        """State, checkpoint, lock and journal files are private to the user."""
        before = os.umask(0o022)
        try:
            async with Runtime(crash_config(checkpoint_frequency=1), tmp_path,
                               configure_logs=False) as runtime:
                (tmp_path / "effects").mkdir()
                result = await runtime.run(CRASH_FLOW, context={"stage_sleep": 0})
                journal_dir = states_dir(tmp_path) / "_journal"
                journals = list(journal_dir.glob("journal-*.log"))
                assert journals and all(_mode(j) == 0o600 for j in journals)
        finally:
            os.umask(before)
        workflow_dir = states_dir(tmp_path) / result.workflow_id
        checkpoints = tmp_path / ".github/workflow-checkpoints"
        for directory in (states_dir(tmp_path), workflow_dir, checkpoints, journal_dir):
            assert _mode(directory) == 0o700, directory
        claims = states_dir(tmp_path) / "_claims"
        assert _mode(claims) == 0o700
        assert len(list(claims.iterdir())) == 256
        files = [workflow_dir / "state.json", *claims.iterdir(), *checkpoints.iterdir()]
        assert len(files) == 1 + 256 + len(CRASH_FLOW.stages) + 1  # every stage, "final"
        for path in files:
            assert _mode(path) == 0o600, path


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --------------------------------------------------------------------------- damage


def _flip_status(raw: bytes) -> bytes:
    return raw.replace(b'"status":"running"', b'"status":"runnimg"')


def _bump_schema(raw: bytes) -> bytes:
    return raw.replace(b'{"schema_version":1,', b'{"schema_version":2,')


DAMAGE = [
    pytest.param(lambda raw: raw[: len(raw) // 2], "not valid JSON (truncated or damaged)",
                 id="truncated"),
    pytest.param(lambda raw: b"", "the file is empty (torn write?)", id="empty"),
    pytest.param(lambda raw: b"\x00\xff\xfegarbage\x00", "not valid JSON", id="garbage"),
    pytest.param(_flip_status, "checksum mismatch", id="flipped-byte"),
    pytest.param(_bump_schema, "schema version 2 is not 1", id="schema-version"),
    pytest.param(lambda raw: b'{"state": 3}', "not a workflow state document", id="shape"),
]


@pytest.fixture
def damaged_store(tmp_path: Path) -> FileStore:
    """A store holding WID at revision 3, with checkpoints 'alpha' (rev 1) and 'beta' (rev 2).

    The files are written directly: the writer may coalesce a workflow's checkpoints into
    its newest document, and these tests need three distinct copies.
    """
    store = FileStore(tmp_path / "states", tmp_path / "checkpoints")
    store.state_path(WID).parent.mkdir(parents=True)
    store.checkpoint_directory.mkdir()
    for revision, path in ((1, store.checkpoint_path(WID, "alpha")),
                           (2, store.checkpoint_path(WID, "beta")),
                           (3, store.state_path(WID))):
        path.write_bytes(encode_document({"workflow_id": WID, "revision": revision,
                                          "status": "running"}))
    assert _load(store).state["revision"] == 3
    return store


def _load(store: FileStore) -> Any:
    return asyncio.run(store.load(WID))


class TestDamagedStateFile:
    @pytest.mark.parametrize(("damage", "problem"), DAMAGE)
    def test_damaged_state_falls_back_to_newest_checkpoint(
            self, damaged_store: FileStore, damage: Any, problem: str) -> None:
        """A torn or tampered state.json is reported by path; the newest checkpoint is used."""
        path = damaged_store.state_path(WID)
        path.write_bytes(damage(path.read_bytes()))
        loaded = _load(damaged_store)
        assert loaded.state["revision"] == 2
        assert loaded.source == str(damaged_store.checkpoint_path(WID, "beta"))
        assert len(loaded.problems) == 1
        assert loaded.problems[0].startswith(f"{path}: ")
        assert problem in loaded.problems[0]

    def test_symlink_to_a_file_outside_is_refused(self, damaged_store: FileStore,
                                                  tmp_path: Path) -> None:
        """state.json replaced by a symlink (even to a valid document) is not followed."""
        path = damaged_store.state_path(WID)
        outside = tmp_path / "outside.json"
        outside.write_bytes(path.read_bytes())
        path.unlink()
        path.symlink_to(outside)
        loaded = _load(damaged_store)
        assert loaded.problems == (f"{path}: is a symbolic link; refused",)
        assert loaded.state["revision"] == 2

    def test_state_of_another_workflow_is_refused(self, damaged_store: FileStore) -> None:
        """A state.json copied from another workflow is reported as belonging elsewhere."""
        path = damaged_store.state_path(WID)
        path.write_bytes(encode_document({"workflow_id": OTHER, "revision": 9}))
        loaded = _load(damaged_store)
        assert f"belongs to '{OTHER}', not {WID}" in loaded.problems[0]
        assert loaded.state["revision"] == 2

    def test_damaged_checkpoints_are_skipped_too(self, damaged_store: FileStore) -> None:
        """With state.json and the newest checkpoint both torn, the older checkpoint is used."""
        damaged_store.state_path(WID).write_bytes(b"{")
        beta = damaged_store.checkpoint_path(WID, "beta")
        beta.write_bytes(_flip_status(beta.read_bytes()))
        loaded = _load(damaged_store)
        assert loaded.source == str(damaged_store.checkpoint_path(WID, "alpha"))
        assert loaded.state["revision"] == 1
        assert any(p.startswith(f"{beta}: checksum mismatch") for p in loaded.problems)

    def test_nothing_valid_left_is_a_clear_error(self, damaged_store: FileStore) -> None:
        """With every copy damaged, StateCorruptedError names state.json and each problem."""
        path = damaged_store.state_path(WID)
        for damaged in (path, damaged_store.checkpoint_path(WID, "alpha"),
                        damaged_store.checkpoint_path(WID, "beta")):
            damaged.write_bytes(b"")
        with pytest.raises(StateCorruptedError) as raised:
            _load(damaged_store)
        assert raised.value.path == str(path)
        assert "no valid state or checkpoint" in str(raised.value)
        assert str(damaged_store.checkpoint_path(WID, "alpha")) in str(raised.value)

    def test_missing_state_json_uses_a_checkpoint(self, damaged_store: FileStore) -> None:
        """A deleted state.json (directory still there) falls back to the newest checkpoint."""
        path = damaged_store.state_path(WID)
        path.unlink()
        loaded = _load(damaged_store)
        assert loaded.problems == (f"{path}: missing",) and loaded.state["revision"] == 2

    def test_symlinked_workflow_directory_is_refused(self, damaged_store: FileStore,
                                                     tmp_path: Path) -> None:
        """A workflow directory that is a symlink (out of the state directory) is not read."""
        directory = damaged_store.state_path(WID).parent
        moved = tmp_path / "elsewhere"
        directory.rename(moved)
        directory.symlink_to(moved)
        with pytest.raises(StateCorruptedError, match="is a symbolic link; refused"):
            _load(damaged_store)

    def test_claimed_but_never_saved_is_not_found_and_not_listed(
            self, tmp_path: Path) -> None:
        """A claim followed by no save leaves nothing behind; a directory holding only a
        lock file (left by an earlier version whose process died before its first save) is
        neither corrupted nor resumable: load says so, list_states skips it."""
        store = FileStore(tmp_path / "states", tmp_path / "checkpoints")
        asyncio.run(store.claim(WID)).release()
        with pytest.raises(WorkflowNotFoundError, match=f"no workflow {WID} under"):
            _load(store)
        (tmp_path / "states" / WID).mkdir(mode=0o700)
        (tmp_path / "states" / WID / "lock").touch(mode=0o600)
        with pytest.raises(WorkflowNotFoundError, match="claimed but never saved"):
            _load(store)
        assert asyncio.run(store.list_states()) == []

    def test_damaged_workflow_is_listed_as_corrupted(self, damaged_store: FileStore) -> None:
        """list_states reports a workflow with nothing valid as 'corrupted', not a crash."""
        for path in (damaged_store.state_path(WID), *damaged_store.checkpoint_directory.iterdir()):
            path.write_bytes(b"garbage")
        states = asyncio.run(damaged_store.list_states())
        assert [(s.state["workflow_id"], s.state["status"]) for s in states] == [
            (WID, "corrupted")]


class TestResumeFromCheckpoint:
    async def test_resume_falls_back_to_a_checkpoint_and_completes(
            self, tmp_path: Path) -> None:
        """Interrupted in 'build' with state.json and the final checkpoint garbled: resume
        logs the damaged file, uses plan's checkpoint, and runs each remaining stage once."""
        (tmp_path / "effects").mkdir()
        config = crash_config(checkpoint_frequency=1)
        PARK_IN.add("build")
        try:
            async with Runtime(config, tmp_path, configure_logs=False) as runtime:
                task = asyncio.create_task(runtime.run(CRASH_FLOW, context={"stage_sleep": 0}))
                for _ in range(10_000):  # until 'build' has started (and parked)
                    if "build" in next(iter(effect_counts(tmp_path).values()), {}):
                        break
                    await asyncio.sleep(0.001)
                (workflow_id,) = runtime.running
                await runtime.cancel(workflow_id)
                interrupted = await task
        finally:
            PARK_IN.clear()
        assert interrupted.status == "interrupted"
        state_file = states_dir(tmp_path) / workflow_id / "state.json"
        state_file.write_bytes(b"\x00garbage")
        checkpoints = tmp_path / ".github/workflow-checkpoints"
        final = checkpoints / f"{workflow_id}_checkpoint_final.json"
        final.write_bytes(b"")

        messages: list[str] = []
        handler = logging.Handler()
        handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
        runtime_logger.addHandler(handler)
        try:
            async with Runtime(config, tmp_path, configure_logs=False) as runtime:
                resumed = await runtime.resume(workflow_id)
        finally:
            runtime_logger.removeHandler(handler)
        assert resumed.status == "completed" and resumed.resumed_from == "build"
        problems = [m for m in messages if m.startswith(f"State problem for {workflow_id}")]
        assert any(f"{state_file}: not valid JSON" in m for m in problems)
        assert any(f"{final}: the file is empty" in m for m in problems)
        assert all(m.endswith(f"using {checkpoints / (workflow_id + '_checkpoint_plan.json')}")
                   for m in problems)
        counts = effect_counts(tmp_path)[workflow_id]
        assert counts == {"fetch": 1, "plan": 1, "build": 2, "test": 1, "package": 1,
                          "publish": 1}

    async def test_diagnostics_of_a_workflow_only_on_disk_read_its_files(
            self, tmp_path: Path) -> None:
        """A runtime that never ran the workflow diagnoses it from its state file (the
        file store's synchronous load), naming where its files are."""
        (tmp_path / "effects").mkdir()
        async with Runtime(crash_config(), tmp_path, configure_logs=False) as runtime:
            result = await runtime.run(CRASH_FLOW, context={"stage_sleep": 0})
        async with Runtime(crash_config(), tmp_path, configure_logs=False) as runtime:
            diagnostics = runtime.get_workflow_diagnostics(result.workflow_id)
        assert diagnostics["status"] == "completed"
        assert diagnostics["running_here"] is False
        assert diagnostics["completed_stages"] == list(CRASH_STAGES)
        assert str(states_dir(tmp_path) / result.workflow_id / "state.json") in str(diagnostics)
