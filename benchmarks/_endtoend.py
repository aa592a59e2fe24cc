"""Figure 6: the example prompts through the development workflow on the local forge.

Real git, the example agent and the repository's tests run for each prompt, so this
figure shows where a real workflow's time goes, per stage.
"""

from __future__ import annotations

import asyncio
import importlib
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from reliability import WorkflowConfiguration, WorkflowResult

from ._plan import Plan
from ._results import Figure
from ._workloads import runtime

__all__ = ["EXAMPLES", "measure_end_to_end", "unavailable_reason"]

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
_DEFINITION = "machines.development:DEVELOPMENT_WORKFLOW"


def unavailable_reason() -> str | None:
    """Why this figure cannot run here, or None when it can."""
    for needed in (EXAMPLES / "prompts", EXAMPLES / "make_repo.py", EXAMPLES / "agent.py"):
        if not needed.exists():
            return f"{needed} is missing"
    module_name, _, attribute = _DEFINITION.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        return f"cannot import {module_name} ({error})"
    if not hasattr(module, attribute):
        return f"{_DEFINITION} does not exist yet"
    return None


def _prepare(plan: Plan) -> tuple[Path, list[Path]]:
    """A fresh example repository, and the prompts copied beside (not into) it, so the
    workflow's commits contain only what the agent wrote."""
    base = plan.fresh_root("end-to-end")
    repo = base / "repo"
    subprocess.run([sys.executable, str(EXAMPLES / "make_repo.py"), str(repo)], check=True,
                   capture_output=True)
    prompts = Path(shutil.copytree(EXAMPLES / "prompts", base / "prompts"))
    return repo, sorted(prompts.glob("*.md"))


def _configuration() -> WorkflowConfiguration:
    agent = shlex.quote(str(EXAMPLES / "agent.py"))
    # Tuned as 'workflow-manager batch' tunes it: the figure is the batch command's.
    return WorkflowConfiguration(forge="local", log_level="WARNING", tune_interpreter=True,
                                 agent_command=f"{{python}} {agent} {{prompt_file}}")


async def _run_batch(repo: Path, prompts: Sequence[Path]) -> tuple[float, list[WorkflowResult]]:
    async with runtime(repo, _configuration()) as rt:
        started = time.perf_counter()
        results = await asyncio.gather(*(rt.run(p) for p in prompts))
        return time.perf_counter() - started, list(results)


def _stage_means(results: Sequence[WorkflowResult]) -> dict[str, float]:
    """Mean seconds per stage over the workflows that ran it, in first-seen stage order."""
    durations: dict[str, list[float]] = {}
    for result in results:
        stages: Mapping[str, Any] = result.reliability_metrics.get("stage_performance", {})
        for stage, entry in stages.items():
            durations.setdefault(stage, []).append(float(entry.get("duration", 0.0)))
    return {stage: sum(values) / len(values) for stage, values in durations.items()}


def measure_end_to_end(plan: Plan) -> Figure:
    figure = Figure("end_to_end", "End to end: example prompts, development workflow, "
                                  "local forge")
    reason = unavailable_reason()
    if reason is not None:
        figure.skipped = reason
        return figure
    repo, prompts = _prepare(plan)
    wall, results = asyncio.run(_run_batch(repo, prompts))
    completed = sum(r.success for r in results)
    batch = figure.row("batch", f"batch of {len(prompts)} prompts, concurrently")
    batch.add("wall", wall, "s").add("completed", completed, "workflows",
                                     higher_is_better=True)
    for result in results:
        if not result.success:
            figure.notes.append(f"{result.workflow_id} ended {result.status} in "
                                f"{result.current_stage}: {result.error}")
    for stage, mean in _stage_means(results).items():
        figure.row(f"stage-{stage}", f"stage {stage} (mean)").add("mean", mean, "s")
    return figure
