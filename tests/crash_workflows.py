"""Workflow definitions and a runner for the crash and store tests.

Subprocesses import this module as ``crash_workflows`` (``PYTHONPATH=/work/main:/work/main/
tests``), so every definition here is bound to a module-level name and resumable from a
fresh process. Never run it as ``__main__``: a definition made in ``__main__`` has no
import path. Start it with ``python -c "import crash_workflows; crash_workflows.main()" ...``.

Each stage of ``CRASH_FLOW`` appends one line ``"<stage> <attempt>"`` to
``{project_root}/effects/{workflow_id}.log`` (one ``write`` on an ``O_APPEND`` descriptor,
so a line is whole or absent), then sleeps. The line is the stage's side effect: counting
lines tells how often each stage really ran.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import traceback
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from machines import StageContext, StageSpec, WorkflowDefinition
from reliability import CriticalError, FileStore, Runtime, WorkflowConfiguration

__all__ = ["CRASH_FLOW", "CRASH_STAGES", "PARKED_FLOW", "PARK_IN", "ROOT", "crash_config",
           "effect_counts", "main", "subprocess_env"]

ROOT = Path(__file__).resolve().parent.parent
CRASH_STAGES = ("fetch", "plan", "build", "test", "package", "publish")
EFFECTS = "effects"
DURABILITY_VARIABLE = "CRASH_TEST_DURABILITY"  # a child's durability mode, from its parent


def subprocess_env() -> dict[str, str]:
    """The environment a child Python needs to import the project and this module."""
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}


def crash_config(**changes: Any) -> WorkflowConfiguration:
    """Quiet settings for crash runs: no health sampling, no log files."""
    settings: dict[str, Any] = {"enable_health_checks": False, "enable_monitoring": False,
                                "log_level": "WARNING", "checkpoint_frequency": 2,
                                "durability": os.environ.get(DURABILITY_VARIABLE, "strict")}
    settings.update(changes)
    return WorkflowConfiguration(**settings)


def effects_file(project_root: Path, workflow_id: str) -> Path:
    return project_root / EFFECTS / f"{workflow_id}.log"


def effect_counts(project_root: Path) -> dict[str, Counter[str]]:
    """Per workflow ID: how many times each stage's side effect happened."""
    counts: dict[str, Counter[str]] = {}
    directory = project_root / EFFECTS
    if not directory.exists():
        return counts
    for path in directory.glob("*.log"):
        lines = path.read_text().splitlines()
        counts[path.stem] = Counter(line.split()[0] for line in lines)
    return counts


# In-process tests put a stage name here to park that stage until it is cancelled.
PARK_IN: set[str] = set()


async def record_effect(ctx: StageContext) -> Mapping[str, Any]:
    """Append this stage's side-effect line, check earlier outputs arrived, then wait."""
    index = CRASH_STAGES.index(ctx.stage)
    missing = [s for s in CRASH_STAGES[:index] if ctx.context.get(f"{s}_output") != s.upper()]
    if missing:
        raise CriticalError(f"stage {ctx.stage} did not see the outputs of {missing}")
    path = effects_file(ctx.project_root, ctx.workflow_id)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, f"{ctx.stage} {ctx.attempt}\n".encode())
    finally:
        os.close(fd)
    if ctx.stage in PARK_IN:
        await asyncio.Event().wait()  # until cancelled
    await asyncio.sleep(float(ctx.context.get("stage_sleep", 0.05)))
    return {f"{ctx.stage}_output": ctx.stage.upper()}


CRASH_FLOW = WorkflowDefinition(
    "crash", [StageSpec(stage=name, handler=record_effect, timeout_seconds=60)
              for name in CRASH_STAGES])


async def _quick(ctx: StageContext) -> Mapping[str, Any]:
    return {ctx.stage: ctx.attempt}


async def _park(ctx: StageContext) -> None:
    (ctx.project_root / "parked").mkdir(exist_ok=True)
    (ctx.project_root / "parked" / ctx.workflow_id).touch()
    await asyncio.sleep(3600)


