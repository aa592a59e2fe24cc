"""Many event loops on one store: ``batch --processes N`` and ``worker --processes N``.

One process runs one event loop, so it uses one core. With ``--processes N`` the command
becomes a parent that starts N children (``python -m reliability._processes``, each a
fresh interpreter: no fork of a process with a running loop), each with its own runtime,
store client and writer, and hands them work:

- **batch**: the parent registers every prompt's workflow (``pending``, durable) and
  closes its store, so every state file is on disk before a child writes a newer one;
  then it deals the workflows out, a few at a time, to whichever child has room. Each
  workflow goes to one child only, and that child runs it under its claim
  (docs/architecture.md, invariant 9). Children send back each workflow's report row and,
  four times a second, their progress; the parent shows one progress display and writes
  one summary and report.
- **worker, file store**: the same dealing, from the store's ``pending`` workflows, read
  by the parent every 0.2 s. The parent remembers what it dealt: a state file may still
  say ``pending`` for a while after a child finished it (another writer's journal holds
  the newer state until it writes the file), and such a workflow must not run twice.
- **worker, PostgreSQL**: each child is a worker of its own (own pool, lease and
  heartbeat) that claims from the queue with ``SKIP LOCKED``; the parent only supervises.

Stopping: the parent's SIGINT/SIGTERM is forwarded once to every child (to one still
starting, as soon as it says it is ready to receive it). Children live in process groups
of their own, so a terminal's Ctrl-C reaches them only through the parent, once. Each
child stops its workflows at their next stage boundary (``interrupted``, checkpointed),
closes its store and exits 130; then the parent exits 130. A child whose parent dies
(its input pipe ends) stops the same way. ``resume --all`` finishes everything.

The channel: the child's stdin and stdout carry length-prefixed pickles (the child points
its own ``sys.stdout`` at stderr, so nothing a handler prints can corrupt it).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import pickle
import signal
import struct
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._batch import BatchItem, BatchSnapshot, BatchTracker
from ._clock import SystemClock
from ._config import WorkflowConfiguration
from ._errors import WorkflowLockedError
from ._logging import logger
from ._store import LoadedState

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["BatchProgress", "ChildSpec", "Family", "default_worker_processes",
           "run_batch_processes", "serve_processes", "split_concurrency"]

_HEADER = struct.Struct("!I")
_PROGRESS_SECONDS = 0.25  # how often a batch child reports its progress
_FILE_POLL = 0.2  # seconds between the parent's looks at the file store's pending ones


def default_worker_processes() -> int:
    """``worker``'s default: one process per CPU this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True, slots=True)
class ChildSpec:
    """What one child runs: sent to it as the first message."""

    mode: str  # "run": workflows the parent deals it; "serve": a PostgreSQL worker
    index: int
    project_root: str
    config: WorkflowConfiguration
    concurrency: int
    console_level: str
    progress: bool = False  # send progress snapshots (a batch with a live display)
    queue: str = "default"
    exit_when_idle: bool = False
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None


# --------------------------------------------------------------------------- framing


def _frame(message: object) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(body)) + body


async def _read_frame(reader: asyncio.StreamReader) -> Any:
    """The next message, or None at the end of the stream."""
    try:
        header = await reader.readexactly(_HEADER.size)
        (size,) = _HEADER.unpack(header)
        return pickle.loads(await reader.readexactly(size))
    except asyncio.IncompleteReadError:
        return None


# --------------------------------------------------------------------------- parent


@dataclass(slots=True)
class _Child:
    spec: ChildSpec
    process: asyncio.subprocess.Process
    ready: bool = False
    signalled: bool = False
    ended: bool = False  # told that no more work comes
    # Dealt, no row back yet: ID -> what was dealt (dealt again if it dies before starting).
    outstanding: dict[str, tuple[str, str | None, dict[str, Any]]] = field(
        default_factory=dict)
    started: set[str] = field(default_factory=set)
    snapshot: BatchSnapshot | None = None
    summary: dict[str, Any] | None = None
    returncode: int | None = None


