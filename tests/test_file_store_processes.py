"""Separate processes on one file store (not children of one parent): a workflow runs once.

Each process's writer appends to its own journal and writes state files later, at idle
priority. A claim released before its workflow's final state file was written let a
second process take the claim, read a ``pending`` state file and run the workflow again
(docs/architecture.md, invariant 12). And a journal whose process died is replayed
even while its writer is still dying."""

from __future__ import annotations

import asyncio
import collections
import functools
import json
import os
import subprocess
import sys
import threading
import time
import types
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from cluster_workflows import read_effects

from reliability._errors import WorkflowLockedError
from reliability._store import FileStore, _replay
from reliability._store._protocol import canonical
from reliability._store._writer import wrap_document

ROOT = Path(__file__).resolve().parent.parent
EFFECTS_PATH = "tests.cluster_workflows:EFFECTS"
STAGES = ("one", "two", "three")


def _env(effects: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "CLUSTER_EFFECTS": str(effects),
            "WORKFLOW_ENABLE_HEALTH_CHECKS": "false"}


def _command(root: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "reliability", *args, "--project-root", str(root)]


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        process.communicate()


def _state_files(root: Path) -> dict[str, dict[str, object]]:
    states = {}
    for path in (root / ".github" / "workflow-states").glob("workflow-*/state.json"):
        state = json.loads(path.read_bytes())["state"]
        states[state["workflow_id"]] = state
    return states


