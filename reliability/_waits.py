"""Durable waits: a stage that waits for a signal or a date parks its workflow.

``ctx.wait_for_signal(name, timeout_seconds=...)`` returns a signal already stored for
the workflow at once. Otherwise the workflow is *parked*: an entry in the store's parked
index, then its state saved with status ``waiting`` and what it waits for; its claim,
slot and task are released and nothing of it stays in memory but a heap entry for its
deadline. When the signal comes or the deadline passes, an open runtime (its ``Waker``)
claims it and runs the waiting stage again from its start: the wait then returns the
signal (or raises ``SignalTimeout``; ``sleep_durably`` returns). So a waiting stage runs
the code before its wait twice: it must be idempotent, like any stage.

Deadlines are wall-clock epoch seconds from the runtime's ``Clock`` (docs/architecture.md,
invariant 6), kept in the store, and re-armed when a runtime opens: a deadline that passed
while nothing ran fires at the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import random
import re
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import orjson

from ._errors import (
    ConfigurationError,
    SignalRefusedError,
    SignalTimeout,
    WorkflowError,
)
from ._logging import logger
from ._state import TERMINAL, WAITING
from ._store import LoadedState

if TYPE_CHECKING:
    from ._clock import TimerHandle
    from ._context import DefinitionLike
    from ._runtime import Runtime, WorkflowResult
    from ._state import WorkflowRun
    from ._store import Claim, DueClaims, ParkedEntry, SignalStore

__all__ = ["SignalSource", "Slots", "WaitParked", "Waker", "check_signal_name",
           "encode_payload", "register_signal_source", "signal_store"]

_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_RESULTS_KEPT = 10_000  # results of woken workflows kept until ``settle`` takes them
# Parked workflows claimed per claim call while waking: a file store's claims are system
# calls on the loop, so a chunk holds it for tens of milliseconds at most.
_WAKE_BATCH = 1000
# Woken workflows prepared (state decoded into a run, definition resolved) per loop
# iteration: ~0.1-0.3 ms each, so a chunk holds the loop for tens of milliseconds at most.
_PREPARE_CHUNK = 200
_RETRY_FIRST, _RETRY_MAX = 0.05, 2.0  # backoff of due wakes while a store is unreachable


class WaitParked(BaseException):
    """Raised through a handler when its workflow parks; the engine ends it ``waiting``.

    A ``BaseException``, like ``CancelledError``: a handler's ``except Exception`` must not
    swallow it.
    """

    def __init__(self, entry: ParkedEntry) -> None:
        super().__init__(entry[0])
        self.entry = entry


def check_signal_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise SignalRefusedError(f"signal name {name!r} must be 1-64 letters, digits, "
                                 "'_', '.' or '-'")
    return name


def encode_payload(payload: Any) -> bytes:
    """``payload`` as JSON bytes; SignalRefusedError if it is not JSON."""
    try:
        return orjson.dumps(payload)
    except TypeError as error:
        raise SignalRefusedError(f"signal payload is not JSON: {error}") from None


def signal_store(store: object) -> SignalStore:
    """``store`` if it keeps signals and parked workflows, else a ConfigurationError."""
    if not callable(getattr(store, "park", None)) or not callable(
            getattr(store, "send_signal", None)):
        raise ConfigurationError(f"store {type(store).__name__} does not support durable "
                                 "waits and signals")
    return cast("SignalStore", store)


class StageWaits:
    """One stage attempt's durable waits: how many began, signals taken per name."""

    __slots__ = ("count", "taken")

    def __init__(self) -> None:
        self.count = 0
        self.taken: dict[str, int] = {}


