"""Worker processes sharing one PostgreSQL server vs DBOS, same workload, same run.

``python -m benchmarks.cluster [--workers 1,2,4] [--workflows 2000] [--concurrency 250]
[--dbos-workflows 1000] [--dbos-mode async|sync] [--json FILE]`` starts a throwaway server
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

Then DBOS (``pip install 'dbos==3.4.*'``), through ``benchmarks._pgstore``'s DBOS run: N
workflows of 19 no-op steps on a database of its own on the same server. The URL reaches
every child on its environment or stdin, never on a command line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
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


async def _worker(concurrency: int, root: str) -> dict[str, Any]:
    """One worker process's run (the store URL from WORKFLOW_STORE_URL)."""
    from reliability import Runtime
    from reliability._postgres import PostgresStore
    async with Runtime(_config(), root) as runtime:
        count = await runtime.serve(concurrency=concurrency, exit_when_idle=True)
        store = runtime.store
        assert isinstance(store, PostgresStore)
        commits = list(store.commit_seconds)
    return {"workflows_run": count, "commit_seconds": commits}


async def _submit(url: str, workflows: int, root: str) -> None:
    from reliability import Runtime
    from reliability._cluster import submit_many
    os.environ["WORKFLOW_STORE_URL"] = url
    try:
        async with Runtime(_config(), root) as runtime:
            await submit_many(runtime, [(NOOP19, {})] * workflows)
    finally:
        del os.environ["WORKFLOW_STORE_URL"]


async def _window(url: str) -> tuple[float, int]:
    """Seconds from the first claim to the last final write (database clock), and how
    many workflows completed."""
    import asyncpg
    connection = await asyncpg.connect(url)
    try:
        row = await connection.fetchrow(
            "SELECT extract(epoch FROM (SELECT max(updated_at) FROM workflows) - "
            "(SELECT min(at) FROM workflow_writes WHERE kind = 'claim')) AS seconds, "
            "(SELECT count(*) FROM workflows WHERE status = 'completed') AS completed")
    finally:
        await connection.close()
    return float(row["seconds"]), int(row["completed"])


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
    if function is None or wal is None or not function["calls"]:
        return None
    return {"server_commits": function["calls"],
            "server_commit_mean_ms": function["total_time"] / function["calls"],
            "wal_syncs": wal["wal_sync"], "wal_sync_time_ms": wal["wal_sync_time"]}


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
                      concurrency: int) -> dict[str, Any]:
    """N workflows served by ``workers`` processes on a fresh database of the server."""
    database = await _fresh_database(url, "bench_cluster")
    timed = await _timed(url, database)
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as root:
        await _submit(database, workflows, root)
        before = await _server_times(url, database) if timed else None
        env = {**os.environ, "WORKFLOW_STORE_URL": database, "PYTHONPATH": str(ROOT)}
        start = time.perf_counter()
        processes = [await asyncio.create_subprocess_exec(
            sys.executable, "-m", "benchmarks._cluster", "--worker", str(concurrency),
            "--root", root, cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE) for _ in range(workers)]
        outputs = [await p.communicate() for p in processes]
        wall = time.perf_counter() - start
    for process, (_, err) in zip(processes, outputs, strict=True):
        if process.returncode != 0:
            raise RuntimeError(f"a worker failed: {err.decode(errors='replace')[-2000:]}")
    runs = [json.loads(out.decode().strip().splitlines()[-1]) for out, _ in outputs]
    seconds, completed = await _window(database)
    if completed != workflows:
        raise RuntimeError(f"{completed} of {workflows} workflows completed")
    commits = [c for run in runs for c in run["commit_seconds"]]
    transitions = workflows * len(NOOP19.stages)
    figures = {"workers": workers, "workflows": workflows, "concurrency": concurrency,
               "transitions": transitions, "seconds": seconds,
               "transitions_per_s": transitions / seconds, "wall_seconds": wall,
               "per_worker": [r["workflows_run"] for r in runs], "batches": len(commits),
               "commit_p50_ms": statistics.median(commits) * 1000,
               "commit_p99_ms": _percentile(commits, 0.99) * 1000}
    after = await _server_times(url, database) if timed else None
    if after is not None:
        # Where a commit's time goes: the server's work in the statement, then the WAL
        # sync of its COMMIT; the rest of what the worker measured is the way there and
        # back, waiting for a CPU and the worker's event loop.
        syncs = after["wal_syncs"] - (before["wal_syncs"] if before else 0)
        sync_ms = after["wal_sync_time_ms"] - (before["wal_sync_time_ms"] if before else 0)
        figures.update(server_commit_mean_ms=after["server_commit_mean_ms"],
                       commit_mean_ms=statistics.fmean(commits) * 1000,
                       wal_syncs=syncs, wal_sync_mean_ms=sync_ms / syncs if syncs else 0.0)
    return figures


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
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(asyncio.run(_worker(args.worker, args.root))))
        return 0

    async def run(url: str) -> dict[str, list[dict[str, Any]]]:
        results: dict[str, list[dict[str, Any]]] = {"cluster": [], "dbos": []}
        for n in (int(x) for x in args.workers.split(",") if x):
            results["cluster"].append(await cluster_run(url, n, args.workflows,
                                                        args.concurrency))
        if args.dbos_workflows:
            results["dbos"].append(await dbos_run(url, int(args.dbos_workflows),
                                                  args.dbos_mode))
        return results

    results = on_server(run)
    for row in results["cluster"]:
        print(f"{row['workers']} worker(s), {row['workflows']} workflows: "
              f"{row['transitions_per_s']:8.0f} transitions/s ({row['wall_seconds']:.1f} s "
              f"wall with start-up); commit p50 {row['commit_p50_ms']:.1f} ms, p99 "
              f"{row['commit_p99_ms']:.1f} ms over {row['batches']} batches")
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