@pytest.mark.parametrize("children", ["1", "2"])
def test_two_worker_processes_run_each_workflow_once(
        tmp_path: Path, processes: list[subprocess.Popen[bytes]], children: str) -> None:
    """Two `worker --exit-when-idle` commands (no common parent; each one process, or a
    parent dealing to two children) serve 400 submitted three-stage workflows from one
    file store: every stage's effect happens exactly once and every workflow ends
    completed."""
    effects = tmp_path / "effects"
    effects.mkdir()
    submitted = subprocess.run(
        _command(tmp_path, "submit", "--definition", EFFECTS_PATH, "--count", "400", "--json"),
        cwd=ROOT, env=_env(effects), capture_output=True, check=True)
    ids = set(json.loads(submitted.stdout)["workflow_ids"])
    # Many short workflows and two loops on two cores keep the writers' idle-priority
    # state file threads behind the journals: the window a released claim opened.
    for _ in range(2):
        processes.append(subprocess.Popen(
            _command(tmp_path, "worker", "--processes", children, "--exit-when-idle",
                     "--concurrency", "50", "--log-level", "WARNING", "--json"),
            cwd=ROOT, env=_env(effects), stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    ran = 0
    for process in processes:
        out, err = process.communicate(timeout=240)
        assert process.returncode == 0, err.decode()
        ran += json.loads(out)["workflows_run"]
    done = collections.Counter((e[1], e[2]) for e in read_effects(effects) if e[0] == "done")
    twice = sorted(key for key, count in done.items() if count > 1)
    assert not twice, (f"{len(twice)} stage effects happened twice, in "
                       f"{len({w for w, _ in twice})} of {len(ids)} workflows")
    assert set(done) == {(w, s) for w in ids for s in STAGES}
    states = _state_files(tmp_path)
    assert {w: s["status"] for w, s in states.items()} == dict.fromkeys(ids, "completed")
    assert all(s["completed_stages"] == list(STAGES) for s in states.values())
    assert ran == len(ids)  # each started by one worker, once


def _dead_process_journal(journals: Path, suffix: str, *, revision: int
                          ) -> tuple[Path, str]:
    """A journal named after a process that has exited (and been reaped), holding one
    completed state at ``revision``; the journal and that workflow's ID."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # reaped: its PID names no process now
    journals.mkdir()
    journal = journals / f"journal-{gone.pid}-0000{suffix}.log"
    workflow_id = f"workflow-20240101-000000-00000000{suffix}"
    journal.write_bytes(wrap_document(canonical(
        {"workflow_id": workflow_id, "status": "completed", "revision": revision})))
    return journal, workflow_id


def write(path: Path, document: bytes) -> None:
    """The replay's file writer, plainly."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(document)


def test_replay_waits_for_the_journal_of_a_dead_process_s_dying_writer(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A journal still locked after its owner (the PID in its name) died, as while the
    kernel kills its writer, is waited for and replayed, not skipped as a live one's."""
    journals, states = tmp_path / "_journal", tmp_path / "states"
    journal, workflow_id = _dead_process_journal(journals, "abcd", revision=3)
    holder = subprocess.Popen(  # the dying writer: holds the journal's lock until told
        [sys.executable, "-c", "import fcntl, os, sys\n"
         f"fd = os.open({str(journal)!r}, os.O_RDWR)\nfcntl.flock(fd, fcntl.LOCK_EX)\n"
         "print('locked', flush=True)\nsys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert holder.stdin is not None and holder.stdout is not None
    try:
        assert holder.stdout.readline() == b"locked\n"
        waiting = threading.Event()

        def sleep(seconds: float) -> None:
            waiting.set()  # the replay found the lock held and waits for it
            time.sleep(seconds)

        monkeypatch.setattr(_replay, "time", types.SimpleNamespace(
            monotonic=time.monotonic, sleep=sleep))

        replayed: list[int] = []
        thread = threading.Thread(target=lambda: replayed.append(
            _replay.replay_orphan_journals(journals, states, write, None)))
        thread.start()
        assert waiting.wait(60), "the replay did not wait for the locked journal"
        holder.stdin.close()  # the writer dies: its lock goes
        thread.join(60)
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
        if not holder.stdin.closed:
            holder.stdin.close()
    assert replayed == [1]
    state = json.loads((states / workflow_id / "state.json").read_bytes())["state"]
    assert state["revision"] == 3
    assert not journal.exists()



def test_a_journal_locked_past_the_wait_is_not_waited_for_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A journal whose named owner looks dead but whose lock stays held (a process in
    another PID namespace) costs one wait, not one per replay; once its lock is free it
    is replayed."""
    journals, states = tmp_path / "_journal", tmp_path / "states"
    journal, _ = _dead_process_journal(journals, "abce", revision=2)
    sleeps: list[float] = []
    monkeypatch.setattr(_replay, "ORPHAN_WAIT", 0.0)
    monkeypatch.setattr(_replay, "_given_up", set())
    monkeypatch.setattr(_replay, "time", types.SimpleNamespace(
        monotonic=time.monotonic, sleep=sleeps.append))

    holder = os.open(journal, os.O_RDWR)
    try:
        import fcntl
        # flock locks belong to the open file description: this one holds it against the
        # replay's own open, as another process's would.
        fcntl.flock(holder, fcntl.LOCK_EX)
        assert _replay.replay_orphan_journals(journals, states, write, None) == 0
        assert sleeps, "the first replay did not wait for the locked journal"
        sleeps.clear()
        assert _replay.replay_orphan_journals(journals, states, write, None) == 0
        assert sleeps == []  # given up once: not waited for again
    finally:
        os.close(holder)
    assert _replay.replay_orphan_journals(journals, states, write, None) == 1
    assert not journal.exists()

# --------------------------------------------------------------------------- one process


def _state(workflow_id: str, status: str, revision: int) -> dict[str, object]:
    return {"workflow_id": workflow_id, "status": status, "revision": revision}


@pytest.fixture
async def two_stores(tmp_path: Path) -> AsyncIterator[tuple[FileStore, FileStore]]:
    """Two stores on one directory, as two processes' would be, their claim files open
    (so a claim is decided without a thread hop, in the iteration it is asked)."""
    stores = (FileStore(tmp_path / "states", tmp_path / "checkpoints"),
              FileStore(tmp_path / "states", tmp_path / "checkpoints"))
    try:
        for store in stores:
            await store.open()
            (await store.claim("workflow-20240101-000000-00000000ffff")).release()
        yield stores
    finally:
        for store in reversed(stores):
            await store.close()


async def _end_and_release(store: FileStore, workflow_id: str, status: str,
                           revision: int) -> None:
    """Claim ``workflow_id``, save its final state, give the claim back: a run's end."""
    claim = await store.claim(workflow_id)
    await store.save(workflow_id, functools.partial(_state, workflow_id, status, revision),
                     checkpoint_stage="final")
    claim.release()


async def test_a_claim_is_given_back_only_once_its_state_file_is_written(
        two_stores: tuple[FileStore, FileStore]) -> None:
    """Released after its final save, a claim stays locked against another store until the
    writer has written the state file; whoever takes it next reads the final state."""
    first, second = two_stores
    workflow_id = "workflow-20240101-000000-0000000000aa"
    await _end_and_release(first, workflow_id, "completed", 7)
    with pytest.raises(WorkflowLockedError):  # the release request is not even sent yet
        await second.claim(workflow_id)
    while True:  # until the writer's answer unlocks it (an event in another process)
        try:
            taken = await second.claim(workflow_id)
            break
        except WorkflowLockedError:
            await asyncio.sleep(0.01)
    assert second.load_sync(workflow_id).state["revision"] == 7
    taken.release()


async def test_a_claim_being_given_back_can_be_taken_back_by_its_process(
        two_stores: tuple[FileStore, FileStore]) -> None:
    """A workflow released but still locked (its state file not written yet) is claimed
    again at once by the same store, as a parked workflow woken at once is; once given
    back for good, another store takes it."""
    store, other = two_stores
    workflow_id = "workflow-20240101-000000-0000000000bb"
    await _end_and_release(store, workflow_id, "waiting", 3)
    again = await store.claim(workflow_id)  # still locked by this store: taken back
    # A read waits for the writer's flush, answered after the release request: the
    # answer to that request came, and must not unlock a claim taken back.
    assert (await store.load(workflow_id)).state["revision"] == 3
    with pytest.raises(WorkflowLockedError):
        await other.claim(workflow_id)
    again.release()
    await store.close()  # its writer has written everything: the claim is free
    (await other.claim(workflow_id)).release()