async def durable_wait(store: SignalStore, now: float, run: WorkflowRun,
                       waits: StageWaits, name: str, deadline: float) -> tuple[bool, Any]:
    """The ``waits.count``-th wait of this stage: (True, payload) when the signal is
    stored, (False, None) past the deadline; else park (raises WaitParked)."""
    position = waits.count
    waits.count += 1
    if position < len(run.stage_waits):
        deadline = run.stage_waits[position]  # the stage ran before: keep its deadline
    else:
        run.stage_waits.append(deadline)
    if run.deadline_passed is not None and deadline == run.deadline_passed:
        # The store woke it as due on its own clock (the database's, the same for every
        # worker): a worker whose clock lags must not park it again for the lag.
        run.deadline_passed = None
        now = max(now, deadline)
    index = 0
    if name:
        index = run.signals_consumed.get(name, 0) + waits.taken.get(name, 0)
        absent = run.signals_absent
        if absent and (name, index) in absent and now >= deadline:
            # The wake looked it up after this deadline had passed and found none: one
            # lookup for the whole batch instead of a read per workflow. Used once: a
            # later wait in the same run reads the store again.
            absent.discard((name, index))
            raise SignalTimeout(run.workflow_id, name, deadline)
        payload = await store.read_signal(run.workflow_id, name, index)
        if payload is not None:
            waits.taken[name] = waits.taken.get(name, 0) + 1
            return True, orjson.loads(payload)
    if now >= deadline:
        if name:
            raise SignalTimeout(run.workflow_id, name, deadline)
        return False, None
    entry: ParkedEntry = (run.workflow_id, deadline, name, index)
    # Durable before the "waiting" state: never a waiting state unindexed
    # (docs/architecture.md, invariant 11).
    await store.park(entry)
    raise WaitParked(entry)


# ---------------------------------------------------------------------------- sources

