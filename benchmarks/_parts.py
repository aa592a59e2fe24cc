"""``python -m benchmarks parts``: what the parts of a stage cost on this machine alone.

Issue 17's targets are budgets per stage: 20 us of loop CPU for the engine alone
(50,000/s), 40 us with every feature, 2 % of a 10 ms stage (~210 us) for one workflow.
This measures, each on its own, the parts a stage cannot do without, so a missed target
can be set against what its parts cost here, outside the runtime:

- ``fdatasync`` of one journal-sized append (2,300 bytes), back to back and after a
  10 ms idle gap (what a strict stage waits for: one sync per stage for one workflow);
- a pipe round trip between two processes, back to back and after the gap (the
  loop -> writer -> loop hand-over, without the sync);
- ``FileStore.save`` of one workflow after the gap: the whole durable path, as a strict
  stage of one workflow waits for it;
- the canonical encoding of a 19-stage workflow's state at its last stage
  (``to_state(encoded=True)`` + the store's ``canonical``), as every save encodes it;
- a ``transitions`` AsyncMachine trigger (queued, one model), awaited: the package's
  own cost of moving one state, and the definition's short path (``advance_now``), which
  the engine takes instead whenever the move has no callbacks (every stage's here);
- bare asyncio per stage: tasks that await a no-op coroutine 19 times, 1,000 at once
  (the loop's own cost of a stage with no runtime at all);
- the bare one-workflow stage against the loopback peer (10 ms of I/O): the wall time
  the overhead target takes 2 % of.

Each is the median (and p90) of ``--samples`` readings. The last lines put them together:
the one-workflow strict overhead that the sync and the hand-over alone cost, and the
loop CPU that encoding, a trigger and asyncio's step alone cost, against the targets.
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
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from transitions.extensions.asyncio import AsyncMachine

from reliability import FileStore
from reliability._state import COMPLETED, PENDING, WorkflowRun
from reliability._store._protocol import canonical

from ._workloads import FLOW, STAGES, Peer, bare_io, run_bare, with_connections

__all__ = ["Part", "main", "measure_parts"]

_GAP = 0.010  # the idle time between two stages of one workflow (10 ms of I/O)
_APPEND = b"x" * 2_299 + b"\n"  # a journal record of a 19-stage workflow, about
_ONE_WORKFLOW = "workflow-20261201-000000-abcd"


@dataclass(frozen=True, slots=True)
class Part:
    name: str
    label: str
    p50_us: float
    p90_us: float


def _summary(name: str, label: str, seconds: list[float]) -> Part:
    ordered = sorted(seconds)
    return Part(name, label, statistics.median(ordered) * 1e6,
                ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))] * 1e6)


def _fdatasync(directory: Path, samples: int, gap: float) -> list[float]:
    fd = os.open(directory / "journal.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        readings = []
        for _ in range(samples):
            if gap:
                time.sleep(gap)
            os.write(fd, _APPEND)
            started = time.perf_counter()
            os.fdatasync(fd)
            readings.append(time.perf_counter() - started)
        return readings
    finally:
        os.close(fd)


def _pipe_round_trips(samples: int, gap: float) -> list[float]:
    """One byte to a child process and back, ``samples`` times (the child echoes)."""
    from_parent, to_child = os.pipe()
    from_child, to_parent = os.pipe()
    pid = os.fork()
    if pid == 0:  # the echo: nothing but reads and writes, until its input closes
        os.close(to_child)
        os.close(from_child)
        while byte := os.read(from_parent, 1):
            os.write(to_parent, byte)
        os._exit(0)
    os.close(from_parent)
    os.close(to_parent)
    try:
        readings = []
        for _ in range(samples):
            if gap:
                time.sleep(gap)
            started = time.perf_counter()
            os.write(to_child, b"x")
            os.read(from_child, 1)
            readings.append(time.perf_counter() - started)
        return readings
    finally:
        os.close(to_child)
        os.close(from_child)
        os.waitpid(pid, 0)


def _finished_run() -> WorkflowRun:
    """A 19-stage workflow at its last stage, its history as the engine records it."""
    run = WorkflowRun(_ONE_WORKFLOW, definition_name="FLOW", definition_path="a.b:FLOW",
                      context={"prompt": "Add a health endpoint to the service."},
                      prompt_file="prompts/p000001.md", created_at=1_790_000_000.0)
    for index in range(STAGES):
        run.completed_stages.append(f"s{index}")
        run.stage_history.append({"stage": f"s{index}", "started_at": 1_790_000_000.0 + index,
                                  "duration": 0.000123, "baseline": None, "attempts": 1,
                                  "status": "completed"})
    return run


def _per_call(function: Callable[[], object], samples: int, calls: int) -> list[float]:
    readings = []
    for _ in range(samples):
        started = time.perf_counter()
        for _ in range(calls):
            function()
        readings.append((time.perf_counter() - started) / calls)
    return readings


def _encoding(samples: int) -> list[float]:
    run = _finished_run()
    run.to_state(encoded=True)  # the entries' encodings are kept from earlier saves
    return _per_call(lambda: canonical(run.to_state(encoded=True)), samples, 200)


async def _triggers(samples: int, calls: int) -> list[float]:
    class Model:
        pass

    states = [f"s{index}" for index in range(STAGES)]
    machine = AsyncMachine(states=states, initial=states[0], auto_transitions=False,
                           queued="model")
    machine.add_ordered_transitions(states, trigger="advance", loop=True)
    model = Model()
    machine.add_model(model, initial=states[0])
    readings = []
    for _ in range(samples):
        started = time.perf_counter()
        for _ in range(calls):
            await model.advance()  # type: ignore[attr-defined]
        readings.append((time.perf_counter() - started) / calls)
    return readings


def _short_moves(samples: int) -> list[float]:
    """``advance_now`` through the 19 stages of the benchmarks' flow, per move."""
    readings = []
    for _ in range(samples):
        runs = [_finished_run() for _ in range(10)]
        started = time.perf_counter()
        for run in runs:
            FLOW.attach(run, PENDING)
            while FLOW.advance_now(run) and run.state != COMPLETED:
                pass
            FLOW.detach(run)
        readings.append((time.perf_counter() - started) / (len(runs) * (STAGES + 1)))
    return readings