class Family:
    """The parent's side: N children, the work dealt to them, what they sent back.

    ``install_signals`` makes SIGINT/SIGTERM call ``stop``: the first one is forwarded to
    every child, once; later ones are ignored (each child is stopping already)."""

    def __init__(self, specs: list[ChildSpec], *, keep_rows: bool = True) -> None:
        """``keep_rows``: keep every workflow's report row (a batch's summary); a worker
        that runs for months does not."""
        self.specs = specs
        self.children: list[_Child] = []
        self.rows: dict[str, dict[str, Any]] = {}
        self._keep_rows = keep_rows
        self.stop_signal: int | None = None
        # Also called by stop(): e.g. the runtime registering the batch before children start.
        self.on_stop: list[Callable[[], None]] = []
        self._backlog: deque[tuple[str, str | None, dict[str, Any]]] = deque()
        self._closed = False  # no more work will be added
        self._changed = asyncio.Event()
        self._readers: list[asyncio.Task[None]] = []
        self.clock = SystemClock()
        self.last_row_at: float | None = None  # when the latest workflow's row came

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start every child (they say ``ready`` on their own time)."""
        environment = _child_environment()
        for spec in self.specs:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "reliability._processes",
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                env=environment,
                # Its own process group: a terminal's Ctrl-C reaches it through us, once.
                process_group=0)
            child = _Child(spec, process)
            self.children.append(child)
            assert process.stdin is not None
            process.stdin.write(_frame(spec))
            self._readers.append(asyncio.ensure_future(self._read(child)))

    def install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self.stop, signum)

    def stop(self, signum: int = signal.SIGINT) -> None:
        """Stop every child at its workflows' next stage boundary; deal out no more."""
        if self.stop_signal is not None:
            return  # forwarded once already
        self.stop_signal = signum
        logger.warning("Received %s: stopping %d processes; their workflows stay "
                       "resumable", signal.Signals(signum).name, len(self.specs))
        self._backlog.clear()
        for child in self.children:
            self._forward(child)
        for also in self.on_stop:
            also()
        self._deal()  # "end" to every ready child: it exits once its workflows stopped
        self._changed.set()

    @property
    def stopping(self) -> bool:
        return self.stop_signal is not None

    def _forward(self, child: _Child) -> None:
        if self.stop_signal is None or not child.ready or child.signalled:
            return
        child.signalled = True
        if child.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                child.process.send_signal(self.stop_signal)

    async def wait(self) -> list[int]:
        """Until every child has exited; their exit codes."""
        for reader in self._readers:
            await reader
        codes = []
        for child in self.children:
            child.returncode = await child.process.wait()
            codes.append(child.returncode)
        return codes

    async def kill(self) -> None:
        """Kill children still running (the parent is failing) and reap them."""
        for child in self.children:
            if child.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    child.process.kill()
        for child in self.children:
            await child.process.wait()
        for reader in self._readers:
            reader.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)

    async def wait_ready(self) -> None:
        """Until every child is ready, or has exited."""
        while not all(child.ready or child.returncode is not None
                      or child.process.returncode is not None for child in self.children):
            self._changed.clear()
            await self._changed.wait()

    # ------------------------------------------------------------------ messages

    async def _read(self, child: _Child) -> None:
        assert child.process.stdout is not None
        while True:
            message = await _read_frame(child.process.stdout)
            if message is None:
                break
            self._received(child, message)
        child.returncode = await child.process.wait()
        self._orphaned(child)
        self._changed.set()

    def _orphaned(self, child: _Child) -> None:
        """A child that ended holding dealt workflows it never started: deal them again.
        Those it started stay where it left them (``running`` or ``interrupted``) for
        ``resume --all``. Its "started" message for one is in the pipe before any of that
        workflow's stages can complete (a completion waits for the writer), so a workflow
        not reported started has no completed stage and its dealt state is still current."""
        unstarted = [work for workflow_id, work in child.outstanding.items()
                     if workflow_id not in child.started]
        for workflow_id, *_ in unstarted:
            del child.outstanding[workflow_id]
        if unstarted and not self.stopping:
            if child.returncode not in (0, 130):
                logger.warning("Process %d ended (status %s) before starting %d "
                               "workflow(s); dealing them to the others",
                               child.process.pid, child.returncode, len(unstarted))
            self._backlog.extendleft(reversed(unstarted))
            self._deal()

    def _received(self, child: _Child, message: dict[str, Any]) -> None:
        kind = message["kind"]
        if kind == "ready":
            child.ready = True
            self._forward(child)  # a stop that came while it was starting
            self._deal()
        elif kind == "started":
            child.started.update(message["ids"])
        elif kind == "rows":
            self.last_row_at = self.clock.monotonic()
            for row in message["rows"]:
                child.outstanding.pop(row["workflow_id"], None)
                child.started.discard(row["workflow_id"])  # only unreported ones matter
                if self._keep_rows:
                    self.rows[row["workflow_id"]] = row
            self._deal()
        elif kind == "snapshot":
            child.snapshot = message["snapshot"]
        elif kind == "done":
            child.summary = message["summary"]
        self._changed.set()

    # ------------------------------------------------------------------ dealing work

    def add_work(self, work: Iterable[tuple[str, str | None, dict[str, Any]]]) -> None:
        """Workflows to deal out: (ID, prompt or None, its stored state)."""
        if self.stopping:
            return
        self._backlog.extend(work)
        self._deal()

    def close_work(self) -> None:
        """No more work comes: each child exits once it has run what it was dealt."""
        self._closed = True
        self._deal()

    @property
    def idle(self) -> bool:
        """Nothing waits to be dealt and no living child holds a dealt workflow."""
        return not self._backlog and not any(child.outstanding for child in self.children
                                             if child.returncode is None)


    def _deal(self) -> None:
        # Every child is first given up to its concurrency; then, once no child is still
        # starting, up to twice that: its next workflows are there when a slot frees,
        # without a round trip to the parent. (Twice at once let the first child ready
        # take a whole batch of up to twice a share: with --concurrency as large as the
        # batch, the second process ran nothing.)
        takers = [child for child in self.children
                  if child.ready and not child.ended and child.returncode is None
                  and child.process.returncode is None]  # not starting, ended or gone
        starting = any(not child.ready and child.returncode is None
                       and child.process.returncode is None for child in self.children)
        batches: dict[int, list[tuple[str, str | None, dict[str, Any]]]] = {}
        for share in (1,) if starting else (1, 2):
            for index, child in enumerate(takers):
                batch = batches.setdefault(index, [])
                room = share * child.spec.concurrency - len(child.outstanding) - len(batch)
                batch += [self._backlog.popleft()
                          for _ in range(min(max(room, 0), len(self._backlog)))]
        for index, batch in batches.items():
            if batch:
                child = takers[index]
                child.outstanding.update((work[0], work) for work in batch)
                self._send(child, {"kind": "work", "work": batch})
        # "end" once nothing is left anywhere: a child that dies may leave workflows to
        # deal again, and a child told "end" takes no more.
        if self.stopping or (self._closed and self.idle):
            for child in self.children:
                if child.ready and not child.ended and child.returncode is None:
                    child.ended = True
                    self._send(child, {"kind": "end"})

    def _send(self, child: _Child, message: dict[str, Any]) -> None:
        stdin = child.process.stdin
        if stdin is None or stdin.is_closing():
            return
        try:
            stdin.write(_frame(message))
        except (BrokenPipeError, ConnectionResetError):  # it died; its reader sees that
            return
        if message["kind"] == "end":
            stdin.close()

    # ------------------------------------------------------------------ progress

    def snapshot(self, total: int) -> BatchSnapshot:
        """Every child's latest progress, merged, with the rows received so far."""
        by_status = Counter(row["status"] for row in self.rows.values())
        stages: Counter[str] = Counter()
        running = retrying = held = 0
        for child in self.children:
            shot = child.snapshot
            if shot is None or child.returncode is not None:
                continue
            running += shot.running
            retrying += shot.retrying
            held += shot.held
            stages.update(shot.stages)
        return BatchSnapshot(total=total, finished=len(self.rows), by_status=dict(by_status),
                             running=running, retrying=retrying, held=held,
                             stages=dict(stages.most_common()), stopping=self.stopping)

    def missing_row(self, workflow_id: str, prompt: str | None) -> dict[str, Any]:
        """The report row of a workflow no child reported on: never started (still
        ``pending``), or started by a child that ended without saying how it went."""
        for child in self.children:
            if workflow_id in child.started:
                row = BatchItem(Path(prompt or "-"), workflow_id).to_dict()
                row["status"] = "interrupted"
                row["error"] = (f"its process {child.process.pid} ended (status "
                                f"{child.returncode}) before reporting it; "
                                "resume --all continues it")
                return row
        return BatchItem(Path(prompt or "-"), workflow_id).to_dict()