SignalPoll = Callable[["Runtime", list[str]], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class SignalSource:
    """Something outside that sends signal ``name`` (a forge's reviews): ``poll(runtime,
    ids)`` is called every ``interval_seconds`` with the workflows parked here on it."""

    name: str
    poll: SignalPoll
    interval_seconds: float


_SOURCES: dict[str, SignalSource] = {}


def register_signal_source(source: SignalSource) -> None:
    """Every runtime polls ``source`` while workflows it woke or re-armed wait for its
    signal (registered by a workflow package on import)."""
    _SOURCES[source.name] = source


# ---------------------------------------------------------------------------- slots


class Slots:
    """A worker's concurrency limit (``serve(concurrency=N)``), shared by the workflows it
    claims from its queue and the parked ones its runtime wakes: a woken workflow takes a
    slot like a claimed one, so at most N run at once whatever brought them."""

    __slots__ = ("_on_free", "_waiters", "_watchers", "limit", "used")

    def __init__(self, limit: int, on_free: Callable[[], None] | None = None) -> None:
        if limit < 1:
            raise ConfigurationError(f"concurrency must be >= 1, got {limit}")
        self.limit = limit
        self.used = 0
        self._on_free = on_free
        self._waiters: deque[asyncio.Future[None]] = deque()  # ``acquire``s, in order
        self._watchers: list[asyncio.Future[None]] = []  # ``wait_free``s

    @property
    def free(self) -> int:
        return self.limit - self.used

    def take(self, wanted: int) -> int:
        """Take up to ``wanted`` free slots now (none while an ``acquire`` waits: it came
        first); how many were taken."""
        taken = 0 if self._waiters else max(0, min(wanted, self.limit - self.used))
        self.used += taken
        return taken

    async def acquire(self) -> None:
        """Take one slot, waiting in line for it."""
        if self.used < self.limit and not self._waiters:
            self.used += 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.give()  # granted as it was cancelled: the slot goes to the next
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            raise

    def give(self, count: int = 1) -> None:
        """Give back ``count`` slots: to those waiting in ``acquire`` first."""
        self.used -= count
        while self._waiters and self.used < self.limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.used += 1
                waiter.set_result(None)
        if count and self.used < self.limit:
            for watcher in self._watchers:
                if not watcher.done():
                    watcher.set_result(None)
            self._watchers.clear()
        if count and self._on_free is not None:
            self._on_free()

    async def wait_free(self) -> None:
        """Until a slot is free."""
        if self.used < self.limit:
            return
        watcher = asyncio.get_running_loop().create_future()
        self._watchers.append(watcher)
        await watcher


# ---------------------------------------------------------------------------- the waker


class Waker:
    """A runtime's parked workflows: their deadlines on one timer, their wakes.

    Memory per parked workflow: a heap entry ``(deadline, id)`` and a dict entry (the ID
    string shared); none at all when no workflow is parked.
    """

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime
        self._clock = runtime.clock
        self._store: SignalStore | None = None
        self._heap: list[tuple[float, str]] = []
        self._parked: dict[str, tuple[float, str]] = {}  # id -> (deadline, signal name)
        self._timer: TimerHandle | None = None
        self._timer_at = float("inf")
        self._waking: set[str] = set()  # asked to wake, not yet running or let go
        self._queued: deque[str] = deque()  # of those, not yet claimed
        self._drainer: asyncio.Task[None] | None = None
        self._unparking: list[ParkedEntry] = []  # entries of woken workflows that ended
        self._unparker: asyncio.Task[None] | None = None
        self._by_claim: DueClaims | None = None  # a store that finds due ones itself
        self._due_loop: asyncio.Task[None] | None = None
        self._running: set[str] = set()  # woken and running here now
        self._tasks: set[asyncio.Task[Any]] = set()
        self._results: deque[WorkflowResult] = deque(maxlen=_RESULTS_KEPT)
        self._pollers: dict[str, asyncio.Task[None]] = {}
        self._notices: asyncio.Task[None] | None = None
        # A worker's slots (``serve``): woken runs count against its concurrency. Those
        # holding one, and which (a run outlives the worker that gave it its slot).
        self.slots: Slots | None = None
        self._slotted: dict[str, Slots] = {}
        self._for_slot: set[asyncio.Task[Any]] = set()  # woken runs waiting for one
        self.poll_seconds = 1.0
        self.closed = False
        self.started = False

    @property
    def signals(self) -> SignalStore | None:
        """The store's signals and parked index, once the waker has started; else None."""
        return self._store

    @property
    def parked_count(self) -> int:
        return len(self._parked)

    def use_slots(self, slots: Slots | None) -> None:
        """Count the runs woken from now on against ``slots`` (a worker's; None: no limit).
        On a store that finds due ones itself, only as many are claimed as slots are
        free; otherwise a woken run waits for a slot before it starts."""
        self.slots = slots

    def _give_slot(self, workflow_id: str) -> None:
        slots = self._slotted.pop(workflow_id, None)
        if slots is not None:
            slots.give()

    async def start(self) -> int:
        """Once per runtime, when it first runs a workflow (listing or signalling from a
        runtime wakes nothing): re-arm every parked workflow of the store; the due ones
        wake now. Returns how many were woken."""
        store = self._runtime.store
        if self.started or not self._runtime.persistence or not callable(
                getattr(store, "park", None)):
            return 0
        self.started = True
        self._store = signal_store(store)
        if getattr(store, "wakes_by_claim", False):
            # The store decides when its parked workflows are due, for every worker at
            # once (a database's clock, its NOTIFY): claim those due now, then whenever
            # it says more are; no timers of our own.
            self._by_claim = cast("DueClaims", store)
            woken = await self._claim_due_round()
            await self.sweep()
            self._due_loop = asyncio.get_running_loop().create_task(
                self._serve_due(self._by_claim), name="due-wakes")
            return woken
        woken = await self.rescan()
        await self.sweep()
        if getattr(store, "signals_from_other_processes", True):  # (the protocol says why)
            self._notices = asyncio.get_running_loop().create_task(
                self._watch_notices(), name="signal-notices")
        return woken

    async def rescan(self) -> int:
        """Read the store's parked index again: wake the due, arm the rest."""
        assert self._store is not None
        if self._by_claim is not None:
            return await self._claim_due_round()
        entries = await self._store.parked()
        now = self._clock.time()
        # Only those not yet due need their signal looked up to know whether to wake: a
        # due one wakes anyway, and the wake looks its signal up with the batch's
        # (``_signals_absent``). 10,000 due at a start: one lookup of all, not two.
        asking = [(w, name, index) for w, deadline, name, index in entries
                  if name and deadline > now]
        signalled = set(await self._store.signals_ready(asking)) if asking else set()
        woken = 0
        for workflow_id, deadline, name, _ in entries:
            if workflow_id in signalled or deadline <= now:
                woken += self.wake(workflow_id)
            else:
                self.push(workflow_id, deadline, name)
        return woken

    async def sweep(self) -> int:
        """Drop the signals, notices and parked entries of finished workflows (signals
        sent as a workflow ended, never taken, or left by a crash before their cleanup).
        Returns how many workflows' leftovers were dropped."""
        assert self._store is not None
        dropped = 0
        try:
            for workflow_id in await self._store.signalled():
                if (workflow_id in self._parked or workflow_id in self._waking
                        or self._runtime.live(workflow_id)):
                    continue
                try:
                    status = (await self._runtime.store.load(workflow_id)).state.get("status")
                except WorkflowError:
                    continue
                if status in TERMINAL:
                    await self._store.drop_signals(workflow_id, scan=True)
                    dropped += 1
        except OSError as error:
            logger.warning("Could not remove finished workflows' signals: %s", error)
        return dropped

    def push(self, workflow_id: str, deadline: float, name: str) -> None:
        if self._parked.get(workflow_id) == (deadline, name):
            return
        self._parked[workflow_id] = (deadline, name)
        heapq.heappush(self._heap, (deadline, workflow_id))
        if deadline < self._timer_at:
            self._arm()
        if name and name in _SOURCES and name not in self._pollers:
            self._pollers[name] = asyncio.get_running_loop().create_task(
                self._poll_source(_SOURCES[name]), name=f"signal-source-{name}")

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = float("inf")
        heap = self._heap
        while heap and self._parked.get(heap[0][1], (None,))[0] != heap[0][0]:
            heapq.heappop(heap)  # stale: woken, or parked again with another deadline
        if self._heap and not self.closed:
            self._timer_at = self._heap[0][0]
            self._timer = self._clock.call_later(self._timer_at - self._clock.time(),
                                                 self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = float("inf")
        self.wake_due_now()
        self._arm()

    def wake_due_now(self) -> int:
        """Wake every workflow whose deadline has passed; returns how many."""
        now = self._clock.time()
        woken = 0
        while self._heap and self._heap[0][0] <= now:
            deadline, workflow_id = heapq.heappop(self._heap)
            if self._parked.get(workflow_id, (None,))[0] == deadline:
                woken += self.wake(workflow_id)
        return woken

    def parked(self, run: WorkflowRun) -> None:
        """``run`` just parked here (its state is durable): arm its deadline, and wake it
        if its signal came while it was parking."""
        if self._by_claim is not None:  # the store knows its deadline: look again
            self._by_claim.poke_due()
            return
        wait = run.wait or {}
        name = str(wait.get("signal") or "")
        self.push(run.workflow_id, float(wait["deadline"]), name)
        if name and self._store is not None:
            self._spawn(self._check_signal(run.workflow_id, name, int(wait.get("index", 0))))

    async def _check_signal(self, workflow_id: str, name: str, index: int) -> None:
        assert self._store is not None
        if await self._store.signals_ready([(workflow_id, name, index)]):
            self.wake(workflow_id)

    def wake(self, workflow_id: str) -> int:
        """Try to run a parked workflow now (it runs only if its wait is over). Wakes asked
        for in one loop iteration are handled together (``_drain``)."""
        if (not self.started or self.closed or workflow_id in self._waking
                or workflow_id in self._running or self._runtime.live(workflow_id)):
            return 0
        if self._by_claim is not None:  # the store finds it due, for whichever worker
            self._by_claim.poke_due()
            return 0
        self._waking.add(workflow_id)
        self._queued.append(workflow_id)
        if self._drainer is None:
            self._drainer = self._spawn(self._drain())
        return 1

    def _spawn(self, coroutine: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _drain(self) -> None:
        """Wake the queued workflows together: claims ``_WAKE_BATCH`` per call, one read of
        all their states, at most one look for their signals, instead of a claim, a load
        and an unpark each (20,007 thread hops for 10,000 due, the loop mostly waiting for
        them). What is queued meanwhile goes in the next round."""
        try:
            await asyncio.sleep(0)  # the wakes asked for in this loop iteration go together
            while self._queued and not self.closed:
                batch = list(self._queued)
                self._queued.clear()
                try:
                    await self._wake_batch(batch)
                except (WorkflowError, OSError) as error:
                    logger.error("Could not wake %d parked workflow(s): %s", len(batch), error)
                    self._waking.difference_update(batch)
        finally:
            self._drainer = None  # no await since the last look at the queue
            if self.closed:
                self._waking.difference_update(self._queued)
                self._queued.clear()

    async def _wake_batch(self, batch: list[str]) -> None:
        runtime = self._runtime
        store = self._store
        assert store is not None
        claimed: dict[str, Claim] = {}
        try:
            for start in range(0, len(batch), _WAKE_BATCH):
                if start:
                    await asyncio.sleep(0)  # a file store's claims: system calls on the loop
                claims, refused = await runtime.store.claim_many(
                    batch[start:start + _WAKE_BATCH])
                for workflow_id in refused:  # another process runs it: its wait is theirs
                    self._waking.discard(workflow_id)
                    self._parked.pop(workflow_id, None)
                claimed.update((claim.workflow_id, claim) for claim in claims)
        except BaseException:
            for claim in claimed.values():
                claim.release()
            raise
        claims = list(claimed.values())
        # One read for the whole round, not one per chunk: with chunks, the stages after
        # the wait of the chunks woken first took turns before the last chunk's waiting
        # stages, and every stage started again later (measured: 10,000 in process
        # 3.8-4.3 s against 2.2 s; at the next start 3.7-4.8 s against 1.7-2.6 s).
        try:
            loaded = await store.load_many(list(claimed))
        except BaseException:
            for claim in claims:
                claim.release()
            self._waking.difference_update(claimed)
            raise
        await self._start_loaded(claimed, loaded, due_by_store=False)

    async def _start_loaded(self, claimed: dict[str, Claim],
                            loaded: Mapping[str, LoadedState | WorkflowError], *,
                            due_by_store: bool) -> int:
        """Run those of the claimed workflows that still wait and are due (all that still
        wait, with ``due_by_store``); let the others go. Returns how many started."""
        store = self._store
        runtime = self._runtime
        assert store is not None
        now = self._clock.time()
        started = 0
        due: list[tuple[Claim, LoadedState, ParkedEntry]] = []
        asking: list[tuple[Claim, LoadedState, ParkedEntry]] = []
        finished: list[str] = []
        for workflow_id, claim in claimed.items():
            found = loaded.get(workflow_id)
            if not isinstance(found, LoadedState):
                self._let_go(claim)
                logger.error("Could not wake %s: %s", workflow_id, found)
                continue
            wait = found.state.get("wait") or {}
            if found.state.get("status") != WAITING or not wait:
                self._let_go(claim)
                self._parked.pop(workflow_id, None)
                if found.state.get("status") in TERMINAL:  # an entry a crash left behind
                    finished.append(workflow_id)
                continue
            entry: ParkedEntry = (workflow_id, float(wait["deadline"]),
                                  str(wait.get("signal") or ""), int(wait.get("index", 0)))
            if entry[1] <= now or due_by_store:
                due.append((claim, found, entry))
            elif entry[2]:
                asking.append((claim, found, entry))
            else:
                self._let_go(claim)
                self.push(workflow_id, entry[1], entry[2])
        if asking:
            try:
                ready = set(await store.signals_ready([(e[0], e[2], e[3])
                                                       for _, _, e in asking]))
            except BaseException:
                for claim, _, _ in asking:
                    self._let_go(claim)
                for claim, _, _ in due:
                    self._let_go(claim)
                raise
            for claim, found, entry in asking:
                if entry[0] in ready:
                    due.append((claim, found, entry))
                else:
                    self._let_go(claim)
                    self.push(entry[0], entry[1], entry[2])
        absent = await self._signals_absent(due, now) if not due_by_store else set()
        known: dict[Any, Any] = {}  # definitions and resume points, found once per batch
        for position, (claim, found, entry) in enumerate(due):
            if position and not position % _PREPARE_CHUNK:
                await asyncio.sleep(0)  # thousands prepared at once would hold the loop
                if self.closed:  # closing meanwhile: the rest stay parked
                    for rest in due[position:]:
                        self._let_go(rest[0])
                    break
            self._parked.pop(entry[0], None)
            try:
                prepared = runtime.prepare_resume(found, known)
            except WorkflowError as error:
                self._let_go(claim)
                logger.error("Could not wake %s: %s", entry[0], error)
                continue
            if not isinstance(prepared, tuple):
                self._let_go(claim)
                continue
            if entry[0] in absent:
                prepared[1].signals_absent = {(entry[2], entry[3])}
            if due_by_store:
                # Due on the store's clock, or signalled (its stage then reads the signal
                # before it looks at the deadline): never parked again for this clock's lag.
                prepared[1].deadline_passed = entry[1]
            self._waking.discard(entry[0])
            self._running.add(entry[0])
            self._spawn(self._run_woken(prepared, claim, entry))
            started += 1
        for workflow_id in finished:
            with contextlib.suppress(OSError):  # the next start tries again
                await store.drop_signals(workflow_id, scan=True)
        return started

    async def _signals_absent(self, due: list[tuple[Claim, LoadedState, ParkedEntry]],
                              now: float) -> set[str]:
        """Those of the due signal waits whose deadline had passed at ``now`` and whose
        signal is not stored: one lookup for all (a file store's is one thread hop, where
        each woken stage reading its own would be one each). A failed lookup tells
        nothing: each stage then reads its own."""
        store = self._store
        assert store is not None
        late = [(e[0], e[2], e[3]) for _, _, e in due if e[2] and e[1] <= now]
        if not late:
            return set()
        try:
            ready = set(await store.signals_ready(late))
        except Exception as error:  # an optimisation only: never a reason to fail
            logger.debug("Signal lookup for %d woken workflows failed: %s", len(late), error)
            return set()
        return {workflow_id for workflow_id, _, _ in late if workflow_id not in ready}

    async def _claim_due_round(self) -> int:
        """Claim the workflows the store says are due, and run them; how many started."""
        assert self._by_claim is not None
        slots = self.slots
        # A worker's free slots bound the claim: a claim held while waiting for a slot
        # would keep the workflow from another worker that has one.
        limit = slots.take(_WAKE_BATCH) if slots is not None else _WAKE_BATCH
        if not limit:
            return 0
        try:
            claimed = await self._by_claim.claim_due(limit)
        except BaseException:
            if slots is not None:
                slots.give(limit)
            raise
        if slots is not None:
            slots.give(limit - len(claimed))
            for claim, _ in claimed:  # each held until its run ends or it is let go
                self._slotted[claim.workflow_id] = slots
        return await self._start_loaded({c.workflow_id: c for c, _ in claimed},
                                         {c.workflow_id: found for c, found in claimed},
                                         due_by_store=True)

    async def _serve_due(self, store: DueClaims) -> None:
        """Wake what the store finds due, whenever it says more may be (a signal from any
        host, the next deadline on its clock, a poll); backs off while it is unreachable."""
        backoff = _RETRY_FIRST
        while not self.closed:
            try:
                if await self._claim_due_round() >= _WAKE_BATCH:
                    continue  # more may be due already
                slots = self.slots
                if slots is not None and slots.free <= 0:
                    # Every slot of the worker is taken: nothing due can run before one
                    # frees (a woken run's or the worker's own; polled as a bound).
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(slots.wait_free(), store.poll_interval)
                    continue
                await store.wait_for_due(store.poll_interval)
                backoff = _RETRY_FIRST
            except Exception as error:
                if not store.unreachable(error):
                    logger.warning("Could not wake due workflows: %s", error)
                await store.clock.sleep(backoff * random.uniform(0.5, 1.0))
                backoff = min(backoff * 2, _RETRY_MAX)

    def _let_go(self, claim: Claim) -> None:
        claim.release()
        self._waking.discard(claim.workflow_id)
        self._give_slot(claim.workflow_id)

    async def _run_woken(self, prepared: tuple[DefinitionLike, WorkflowRun, str], claim: Claim,
                         entry: ParkedEntry) -> None:
        definition, run, at = prepared
        try:
            slots = self.slots
            if slots is not None and entry[0] not in self._slotted:
                # A worker's: it waits for a slot like a claimed one (a file store's
                # claim is this host's lock, held meanwhile).
                task = asyncio.current_task()
                assert task is not None
                self._for_slot.add(task)
                try:
                    await slots.acquire()
                except BaseException:  # closing: it stays parked, woken again next time
                    claim.release()
                    raise
                finally:
                    self._for_slot.discard(task)
                self._slotted[entry[0]] = slots
                if self.closed:
                    claim.release()
                    return
            self._results.append(await self._runtime.execute_prepared(definition, run, at,
                                                                      claim=claim))
            # Its entry goes only now that a state which no longer waits on it is durable
            # (the final save is awaited): a crash before this wakes it again, never
            # leaves it waiting unindexed (docs/architecture.md, invariant 11). Parked
            # again on the very same entry: kept.
            again = run.wait or {}
            if run.status != WAITING or (float(again.get("deadline", -1)), str(
                    again.get("signal") or ""), int(again.get("index", 0))) != entry[1:]:
                self._unparking.append(entry)
            notify = getattr(self._runtime.store, "notify_result", None)
            if notify is not None and run.status in TERMINAL:
                with contextlib.suppress(Exception):  # waiters poll too
                    await notify(entry[0])  # ``rt.result`` anywhere hears of the end
        except WorkflowError as error:  # its entry stays: the next wake reads its state
            logger.error("Woken workflow %s failed: %s", entry[0], error)
        finally:
            self._running.discard(entry[0])
            self._give_slot(entry[0])
            # Entries are dropped together: when no woken workflow runs any more, or a
            # batch's worth is waiting (one thread hop for many on a file store).
            if self._unparking and self._unparker is None and (
                    not self._running or len(self._unparking) >= _WAKE_BATCH or self.closed):
                self._unparker = self._spawn(self._unpark_pending())

    async def _unpark_pending(self) -> None:
        assert self._store is not None
        try:
            while self._unparking:
                entries = list(self._unparking)
                self._unparking.clear()
                try:
                    await self._store.unpark_many(entries)
                except OSError as error:  # a stale entry costs one wake that finds nothing
                    logger.warning("Could not drop %d parked entries: %s", len(entries), error)
        finally:
            self._unparker = None

    async def _watch_notices(self) -> None:
        """Signals sent by other processes (``workflow-manager signal``): wake their
        workflows. One directory scan per ``poll_seconds`` on the runtime's clock."""
        assert self._store is not None
        while True:
            await self._clock.sleep(self.poll_seconds)
            try:
                for workflow_id, _ in await self._store.signal_notices():
                    self.wake(workflow_id)
            except OSError as error:
                logger.warning("Could not read signal notices: %s", error)

    async def _poll_source(self, source: SignalSource) -> None:
        try:
            while not self.closed:
                await self._clock.sleep(source.interval_seconds)
                ids = [w for w, (_, name) in self._parked.items() if name == source.name]
                if not ids:
                    return
                try:
                    await source.poll(self._runtime, ids)
                except Exception as error:  # a source's failure never stops the runtime
                    logger.warning("Signal source %s failed: %s", source.name, error)
        finally:
            self._pollers.pop(source.name, None)

    async def settle(self) -> list[WorkflowResult]:
        """Wait until no woken workflow is running; their results since the last call."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        results = list(self._results)
        self._results.clear()
        return results

    async def close(self) -> None:
        self.closed = True
        if self._due_loop is not None:
            self._due_loop.cancel()
            await asyncio.gather(self._due_loop, return_exceptions=True)
            self._due_loop = None
        if self._by_claim is not None:
            await self._by_claim.stop_waiting_for_due()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        side = [t for t in (self._notices, *self._pollers.values()) if t is not None]
        for task in side:
            task.cancel()
        await asyncio.gather(*side, return_exceptions=True)
        for task in self._for_slot:  # not started yet: they stay parked
            task.cancel()
        for workflow_id in list(self._running):  # stopped at a safe point, resumable
            live = self._runtime.live(workflow_id)
            if live is not None:
                live.stop("shutdown")
        while self._tasks:  # a run that ends may start the drop of the entries
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        if self._unparking and self._store is not None:
            await self._unpark_pending()
        self._heap.clear()
        self._parked.clear()
