"""The batch runner behind ``workflow-manager batch``: many prompts, one loop, one runtime.

Every workflow of the batch is first saved as ``pending`` (``Runtime.register``), then at
most ``concurrency`` run at once. A shutdown (Ctrl-C, SIGTERM) stops the running ones at a
safe point, ``interrupted`` and checkpointed, and starts no more; those never started stay
``pending``. Either way ``workflow-manager resume --all`` finishes the whole batch.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

from ._context import DefinitionLike
from ._errors import ConfigurationError
from ._logging import logger

if TYPE_CHECKING:
    from ._runtime import Runtime, WorkflowResult
    from ._state import WorkflowRun

__all__ = ["NOT_STARTED", "BatchDisplay", "BatchItem", "BatchSnapshot", "BatchTracker",
           "ProgressSource", "batch_report", "default_report_path", "expand_prompt_paths",
           "register_batch", "run_batch"]

NOT_STARTED = "not started"
RESUME_ALL = "workflow-manager resume --all"


def expand_prompt_paths(paths: Iterable[str], *, base: Path | None = None) -> list[Path]:
    """Prompt files, in order: files as given, directories as their ``*.md`` files sorted.

    A relative path is looked up in the current directory, then under ``base``. Raises
    ConfigurationError naming the first path that does not exist or holds no prompts.
    """
    found: list[Path] = []
    for raw in paths:
        path = _locate(Path(raw), base)
        if path.is_dir():
            prompts = sorted(p for p in path.glob("*.md") if p.is_file())
            if not prompts:
                raise ConfigurationError(f"directory {raw} holds no *.md prompt files")
            found.extend(prompts)
        else:
            found.append(path)
    return list(dict.fromkeys(p.resolve() for p in found))  # each prompt once, in order


def _locate(path: Path, base: Path | None) -> Path:
    if path.exists():
        return path
    if base is not None and not path.is_absolute() and (base / path).exists():
        return base / path
    raise ConfigurationError(f"prompt path {path} does not exist")


@dataclass(slots=True)
class BatchItem:
    """One prompt of a batch and what became of it."""

    prompt: Path
    workflow_id: str | None = None
    started: bool = False
    result: WorkflowResult | None = None
    error: str | None = None
    duration: float | None = None

    @property
    def status(self) -> str:
        if self.result is not None:
            return self.result.status
        return "failed" if self.error is not None else NOT_STARTED

    def to_dict(self) -> dict[str, Any]:
        result = self.result
        outputs = result.outputs if result is not None else {}
        metrics = result.reliability_metrics if result is not None else {}
        return {"prompt": str(self.prompt), "workflow_id": self.workflow_id,
                "status": self.status,
                "current_stage": result.current_stage if result is not None else None,
                "duration": round(self.duration, 3) if self.duration is not None else None,
                "pr_url": outputs.get("pr_url"), "pr_number": outputs.get("pr_number"),
                "grade": metrics.get("performance_grade"),
                "error": self.error or (result.error if result is not None else None)}


def _target(item: BatchItem, definition: DefinitionLike | None
            ) -> tuple[str | DefinitionLike, dict[str, Any] | None]:
    if definition is None:
        return str(item.prompt), None  # the development workflow reads the prompt itself
    return definition, {"prompt_file": str(item.prompt)}


async def run_batch(runtime: Runtime, prompts: list[Path], *,
                    definition: DefinitionLike | None, concurrency: int,
                    on_registered: Callable[[], None] | None = None) -> list[BatchItem]:
    """Run one workflow per prompt, at most ``concurrency`` at once; how each ended.
    ``on_registered`` is called once every workflow is saved ``pending``, before any runs.

    Never raises for one workflow's failure: its item carries the error instead.
    """
    items = [BatchItem(prompt) for prompt in prompts]
    if runtime.persistence:
        ids = await asyncio.gather(*(_register(runtime, item, definition) for item in items))
        for item, workflow_id in zip(items, ids, strict=True):
            item.workflow_id = workflow_id
    if on_registered is not None:
        on_registered()
    limit = asyncio.Semaphore(concurrency)
    await asyncio.gather(*(_run_one(runtime, item, definition, limit) for item in items))
    return items


async def _register(runtime: Runtime, item: BatchItem,
                    definition: DefinitionLike | None) -> str:
    target, context = _target(item, definition)
    return await runtime.register(target, context=context)


async def register_batch(runtime: Runtime, prompts: list[Path], *,
                         definition: DefinitionLike | None
                         ) -> list[tuple[str, str, dict[str, Any]]]:
    """Save one ``pending`` workflow per prompt, as ``Runtime.register`` does; for each,
    (ID, prompt, the state saved), for other processes to run (``_processes.py``)."""
    if not runtime.persistence:
        raise ConfigurationError("a batch in several processes needs enable_persistence")
    runs = []
    for prompt in prompts:
        target, context = _target(BatchItem(prompt), definition)
        resolved, inputs, prompt_file = runtime.prepare_target(target, context)
        if resolved.import_path is None:
            raise ConfigurationError(f"definition {resolved.name!r} must be bound to a "
                                     "module-level name to run in other processes")
        runs.append(runtime.new_run(resolved, inputs, prompt_file))
    await asyncio.gather(*(runtime.store.save(run.workflow_id, run.to_state) for run in runs))
    return [(run.workflow_id, str(prompt), run.to_state())
            for run, prompt in zip(runs, prompts, strict=True)]


async def _run_one(runtime: Runtime, item: BatchItem, definition: DefinitionLike | None,
                   limit: asyncio.Semaphore) -> None:
    async with limit:
        if runtime.shutting_down:
            return  # stays pending: resume --all starts it
        item.started = True
        started = runtime.clock.monotonic()
        try:
            if item.workflow_id is not None:
                item.result = await runtime.resume(item.workflow_id)
            else:
                target, context = _target(item, definition)
                item.result = await runtime.run(target, context=context)
                item.workflow_id = item.result.workflow_id
        except Exception as error:  # one bad workflow must not stop the batch
            item.error = f"{type(error).__name__}: {error}"
            logger.error("Workflow for %s could not run: %s", item.prompt, item.error)
        finally:
            item.duration = runtime.clock.monotonic() - started


def default_report_path(project_root: Path, wall_time: float) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(wall_time))
    return project_root / ".github" / "workflow-reports" / f"batch-{stamp}.json"


def batch_report(rows: list[dict[str, Any]], *, project_root: Path, definition: str,
                 concurrency: int, started_at: float, finished_at: float,
                 interrupted: bool, processes: int = 1, run_seconds: float | None = None,
                 run_cpu_seconds: float | None = None) -> dict[str, Any]:
    """The JSON report of a batch: one row per prompt (``BatchItem.to_dict``), counts, and
    how to finish it. ``run_seconds``: from the first workflow's start to the last one's
    end (registration, start-up and the report excluded); ``run_cpu_seconds``: the CPU
    time the processes running workflows spent meanwhile (their writers' excluded)."""
    counts = Counter(row["status"] for row in rows)
    unfinished = counts["interrupted"] + counts[NOT_STARTED] + counts["pending"]
    return {"project_root": str(project_root), "definition": definition,
            "concurrency": concurrency, "processes": processes,
            "started_at": _iso(started_at), "finished_at": _iso(finished_at),
            "run_seconds": round(run_seconds, 3) if run_seconds is not None else None,
            "run_cpu_seconds": (round(run_cpu_seconds, 3) if run_cpu_seconds is not None
                                else None),
            "interrupted": interrupted, "counts": dict(counts), "workflows": rows,
            "resume_command": RESUME_ALL if unfinished else None}


def _iso(wall_time: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wall_time))


