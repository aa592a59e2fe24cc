"""What the dashboard shows, read from the store and the running processes' live views.

``DashboardSource`` polls the store's workflows and the live views running processes
publish (``_observe.LivePublisher``): files beside the states with the file store, the
rows of every worker on any host with the PostgreSQL store (``_postgres._live``), and
turns each change into a numbered event. Server-sent event streams replay from any number
still in the buffer, so a browser that reconnects (``Last-Event-ID``) misses nothing; one
that was away longer is told to reload.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._cluster import postgres
from .._diagnostics import redact
from .._observe import runtime_directory
from .._runtime import workflow_row
from .._store._platform import process_alive

if TYPE_CHECKING:
    from .._runtime import Runtime

__all__ = ["BUFFERED_EVENTS", "DashboardSource", "Event", "runtime_directory"]

BUFFERED_EVENTS = 20_000
ENDED_SHOWN = 3  # processes that ended, kept on /health with how they left their breakers
KEEP_ALIVE = 15.0  # seconds between comments on an idle stream
_KEY_FIELDS = ("status", "current_stage", "updated_at", "error", "worker")


class Event:
    __slots__ = ("data", "id", "kind")

    def __init__(self, event_id: int, kind: str, data: Any) -> None:
        self.id, self.kind, self.data = event_id, kind, data

    def encode(self) -> bytes:
        payload = json.dumps(self.data, default=str, separators=(",", ":"))
        return f"id: {self.id}\nevent: {self.kind}\ndata: {payload}\n\n".encode()


class DashboardSource:
    """The latest rows and runtime views, and the numbered changes between polls."""

    def __init__(self, runtime: Runtime, *, poll_interval: float = 0.5,
                 secrets: tuple[str, ...] = ()) -> None:
        self.runtime = runtime
        self.poll_interval = poll_interval
        self._secrets = secrets
        self.rows: dict[str, dict[str, Any]] = {}
        self.runtimes: dict[str, dict[str, Any]] = {}
        self.sequence = 0
        self._events: deque[Event] = deque(maxlen=BUFFERED_EVENTS)
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self.polls = 0

    # ------------------------------------------------------------------ polling

    async def start(self) -> None:
        await self.poll()
        self._task = asyncio.get_running_loop().create_task(self._poll_forever(),
                                                            name="dashboard-poll")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _poll_forever(self) -> None:
        while True:
            began = time.monotonic()
            try:
                await self.poll()
            except Exception as error:  # a transient read error: try again next time
                from .._logging import logger

                logger.warning("Dashboard could not read the store: %s", error)
            # A big store takes a while to list: never spend more than a third of the time
            # listing it.
            await asyncio.sleep(max(self.poll_interval, 2 * (time.monotonic() - began)))

    async def poll(self) -> None:
        stored = {}
        for loaded in await self.runtime.store.list_states():
            state = loaded.state
            row = workflow_row(state)
            # The metrics' label for the definition: its name, as the runtimes count it.
            row["definition_name"] = state.get("definition_name") or row["definition"]
            stored[str(row["workflow_id"])] = row
        runtimes = await self._read_views()
        rows = {workflow_id: redact(row, self._secrets)
                for workflow_id, row in _merge(stored, runtimes).items()}
        events: list[tuple[str, Any]] = []
        for workflow_id, row in rows.items():
            before = self.rows.get(workflow_id)
            if before is None or any(before.get(k) != row.get(k) for k in _KEY_FIELDS):
                events.append(("row", row))
        for workflow_id in self.rows.keys() - rows.keys():
            events.append(("gone", {"workflow_id": workflow_id}))
        health_changed = _health_view(runtimes) != _health_view(self.runtimes)
        self.rows, self.runtimes = rows, runtimes
        if events:
            events.append(("counts", self.counts()))
        if health_changed or (runtimes and self.polls % 4 == 0):
            events.append(("health", self.health()))
        self.polls += 1
        if events:
            async with self._changed:
                for kind, data in events:
                    self.sequence += 1
                    self._events.append(Event(self.sequence, kind, data))
                self._changed.notify_all()

    async def _read_views(self) -> dict[str, dict[str, Any]]:
        """The live views of the processes running workflows: every worker's row of a
        PostgreSQL store (on any host), else the runtime files beside the states."""
        store = postgres(self.runtime.store)
        if store is not None:
            from .._postgres._live import read_live_views

            return await read_live_views(store, self.runtimes)
        return await asyncio.to_thread(_read_runtime_files, runtime_directory(self.runtime))

    # ------------------------------------------------------------------ reading

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for row in self.rows.values():
            status = str(row.get("status"))
            counts[status] = counts.get(status, 0) + 1
        return dict(sorted(counts.items()))

    def filtered(self, status: str | None = None, definition: str | None = None,
                 stage: str | None = None) -> list[dict[str, Any]]:
        rows = sorted(self.rows.values(), key=lambda r: float(r.get("created_at") or 0))
        return [r for r in rows
                if (not status or r.get("status") == status)
                and (not definition or r.get("definition") == definition)
                and (not stage or r.get("current_stage") == stage)]

    def choices(self) -> dict[str, list[str]]:
        """The values each filter can take, from the rows known now."""
        def values(key: str) -> list[str]:
            return sorted({str(r[key]) for r in self.rows.values() if r.get(key)})

        return {"status": values("status"), "definition": values("definition"),
                "stage": values("current_stage")}

    def live(self, workflow_id: str) -> dict[str, Any] | None:
        """The live view of a workflow a running process publishes, if one does."""
        for view in self.runtimes.values():
            if not view.get("alive"):
                continue  # ended or killed: what it ran is another's, or stored, now
            found = (view.get("workflows") or {}).get(workflow_id)
            if found is not None:
                return {**found, "pid": view.get("pid"), "worker": _worker(view)}
        return None

    def live_state(self, workflow_id: str) -> dict[str, Any] | None:
        """The whole record of a running workflow, from a process that publishes it (once
        ``watch`` asked for it)."""
        for view in self.runtimes.values():
            if view.get("alive"):
                found = (view.get("states") or {}).get(workflow_id)
                if isinstance(found, dict):
                    return found
        return None

    async def watch(self, workflow_id: str) -> None:
        """Ask the processes running ``workflow_id`` to publish its whole record (for a
        minute): a file named by the ID, whose time they read. Workers of a PostgreSQL
        store need no asking: the database has each workflow's newest committed record."""
        if postgres(self.runtime.store) is not None:
            return
        path = runtime_directory(self.runtime) / "watch" / workflow_id

        def touch() -> None:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            path.touch(mode=0o600)

        with contextlib.suppress(OSError):  # read-only disk: pages show the stored record
            await asyncio.to_thread(touch)

    def health(self) -> dict[str, Any]:
        """Running processes first, then the last few that ended (newest first)."""
        views = sorted(self.runtimes.values(),
                       key=lambda v: (not v.get("alive"), -float(v.get("at") or 0)))
        running = [v for v in views if v.get("alive")]
        ended = [v for v in views if not v.get("alive")][:ENDED_SHOWN]
        return {"runtimes": [redact(v, self._secrets) for v in (*running, *ended)]}

    # ------------------------------------------------------------------ streaming

    async def stream(self, after: int | None) -> AsyncIterator[bytes]:
        """Events after number ``after`` (from the start of the buffer if older), then
        each new one as it happens; a ``reset`` when the buffer no longer holds them."""
        last = self.sequence if after is None else after
        oldest = self._events[0].id if self._events else self.sequence + 1
        if last < oldest - 1:
            yield Event(self.sequence, "reset", {"reason": "missed events"}).encode()
            last = self.sequence
        yield b"retry: 1000\n\n"
        while True:
            pending = [e for e in list(self._events) if e.id > last]
            for event in pending:
                yield event.encode()
                last = event.id
            if not await self._wait_beyond(last):
                yield b": keep-alive\n\n"  # proxies and browsers keep the stream open

    async def _wait_beyond(self, last: int) -> bool:
        """Wait until an event after ``last`` exists; False after KEEP_ALIVE seconds. The
        lock is never held while a client is sent anything."""
        async with self._changed:
            try:
                async with asyncio.timeout(KEEP_ALIVE):
                    await self._changed.wait_for(lambda: self.sequence > last)
            except TimeoutError:
                return False
        return True


