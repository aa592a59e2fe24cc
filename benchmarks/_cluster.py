"""Worker processes sharing one PostgreSQL server vs DBOS, same workload, same run.

``python -m benchmarks.cluster [--workers 1,2,4] [--workflows 2000] [--concurrency 250]
[--dbos-workflows 1000] [--dbos-mode async|sync] [--latency-at 0.5,0.75]
[--saturated-rate N] [--probe] [--json FILE]`` starts a throwaway server
(``tests/postgres_server.py``: fsync and synchronous_commit on; or uses
``WORKFLOW_TEST_POSTGRES_URL``) and, for each worker count, on a fresh database:

- submits N workflows of 19 no-op stages (``NOOP19``) in one transaction per 1,000;
- starts that many worker processes, each ``Runtime.serve(concurrency,
  exit_when_idle=True)`` as ``workflow-manager worker --exit-when-idle`` runs it (strict
  durability: each stage's completion committed before the next starts; health checks
  and monitoring off, as in the single-process throughput figure), and waits for all of
  them to exit;
- reports durable stage transitions/s over the database's own clock, from the first
  claim to the last workflow's final write (process start-up excluded; the wall time
  including it is reported too), and the group commits' p50/p99 pooled over the workers;
  with a superuser's URL also the server's side of a commit: the mean time in the
  ``workflow_commit`` statement and of a WAL sync (``track_functions``,
  ``track_wal_io_timing`` set on the run's database).

A commit's latency means something only where the worker is not saturated: at
saturation every workflow waits for a CPU and a lane, so its commits' latency is the
concurrency over the rate (Little's law), whatever the commit costs. ``--latency-at``
then runs one worker at each given fraction of the 1-worker saturated rate (this run's,
or ``--saturated-rate``), workflows queued at that rate while it runs (an open loop),
and reports the same figures with the share of the run its loop was on a CPU.
``--probe`` splits every commit in each worker (``CommitProbe``), lists the slowest 1 %
one by one, and reports the server's side: its counters, statements and log lines.

Then DBOS (``pip install 'dbos==3.4.*'``), through ``benchmarks._pgstore``'s DBOS run: N
workflows of 19 no-op steps on a database of its own on the same server. The URL reaches
every child on its environment or stdin, never on a command line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import gc
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from machines import StageContext, StageSpec, WorkflowDefinition

from ._pgstore import _admin, _fresh_database, _percentile, dbos_line, dbos_run, on_server

ROOT = Path(__file__).resolve().parent.parent


async def _noop(ctx: StageContext) -> None:
    return None


NOOP19 = WorkflowDefinition("noop19", [StageSpec(f"stage_{i:02d}", _noop) for i in range(19)])


def _config() -> Any:
    from reliability import load_configuration
    return load_configuration(enable_health_checks=False, enable_monitoring=False,
                              log_level="WARNING", durability="strict",
                              tune_interpreter=True)


class _Wire:
    """One lane connection's last write and last read, on the real clock: its transport's
    ``write`` and its protocol's ``data_received`` wrapped (asyncio's selector transport
    calls ``self._protocol.data_received``)."""

    def __init__(self, transport: Any) -> None:
        self.written = self.written_cpu = self.read = 0.0
        write, protocol = transport.write, transport._protocol
        wire = self

        def timed_write(data: Any) -> None:
            wire.written, wire.written_cpu = time.perf_counter(), time.thread_time()
            write(data)

        class Reader:
            def __getattr__(self, name: str) -> Any:
                return getattr(protocol, name)

            def data_received(self, data: bytes) -> None:
                wire.read = time.perf_counter()
                protocol.data_received(data)

        transport.write = timed_write
        transport._protocol = Reader()


class _Sample:
    """One sampled batch's times (perf_counter seconds) from its rows' saves to their
    waiters woken."""

    __slots__ = ("cpu", "ended", "probe", "read", "resolved_at", "resumed", "started", "taken",
                 "waits", "woken", "written")

    def __init__(self, probe: CommitProbe, waits: list[float]) -> None:
        self.probe = probe
        self.waits = waits
        self.taken, self.cpu = time.perf_counter(), time.thread_time()
        self.written = self.read = self.resumed = self.resolved_at = self.woken = 0.0
        self.started = self.ended = 0.0

    def replied(self, connection: Any, started: Any, ended: Any) -> None:
        self.resumed = time.perf_counter()
        wire = self.probe.wires.get(id(connection))
        if wire is not None:
            self.written, self.read = wire.written, wire.read
            self.cpu = wire.written_cpu - self.cpu
        # The server's clock is this host's wall clock: to perf_counter's.
        self.started = started.timestamp() - self.probe.offset
        self.ended = ended.timestamp() - self.probe.offset

    def resolved(self, waiters: list[tuple[str, asyncio.Future[None]]]) -> None:
        self.resolved_at = time.perf_counter()
        if waiters:
            # Runs in the loop's turn that also resumes the last waiter's task.
            waiters[-1][1].add_done_callback(self._woken)
        if self.written:
            self.probe.samples.append(self)

    def _woken(self, _: object) -> None:
        self.woken = time.perf_counter()


class CommitProbe:
    """Where a group commit's time goes, in a worker (``--probe``): every ``every``-th
    batch is timed from its rows' saves to their waiters woken, and the loop's turns are
    timed throughout (``select`` of the loop's selector wrapped), with the collector's
    pauses (``gc.callbacks``) and the lateness of a 5 ms timer (the loop's lag). Parts
    (ms, p50/p99):

    a. a row's wait from its save to its batch being taken (a free lane, the batch before);
    b. the batch's encoding on the loop, taken to written (and its CPU time);
    c. the round trip, written to the reply read by the loop: to the server reading it,
       the server's function, then the COMMIT's WAL sync, the reply and its wait in the
       socket until the loop's next look;
    d. read to the commit's task resumed, to its waiters resolved, to the last waiter's
       task woken.

    ``slowest``: the slowest 1 % of the sampled commits (taken to woken), each with its
    parts, the collections and the longest loop turn during it, and its wall-clock time
    (to match with the server's log).
    """

    LAG_INTERVAL = 0.005

    def __init__(self, every: int = 1) -> None:
        self.every = every
        self.batches = 0
        self.queued_at: dict[str, float] = {}
        self.wires: dict[int, _Wire] = {}
        self.samples: list[_Sample] = []
        self.turns: list[tuple[float, float]] = []  # (start, seconds) of each loop turn
        self.pauses: list[tuple[float, float, int]] = []  # (start, seconds, generation)
        self.lane_pids: list[int] = []  # the commit lanes' server processes
        self.lags: list[tuple[float, float]] = []  # (asked, seconds late) of the lag timer
        self._gc_started = 0.0
        self._lagging: asyncio.Task[None] | None = None
        self.offset = time.time() - time.perf_counter()

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        selector = loop._selector  # type: ignore[attr-defined]
        select, turns = selector.select, self.turns
        last = [time.perf_counter()]

        def timed_select(timeout: float | None = None) -> Any:
            # A turn: from one select's return to the next one's call (the loop's work).
            now = time.perf_counter()
            turns.append((last[0], now - last[0]))
            events = select(timeout)
            last[0] = time.perf_counter()
            return events

        selector.select = timed_select
        gc.callbacks.append(self._collected)
        self._lagging = loop.create_task(self._lag())

    def uninstall(self) -> None:
        """Stop timing collections and the loop's lag (the selector stays wrapped)."""
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self._collected)
        if self._lagging is not None:
            self._lagging.cancel()

    def _collected(self, phase: str, info: dict[str, int]) -> None:
        # Called by the collector around each collection, on the thread that triggered it.
        if phase == "start":
            self._gc_started = time.perf_counter()
        else:
            self.pauses.append((self._gc_started, time.perf_counter() - self._gc_started,
                                info["generation"]))

    async def _lag(self) -> None:
        """A tiny periodic timer: how late the loop runs it is what any timer or reply
        waits for a busy loop (a benchmark's own probe: the real clock on purpose)."""
        while True:
            asked = time.perf_counter()
            await asyncio.sleep(self.LAG_INTERVAL)
            self.lags.append((asked, time.perf_counter() - asked - self.LAG_INTERVAL))

    def connected(self, connection: Any) -> None:
        self.wires[id(connection)] = _Wire(connection._transport)
        self.lane_pids.append(connection.get_server_pid())

    def queued(self, workflow_id: str) -> None:
        self.queued_at[workflow_id] = time.perf_counter()

    def taken(self, batch: Any) -> _Sample | None:
        self.batches += 1
        if self.batches % self.every:
            return None
        now = time.perf_counter()
        return _Sample(self, [now - self.queued_at[w] for w, _ in batch.waiters
                              if w in self.queued_at])

    def summary(self) -> dict[str, Any]:
        done = [s for s in self.samples if s.woken]

        def parts(values: list[float]) -> list[float]:
            if not values:
                return [0.0, 0.0]
            return [round(statistics.median(values) * 1000, 2),
                    round(_percentile(values, 0.99) * 1000, 2)]

        return {
            "sampled_batches": len(done),
            "a_wait_for_batch": parts([w for s in done for w in s.waits]),
            "b_encode": parts([s.written - s.taken for s in done]),
            "b_encode_cpu": parts([s.cpu for s in done]),
            "c_round_trip": parts([s.read - s.written for s in done]),
            "c1_to_server": parts([s.started - s.written for s in done]),
            "c2_server_function": parts([s.ended - s.started for s in done]),
            "c3_sync_reply_and_socket": parts([s.read - s.ended for s in done]),
            "d_loop_after_reply": parts([s.woken - s.read for s in done]),
            "d1_task_resumed": parts([s.resumed - s.read for s in done]),
            "d2_waiters_resolved": parts([s.resolved_at - s.resumed for s in done]),
            "d3_waiters_woken": parts([s.woken - s.resolved_at for s in done]),
            "commit_taken_to_woken": parts([s.woken - s.taken for s in done]),
            "save_to_woken": parts([w + s.woken - s.taken for s in done for w in s.waits]),
            "loop_turn": parts([t for _, t in self.turns]),
            "loop_lag": parts([lag for _, lag in self.lags]),
            "rows_per_batch": statistics.fmean([len(s.waits) for s in done]) if done else 0,
            "gc": self._gc_summary(),
            "lane_pids": self.lane_pids,
            "slowest": self._slowest(done),
        }

    def _gc_summary(self) -> dict[str, Any]:
        by_generation: dict[str, Any] = {}
        for generation in (0, 1, 2):
            pauses = [p for _, p, g in self.pauses if g == generation]
            by_generation[f"gen{generation}"] = {
                "count": len(pauses), "total_ms": round(sum(pauses) * 1000, 1),
                "max_ms": round(max(pauses, default=0.0) * 1000, 2)}
        return by_generation

    def _slowest(self, done: list[_Sample]) -> list[dict[str, Any]]:
        """The slowest 1 % of the sampled commits (at least one), slowest first."""
        ranked = sorted(done, key=lambda s: s.woken - s.taken, reverse=True)
        rows = []
        for s in ranked[:max(1, len(ranked) // 100)] if ranked else []:
            begin, end = s.taken, s.woken
            pauses = [(p, g) for at, p, g in self.pauses if at < end and at + p > begin]
            turns = [t for at, t in self.turns if at < end and at + t > begin]

            def ms(seconds: float) -> float:
                return round(seconds * 1000, 2)

            rows.append({
                "at": round(s.taken + self.offset, 3), "rows": len(s.waits),
                "total": ms(end - begin), "a_wait_max": ms(max(s.waits, default=0.0)),
                "b_encode": ms(s.written - s.taken), "c1_to_server": ms(s.started - s.written),
                "c2_server_function": ms(s.ended - s.started),
                "c3_sync_reply_and_socket": ms(s.read - s.ended),
                "d1_task_resumed": ms(s.resumed - s.read),
                "d2_waiters_resolved": ms(s.resolved_at - s.resumed),
                "d3_waiters_woken": ms(s.woken - s.resolved_at),
                "gc_ms": ms(sum(p for p, _ in pauses)),
                "gc_generations": sorted({g for _, g in pauses}),
                "longest_turn": ms(max(turns, default=0.0))})
        return rows


async def _worker(concurrency: int, root: str, probe: bool = False,
                  until: int | None = None) -> dict[str, Any]:
    """One worker process's run (the store URL from WORKFLOW_STORE_URL): until nothing is
    queued or running, or with ``until`` (workflows submitted while it runs, so the queue
    may be empty for a moment) until that many completed."""
    from reliability import Runtime
    from reliability._postgres import PostgresStore
    async with Runtime(_config(), root) as runtime:
        store = runtime.store
        assert isinstance(store, PostgresStore)
        probing = CommitProbe() if probe else None
        if probing is not None:
            probing.install(asyncio.get_running_loop())
            store.commit_probe = probing
        started = time.thread_time()
        if until is None:
            count = await runtime.serve(concurrency=concurrency, exit_when_idle=True)
        else:
            serving = asyncio.ensure_future(runtime.serve(concurrency=concurrency))
            while True:  # the database knows when all completed, in any worker
                completed = await store.require_pool().fetchval(
                    "SELECT count(*) FROM workflows WHERE status = 'completed'")
                if completed >= until:
                    break
                await asyncio.sleep(0.2)
            runtime.request_shutdown()
            count = await serving
        cpu = time.thread_time() - started
        commits = list(store.commit_seconds)
        if probing is not None:
            probing.uninstall()
    result = {"workflows_run": count, "commit_seconds": commits, "loop_cpu_seconds": cpu}
    if probing is not None:
        result["probe"] = probing.summary()
    return result


async def _submit(url: str, workflows: int, root: str) -> None:
    from reliability import Runtime
    from reliability._cluster import submit_many
    os.environ["WORKFLOW_STORE_URL"] = url
    try:
        async with Runtime(_config(), root) as runtime:
            await submit_many(runtime, [(NOOP19, {})] * workflows)
    finally:
        del os.environ["WORKFLOW_STORE_URL"]


async def _submit_paced(url: str, workflows: int, per_second: float, root: str) -> None:
    """Queue ``workflows`` at ``per_second`` (an open loop: on schedule whatever the
    workers do), in a chunk every 20 ms; their states built before the clock starts."""
    from reliability import Runtime
    from reliability._postgres import PostgresStore
    os.environ["WORKFLOW_STORE_URL"] = url
    try:
        async with Runtime(_config(), root) as runtime:
            store = runtime.store
            assert isinstance(store, PostgresStore)
            definition, inputs, prompt_file = runtime.prepare_target(NOOP19, {})
            states = [runtime.new_run(definition, inputs, prompt_file).to_state()
                      for _ in range(workflows)]
            start, sent = time.perf_counter(), 0
            while sent < workflows:
                due = min(workflows, int((time.perf_counter() - start) * per_second) + 1)
                if due > sent:
                    await store.enqueue(states[sent:due])
                    sent = due
                await asyncio.sleep(0.02)
    finally:
        del os.environ["WORKFLOW_STORE_URL"]


async def _workers_ready(url: str, workers: int) -> None:
    """Until ``workers`` workers registered (their stores opened): queueing at a rate
    starts then, not during their start-up (a backlog would be a burst)."""
    import asyncpg
    connection = await asyncpg.connect(url)
    try:
        while True:  # the registrations are rows of another process: polled
            with contextlib.suppress(asyncpg.UndefinedTableError):  # not migrated yet
                if await connection.fetchval(
                        "SELECT count(*) FROM workflow_workers") >= workers:
                    return
            await asyncio.sleep(0.05)
    finally:
        await connection.close()


async def _window(url: str) -> tuple[float, int, float]:
    """Seconds from the first claim to the last final write (database clock), how many
    workflows completed, and the seconds from the first queued to the last."""
    import asyncpg
    connection = await asyncpg.connect(url)
    try:
        row = await connection.fetchrow(
            "SELECT extract(epoch FROM (SELECT max(updated_at) FROM workflows) - "
            "(SELECT min(at) FROM workflow_writes WHERE kind = 'claim')) AS seconds, "
            "(SELECT count(*) FROM workflows WHERE status = 'completed') AS completed, "
            "extract(epoch FROM max(created_at) - min(created_at)) AS queued FROM workflows")
    finally:
        await connection.close()
    return float(row["seconds"]), int(row["completed"]), float(row["queued"])


async def _server_times(url: str, database: str) -> dict[str, float] | None:
    """The server's side of the group commits, from its statistics: calls of
    ``workflow_commit`` and their mean time, and the WAL syncs of the whole server
    (``pg_stat_wal``: this run's, if nothing else runs on the server) with their mean
    time. None where the settings that time them cannot be set (not a superuser)."""
    import asyncpg
    connection = await asyncpg.connect(database)
    try:
        function = await connection.fetchrow(
            "SELECT calls, total_time FROM pg_stat_user_functions "
            "WHERE funcname = 'workflow_commit'")
        wal = await connection.fetchrow("SELECT wal_sync, wal_sync_time FROM pg_stat_wal")
    finally:
        await connection.close()
    if wal is None:
        return None
    # No row for the function before its first call (a fresh database): none yet, and the
    # WAL counters as they stand, so the run's are the difference.
    return {"server_commits": function["calls"] if function else 0,
            "server_commit_ms": function["total_time"] if function else 0.0,
            "wal_syncs": wal["wal_sync"], "wal_sync_time_ms": wal["wal_sync_time"]}


# The server's diagnostics for a benchmark's throwaway server (``on_server``): what a
# slow commit may meet there, each logged with its time (checkpoints, autovacuum runs,
# lock waits over 5 ms) or counted (pg_stat_statements per statement, nested ones too).
DIAGNOSTICS = ("log_checkpoints=on", "log_autovacuum_min_duration=0", "log_lock_waits=on",
               "deadlock_timeout=5ms", "shared_preload_libraries=pg_stat_statements",
               "pg_stat_statements.track=all", "track_io_timing=on")

_COUNTERS = {
    "bgwriter": "SELECT * FROM pg_stat_bgwriter",
    "wal": "SELECT * FROM pg_stat_wal",
}
_TABLES = ("SELECT relname, n_tup_upd, n_tup_hot_upd, n_dead_tup, autovacuum_count, "
           "autoanalyze_count FROM pg_stat_user_tables")
_STATEMENTS = ("SELECT left(regexp_replace(query, '\\s+', ' ', 'g'), 70) AS query, calls, "
               "mean_exec_time, max_exec_time, stddev_exec_time, shared_blks_written "
               "FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database "
               "WHERE datname = current_database()) ORDER BY max_exec_time DESC LIMIT 8")
_LOG_KINDS = {"checkpoint": ("checkpoint complete",),
              "autovacuum": ("automatic vacuum", "automatic analyze"),
              "lock_wait": ("still waiting", "acquired")}
_TOOK = re.compile(r"(?:total=|elapsed: )(\d+\.\d+) s")
_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+) ")


async def _server_counters(database: str) -> dict[str, Any]:
    """The server's counters of what can slow a commit, now: checkpoints and buffers
    written by backends (pg_stat_bgwriter), WAL buffers full (pg_stat_wal), the tables'
    updates, dead rows and autovacuum runs; and whether pg_stat_statements is on (then
    reset, so the run's statements are counted alone)."""
    import asyncpg
    connection = await asyncpg.connect(database)
    try:
        counters = await _server_counters_only(connection)
        try:
            await connection.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            await connection.execute("SELECT pg_stat_statements_reset()")
            counters["statements"] = True
        except asyncpg.PostgresError:  # not preloaded, or not a superuser
            counters["statements"] = False
        return counters
    finally:
        await connection.close()


def _difference(after: Any, before: Any) -> Any:
    if isinstance(after, dict):
        return {k: _difference(v, before.get(k, 0) if isinstance(before, dict) else 0)
                for k, v in after.items()}
    if isinstance(after, int | float) and isinstance(before, int | float):
        return round(after - before, 3)
    return after


async def _server_report(database: str, before: dict[str, Any], start: float,
                         end: float) -> dict[str, Any]:
    """The server's side of a run from ``start`` to ``end`` (wall clock): its counters'
    change, its statements' mean/max/stddev and its log's lines of the run (checkpoints,
    autovacuum, lock waits), each with its time. The log is read where
    tests/postgres_server.py writes it (beside the data directory), when it can be."""
    import asyncpg
    connection = await asyncpg.connect(database)
    try:
        after = await _server_counters_only(connection)
        report: dict[str, Any] = {"counters": _difference(after, before)}
        if before.get("statements"):
            report["statements"] = [
                {"query": r["query"], "calls": r["calls"],
                 "mean_ms": round(r["mean_exec_time"], 2),
                 "max_ms": round(r["max_exec_time"], 2),
                 "stddev_ms": round(r["stddev_exec_time"], 2),
                 "blocks_written": r["shared_blks_written"]}
                for r in await connection.fetch(_STATEMENTS)]
        try:
            text = await connection.fetchval(
                "SELECT pg_read_file(regexp_replace(current_setting('data_directory'), "
                "'/[^/]+$', '') || '/server.log')")
        except asyncpg.PostgresError:
            text = ""
    finally:
        await connection.close()
    events: list[dict[str, Any]] = []
    kept = False
    for line in (text or "").splitlines():
        match = _LOG_TIME.match(line)
        if match is None:  # a continuation of the line before (autovacuum's details)
            if kept:
                events[-1]["line"] += " " + line.strip()
            continue
        at = datetime.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S.%f").replace(
            tzinfo=datetime.UTC).timestamp()
        kind = next((k for k, words in _LOG_KINDS.items() if any(w in line for w in words)),
                    None)
        kept = kind is not None and start - 1 <= at <= end + 1
        if kept:
            events.append({"kind": kind, "at": round(at, 3),
                           "line": line[len(match.group(0)):]})
    for event in events:
        # When it began: a checkpoint's and an autovacuum's log line comes at its end.
        took = _TOOK.search(event["line"])
        event["began"] = round(event["at"] - float(took.group(1)) if took else event["at"], 3)
        event["line"] = event["line"][:400]
    report["log"] = events
    return report


async def _server_counters_only(connection: Any) -> dict[str, Any]:
    counters: dict[str, Any] = {}
    for name, query in _COUNTERS.items():
        row = await connection.fetchrow(query)
        counters[name] = {k: v for k, v in dict(row or {}).items()
                          if isinstance(v, int | float) and not isinstance(v, bool)}
    counters["tables"] = {r["relname"]: {k: v for k, v in dict(r).items() if k != "relname"}
                          for r in await connection.fetch(_TABLES)}
    return counters


async def _timed(url: str, database: str) -> bool:
    """Time the commit function and WAL syncs in ``database`` (a superuser's settings)."""
    import asyncpg
    name = database.rsplit("/", 1)[1]  # generated by _fresh_database: safe in a statement
    try:
        await _admin(url, f"ALTER DATABASE {name} SET track_functions = 'pl'")
        await _admin(url, f"ALTER DATABASE {name} SET track_wal_io_timing = on")
    except asyncpg.PostgresError:
        return False
    return True


async def cluster_run(url: str, workers: int, workflows: int,
                      concurrency: int, probe: bool = False,
                      offered: float | None = None) -> dict[str, Any]:
    """N workflows served by ``workers`` processes on a fresh database of the server: all
    queued before the workers start (saturated), or with ``offered`` (transitions/s)
    queued at that rate while they run (a latency run below saturation)."""
    database = await _fresh_database(url, "bench_cluster")
    timed = await _timed(url, database)
    until = [] if offered is None else ["--until", str(workflows)]
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as root:
        if offered is None:
            await _submit(database, workflows, root)
        before = await _server_times(url, database) if timed else None
        counters = await _server_counters(database)
        wall_start = time.time()
        env = {**os.environ, "WORKFLOW_STORE_URL": database, "PYTHONPATH": str(ROOT)}
        start = time.perf_counter()
        processes = [await asyncio.create_subprocess_exec(
            sys.executable, "-m", "benchmarks._cluster", "--worker", str(concurrency),
            "--root", root, *(["--probe"] if probe else []), *until, cwd=ROOT, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            for _ in range(workers)]
        if offered is not None:
            await _workers_ready(database, workers)
            await _submit_paced(database, workflows, offered / len(NOOP19.stages), root)
        outputs = [await p.communicate() for p in processes]
        wall = time.perf_counter() - start
        server = await _server_report(database, counters, wall_start, time.time())
    for process, (_, err) in zip(processes, outputs, strict=True):
        if process.returncode != 0:
            raise RuntimeError(f"a worker failed: {err.decode(errors='replace')[-2000:]}")
    runs = [json.loads(out.decode().strip().splitlines()[-1]) for out, _ in outputs]
    seconds, completed, queued = await _window(database)
    if completed != workflows:
        raise RuntimeError(f"{completed} of {workflows} workflows completed")
    commits = [c for run in runs for c in run["commit_seconds"]]
    transitions = workflows * len(NOOP19.stages)
    loop_cpu = sum(r["loop_cpu_seconds"] for r in runs)
    figures = {"workers": workers, "workflows": workflows, "concurrency": concurrency,
               "offered_per_s": offered, "loop_busy": loop_cpu / workers / seconds,
               "queued_seconds": queued,
               "transitions": transitions, "seconds": seconds,
               "transitions_per_s": transitions / seconds, "wall_seconds": wall,
               "per_worker": [r["workflows_run"] for r in runs], "batches": len(commits),
               "commit_p50_ms": statistics.median(commits) * 1000,
               "commit_p99_ms": _percentile(commits, 0.99) * 1000,
               "loop_cpu_ms_per_batch": 1000 * sum(r["loop_cpu_seconds"] for r in runs)
               / max(1, len(commits)),
               "loop_cpu_us_per_transition": 1e6 * sum(r["loop_cpu_seconds"] for r in runs)
               / transitions}
    if probe:
        figures["probe"] = [r["probe"] for r in runs]
        for run in figures["probe"]:
            for row in run["slowest"]:
                row["server"] = _met(row, server["log"])
            run["lock_waits"] = _lock_waits(server["log"], set(run["lane_pids"]))
    figures["server"] = server
    after = await _server_times(url, database) if timed else None
    if after is not None and before is not None and after["server_commits"]:
        # Where a commit's time goes: the server's work in the statement, then the WAL
        # sync of its COMMIT; the rest of what the worker measured is the way there and
        # back, waiting for a CPU and the worker's event loop. (WAL syncs are the whole
        # server's: claims and heartbeats commit too.)
        syncs = after["wal_syncs"] - before["wal_syncs"]
        sync_ms = after["wal_sync_time_ms"] - before["wal_sync_time_ms"]
        figures.update(server_commit_mean_ms=after["server_commit_ms"]
                       / after["server_commits"],
                       commit_mean_ms=statistics.fmean(commits) * 1000,
                       wal_syncs=syncs, wal_sync_mean_ms=sync_ms / syncs if syncs else 0.0)
    return figures


_WAITED = re.compile(r"process (\d+) acquired \w+ on (\w+).* after ([\d.]+) ms")


def _lock_waits(log: list[dict[str, Any]], lanes: set[int]) -> dict[str, list[float]]:
    """The lock waits over 5 ms the server logged (log_lock_waits), by who waited (the
    worker's commit lanes, or any other session) and what for (``object``: a shared
    object's lock, such as the one every NOTIFY takes at commit; ``extension``: a table's
    file growing): [count, total ms] each."""
    waits: dict[str, list[float]] = {}
    for event in log:
        match = _WAITED.search(event["line"])
        if match is not None:
            who = "lanes" if int(match.group(1)) in lanes else "others"
            total = waits.setdefault(f"{who}_{match.group(2)}", [0, 0.0])
            total[0] += 1
            total[1] = round(total[1] + float(match.group(3)), 1)
    return waits


async def notify_lock_run(url: str, rounds: int = 3, seconds: float = 5.0,
                          connections: int = 3) -> list[dict[str, Any]]:
    """The NOTIFY lock alone (``--notify-ab``): ``connections`` sessions commit a 2 KB
    insert each as fast as they can for ``seconds``, every transaction with a NOTIFY in
    it or none (as a commit lane did before ends were announced after the commit, and
    does now), the order alternating by round; commits/s and commit p50/p99 (ms)."""
    import asyncpg
    database = await _fresh_database(url, "bench_notify")
    setup = await asyncpg.connect(database)
    try:
        await setup.execute("CREATE TABLE notify_ab (id bigserial PRIMARY KEY, v text)")
    finally:
        await setup.close()
    # A listener, as each worker has one: NOTIFYs are delivered to someone.
    listener = await asyncpg.connect(database)
    heard: list[str] = []
    await listener.add_listener("notify_ab", lambda *args: heard.append(args[3]))
    rows: list[dict[str, Any]] = []
    for round_ in range(rounds):
        for notify in (True, False) if round_ % 2 == 0 else (False, True):
            heard.clear()
            sessions = [await asyncpg.connect(database) for _ in range(connections)]
            statement = "INSERT INTO notify_ab (v) VALUES (repeat('x', 2000))" + (
                "; NOTIFY notify_ab, 'x'" if notify else "")  # one implicit transaction
            latencies: list[float] = []
            stop = time.perf_counter() + seconds

            async def commit(session: Any, statement: str = statement,
                             latencies: list[float] = latencies, stop: float = stop) -> None:
                while time.perf_counter() < stop:
                    start = time.perf_counter()
                    await session.execute(statement)
                    latencies.append(time.perf_counter() - start)

            try:
                await asyncio.gather(*(commit(s) for s in sessions))
            finally:
                for session in sessions:
                    await session.close()
            await listener.execute("SELECT 1")  # a round trip: what was sent is heard
            rows.append({"round": round_, "notify": notify, "heard": len(heard),
                         "commits": len(latencies),
                         "commits_per_s": len(latencies) / seconds,
                         "p50_ms": statistics.median(latencies) * 1000,
                         "p99_ms": _percentile(latencies, 0.99) * 1000})
    await listener.close()
    return rows


def _met(commit: dict[str, Any], log: list[dict[str, Any]]) -> list[str]:
    """The server's logged events that overlapped a commit (its wall-clock span)."""
    begin, end = commit["at"], commit["at"] + commit["total"] / 1000
    return sorted({e["kind"] for e in log if e["began"] <= end and e["at"] >= begin})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cluster",
                                     description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--workers", default="1,2,4", help="comma-separated worker counts")
    parser.add_argument("--workflows", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=250,
                        help="workflows each worker runs at once")
    parser.add_argument("--dbos-workflows", default="1000",
                        help="workflows for DBOS ('' skips DBOS)")
    parser.add_argument("--dbos-mode", choices=("async", "sync"), default="async")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--until", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--latency-at", default="",
                        help="comma-separated fractions (e.g. 0.5,0.75) of the 1-worker "
                             "saturated rate: then a 1-worker run at each, workflows "
                             "queued at that rate while it runs (commit latency below "
                             "saturation)")
    parser.add_argument("--saturated-rate", type=float,
                        help="the 1-worker saturated transitions/s for --latency-at (default: "
                             "this run's, which then needs 1 in --workers)")
    parser.add_argument("--probe", action="store_true",
                        help="time where each worker's commits spend their time, the slowest 1 %% "
                             "one by one, with the server's counters and log")
    parser.add_argument("--server-setting", action="append", default=[],
                        metavar="NAME=VALUE",
                        help="a setting for the throwaway server, after its own and the "
                             "diagnostics (e.g. shared_buffers=256MB); repeatable")
    parser.add_argument("--notify-ab", type=int, metavar="ROUNDS",
                        help="instead: the NOTIFY lock alone, 3 sessions committing with "
                             "and without a NOTIFY in each transaction, ROUNDS alternations")
    parser.add_argument("--notify-seconds", type=float, default=5.0, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.notify_ab is not None:
        ab = on_server(lambda url: notify_lock_run(url, args.notify_ab,
                                                   args.notify_seconds))
        for row in ab:
            print(f"round {row['round']}, NOTIFY in each commit {'yes' if row['notify'] else 'no '}"
                  f": {row['commits_per_s']:6.0f} commits/s, p50 {row['p50_ms']:.2f} ms, "
                  f"p99 {row['p99_ms']:.2f} ms")
        if args.json:
            args.json.write_text(json.dumps({"notify_ab": ab}, indent=2) + "\n")
        return 0
    if args.worker is not None:
        print(json.dumps(asyncio.run(_worker(args.worker, args.root, args.probe, args.until))))
        return 0

    async def run(url: str) -> dict[str, list[dict[str, Any]]]:
        results: dict[str, list[dict[str, Any]]] = {"cluster": [], "latency": [], "dbos": []}
        for n in (int(x) for x in args.workers.split(",") if x):
            results["cluster"].append(await cluster_run(url, n, args.workflows,
                                                        args.concurrency, args.probe))
        saturated = args.saturated_rate or next(
            (r["transitions_per_s"] for r in results["cluster"] if r["workers"] == 1), None)
        for fraction in (float(x) for x in args.latency_at.split(",") if x):
            if saturated is None:
                raise SystemExit("--latency-at needs --saturated-rate or 1 in --workers")
            results["latency"].append(await cluster_run(
                url, 1, args.workflows, args.concurrency, args.probe,
                offered=fraction * saturated))
        if args.dbos_workflows:
            results["dbos"].append(await dbos_run(url, int(args.dbos_workflows),
                                                  args.dbos_mode))
        return results

    results = on_server(run, (*DIAGNOSTICS, *args.server_setting))
    for row in results["cluster"] + results["latency"]:
        if row["offered_per_s"] is not None:
            print(f"Below saturation, {row['offered_per_s']:.0f} transitions/s offered "
                  f"(workflows queued at that rate), worker loop on a CPU "
                  f"{100 * row['loop_busy']:.0f} % of the run:")
        print(f"{row['workers']} worker(s), {row['workflows']} workflows: "
              f"{row['transitions_per_s']:8.0f} transitions/s ({row['wall_seconds']:.1f} s "
              f"wall with start-up); commit p50 {row['commit_p50_ms']:.1f} ms, p99 "
              f"{row['commit_p99_ms']:.1f} ms over {row['batches']} batches; loop CPU "
              f"{row['loop_cpu_us_per_transition']:.0f} us a transition, "
              f"{row['loop_cpu_ms_per_batch']:.2f} ms a batch")
        for n, parts in enumerate(row.get("probe", ())):
            print(f"  worker {n} (ms, p50/p99): " + ", ".join(
                f"{k} {v[0]}/{v[1]}" for k, v in parts.items() if isinstance(v, list)
                and k not in ("slowest", "lane_pids"))
                + f"; {parts['rows_per_batch']:.1f} rows a batch")
            print(f"  lock waits over 5 ms [count, ms]: {parts.get('lock_waits', {})}")
            print("  collections: " + ", ".join(
                f"{g} {c['count']} ({c['total_ms']} ms, max {c['max_ms']} ms)"
                for g, c in parts["gc"].items()))
            print(f"  the slowest 1 % ({len(parts['slowest'])}), ms: ")
            for slow in parts["slowest"]:
                print("    " + ", ".join(f"{k} {v}" for k, v in slow.items() if k != "at"))
        server = row.get("server", {})
        counters = server.get("counters", {})
        if counters:
            print("  server: " + "; ".join(
                f"{k} {v}" for k, v in {**counters["bgwriter"], **counters["wal"]}.items()
                if v and not k.endswith("time")))
            for table, values in counters["tables"].items():
                if any(values.values()):
                    print(f"    {table}: " + ", ".join(f"{k} {v}" for k, v in values.items()))
        for statement in server.get("statements", ()):
            print(f"    {statement}")
        for event in server.get("log", ()):
            print(f"    log {event['kind']} {event['began']:.3f}-{event['at']:.3f}: "
                  f"{event['line'][:160]}")
        if "server_commit_mean_ms" in row:
            print(f"  commit mean {row['commit_mean_ms']:.1f} ms in the workers; on the "
                  f"server {row['server_commit_mean_ms']:.1f} ms in workflow_commit, then "
                  f"WAL syncs of {row['wal_sync_mean_ms']:.1f} ms ({row['wal_syncs']})")
    for row in results["dbos"]:
        print(dbos_line(row))
        for mine in results["cluster"]:
            print(f"  {mine['workers']} worker(s): "
                  f"{mine['transitions_per_s'] / row['transitions_per_s']:.1f}x DBOS")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
