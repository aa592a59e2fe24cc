"""Figure 7: the throughput workload on DBOS with SQLite, beside ours in the same run.

DBOS is an optional extra (``pip install 'workflow-manager[bench]'``); without it the row
says so. It is imported by name at run time so this module type-checks either way.
DBOS runs in this process (after every other figure): it starts background threads and
keeps a global registry, torn down with ``DBOS.destroy()``.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.metadata
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from ._measure import median, settle
from ._plan import Plan
from ._results import Figure, Target
from ._throughput import run_runtime_case
from ._workloads import STAGES

__all__ = ["dbos_version", "measure_peer"]

OUR_RUNS = 3


def dbos_version() -> str | None:
    try:
        return importlib.metadata.version("dbos")
    except importlib.metadata.PackageNotFoundError:
        return None


def _load_dbos() -> ModuleType | str:
    try:
        return importlib.import_module("dbos")
    except ImportError as error:
        return (f"DBOS is not installed ({error}); pip install 'workflow-manager[bench]' "
                "to measure it")


async def _dbos_run(dbos: ModuleType, database: Path, count: int) -> float:
    """Seconds for ``count`` concurrent DBOS workflows of STAGES async steps each."""
    api: Any = dbos.DBOS

    async def bench_step() -> None:
        await asyncio.sleep(0)

    async def bench_workflow() -> None:
        for _ in range(STAGES):
            await step()

    # Decorators applied as calls: DBOS is untyped here (imported by name).
    step = api.step(name="bench_step")(bench_step)
    workflow = api.workflow(name="bench_workflow")(bench_workflow)
    api(config={"name": "workflow-manager-bench", "log_level": "WARNING",
                "system_database_url": f"sqlite:///{database}"})
    api.launch()
    try:
        started = time.perf_counter()
        await asyncio.gather(*(workflow() for _ in range(count)))
        return time.perf_counter() - started
    finally:
        api.destroy(destroy_registry=True)


def measure_peer(plan: Plan) -> Figure:
    count = plan.peer_workflows
    figure = Figure("peer", f"Peer: {count} workflows x {STAGES} steps, this runtime "
                            "(FileStore) vs DBOS on SQLite, same run")
    # Ours takes ~0.2 s, where one slow fdatasync moves the rate by a third; DBOS's run
    # takes seconds and averages such moments out. So ours is the median of three.
    rates = []
    for _ in range(OUR_RUNS):
        settle(wait_idle=plan.wait_idle)
        rates.append(asyncio.run(run_runtime_case(plan, "file", count)).rate)
    ours = median(rates)
    figure.row("ours", f"this runtime + FileStore (median of {OUR_RUNS} runs)").add(
        "rate", ours, "/s", higher_is_better=True)
    dbos = _load_dbos()
    if isinstance(dbos, str):
        figure.row("dbos", "DBOS on SQLite").skipped = dbos
        return figure
    settle(wait_idle=plan.wait_idle)
    database = plan.fresh_root("dbos") / "dbos.sqlite"
    seconds = asyncio.run(_dbos_run(dbos, database, count))
    rate = count * STAGES / seconds
    figure.row("dbos", f"DBOS {dbos_version()} on SQLite (async steps)").add(
        "rate", rate, "/s", higher_is_better=True).add("wall", seconds, "s")
    figure.row("ratio", "this runtime / DBOS", targets=(Target("ratio", ">=", 40.0,
                                                                ">= 40x"),)).add(
        "ratio", ours / rate, "x", higher_is_better=True)
    figure.notes.append("DBOS's SQLite pool has 20 connections; far above that many concurrent "
                        "workflows it waits on pool timeouts (30 s), so the default stays "
                        "at 200 (--peer-workflows to change)")
    return figure
