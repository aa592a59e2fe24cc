"""Workers: queue workflows, run them in any number of processes, wait for their results.

With the PostgreSQL store (``store_url = "postgresql://..."``) ``submit`` queues a workflow
in the database; ``serve`` claims queued ones, and those of dead workers (re-queued with a
new epoch by any live worker's heartbeat), with ``FOR UPDATE SKIP LOCKED``, runs each from
its last completed stage, and gives its claims back when it stops; ``result`` waits for a
NOTIFY of the end, with a poll as fallback. A ``cancel`` from another host is a row in
``workflow_signals`` that the worker running the workflow reads every third of its lease.

With the file store (the default) everything stays on one host: ``submit`` saves a
``pending`` workflow, ``serve`` runs pending ones, ``result`` polls the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._config import WorkflowConfiguration
from ._context import DefinitionLike
from ._errors import ConfigurationError, WorkflowError
from ._ids import validate_workflow_id
from ._logging import logger
from ._state import TERMINAL, WorkflowRun
from ._store import Claim, FileStore, LoadedState, Store
from ._waits import Slots, signal_store

if TYPE_CHECKING:
    import asyncpg

    from ._postgres import PostgresStore
    from ._runtime import Runtime, WorkflowResult

__all__ = ["load_claimed", "make_store", "migrate_store", "postgres", "result", "serve",
           "submit", "submit_many"]

_FILE_POLL = 0.2  # seconds between looks at the file store (it has no notifications)
_RESULT_POLL = 2.0  # fallback poll while waiting for a NOTIFY of a result
_RETRY_FIRST, _RETRY_MAX = 0.05, 2.0  # backoff of a worker's claims while the server is down


def make_store(config: WorkflowConfiguration, root: Path,
               on_fenced: Callable[[str], None]) -> Store:
    """The store ``config.store_url`` names: PostgreSQL, or the file store without one."""
    if config.store_url:
        from ._postgres import PostgresStore
        store: Store = PostgresStore(config.store_url, lease_seconds=config.lease_seconds,
                                     on_fenced=on_fenced)
        return store
    return FileStore(_under(root, config.state_directory),
                     _under(root, config.checkpoint_directory))


def _under(root: Path, value: str) -> Path:
    path = Path(value)
    return path if path.is_absolute() else root / path


def postgres(store: Store) -> PostgresStore | None:
    """``store`` if it is the PostgreSQL store (checked without importing asyncpg)."""
    from ._postgres import PostgresStore
    return store if isinstance(store, PostgresStore) else None


# --------------------------------------------------------------------------- submit


async def submit(rt: Runtime, target: str | os.PathLike[str] | DefinitionLike, *,
                 context: Mapping[str, Any] | None = None, queue: str = "default") -> str:
    """Queue a new workflow for any worker of ``queue``; its ID. Durable on return."""
    definition, inputs, prompt_file = rt.prepare_target(target, context)
    _check_submittable(rt, definition, queue)
    run = rt.new_run(definition, inputs, prompt_file)
    store = postgres(rt.store)
    if store is not None:
        await store.enqueue([run.to_state()], queue=queue)
    else:  # one host: a pending workflow that serve() (or resume --all) runs
        await rt.store.save(run.workflow_id, run.to_state)
    return run.workflow_id


async def submit_many(rt: Runtime,
                      targets: Sequence[tuple[str | os.PathLike[str] | DefinitionLike,
                                              Mapping[str, Any]]],
                      *, queue: str = "default") -> list[str]:
    """Queue many workflows at once (one transaction on PostgreSQL); their IDs in order."""
    store = postgres(rt.store)
    if store is None:
        return [await submit(rt, target, context=context, queue=queue)
                for target, context in targets]
    states = []
    for target, context in targets:
        definition, inputs, prompt_file = rt.prepare_target(target, context)
        _check_submittable(rt, definition, queue)
        states.append(rt.new_run(definition, inputs, prompt_file).to_state())
    for start in range(0, len(states), 1000):
        await store.enqueue(states[start:start + 1000], queue=queue)
    return [state["workflow_id"] for state in states]


def _check_submittable(rt: Runtime, definition: DefinitionLike, queue: str) -> None:
    if not queue or len(queue) > 200:
        raise ConfigurationError(f"queue name {queue!r} must be 1 to 200 characters")
    if not rt.persistence:
        raise ConfigurationError("submitting a workflow needs enable_persistence")
    if definition.import_path is None:
        raise ConfigurationError(f"definition {definition.name!r} must be bound to a "
                                 "module-level name so a worker process can import it")


async def migrate_store(url: str) -> tuple[list[int], int]:
    """Apply the PostgreSQL store's migrations (under its advisory lock); the versions
    applied now, and the schema's version after."""
    from ._postgres import PostgresStore, current_version, migrate
    store = PostgresStore(url)  # for its masked URL and its connection errors only
    try:
        import asyncpg
    except ImportError:
        raise ConfigurationError("the PostgreSQL store needs asyncpg: pip install "
                                 "'workflow-manager[postgres]'") from None
    try:
        connection = await asyncpg.connect(store.url.secret)
    except Exception as error:
        raise await store.connect_error(error) from None
    try:
        applied = await migrate(connection)
        return applied, await current_version(connection)
    finally:
        await connection.close()


