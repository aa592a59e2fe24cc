"""Synthetic workloads: the definitions every figure runs, and the bare-asyncio twin.

Definitions are bound to module-level names (with explicit import paths), so a fresh
``Runtime`` finds them by import path when it resumes their workflows.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from machines import StageContext, StageSpec, WorkflowDefinition
from reliability import Clock, Runtime, Store, WorkflowConfiguration, WorkflowResult

__all__ = ["FLOW", "IO_BREAKER_FLOW", "IO_FLOW", "IO_FULL_FLOW", "IO_HEALTH_FLOW",
           "PARKED_FLOW", "RESUME_FLOW", "STAGES", "Gate", "Peer", "bare_io", "bare_step",
           "configuration", "install_gate", "remove_gate", "run_bare", "run_many",
           "runtime", "with_connections"]

STAGES = 19  # the development workflow's stage count, so rates compare with real use
IO_SECONDS = 0.01
BareHandler = Callable[[Any], Awaitable[None]]


async def bare_step(ctx: object) -> None:
    await asyncio.sleep(0)


class Peer:
    """The loopback peer (``_responder.py``) that answers each request IO_SECONDS later:
    the stages' "10 ms of awaited I/O" is a real socket round trip, as a network call
    would be (see that module for why not ``asyncio.sleep``)."""

    def __init__(self, delay: float = IO_SECONDS) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-I", str(Path(__file__).with_name("_responder.py")), str(delay)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self._process.stdout is not None
        line = self._process.stdout.readline()
        if not line.strip().isdigit():
            self.close()
            raise RuntimeError(f"the benchmark's loopback peer did not start: {line!r}")
        self.port = int(line)

    def close(self) -> None:
        self._process.kill()
        self._process.wait()
        for pipe in (self._process.stdin, self._process.stdout):
            if pipe is not None:
                pipe.close()

    def __enter__(self) -> Peer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_connections: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []


async def with_connections(port: int, count: int, work: Awaitable[Any]) -> Any:
    """Await ``work`` with ``count`` connections to the peer open (one per concurrent
    stage), opened before and closed after: no figure times a connect."""
    for _ in range(count):
        _connections.append(await asyncio.open_connection("127.0.0.1", port))
    try:
        return await work
    finally:
        for _, writer in _connections:
            writer.close()
        _connections.clear()


async def _round_trip() -> None:
    connection = _connections.pop()
    reader, writer = connection
    writer.write(b"q")
    await reader.readexactly(1)
    _connections.append(connection)


async def bare_io(ctx: object) -> None:
    await _round_trip()


async def _io_call() -> None:
    await _round_trip()


async def io_via_breaker(ctx: StageContext) -> None:
    await ctx.call("bench", _io_call)


class Gate:
    """Where handlers park: counts arrivals and holds them until ``release()``.

    ``all_in`` is set when ``expected`` handlers have arrived, so a figure measures the
    moment every workflow is inside its stage rather than guessing with a sleep.
    """

    def __init__(self, expected: int, *, open_now: bool = False) -> None:
        self.expected = expected
        self.arrived = 0
        self.all_in = asyncio.Event()
        self._open = asyncio.Event()
        if open_now:
            self._open.set()

    async def enter(self) -> None:
        self.arrived += 1
        if self.arrived >= self.expected:
            self.all_in.set()
        await self._open.wait()

    def release(self) -> None:
        self._open.set()


_GATES: dict[str, Gate] = {}


def install_gate(name: str, gate: Gate) -> Gate:
    _GATES[name] = gate
    return gate


def remove_gate(name: str) -> None:
    _GATES.pop(name, None)


async def _through(name: str) -> None:
    gate = _GATES.get(name)
    if gate is not None:
        await gate.enter()


async def parked(ctx: StageContext) -> None:
    await _through("park")


async def resume_gate(ctx: StageContext) -> None:
    await _through("resume")


def _flow(name: str, handler: Callable[[StageContext], Awaitable[None]], *,
          health_check: bool = False, special: dict[int, Callable[[StageContext],
                                                                 Awaitable[None]]] | None = None,
          ) -> WorkflowDefinition:
    special = special or {}
    specs = [StageSpec(stage=f"s{i}", handler=special.get(i, handler), health_check=health_check)
             for i in range(STAGES)]
    return WorkflowDefinition(name, specs, import_path_hint=f"benchmarks._workloads:{name}")


FLOW = _flow("FLOW", bare_step)
IO_FLOW = _flow("IO_FLOW", bare_io)
IO_BREAKER_FLOW = _flow("IO_BREAKER_FLOW", io_via_breaker)
IO_HEALTH_FLOW = _flow("IO_HEALTH_FLOW", bare_io, health_check=True)
IO_FULL_FLOW = _flow("IO_FULL_FLOW", io_via_breaker, health_check=True)
PARKED_FLOW = _flow("PARKED_FLOW", bare_step, special={0: parked})
RESUME_FLOW = _flow("RESUME_FLOW", bare_step, special={2: resume_gate})  # blocks in stage 3


def configuration(*, persistence: bool = False, health: bool = False,
                  monitoring: bool = False, log_level: str = "WARNING",
                  durability: str = "strict") -> WorkflowConfiguration:
    """Every optional feature off unless asked for, so each figure names what it measures.

    The interpreter is tuned as the command line's long-running commands tune it (the
    library's default leaves it alone): the figures measure the runtime as it is run."""
    return WorkflowConfiguration(log_level=log_level, enable_persistence=persistence,
                                 enable_health_checks=health, enable_monitoring=monitoring,
                                 durability=durability, tune_interpreter=True)


@contextlib.asynccontextmanager
async def runtime(root: Path, config: WorkflowConfiguration, *,
                  store: Store | None = None, clock: Clock | None = None,
                  ) -> AsyncIterator[Runtime]:
    # configure_logs=False: the runtime's console handler would print every INFO record;
    # the monitoring case installs file-only logging itself (see _overhead.py).
    async with Runtime(config, project_root=root, store=store, clock=clock,
                       configure_logs=False) as rt:
        yield rt


async def run_many(rt: Runtime, flow: WorkflowDefinition, count: int) -> list[WorkflowResult]:
    """Run ``count`` workflows concurrently; raise if any did not complete."""
    results = await asyncio.gather(*(rt.run(flow) for _ in range(count)))
    failed = [r for r in results if r.status != "completed"]
    if failed:
        raise RuntimeError(f"{len(failed)} of {count} workflows ended {failed[0].status}: "
                           f"{failed[0].error}")
    return results


async def _bare_workflow(handlers: Sequence[BareHandler]) -> None:
    for handler in handlers:
        await handler(None)


async def run_bare(count: int, handler: BareHandler) -> float:
    """Seconds for ``count`` concurrent plain-asyncio workflows of STAGES handler calls."""
    handlers = [handler] * STAGES
    started = time.perf_counter()
    await asyncio.gather(*(_bare_workflow(handlers) for _ in range(count)))
    return time.perf_counter() - started