async def _noop(ctx: object) -> None:
    return None


async def _bare_stages(samples: int, workflows: int) -> list[float]:
    readings = []
    for _ in range(samples):
        seconds = await run_bare(workflows, _noop)
        readings.append(seconds / (workflows * STAGES))
    return readings


async def _saves_after_gap(directory: Path, samples: int) -> list[float]:
    store = FileStore(directory / "states", directory / "checkpoints")
    await store.open()
    try:
        run = _finished_run()
        readings = []
        for _ in range(samples):
            await asyncio.sleep(_GAP)
            started = time.perf_counter()
            await store.save(run.workflow_id, run.to_state)
            readings.append(time.perf_counter() - started)
        return readings
    finally:
        await store.close()


def _bare_stage_wall(samples: int) -> list[float]:
    with Peer(_GAP) as peer:
        return [asyncio.run(with_connections(peer.port, 1, run_bare(1, bare_io))) / STAGES
                for _ in range(samples)]


def measure_parts(directory: Path, samples: int) -> list[Part]:
    """Every part, in the order the module's docstring gives."""
    rounds = max(1, samples // 10)
    return [
        _summary("fdatasync", "fdatasync of a 2.3 KB append, back to back",
                 _fdatasync(directory, samples, 0.0)),
        _summary("fdatasync_after_gap", "fdatasync of a 2.3 KB append, after 10 ms idle",
                 _fdatasync(directory, samples, _GAP)),
        _summary("pipe", "pipe round trip to a child process, back to back",
                 _pipe_round_trips(samples, 0.0)),
        _summary("pipe_after_gap", "pipe round trip to a child process, after 10 ms idle",
                 _pipe_round_trips(samples, _GAP)),
        _summary("save_after_gap", "FileStore.save of one workflow, after 10 ms idle",
                 asyncio.run(_saves_after_gap(directory, samples))),
        _summary("encoding", "canonical encoding of a 19-stage workflow's last save",
                 _encoding(samples)),
        _summary("trigger", "transitions AsyncMachine trigger, awaited",
                 asyncio.run(_triggers(samples, 200))),
        _summary("short_move", "the definition's advance_now (the engine's move), "
                               "with attach and detach", _short_moves(samples)),
        _summary("asyncio_stage", "bare asyncio stage (a task awaiting a no-op), 1,000 "
                                  "workflows", asyncio.run(_bare_stages(rounds, 1_000))),
        _summary("bare_stage_wall", "bare stage of one workflow, 10 ms of loopback I/O "
                                    "(wall)", _bare_stage_wall(min(rounds, 5))),
    ]


def _budgets(parts: dict[str, Part]) -> list[str]:
    """The parts put together against the targets they bound."""
    stage = parts["bare_stage_wall"].p50_us
    sync = parts["fdatasync_after_gap"].p50_us
    path = parts["save_after_gap"].p50_us
    engine_parts = (parts["encoding"].p50_us + parts["short_move"].p50_us
                    + parts["asyncio_stage"].p50_us)
    return [
        f"one workflow, strict: a stage waits for one sync: {sync:,.0f} us = "
        f"{sync / stage * 100:.1f} % of its {stage / 1000:.2f} ms (target: 2 %); the whole "
        f"save path after the gap: {path:,.0f} us = {path / stage * 100:.1f} %",
        f"engine alone: a save's encoding + the machine's move + asyncio's stage = "
        f"{engine_parts:.1f} us of the 20 us a stage has at 50,000/s; the rest of a "
        f"stage's loop CPU is the runtime's own bookkeeping",
    ]


def main(argv: list[str] | None = None, *, prog: str = "python -m benchmarks parts") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=200, metavar="N",
                        help="readings per part (default 200)")
    parser.add_argument("--scratch", type=Path, metavar="DIR",
                        help="where the syncs and the store write (default: a temporary "
                             "directory); put it on the disk you want measured")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the parts here")
    args = parser.parse_args(argv)
    if args.samples < 10:
        parser.error("--samples must be >= 10")
    with tempfile.TemporaryDirectory(prefix="wm-parts-", dir=args.scratch) as directory:
        parts = measure_parts(Path(directory), args.samples)
    width = max(len(part.label) for part in parts)
    for part in parts:
        print(f"{part.label:<{width}}  p50 {part.p50_us:9,.1f} us  p90 {part.p90_us:9,.1f} us")
    by_name = {part.name: part for part in parts}
    for line in _budgets(by_name):
        print(line)
    print(f"(load average {os.getloadavg()[0]:.1f})")
    if args.json:
        args.json.write_text(json.dumps({"parts": [asdict(part) for part in parts],
                                         "load_average": os.getloadavg()[0]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