def _child_environment() -> dict[str, str]:
    """This environment, with this process's import path: a child finds every module
    (this package, the workflow definitions) the way this process did."""
    environment = dict(os.environ)
    paths = [path or os.getcwd() for path in sys.path]
    if environment.get("PYTHONPATH"):
        paths.append(environment["PYTHONPATH"])
    environment["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return environment


def split_concurrency(total: int, processes: int) -> int:
    """A batch's ``--concurrency`` bounds the whole batch: each process's share."""
    return max(1, math.ceil(total / processes))


class BatchProgress:
    """A ``BatchDisplay`` source over a family of children (see ``BatchTracker``)."""

    def __init__(self, family: Family, total: int) -> None:
        self.family = family
        self.total = total

    def snapshot(self) -> BatchSnapshot:
        return self.family.snapshot(self.total)

    async def pause(self, seconds: float) -> None:
        await self.family.clock.sleep(seconds)


async def run_batch_processes(family: Family, work: list[tuple[str, str, dict[str, Any]]],
                              console: Console | None
                              ) -> tuple[dict[str, dict[str, Any]], float, float]:
    """Run a registered batch's workflows in ``family``'s children; the rows by workflow ID,
    the seconds from the first dealing to the last workflow's end (the children's
    start-up and their stores' closing excluded, as in one process), and the CPU seconds
    the children's processes (not their writers) spent meanwhile."""
    from ._batch import BatchDisplay
    await family.start()
    try:
        await family.wait_ready()
        started = family.clock.monotonic()
        family.add_work(work)
        family.close_work()
        if console is None:
            await family.wait()
        else:
            with BatchDisplay(console, BatchProgress(family, len(work))) as display:
                follower = asyncio.ensure_future(display.follow())
                try:
                    await family.wait()
                finally:
                    follower.cancel()
                    await asyncio.gather(follower, return_exceptions=True)
        ended = family.last_row_at if family.last_row_at is not None else started
        cpu = sum(float((child.summary or {}).get("cpu_seconds", 0.0))
                  for child in family.children)
        return family.rows, ended - started, cpu
    except BaseException:
        await family.kill()
        raise


async def serve_processes(family: Family, *, state_directory: Path | None,
                          checkpoint_directory: Path | None, exit_when_idle: bool) -> None:
    """Supervise a family of workers until they exit. With the file store
    (``state_directory`` given) the parent deals the store's pending workflows to them."""
    await family.start()
    try:
        await family.wait_ready()
        if state_directory is None or checkpoint_directory is None:
            await family.wait()
            return
        await _deal_pending(family, state_directory, checkpoint_directory, exit_when_idle)
        await family.wait()
    except BaseException:
        await family.kill()
        raise


async def _deal_pending(family: Family, state_directory: Path, checkpoint_directory: Path,
                        exit_when_idle: bool) -> None:
    from ._store._reads import list_stored
    dealt: set[str] = set()  # never dealt twice: see the module's docstring
    wanted = frozenset({"pending"})
    while not family.stopping and any(child.returncode is None
                                      for child in family.children):
        listed = await asyncio.to_thread(list_stored, state_directory, checkpoint_directory,
                                         wanted)
        pending = {loaded.state["workflow_id"] for loaded in listed}
        # One no longer listed as pending has a newer state file: it never reads pending
        # again, so forgetting it keeps this set as small as the pending ones.
        dealt &= pending
        fresh = [loaded.state for loaded in listed
                 if loaded.state["workflow_id"] not in dealt]
        fresh.sort(key=lambda state: float(state.get("created_at") or 0))
        dealt.update(state["workflow_id"] for state in fresh)
        family.add_work((state["workflow_id"], None, state) for state in fresh)
        if exit_when_idle and not fresh and family.idle:
            break
        await family.clock.sleep(_FILE_POLL)
    family.close_work()


# --------------------------------------------------------------------------- child


class _Channel:
    """The child's end: messages from the parent on stdin, to it on the saved stdout."""

    def __init__(self, reader: asyncio.StreamReader, out: int) -> None:
        self.reader = reader
        self._out = out
        self._pending: list[bytes] = []
        self._scheduled = False
        self.started: list[str] = []
        self.rows: list[dict[str, Any]] = []

    def send(self, message: dict[str, Any]) -> None:
        self._pending.append(_frame(message))
        self._schedule()

    def started_one(self, workflow_id: str) -> None:
        self.started.append(workflow_id)
        self._schedule()

    def row(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self._schedule()

    def _schedule(self) -> None:
        # Once per loop iteration: thousands of workflows ending together are one write.
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        if self.started:
            self._pending.append(_frame({"kind": "started", "ids": self.started}))
            self.started = []
        if self.rows:
            self._pending.append(_frame({"kind": "rows", "rows": self.rows}))
            self.rows = []
        if not self._pending:
            return
        data = b"".join(self._pending)
        self._pending = []
        try:
            # Blocking, and short: the parent reads all the time, and a message is a few
            # hundred bytes per workflow once per loop iteration.
            view = memoryview(data)
            while view:
                written = os.write(self._out, view)
                view = view[written:]
        except BrokenPipeError:
            pass  # the parent is gone: its end of stdin tells the loop too


async def _child(spec: ChildSpec, channel: _Channel) -> int:
    from ._cli import metrics_options, observed, open_runtime
    arguments = metrics_options().parse_args([])
    arguments.metrics_host = spec.metrics_host
    arguments.metrics_port = spec.metrics_port
    root = Path(spec.project_root)
    async with open_runtime(spec.config, root, console_level=spec.console_level,
                        handle_signals=True) as runtime, observed(runtime, arguments):
        channel.send({"kind": "ready", "pid": os.getpid()})
        channel.flush()
        if spec.mode == "serve":
            watcher = asyncio.ensure_future(_watch_parent(runtime, channel))
            try:
                count = await runtime.serve(concurrency=spec.concurrency, queue=spec.queue,
                                            exit_when_idle=spec.exit_when_idle)
            finally:
                watcher.cancel()
                await asyncio.gather(watcher, return_exceptions=True)
            summary = {"workflows_run": count, "interrupted": runtime.shutting_down}
        else:
            summary = await _run_dealt(runtime, spec, channel)
        channel.send({"kind": "done", "summary": summary})
        channel.flush()
        interrupted = runtime.shutting_down
    return 130 if interrupted else 0


async def _watch_parent(runtime: Any, channel: _Channel) -> None:
    """A worker's parent deals it nothing; its input ending without an ``end`` means the
    parent is gone: stop like a Ctrl-C."""
    while True:
        message = await _read_frame(channel.reader)
        if message is None:
            _parent_gone(runtime)
            return
        if message["kind"] == "end":
            return


def _parent_gone(runtime: Any) -> None:
    if not runtime.shutting_down:
        logger.warning("The parent process went away: stopping workflows")
        runtime.request_shutdown()


async def _run_one_dealt(runtime: Any, workflow_id: str, state: dict[str, Any]
                         ) -> tuple[Any, bool]:
    """Run a dealt workflow from its state as read under this process's claim: its result,
    and whether it ran here (False: it had ended meanwhile).

    The parent read ``state`` before anyone claimed it: another command on the same store
    may have run the workflow since and given its claim back, so the decision to run rests
    on a read made under the claim (docs/architecture.md, invariant 12). Raises
    WorkflowLockedError while another process holds the claim."""
    from ._cluster import load_claimed
    from ._runtime import WorkflowResult
    claim = await runtime.store.claim(workflow_id) if runtime.persistence else None
    loaded: LoadedState | Exception = LoadedState(state, "dealt by the parent")
    try:
        if claim is not None:
            loaded = (await load_claimed(runtime.store, [workflow_id])).get(
                workflow_id, LookupError(f"{workflow_id} is no longer in the store"))
        if isinstance(loaded, Exception):
            raise loaded
        prepared = runtime.prepare_resume(loaded)
    except BaseException:
        if claim is not None:
            claim.release()
        raise
    if isinstance(prepared, WorkflowResult):
        if claim is not None:
            claim.release()
        return prepared, False
    return await runtime.execute_prepared(*prepared, claim=claim), True


async def _run_dealt(runtime: Any, spec: ChildSpec, channel: _Channel) -> dict[str, Any]:
    """Run every workflow the parent deals, ``spec.concurrency`` at once, until it says
    ``end`` (or goes away) and they have all ended."""
    limit = asyncio.Semaphore(spec.concurrency)
    tasks: set[asyncio.Task[None]] = set()
    tracker = BatchTracker(runtime, 0)
    if spec.progress:
        runtime.add_listener(tracker, events=("held", "started", "finished"))
    ran = 0

    async def one(workflow_id: str, prompt: str | None, state: dict[str, Any]) -> None:
        nonlocal ran
        item = BatchItem(Path(prompt or "-"), workflow_id)
        async with limit:
            if runtime.shutting_down:
                return  # stays pending: resume --all starts it (no row: "not started")
            item.started = True
            channel.started_one(workflow_id)
            began = runtime.clock.monotonic()
            try:
                item.result, executed = await _run_one_dealt(runtime, workflow_id, state)
                ran += executed
            except WorkflowLockedError:
                # Another command on this store runs it: reported as not started here (the
                # parent still hears of it, or it would wait for it).
                item.started = False
            except Exception as error:  # one bad workflow must not stop the others
                item.error = f"{type(error).__name__}: {error}"
                logger.error("Workflow %s could not run: %s", workflow_id, item.error)
            finally:
                item.duration = runtime.clock.monotonic() - began
        channel.row(item.to_dict())

    async def progress() -> None:
        while True:
            channel.send({"kind": "snapshot", "snapshot": tracker.snapshot()})
            await runtime.clock.sleep(_PROGRESS_SECONDS)

    reporter = asyncio.ensure_future(progress()) if spec.progress else None
    await runtime.waker.start()  # a runtime that runs workflows wakes parked ones
    cpu_at: float | None = None  # CPU time at the first work: the run's, for benchmarks
    try:
        while True:
            message = await _read_frame(channel.reader)
            if cpu_at is None:
                cpu_at = time.process_time()
            if message is None:  # the parent is gone: stop like a Ctrl-C
                _parent_gone(runtime)
                break
            if message["kind"] == "end":
                break
            for workflow_id, prompt, state in message["work"]:
                task = asyncio.ensure_future(one(workflow_id, prompt, state))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        while tasks:
            await asyncio.gather(*list(tasks), return_exceptions=True)
    finally:
        if reporter is not None:
            reporter.cancel()
            await asyncio.gather(reporter, return_exceptions=True)
        if spec.progress:
            channel.send({"kind": "snapshot", "snapshot": tracker.snapshot()})
        channel.flush()
    cpu = time.process_time() - cpu_at if cpu_at is not None else 0.0
    return {"workflows_run": ran, "interrupted": runtime.shutting_down, "cpu_seconds": cpu}


def _child_main() -> int:
    """``python -m reliability._processes``: one child, its spec the first message."""
    from ._logging import shutdown_logging
    from ._plugins import load_plugins
    # The channel keeps the real stdout; anything else printed goes to stderr.
    out = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    spec = pickle.loads(_read_spec())
    load_plugins()

    pipe = open(0, "rb", buffering=0, closefd=False)  # noqa: SIM115 (the loop owns it)

    async def main() -> int:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=1 << 24)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
        return await _child(spec, _Channel(reader, out))

    try:
        return asyncio.run(main())
    except KeyboardInterrupt:
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the work is done; as the CLI does
        shutdown_logging()


def _read_spec() -> bytes:
    """The first message, read blocking before the loop starts."""
    header = _read_exactly(_HEADER.size)
    (size,) = _HEADER.unpack(header)
    return _read_exactly(size)


def _read_exactly(size: int) -> bytes:
    # os.read, not sys.stdin: a buffered read could take the next messages too, which
    # the loop's reader would then never see.
    chunks = []
    while size:
        chunk = os.read(0, size)
        if not chunk:
            raise SystemExit("reliability._processes: no spec on stdin (started by hand?)")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


if __name__ == "__main__":
    sys.exit(_child_main())