# --------------------------------------------------------------------------- progress


@dataclass(frozen=True, slots=True)
class BatchSnapshot:
    """The batch at one moment: what a progress display shows."""

    total: int
    finished: int
    by_status: dict[str, int]
    running: int
    retrying: int
    held: int
    stages: dict[str, int]
    stopping: bool


@dataclass(slots=True)
class BatchTracker:
    """A runtime listener that counts what the batch's workflows are doing."""

    runtime: Runtime
    total: int
    finished: Counter[str] = field(default_factory=Counter)
    held: set[str] = field(default_factory=set)

    def __call__(self, event: str, run: WorkflowRun, **data: Any) -> None:
        if event == "held":
            self.held.add(run.workflow_id)
        elif event == "started":
            self.held.discard(run.workflow_id)
        elif event == "finished":
            self.held.discard(run.workflow_id)
            self.finished[run.status] += 1

    async def pause(self, seconds: float) -> None:
        await self.runtime.clock.sleep(seconds)

    def snapshot(self) -> BatchSnapshot:
        """Called on the loop; the result is immutable, safe to render in another thread."""
        lives = self.runtime.live_workflows()
        stages = Counter(live.run.current_stage or "starting" for live in lives)
        return BatchSnapshot(total=self.total, finished=sum(self.finished.values()),
                             by_status=dict(self.finished), running=len(lives),
                             retrying=sum(1 for live in lives if live.run.attempt > 1),
                             held=len(self.held), stages=dict(stages.most_common()),
                             stopping=self.runtime.shutting_down)


