"""``python -m benchmarks stagecost``: the event loop's CPU per stage, every feature on.

Workflows of 19 stages whose handler is one ``ctx.call`` (retry + breaker) of a no-op,
each stage health-checked before it starts, persisted to a FileStore with
``durability="strict"``, and INFO records written to the daily log file: what a stage
costs the loop with every feature on, apart from its own I/O. ``--store memory`` with
monitoring and health checks off is the engine alone.

The loop thread's CPU time is divided by the stages run (and the whole process's: the
log records' thread included); under
``valgrind --tool=callgrind`` the same command gives instructions, which do not move
with the machine's load (the figure to compare on a shared machine).
"""

from __future__ import annotations

import asyncio
import operator
import time
from dataclasses import dataclass
from pathlib import Path

from machines import StageContext, StageSpec, WorkflowDefinition
from reliability import MemoryStore

from ._overhead import _file_logging
from ._workloads import STAGES, configuration, run_many, runtime

__all__ = ["ALL_FLOW", "StageCost", "measure_stage_cost"]


async def _noop() -> None:
    return None


async def _called(ctx: StageContext) -> None:
    await ctx.call("bench", _noop)


ALL_FLOW = WorkflowDefinition(
    "ALL_FLOW", [StageSpec(stage=f"s{i}", handler=_called, health_check=True)
                 for i in range(STAGES)],
    import_path_hint="benchmarks._stagecost:ALL_FLOW")


@dataclass(frozen=True, slots=True)
class StageCost:
    stages: int
    seconds: float
    loop_cpu: float  # the loop thread's CPU seconds over the run
    process_cpu: float  # every thread of this process (the log writer's too), same span

    @property
    def us_per_stage(self) -> float:
        return self.loop_cpu / self.stages * 1e6

    @property
    def process_us_per_stage(self) -> float:
        """Work moved off the loop to a thread still holds the GIL: this says whether it
        went down or only moved."""
        return self.process_cpu / self.stages * 1e6

    @property
    def rate(self) -> float:
        return self.stages / self.seconds


async def _run(root: Path, count: int, *, every_feature: bool) -> StageCost:
    if every_feature:
        config = configuration(persistence=True, health=True, monitoring=True,
                               log_level="INFO", durability="strict")
        store = None
    else:
        config = configuration(persistence=True)
        store = MemoryStore()
    with _file_logging(root / "logs", every_feature):
        async with runtime(root, config, store=store) as rt:
            started, cpu = time.perf_counter(), time.thread_time()
            process = time.process_time()
            await run_many(rt, ALL_FLOW, count)
            seconds, cpu = time.perf_counter() - started, time.thread_time() - cpu
            process = time.process_time() - process
    return StageCost(count * STAGES, seconds, cpu, process)


def measure_stage_cost(root: Path, count: int, *, every_feature: bool = True,
                       counted: bool = True) -> StageCost:
    """Run ``count`` workflows once; the loop's CPU per stage and the rate.

    A ``counted`` run is called through ``operator.call``, which nothing else in it
    calls: under ``valgrind --tool=callgrind --collect-atstart=no
    --toggle-collect='_operator_call*'`` only such runs are counted, not the
    interpreter's start, the imports or a warm-up."""
    run = _run(root, count, every_feature=every_feature)
    return operator.call(asyncio.run, run) if counted else asyncio.run(run)