# Three quick stages whose states reach only the journal, then a stage that waits forever.
PARKED_FLOW = WorkflowDefinition(
    "parked", [StageSpec(stage="one", handler=_quick), StageSpec(stage="two", handler=_quick),
               StageSpec(stage="three", handler=_quick),
               StageSpec(stage="wait", handler=_park, timeout_seconds=7200)])

_FLOWS = {"crash": CRASH_FLOW, "parked": PARKED_FLOW}


async def _run(project_root: Path, flow: str, count: int, stage_sleep: float) -> None:
    (project_root / EFFECTS).mkdir(exist_ok=True)
    async with Runtime(crash_config(), project_root, configure_logs=False) as runtime:
        await asyncio.gather(*(runtime.run(_FLOWS[flow], context={"stage_sleep": stage_sleep})
                               for _ in range(count)))


async def _resume(project_root: Path, workflow_ids: list[str]) -> None:
    async with Runtime(crash_config(), project_root, configure_logs=False) as runtime:
        results = await asyncio.gather(*(runtime.resume(w) for w in workflow_ids))
    for result in results:
        print(result.workflow_id, result.status, result.resumed_from, flush=True)


async def _hold_claim(project_root: Path, workflow_id: str) -> None:
    store = FileStore(project_root / "states", project_root / "checkpoints")
    await store.open()
    await store.claim(workflow_id)
    print("claimed", flush=True)
    await asyncio.sleep(3600)


async def _hold_journal(project_root: Path, workflow_id: str) -> None:
    store = FileStore(project_root / "states", project_root / "checkpoints")
    await store.open()
    state = {"workflow_id": workflow_id, "revision": 1, "status": "running"}
    await store.save(workflow_id, lambda: state)
    print("saved", flush=True)
    await asyncio.sleep(3600)


async def _rotate(project_root: Path, workflows: int) -> None:
    """Save revision after revision of ``workflows`` workflows through a store whose
    journal rotates every 4 KiB, printing each acknowledged one, until killed. Only the
    first revision asks for state files: the later ones live in journals until a full
    journal is retired, which is what a kill must not lose."""
    store = FileStore(project_root / "states", project_root / "checkpoints",
                      journal_limit=4096)
    await store.open()
    ids = [f"workflow-20240115-142315-{n:04x}" for n in range(workflows)]
    revision = 0
    while True:
        revision += 1
        await asyncio.gather(*(
            store.save(w, lambda w=w, r=revision: {"workflow_id": w, "revision": r,
                                                   "status": "running"},
                       checkpoint_stage="first" if revision == 1 else None) for w in ids))
        print("acked", revision, flush=True)


def serve() -> None:
    """Fork one child per stdin line ``ROOT COUNT SLEEP`` and print its pid.

    The child runs COUNT crash workflows in ROOT. Forking from this already-imported,
    single-threaded process (no event loop, no store open) costs milliseconds, so a test
    can kill a hundred runs quickly; the test reaps nothing: children are reaped here.
    """
    for line in sys.stdin:
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        root, count, sleep = line.split()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                asyncio.run(_run(Path(root), "crash", int(count), float(sleep)))
            except BaseException:
                traceback.print_exc()
                code = 1
            os._exit(code)
        print(pid, flush=True)


def main(argv: list[str] | None = None) -> None:
    """``run ROOT FLOW COUNT SLEEP`` | ``resume ROOT ID...`` | ``claim ROOT ID`` |
    ``journal ROOT ID`` | ``rotate ROOT WORKFLOWS`` | ``serve``."""
    command, *rest = argv if argv is not None else sys.argv[1:]
    if command == "serve":
        serve()
        return
    project_root = Path(rest.pop(0))
    if command == "run":
        asyncio.run(_run(project_root, rest[0], int(rest[1]), float(rest[2])))
    elif command == "resume":
        asyncio.run(_resume(project_root, rest))
    elif command == "claim":
        asyncio.run(_hold_claim(project_root, rest[0]))
    elif command == "journal":
        asyncio.run(_hold_journal(project_root, rest[0]))
    elif command == "rotate":
        asyncio.run(_rotate(project_root, int(rest[0])))
    else:
        raise SystemExit(f"unknown command {command!r}")