_ENDED = frozenset({"completed", "failed", "timed_out", "cancelled", "interrupted"})


def _merge(stored: dict[str, dict[str, Any]],
           runtimes: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """The store's rows, with each workflow a live process runs shown as it is now.

    A store may keep a running workflow's newest record where only its writer reads it
    (the file store's journal, until a checkpoint): the process running it publishes it.
    A row the store says ended, newer than the live view, wins (the process ended it)."""
    rows = dict(stored)
    for view in runtimes.values():
        if not view.get("alive"):
            continue
        for workflow_id, live in (view.get("workflows") or {}).items():
            row = rows.get(workflow_id)
            if row is not None and row.get("status") in _ENDED and float(
                    row.get("updated_at") or 0) >= float(live.get("updated_at") or 0):
                continue
            rows[workflow_id] = {
                "workflow_id": workflow_id, "status": "running",
                "current_stage": live.get("stage"), "definition": live.get("definition"),
                "prompt_file": live.get("prompt_file"), "created_at": live.get("created_at"),
                "updated_at": live.get("updated_at"), "error": None,
                "definition_name": live.get("definition_name") or live.get("definition"),
                "worker": _worker(view)}
    return rows


def _worker(view: Mapping[str, Any]) -> str:
    """Which process runs a live view's workflows, as people read it: the host too when
    the view came from a worker of the shared store (any host)."""
    host = view.get("host")
    return f"{host} pid {view.get('pid')}" if host else f"pid {view.get('pid')}"


def _health_view(runtimes: Mapping[str, Mapping[str, Any]]) -> Any:
    return [(v.get("pid"), v.get("breakers"), v.get("health"))
            for _, v in sorted(runtimes.items())]


def _read_runtime_files(directory: Path) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    try:
        paths = sorted(directory.glob("runtime-*.json"))
    except OSError:
        return found
    for path in paths:
        try:
            if path.is_symlink() or path.stat().st_size > 16 << 20:
                continue
            document = json.loads(path.read_bytes())
        except (OSError, ValueError):
            continue
        if not isinstance(document, dict):
            continue
        pid = document.get("pid")
        document["alive"] = (isinstance(pid, int) and not document.get("stopped")
                             and process_alive(pid))
        found[path.name] = document
    return found

    return True