# --------------------------------------------------------------------------- result


class _ResultListener:
    """One LISTEN connection per runtime for workflows' ends; waiters by workflow ID."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._connection: asyncpg.Connection | None = None
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._connecting = asyncio.Lock()

    async def ensure(self) -> None:
        if self._connection is not None and not self._connection.is_closed():
            return
        import asyncpg

        from ._postgres import RESULT_CHANNEL
        async with self._connecting:  # two waiters at once open one connection, not two
            if self._connection is not None and not self._connection.is_closed():
                return
            connection = None
            try:
                connection = await asyncpg.connect(self._url)
                await connection.add_listener(RESULT_CHANNEL, self._notified)
            except BaseException as error:
                if connection is not None:  # connected but not listening: not kept
                    connection.terminate()
                if not isinstance(error, Exception):
                    raise  # cancelled: the caller goes
                # The poll still finds the end; the next wait tries again.
                logger.debug("Cannot listen for results: %s", type(error).__name__)
                return
            connection.add_termination_listener(self._lost)
            self._connection = connection

    def _notified(self, _connection: object, _pid: int, _channel: str, payload: object) -> None:
        for event in self._waiters.get(str(payload), ()):
            event.set()

    def _lost(self, *_: object) -> None:
        self._connection = None
        for events in self._waiters.values():
            for event in events:
                event.set()  # re-read: an end may have been missed meanwhile

    def watch(self, workflow_id: str) -> asyncio.Event:
        event = asyncio.Event()
        self._waiters.setdefault(workflow_id, set()).add(event)
        return event

    def unwatch(self, workflow_id: str, event: asyncio.Event) -> None:
        events = self._waiters.get(workflow_id)
        if events is not None:
            events.discard(event)
            if not events:
                del self._waiters[workflow_id]

    async def aclose(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.close()


async def result(rt: Runtime, workflow_id: str,
                 timeout: float | None = None) -> WorkflowResult:  # noqa: ASYNC109 (the API's)
    """How ``workflow_id`` ended, waiting for it to end in whichever process runs it.

    Raises TimeoutError if it has not ended within ``timeout`` seconds."""
    from ._runtime import result_for
    validate_workflow_id(workflow_id)
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    store = postgres(rt.store)
    listener: _ResultListener | None = None
    event: asyncio.Event | None = None
    if store is not None:
        url = store.url.secret

        async def make() -> _ResultListener:
            return _ResultListener(url)

        listener = await rt.shared("postgres-result-listener", make)
        await listener.ensure()
        event = listener.watch(workflow_id)  # before the first read: no end is missed
    try:
        while True:
            state = (await rt.store.load(workflow_id)).state
            if state.get("status") in TERMINAL:
                return result_for(WorkflowRun.from_state(state))
            wait = _RESULT_POLL * random.uniform(0.8, 1.0) if event is not None else _FILE_POLL
            if deadline is not None:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise TimeoutError(f"workflow {workflow_id} did not end within "
                                       f"{timeout:g}s (it is {state.get('status')})")
                wait = min(wait, remaining)
            if event is None:
                await asyncio.sleep(wait)
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), wait)
            event.clear()
            if listener is not None:
                await listener.ensure()
    finally:
        if listener is not None and event is not None:
            listener.unwatch(workflow_id, event)


# --------------------------------------------------------------------------- serve


class _CancellableClaim:
    """A claim that, when a cancel came from another host, records ``cancelled`` in the same
    commit as the release, so no other worker resumes the workflow meanwhile."""

    __slots__ = ("_claim", "_run", "_store", "cancelled", "workflow_id")

    def __init__(self, claim: Claim, run: WorkflowRun, store: Store) -> None:
        self._claim = claim
        self._run = run
        self._store = store
        self.workflow_id = claim.workflow_id
        self.cancelled = False

    def release(self) -> None:
        if self.cancelled and self._run.status not in TERMINAL:
            self._run.status = "cancelled"
            self._run.error = "cancelled on request"
            write = self._store.save_nowait(self.workflow_id, self._run.to_state)
            write.add_done_callback(_report_failed_write)
        self._claim.release()


def _report_failed_write(write: asyncio.Future[None]) -> None:
    if not write.cancelled() and write.exception() is not None:
        logger.error("Could not record a cancellation: %s", write.exception())


class _Worker:
    def __init__(self, rt: Runtime, concurrency: int, queue: str) -> None:
        if concurrency < 1:
            raise ConfigurationError(f"concurrency must be >= 1, got {concurrency}")
        self.rt = rt
        self.concurrency = concurrency
        self.queue = queue
        self.tasks: set[asyncio.Task[None]] = set()
        self.busy: dict[asyncio.Task[None], str] = {}  # task -> its workflow's ID
        self.claims: dict[str, _CancellableClaim] = {}
        self.freed = asyncio.Event()
        # Shared with the runtime's waker: a woken parked workflow takes a slot too.
        self.slots = Slots(concurrency, self.freed.set)
        self.started = 0

    async def claim(self, claim_some: Callable[[int], Awaitable[
            Sequence[tuple[Claim, LoadedState]]]]) -> int:
        """Claim as many as slots are free (``claim_some(n)``) and start them; how many."""
        free = self.slots.take(self.concurrency)
        if not free:
            return 0
        claimed: Sequence[tuple[Claim, LoadedState]] = ()
        try:
            claimed = await claim_some(free)
        finally:
            self.slots.give(free - len(claimed))
        for claim, loaded in claimed:
            self.start(claim, loaded)
        return len(claimed)

    def start(self, claim: Claim, loaded: LoadedState) -> None:
        """Run a claimed workflow in a slot taken for it."""
        task = asyncio.get_running_loop().create_task(self._one(claim, loaded),
                                                      name=f"serve-{claim.workflow_id}")
        self.tasks.add(task)
        self.busy[task] = claim.workflow_id
        self.started += 1
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        self.busy.pop(task, None)
        self.slots.give()  # sets ``freed``
        if not task.cancelled() and task.exception() is not None:
            logger.error("Worker task %s failed: %r", task.get_name(), task.exception())

    async def _one(self, claim: Claim, loaded: LoadedState) -> None:
        from ._runtime import WorkflowResult
        rt = self.rt
        workflow_id = claim.workflow_id
        try:
            prepared = rt.prepare_resume(loaded)
        except WorkflowError as error:
            # Not runnable here (a definition that does not import, stages that changed):
            # recorded as failed, so no worker claims it again and again.
            run = WorkflowRun.from_state(loaded.state)
            run.status, run.error = "failed", f"{type(error).__name__}: {error}"
            run.error_category = error.category.value
            logger.error("Cannot run %s: %s", workflow_id, error)
            try:
                await rt.store.save(workflow_id, run.to_state)
            finally:
                claim.release()
            return
        if isinstance(prepared, WorkflowResult):  # ended already: nothing to run
            claim.release()
            return
        definition, run, at = prepared
        wrapped = _CancellableClaim(claim, run, rt.store)
        self.claims[workflow_id] = wrapped
        # A waiter for its result (rt.result, any host) hears of its end from the commit
        # of its final state (the store's NOTIFY), and polls too.
        try:
            await rt.execute_prepared(definition, run, at, claim=wrapped)
        finally:
            self.claims.pop(workflow_id, None)

    async def watch_cancels(self, store: PostgresStore) -> None:
        """Cancels asked for from any host, read every third of the lease."""
        while True:
            await asyncio.sleep(store.lease_seconds / 3)
            try:
                wanted = await store.take_cancels(list(self.claims))
            except Exception as error:
                logger.debug("Cannot read cancel requests: %s", type(error).__name__)
                continue
            for workflow_id in wanted:
                claim = self.claims.get(workflow_id)
                live = self.rt.live(workflow_id)
                if claim is None or live is None:
                    continue
                logger.warning("Cancel requested for %s: stopping it", workflow_id)
                claim.cancelled = True
                live.stop("cancel")

    async def wait(self, waiter: asyncio.Future[Any] | None, limit: float | None) -> None:
        """Until new work is signalled (``waiter``), a slot frees, a shutdown is asked for,
        or ``limit`` seconds pass."""
        self.freed.clear()
        freed = asyncio.ensure_future(self.freed.wait())
        stopping = asyncio.ensure_future(self.rt.shutdown_requested.wait())
        waiting: set[asyncio.Future[Any]] = {freed, stopping}
        if waiter is not None:
            waiting.add(waiter)
        try:
            await asyncio.wait(waiting, timeout=limit, return_when=asyncio.FIRST_COMPLETED)
        finally:
            freed.cancel()
            stopping.cancel()


async def serve(rt: Runtime, *, concurrency: int = 8, queue: str = "default",
                exit_when_idle: bool = False) -> int:
    """Run queued workflows, at most ``concurrency`` at once, until the runtime shuts down
    (or, with ``exit_when_idle``, until nothing of ``queue`` is queued or running on any
    worker); the number of workflows this worker ran."""
    worker = _Worker(rt, concurrency, queue)
    # It wakes parked workflows too, when due; in its slots, like those it claims.
    rt.waker.use_slots(worker.slots)
    try:
        await rt.waker.start()
    except BaseException:
        rt.waker.use_slots(None)
        raise
    store = postgres(rt.store)
    watcher = (asyncio.ensure_future(worker.watch_cancels(store))
               if store is not None else None)
    try:
        if store is not None:
            await _serve_postgres(rt, worker, store, exit_when_idle)
        else:
            await _serve_files(rt, worker, exit_when_idle)
    finally:
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        if worker.tasks:  # a shutdown stops them at their stage boundary, then releases
            await asyncio.gather(*worker.tasks, return_exceptions=True)
        rt.waker.use_slots(None)
    return worker.started


async def _serve_postgres(rt: Runtime, worker: _Worker, store: PostgresStore,
                          exit_when_idle: bool) -> None:
    announced = False
    backoff = _RETRY_FIRST
    while not rt.shutting_down:
        free = worker.slots.free
        try:
            # Not one still ending here after its claim was lost (fenced) and that was
            # re-queued meanwhile: one process runs a workflow once at a time.
            if free > 0 and store.lease_valid and await worker.claim(
                    lambda n: store.claim_next(n, queue=worker.queue,
                                               exclude=worker.busy.values())):
                backoff = _RETRY_FIRST
                continue
            idle = exit_when_idle and not worker.tasks and await store.count_unfinished(
                worker.queue) == 0
        except Exception as error:
            # The server is down or restarting: the store logs it once; claim nothing,
            # let running workflows wait for their commits, and try again with backoff.
            if not store.unreachable(error):
                raise
            await store.clock.sleep(backoff * random.uniform(0.5, 1.0))
            backoff = min(backoff * 2, _RETRY_MAX)
            continue
        backoff = _RETRY_FIRST
        if idle:
            return
        if not announced:
            logger.info("Worker %s waiting for work on queue %r", store.worker_id, worker.queue)
            announced = True
        # Idle: woken by a NOTIFY of new work (or, exiting when idle, of an end anywhere),
        # the lease becoming valid again, a freed slot or a shutdown; the store's jittered
        # poll (seconds) is only the fallback for a lost NOTIFY. Full: by a freed slot or
        # a shutdown only, with the same poll as a bound.
        waiter = (asyncio.ensure_future(store.wait_for_work(ends=exit_when_idle))
                  if free > 0 else None)
        try:
            await worker.wait(waiter, store.poll_interval)
        finally:
            if waiter is not None and not waiter.done():
                waiter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await waiter


async def load_claimed(store: Store, workflow_ids: list[str]
                        ) -> dict[str, LoadedState | WorkflowError]:
    """The current states of workflows just claimed (see ``FileStore.load_claimed``)."""
    if not workflow_ids:
        return {}
    if isinstance(store, FileStore):
        return await store.load_claimed(workflow_ids)
    return await signal_store(store).load_many(workflow_ids)


async def _serve_files(rt: Runtime, worker: _Worker, exit_when_idle: bool) -> None:
    while not rt.shutting_down:
        pending: list[LoadedState] = []
        if worker.slots.free > 0:
            listed = await rt.store.list_states({"pending"})
            busy = set(rt.running)
            pending = [s for s in listed if s.state["workflow_id"] not in busy]
            pending.sort(key=lambda s: float(s.state.get("created_at") or 0))
            async def claim_some(free: int, pending: list[LoadedState] = pending
                                 ) -> list[tuple[Claim, LoadedState]]:
                ids = [s.state["workflow_id"] for s in pending[:free]]
                claims, _ = await rt.store.claim_many(ids)
                # The list was read before the claims: another process may have run one
                # since and released it (or died). Decide from a read made under the
                # claim (docs/architecture.md, invariant 12); one thread hop for all.
                current = await load_claimed(rt.store, [c.workflow_id for c in claims])
                runnable: list[tuple[Claim, LoadedState]] = []
                for claim in claims:
                    loaded = current.get(claim.workflow_id)
                    if (isinstance(loaded, LoadedState)
                            and loaded.state.get("status") == "pending"):
                        runnable.append((claim, loaded))
                    else:
                        claim.release()
                return runnable

            if await worker.claim(claim_some):
                continue
        if exit_when_idle and not worker.tasks and not pending:
            return
        await worker.wait(None, _FILE_POLL)
