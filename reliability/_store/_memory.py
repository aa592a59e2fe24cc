"""``MemoryStore``: states kept in this process only, for tests and benchmarks.

The smallest complete ``Store`` (see ``_protocol.py``): every write is durable when asked
for (its futures are done on return, so ``lazy`` and ``expedite`` have nothing to do), and
claims are a set, which is exclusive only within this store.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator, MutableMapping
from typing import Any

from .._errors import WorkflowError, WorkflowLockedError, WorkflowNotFoundError
from .._ids import validate_workflow_id
from .._state import WorkflowRun
from ._protocol import (
    Claim,
    LoadedState,
    ParkedEntry,
    Snapshot,
    canonical,
    decode_document,
    encode_document,
)
from ._writer import wrap_document

__all__ = ["MemoryStore"]

_TO_STATE = WorkflowRun.to_state


def _snapshot_of(snapshot: Snapshot) -> dict[str, Any]:
    """``snapshot()``; a workflow's own (the engine hands over ``run.to_state``) with its
    monitoring lists encoded entry by entry once in the workflow's life, as the file store
    takes it: the same document bytes, without re-encoding every earlier stage's entries
    at every save (the engine alone's largest cost per stage after the trigger)."""
    run = getattr(snapshot, "__self__", None)
    if getattr(snapshot, "__func__", None) is _TO_STATE and isinstance(run, WorkflowRun):
        return run.to_state(encoded=True)
    return snapshot()


class _Documents(MutableMapping[str, bytes]):
    """Documents by key, each wrapped (its SHA-256 taken) when first read, not when
    written: most are superseded unread (a workflow's next stage writes over it), and the
    hash was a quarter of the engine-alone benchmark's instructions per stage. What a
    reader gets is byte for byte what ``encode_document`` gives."""

    __slots__ = ("_entries",)

    def __init__(self) -> None:
        # A document, or (its canonical state,) still to be wrapped.
        self._entries: dict[Any, bytes | tuple[bytes]] = {}

    def keep(self, key: Any, body: bytes) -> None:
        """Keep the document of canonical state ``body``, wrapped when first read."""
        self._entries[key] = (body,)

    def __getitem__(self, key: Any) -> bytes:
        value = self._entries[key]
        if type(value) is tuple:
            value = self._entries[key] = wrap_document(value[0])
        return value  # type: ignore[return-value]

    def __setitem__(self, key: Any, value: bytes) -> None:
        self._entries[key] = bytes(value)

    def __delitem__(self, key: Any) -> None:
        del self._entries[key]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


class _MemoryClaim:
    __slots__ = ("_registry", "workflow_id")

    def __init__(self, workflow_id: str, registry: set[str]) -> None:
        self.workflow_id = workflow_id
        self._registry = registry

    def release(self) -> None:
        self._registry.discard(self.workflow_id)


class MemoryStore:
    """States kept in this process only: for tests on a fake clock and for benchmarks.

    It still encodes and validates every document, so what it keeps is what a file holds.
    """

    def __init__(self) -> None:
        self.documents: _Documents = _Documents()
        self.checkpoints: _Documents = _Documents()
        self._pending: dict[str, Snapshot] = {}  # save_soon: encoded only if never superseded
        self._claimed: set[str] = set()
        self.saves = 0
        self.signals: dict[tuple[str, str], list[bytes]] = {}
        self.parked_entries: dict[str, ParkedEntry] = {}
        self._done: asyncio.Future[None] | None = None  # save_nowait's, for its loop

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def save_soon(self, workflow_id: str, snapshot: Snapshot, *,
                  promptly: bool = False) -> None:
        self._pending[workflow_id] = snapshot

    async def save(self, workflow_id: str, snapshot: Snapshot, *,
                   checkpoint_stage: str | None = None) -> None:
        await self.save_nowait(workflow_id, snapshot, checkpoint_stage=checkpoint_stage)

    def save_nowait(self, workflow_id: str, snapshot: Snapshot, *,
                    checkpoint_stage: str | None = None,
                    lazy: bool = False) -> asyncio.Future[None]:
        self._keep(workflow_id, snapshot, checkpoint_stage)
        # Every write is durable on return: one done future per loop serves them all (a
        # done future can be awaited any number of times, a callback added to it is
        # scheduled at once and not kept, and cancel() leaves it done).
        loop = asyncio.get_running_loop()
        done = self._done
        if done is None or done.get_loop() is not loop:
            done = self._done = loop.create_future()
            done.set_result(None)
        return done

    def expedite(self) -> None:
        return None  # its futures are done when returned

    def _keep(self, workflow_id: str, snapshot: Snapshot, checkpoint_stage: str | None) -> None:
        self._pending.pop(workflow_id, None)
        body = canonical(_snapshot_of(snapshot))
        self.documents.keep(workflow_id, body)
        if checkpoint_stage is not None:
            self.checkpoints.keep((workflow_id, checkpoint_stage), body)
        self.saves += 1

    def archive(self, state: dict[str, Any]) -> None:
        return None

    async def load(self, workflow_id: str) -> LoadedState:
        validate_workflow_id(workflow_id)
        self._flush_pending()
        document = self.documents.get(workflow_id)
        if document is None:
            raise WorkflowNotFoundError(f"no workflow {workflow_id} in this memory store")
        return LoadedState(decode_document(document, f"memory:{workflow_id}"),
                           f"memory:{workflow_id}")

    async def list_states(self, statuses: Iterable[str] | None = None) -> list[LoadedState]:
        wanted = frozenset(statuses) if statuses is not None else None
        self._flush_pending()
        states = [LoadedState(decode_document(d, f"memory:{w}"), f"memory:{w}")
                  for w, d in self.documents.items()]
        return [s for s in states if wanted is None or s.state.get("status") in wanted]

    def _flush_pending(self) -> None:
        for workflow_id, snapshot in self._pending.items():
            self.documents[workflow_id] = encode_document(snapshot())
        self._pending.clear()

    async def claim(self, workflow_id: str) -> Claim:
        claims, refused = await self.claim_many([workflow_id])
        if refused:
            raise WorkflowLockedError(f"workflow {workflow_id} is already running")
        return claims[0]

    async def claim_many(self, workflow_ids: Iterable[str]) -> tuple[list[Claim], list[str]]:
        claims: list[Claim] = []
        refused: list[str] = []
        for workflow_id in workflow_ids:
            if workflow_id in self._claimed:
                refused.append(workflow_id)
            else:
                self._claimed.add(workflow_id)
                claims.append(_MemoryClaim(workflow_id, self._claimed))
        return claims, refused

    def describe(self, workflow_id: str) -> dict[str, str]:
        return {"state_file": f"memory:{workflow_id}"}

    # --- durable waits (the SignalStore protocol)

    signals_from_other_processes = False  # one process: its own sends wake directly

    async def send_signal(self, workflow_id: str, name: str, payload: bytes) -> None:
        self.signals.setdefault((validate_workflow_id(workflow_id), name), []).append(payload)

    async def read_signal(self, workflow_id: str, name: str, index: int) -> bytes | None:
        sent = self.signals.get((workflow_id, name), ())
        return sent[index] if index < len(sent) else None

    async def signals_ready(self, wanted: list[tuple[str, str, int]]) -> list[str]:
        return [w for w, name, index in wanted
                if len(self.signals.get((w, name), ())) > index]

    async def park(self, entry: ParkedEntry) -> None:
        self.parked_entries[entry[0]] = entry

    async def unpark(self, entry: ParkedEntry) -> None:
        if self.parked_entries.get(entry[0]) == entry:
            del self.parked_entries[entry[0]]

    async def unpark_many(self, entries: list[ParkedEntry]) -> None:
        for entry in entries:
            await self.unpark(entry)

    async def load_many(self, workflow_ids: list[str]) -> dict[str, LoadedState | WorkflowError]:
        found: dict[str, LoadedState | WorkflowError] = {}
        for workflow_id in workflow_ids:
            try:
                found[workflow_id] = await self.load(workflow_id)
            except WorkflowError as error:
                found[workflow_id] = error
        return found

    async def parked(self) -> list[ParkedEntry]:
        return list(self.parked_entries.values())

    async def signalled(self) -> list[str]:
        return sorted({w for w, _ in self.signals})

    async def drop_signals(self, workflow_id: str, *, scan: bool = False) -> None:
        for key in [k for k in self.signals if k[0] == workflow_id]:
            del self.signals[key]
        if scan:
            self.parked_entries.pop(workflow_id, None)

    async def signal_notices(self) -> list[tuple[str, str]]:
        return []  # one process: its own sends wake directly
