"""The PostgreSQL store alone vs DBOS, on one server, same workload, same run.

``python -m benchmarks.pgstore [--workflows 1000,10000] [--dbos-workflows 1000]
[--dbos-mode async|sync] [--json FILE]`` starts a throwaway server
(``tests/postgres_server.py``: fsync and synchronous_commit on; or uses
``WORKFLOW_TEST_POSTGRES_URL``) and measures, for N 19-stage no-op workflows in one
process:

- ``PostgresStore``: each workflow is claimed, then saves its state with a stage
  checkpoint after each of 19 stages and waits for it to be durable before the next (the
  strict durability point), so every save is one durable stage transition; group commit
  puts everything queued meanwhile into one transaction. Reported: transitions/s, the wait
  of one save (p50/p99) and the time of one batch's commit (p50/p99, with rows per batch).
- DBOS (``pip install dbos``) in a child process, on a database of its own on the same
  server: N workflows of 19 no-op ``@DBOS.step`` calls each, all started at once; each
  step's result is one durable transition. Reported: transitions/s.

The ratio is only honest because both run here, now, against the same server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent
STAGES = tuple(f"stage_{i:02d}" for i in range(19))


def on_server(run: Callable[[str], Coroutine[Any, Any, T]],
              settings: tuple[str, ...] = ()) -> T:
    """``asyncio.run(run(url))`` on the server at ``WORKFLOW_TEST_POSTGRES_URL``, or on a
    throwaway one (``tests/postgres_server.py``, with ``settings`` added) started for it
    and destroyed after. A setting the server refuses (pg_stat_statements not installed)
    starts it without ``settings``."""
    url = os.environ.get("WORKFLOW_TEST_POSTGRES_URL")
    server = None
    if not url:
        sys.path.insert(0, str(ROOT / "tests"))
        from postgres_server import PostgresServer, ServerUnavailable
        server = PostgresServer(settings=settings)
        try:
            server.start()
        except ServerUnavailable:
            if not settings:
                raise
            server.settings = ()
            server.start()
        url = server.url
    try:
        return asyncio.run(run(url))
    finally:
        if server is not None:
            server.destroy()


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


async def _admin(url: str, statement: str) -> None:
    import asyncpg
    connection = await asyncpg.connect(url)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


async def _fresh_database(url: str, prefix: str) -> str:
    name = f"{prefix}_{secrets.token_hex(4)}"  # generated here: safe in a statement
    await _admin(url, f"CREATE DATABASE {name}")
    return url.rsplit("/", 1)[0] + "/" + name


async def store_run(url: str, workflows: int, **settings: int) -> dict[str, float]:
    """N workflows' 19 durable checkpoint saves each through one PostgresStore
    (``settings``: its batch_rows and commit_lanes, when not the defaults)."""
    from reliability._postgres import PostgresStore

    database = await _fresh_database(url, "bench_store")
    store = PostgresStore(database, lease_seconds=600, **settings)
    await store.open()
    commits: list[tuple[float, int]] = []
    commit = store._commit

    async def timed_commit(batch: Any) -> dict[str, BaseException]:
        start = time.perf_counter()
        try:
            return await commit(batch)
        finally:
            commits.append((time.perf_counter() - start, len(batch.writes)))

    store._commit = timed_commit  # type: ignore[method-assign]
    waits: list[float] = []
    try:
        ids = [f"workflow-20250101-000000-{i:08x}" for i in range(workflows)]
        claims, refused = await store.claim_many(ids)
        assert not refused

        async def one(workflow_id: str) -> None:
            done: dict[str, Any] = {}
            for revision, stage in enumerate(STAGES, 1):
                done[stage] = {"ok": True}
                state = {"workflow_id": workflow_id, "revision": revision, "status": "running",
                         "definition": "benchmarks:NOOP19", "current_stage": stage,
                         "completed_stages": list(done), "progress_data": done}
                start = time.perf_counter()
                await store.save(workflow_id, state.copy, checkpoint_stage=stage)
                waits.append(time.perf_counter() - start)

        start = time.perf_counter()
        await asyncio.gather(*(one(w) for w in ids))
        elapsed = time.perf_counter() - start
        for claim in claims:
            claim.release()
    finally:
        await store.close()
    times = [c[0] for c in commits]
    return {"workflows": workflows, "transitions": workflows * len(STAGES),
            "seconds": elapsed, "transitions_per_s": workflows * len(STAGES) / elapsed,
            "save_wait_p50_ms": statistics.median(waits) * 1000,
            "save_wait_p99_ms": _percentile(waits, 0.99) * 1000,
            "commit_p50_ms": statistics.median(times) * 1000,
            "commit_p99_ms": _percentile(times, 0.99) * 1000,
            "batches": len(commits),
            "rows_per_batch_mean": statistics.fmean(c[1] for c in commits)}


def _dbos_child(url: str, workflows: int, mode: str) -> dict[str, float]:
    """Runs in a process of its own: DBOS is one global instance with its own threads."""
    import logging

    from dbos import DBOS

    DBOS(config={"name": "bench", "system_database_url": url, "log_level": "WARNING"})
    logging.getLogger("dbos").setLevel(logging.WARNING)

    @DBOS.step()
    def noop(i: int) -> int:
        return i

    @DBOS.workflow()
    def workflow() -> int:
        for i in range(len(STAGES)):
            noop(i)
        return len(STAGES)

    @DBOS.step()
    async def noop_async(i: int) -> int:
        return i

    @DBOS.workflow()
    async def workflow_async() -> int:
        for i in range(len(STAGES)):
            await noop_async(i)
        return len(STAGES)

    DBOS.launch()
    try:
        start = time.perf_counter()
        if mode == "sync":
            handles = [DBOS.start_workflow(workflow) for _ in range(workflows)]
            results = [h.get_result() for h in handles]
        else:
            async def run_all() -> list[int]:
                handles = await asyncio.gather(
                    *(DBOS.start_workflow_async(workflow_async) for _ in range(workflows)))
                return list(await asyncio.gather(*(h.get_result() for h in handles)))
            results = asyncio.run(run_all())
        elapsed = time.perf_counter() - start
    finally:
        DBOS.destroy()
    assert results == [len(STAGES)] * workflows
    return {"workflows": workflows, "transitions": workflows * len(STAGES),
            "seconds": elapsed, "transitions_per_s": workflows * len(STAGES) / elapsed}


async def dbos_run(url: str, workflows: int, mode: str) -> dict[str, float]:
    """DBOS on a fresh database of the same server, in a child process."""
    import importlib.metadata
    version = importlib.metadata.version("dbos")
    database = await _fresh_database(url, "bench_dbos")
    result = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "benchmarks._pgstore", "--dbos-child",
                         str(workflows), "--dbos-mode", mode],
        input=database, capture_output=True, text=True, check=False,
        cwd=ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"DBOS run failed: {result.stderr[-2000:]}")
    figures: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    figures["dbos_version"] = version
    figures["mode"] = mode
    return figures


def dbos_line(row: dict[str, Any]) -> str:
    """One DBOS run's figures, as both benchmarks print them."""
    return (f"DBOS {row['dbos_version']} ({row['mode']}) {row['workflows']:>6} workflows: "
            f"{row['transitions_per_s']:9.0f} transitions/s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pgstore",
                                     description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--workflows", default="1000,10000",
                        help="comma-separated workflow counts for PostgresStore")
    parser.add_argument("--dbos-workflows", default="1000",
                        help="comma-separated workflow counts for DBOS ('' skips DBOS)")
    parser.add_argument("--dbos-mode", choices=("async", "sync"), default="async")
    parser.add_argument("--batch-rows", type=int,
                        help="rows per group commit (default: the store's; a huge number "
                             "and --commit-lanes 1 is one uncapped batch at a time)")
    parser.add_argument("--commit-lanes", type=int,
                        help="group commits in flight at once (default: the store's)")
    parser.add_argument("--dbos-child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.dbos_child is not None:  # the URL comes on stdin: never on a command line
        figures = _dbos_child(sys.stdin.read().strip(), args.dbos_child, args.dbos_mode)
        print(json.dumps(figures))
        return 0
    settings = {name: value for name, value in (("batch_rows", args.batch_rows),
                                                ("commit_lanes", args.commit_lanes))
                if value is not None}

    async def run(url: str) -> dict[str, list[dict[str, Any]]]:
        results: dict[str, list[dict[str, Any]]] = {"postgres_store": [], "dbos": []}
        for n in (int(x) for x in args.workflows.split(",") if x):
            results["postgres_store"].append(await store_run(url, n, **settings))
        for n in (int(x) for x in args.dbos_workflows.split(",") if x):
            results["dbos"].append(await dbos_run(url, n, args.dbos_mode))
        return results

    results = on_server(run)
    for row in results["postgres_store"]:
        print(f"PostgresStore {row['workflows']:>6} workflows: {row['transitions_per_s']:9.0f} "
              f"transitions/s; save wait p50 {row['save_wait_p50_ms']:.1f} ms, p99 "
              f"{row['save_wait_p99_ms']:.1f} ms; commit p50 {row['commit_p50_ms']:.1f} ms, "
              f"p99 {row['commit_p99_ms']:.1f} ms, {row['rows_per_batch_mean']:.0f} rows/batch")
    for row in results["dbos"]:
        print(dbos_line(row))
    if results["postgres_store"] and results["dbos"]:
        best = {r["workflows"]: r["transitions_per_s"] for r in results["postgres_store"]}
        for row in results["dbos"]:
            mine = best.get(row["workflows"])
            if mine:
                print(f"ratio at {row['workflows']} workflows: "
                      f"{mine / row['transitions_per_s']:.1f}x DBOS")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
