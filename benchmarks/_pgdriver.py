"""Which PostgreSQL driver the store uses: asyncpg vs psycopg 3 (async), measured.

``python -m benchmarks.pgdriver [--rounds N] [--batch N]`` starts a throwaway server
(``tests/postgres_server.py``; or uses ``WORKFLOW_TEST_POSTGRES_URL``) and times, for each
driver, what the PostgreSQL store does:

- group commit: N workflows' state documents (~2 KB JSONB each) upserted in one
  transaction, three ways: ``executemany``, one statement over ``unnest`` arrays, and
  COPY into a temporary table then one upsert;
- a fenced write: one single-row ``UPDATE ... WHERE id AND owner AND epoch`` per
  round trip, each its own transaction (commit waits for fsync);
- a claim: ``UPDATE ... WHERE id = (SELECT ... FOR UPDATE SKIP LOCKED LIMIT 1)``;
- LISTEN/NOTIFY: from ``pg_notify`` on one connection to the callback on another.

Each figure is the median of ``--rounds`` runs, the two drivers interleaved so a busy
machine hurts both alike. Prints a table; ``--json FILE`` writes it too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson

SCHEMA = """
DROP TABLE IF EXISTS bench_workflows;
CREATE TABLE bench_workflows (
    id text PRIMARY KEY, owner text, epoch bigint NOT NULL DEFAULT 0,
    status text NOT NULL DEFAULT 'queued', state jsonb NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now());