def describe_snapshot(snapshot: BatchSnapshot) -> Text:
    line = Text()
    line.append(f"running {snapshot.running}")
    if snapshot.retrying:
        line.append(f" (retrying {snapshot.retrying})", style="yellow")
    for status, style in (("completed", "green"), ("failed", "red"), ("timed_out", "red"),
                          ("interrupted", "yellow")):
        if snapshot.by_status.get(status):
            line.append(f"  {status} {snapshot.by_status[status]}", style=style)
    if snapshot.held:
        line.append(f"  waiting for system health {snapshot.held}", style="yellow")
    if snapshot.stages:
        line.append("\nstages: " + ", ".join(f"{name} {count}"
                                              for name, count in snapshot.stages.items()))
    if snapshot.stopping:
        line.append("\nstopping: running workflows stop at a safe point and stay resumable",
                    style="bold yellow")
    return line


class ProgressSource(Protocol):
    """What a ``BatchDisplay`` shows: a ``BatchTracker`` in one process, the merged
    progress of a batch's processes in several (``_processes.BatchProgress``)."""

    total: int

    def snapshot(self) -> BatchSnapshot: ...

    async def pause(self, seconds: float) -> None: ...


class BatchDisplay:
    """Live progress on a terminal: the overall bar, counts, workflows per current stage.

    ``follow()`` runs on the loop and only swaps in a new snapshot four times a second;
    rich renders it from its own refresh thread, so a slow terminal never stalls the loop.
    """

    def __init__(self, console: Console, tracker: ProgressSource) -> None:
        self._tracker = tracker
        self._progress = Progress(TextColumn("[bold]workflows"), BarColumn(),
                                  MofNCompleteColumn(), TimeElapsedColumn(), console=console)
        self._task = self._progress.add_task("workflows", total=tracker.total)
        self._line = Text("starting")
        self._live = Live(Group(self._progress, _Latest(self)), console=console,
                          refresh_per_second=4)

    def __enter__(self) -> BatchDisplay:
        self._live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._show(self._tracker.snapshot())
        self._live.stop()

    async def follow(self) -> None:
        while True:
            self._show(self._tracker.snapshot())
            await self._tracker.pause(0.25)

    def _show(self, snapshot: BatchSnapshot) -> None:
        self._progress.update(self._task, completed=snapshot.finished)
        self._line = describe_snapshot(snapshot)


class _Latest:
    def __init__(self, display: BatchDisplay) -> None:
        self._display = display

    def __rich__(self) -> RenderableType:
        return self._display._line