"""
UPSERT_ONE = ("INSERT INTO bench_workflows (id, owner, epoch, state) VALUES ($1, $2, 1, "
              "$3::jsonb) ON CONFLICT (id) DO UPDATE SET state = EXCLUDED.state, "
              "updated_at = now() WHERE bench_workflows.owner = EXCLUDED.owner")
UPSERT_UNNEST = ("INSERT INTO bench_workflows (id, owner, epoch, state) SELECT i, $1, 1, s "
                 "FROM unnest($2::text[], $3::jsonb[]) AS u(i, s) ON CONFLICT (id) DO UPDATE "
                 "SET state = EXCLUDED.state, updated_at = now() "
                 "WHERE bench_workflows.owner = EXCLUDED.owner")
UPSERT_FROM_STAGE = ("INSERT INTO bench_workflows (id, owner, epoch, state) SELECT id, owner, 1, "
                     "state FROM bench_stage ON CONFLICT (id) DO UPDATE SET state = "
                     "EXCLUDED.state, updated_at = now() "
                     "WHERE bench_workflows.owner = EXCLUDED.owner")
FENCED = ("UPDATE bench_workflows SET state = $1::jsonb, updated_at = now() "
          "WHERE id = $2 AND owner = $3 AND epoch = $4")
CLAIM = ("UPDATE bench_workflows SET owner = $1, epoch = epoch + 1, status = 'running' "
         "WHERE id = (SELECT id FROM bench_workflows WHERE status = 'queued' "
         "ORDER BY id FOR UPDATE SKIP LOCKED LIMIT 1) RETURNING id, epoch")


def _document(index: int) -> str:
    outputs = {f"stage_{i}": {"ok": True, "value": i * index, "text": "x" * 64}
               for i in range(12)}
    return orjson.dumps({"workflow_id": f"wf-{index}", "revision": index, "status": "running",
                         "progress_data": outputs, "completed_stages": list(outputs)}).decode()


def _psycopg_sql(query: str) -> str:
    # The same statements in psycopg's placeholder style (each $n is used once, in order).
    return re.sub(r"\$\d+", "%s", query)


class _Asyncpg:
    name = "asyncpg"

    def __init__(self, url: str) -> None:
        self.url = url

    async def connect(self) -> Any:
        import asyncpg
        return await asyncpg.connect(self.url)

    async def setup(self) -> None:
        connection = await self.connect()
        await connection.execute(SCHEMA)
        await connection.close()

    async def group_executemany(self, c: Any, rows: list[tuple[str, str, str]]) -> None:
        async with c.transaction():
            await c.executemany(UPSERT_ONE, rows)

    async def group_unnest(self, c: Any, rows: list[tuple[str, str, str]]) -> None:
        async with c.transaction():
            await c.execute(UPSERT_UNNEST, rows[0][1], [r[0] for r in rows],
                            [r[2] for r in rows])

    async def group_copy(self, c: Any, rows: list[tuple[str, str, str]]) -> None:
        async with c.transaction():
            await c.execute("CREATE TEMP TABLE IF NOT EXISTS bench_stage (id text, owner text, "
                            "state jsonb) ON COMMIT DELETE ROWS")
            await c.copy_records_to_table("bench_stage", records=rows)
            await c.execute(UPSERT_FROM_STAGE)

    async def fenced(self, c: Any, doc: str, workflow_id: str, owner: str) -> None:
        await c.execute(FENCED, doc, workflow_id, owner, 1)

    async def claim(self, c: Any, owner: str) -> Any:
        return await c.fetchrow(CLAIM, owner)

    async def execute(self, c: Any, query: str) -> None:
        await c.execute(query)

    async def listen(self, c: Any, channel: str, callback: Callable[[str], None]) -> None:
        await c.add_listener(channel, lambda *args: callback(args[3]))

    async def notify(self, c: Any, channel: str, payload: str) -> None:
        await c.execute("SELECT pg_notify($1, $2)", channel, payload)

    async def close(self, c: Any) -> None:
        await c.close()


class _Psycopg:
    name = "psycopg"

    def __init__(self, url: str) -> None:
        self.url = url
        self._listeners: list[asyncio.Task[None]] = []

    async def connect(self) -> Any:
        import psycopg
        return await psycopg.AsyncConnection.connect(self.url, autocommit=True,
                                                     prepare_threshold=0)

    async def setup(self) -> None:
        connection = await self.connect()
        for statement in filter(str.strip, SCHEMA.split(";")):  # one per prepared statement
            await connection.execute(statement)
        await connection.close()

    async def group_executemany(self, c: Any, rows: list[tuple[str, str, str]]) -> None:
        async with c.transaction(), c.cursor() as cursor:
            await cursor.executemany(_psycopg_sql(UPSERT_ONE), rows)

    async def group_unnest(self, c: Any, rows: list[tuple[str, str, str]]) -> None:
        async with c.transaction():
            await c.execute(_psycopg_sql(UPSERT_UNNEST),
                            (rows[0][1], [r[0] for r in rows], [r[2] for r in rows]))

    async def group_copy(self, c: Any, rows: list[tuple[str, str, str]]) -> None:
        async with c.transaction():
            await c.execute("CREATE TEMP TABLE IF NOT EXISTS bench_stage (id text, owner text, "
                            "state jsonb) ON COMMIT DELETE ROWS")
            async with c.cursor() as cursor, cursor.copy(
                    "COPY bench_stage (id, owner, state) FROM STDIN") as copy:
                for row in rows:
                    await copy.write_row(row)
            await c.execute(UPSERT_FROM_STAGE)

    async def fenced(self, c: Any, doc: str, workflow_id: str, owner: str) -> None:
        await c.execute(_psycopg_sql(FENCED), (doc, workflow_id, owner, 1))

    async def claim(self, c: Any, owner: str) -> Any:
        cursor = await c.execute(_psycopg_sql(CLAIM), (owner,))
        return await cursor.fetchone()

    async def execute(self, c: Any, query: str) -> None:
        await c.execute(query)

    async def listen(self, c: Any, channel: str, callback: Callable[[str], None]) -> None:
        await c.execute(f"LISTEN {channel}")

        async def pump() -> None:
            async for notify in c.notifies():
                callback(notify.payload)

        self._listeners.append(asyncio.create_task(pump()))

    async def notify(self, c: Any, channel: str, payload: str) -> None:
        await c.execute("SELECT pg_notify(%s, %s)", (channel, payload))

    async def close(self, c: Any) -> None:
        for task in self._listeners:
            task.cancel()
        self._listeners.clear()
        await c.close()


Driver = _Asyncpg | _Psycopg


async def _timed(call: Callable[[], Awaitable[Any]]) -> float:
    start = time.perf_counter()
    await call()
    return time.perf_counter() - start


async def _measure(driver: Driver, batch: int, singles: int) -> dict[str, float]:
    await driver.setup()
    c = await driver.connect()
    figures: dict[str, float] = {}
    owner = "worker-1"
    try:
        for method in ("executemany", "unnest", "copy"):
            run = getattr(driver, f"group_{method}")
            rows = [(f"wf-{i}", owner, _document(i)) for i in range(batch)]
            await run(c, rows)  # warm: the rows exist, as for a running workflow's saves
            elapsed = await _timed(lambda run=run, rows=rows: run(c, rows))
            figures[f"group_{method}_ms"] = elapsed * 1000
            figures[f"group_{method}_rows_per_s"] = batch / elapsed
        doc = _document(7)
        latencies = []
        for i in range(singles):
            latencies.append(await _timed(
                lambda i=i: driver.fenced(c, doc, f"wf-{i % batch}", owner)))
        figures["fenced_update_p50_ms"] = statistics.median(latencies) * 1000
        figures["fenced_update_p99_ms"] = sorted(latencies)[int(len(latencies) * 0.99)] * 1000
        await driver.execute(c, "UPDATE bench_workflows SET status = 'queued', owner = NULL")
        claims = [await _timed(lambda: driver.claim(c, owner)) for _ in range(singles)]
        figures["claim_p50_ms"] = statistics.median(claims) * 1000
        listener = await driver.connect()
        try:
            arrived: asyncio.Queue[str] = asyncio.Queue()
            await driver.listen(listener, "bench_wake", arrived.put_nowait)
            waits = []
            for i in range(singles):
                start = time.perf_counter()
                await driver.notify(c, "bench_wake", str(i))
                while await arrived.get() != str(i):
                    pass
                waits.append(time.perf_counter() - start)
            figures["notify_p50_ms"] = statistics.median(waits) * 1000
            figures["notify_p99_ms"] = sorted(waits)[int(len(waits) * 0.99)] * 1000
        finally:
            await driver.close(listener)
    finally:
        await driver.close(c)
    return figures


async def _run(url: str, rounds: int, batch: int, singles: int) -> dict[str, dict[str, float]]:
    samples: dict[str, list[dict[str, float]]] = {"asyncpg": [], "psycopg": []}
    for _ in range(rounds):
        for driver in (_Asyncpg(url), _Psycopg(url)):
            samples[driver.name].append(await _measure(driver, batch, singles))
    return {name: {key: statistics.median(s[key] for s in runs) for key in runs[0]}
            for name, runs in samples.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pgdriver",
                                     description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1000, help="workflows per group commit")
    parser.add_argument("--singles", type=int, default=200, help="round trips per figure")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    from ._pgstore import on_server
    result = on_server(lambda url: _run(url, args.rounds, args.batch, args.singles))
    keys = list(result["asyncpg"])
    print(f"{'figure (median of ' + str(args.rounds) + ')':34} {'asyncpg':>12} {'psycopg':>12}")
    for key in keys:
        print(f"{key:34} {result['asyncpg'][key]:12.2f} {result['psycopg'][key]:12.2f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0
