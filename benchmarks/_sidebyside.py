"""``python -m benchmarks --before REV``: each figure measured in REV's code and in this
checkout's, alternately, in one run, then shown side by side.

REV's tree is exported with ``git archive`` into a temporary directory, and this
checkout's ``benchmarks/`` replaces the one it had: both sides are measured by the same
harness, so a difference is the runtime's. Each figure runs in a fresh interpreter per
side (``python -m benchmarks --only NAME --json ...`` with ``PYTHONPATH`` at that side's
tree), before then after for the first figure, after then before for the next, and so
on: a drift in the machine's load over the run does not favour one side.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from ._report import compare_files, print_figures, read_document, to_document, write_json
from ._results import Figure

__all__ = ["measure_side_by_side"]

ROOT = Path(__file__).resolve().parent.parent


class RevisionError(RuntimeError):
    """REV is not a commit of this checkout, or there is no checkout (no git)."""


def export_revision(revision: str, directory: Path) -> Path:
    """``revision``'s files in ``directory``, with this checkout's benchmark harness."""
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", "--quiet",
                                 f"{revision}^{{commit}}"], capture_output=True, text=True,
                                check=False)
    except FileNotFoundError as error:
        raise RevisionError("--before needs git, which is not installed") from error
    if commit.returncode != 0:
        raise RevisionError(f"--before {revision!r}: not a commit of the checkout at {ROOT}")
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit.stdout.strip()],
                             capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(directory, filter="data")
    shutil.rmtree(directory / "benchmarks", ignore_errors=True)
    shutil.copytree(ROOT / "benchmarks", directory / "benchmarks",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return directory


def _run_figure(tree: Path, name: str, options: Sequence[str], output: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    # Progress and tables go to this terminal as the figure runs; the result to ``output``.
    finished = subprocess.run([sys.executable, "-m", "benchmarks", "--only", name,
                               "--json", str(output), *options], cwd=tree, env=env,
                              check=False)
    if not output.exists():
        raise RuntimeError(f"figure {name} in {tree} wrote no result "
                           f"(exit code {finished.returncode})")


def _merged(parts: list[tuple[dict[str, Any], list[Figure]]]) -> dict[str, Any]:
    """One document from each figure's: the first's machine description, the load at the
    first start and the last end, every figure."""
    meta = dict(parts[0][0])
    meta["load_average_end"] = parts[-1][0].get("load_average_end")
    meta["seconds"] = round(sum(float(m.get("seconds", 0.0)) for m, _ in parts), 1)
    return to_document(meta, [figure for _, figures in parts for figure in figures])


def measure_side_by_side(console: Console, revision: str, names: Sequence[str],
                         options: Sequence[str], json_path: Path | None) -> int:
    """Run ``names`` (in order) on both sides; print this side's table with its targets,
    then every metric before and after. 0 if every figure ran on both sides."""
    with tempfile.TemporaryDirectory(prefix="wm-before-") as scratch:
        work = Path(scratch)
        trees = {"before": export_revision(revision, work / "tree"), "after": ROOT}
        parts: dict[str, list[tuple[dict[str, Any], list[Figure]]]] = {"before": [],
                                                                       "after": []}
        for index, name in enumerate(names):
            for side in ("before", "after") if index % 2 == 0 else ("after", "before"):
                code = revision if side == "before" else "this checkout"
                console.print(f"[bold]{name}[/bold], {side} ({code})")
                output = work / f"{side}-{name}.json"
                _run_figure(trees[side], name, options, output)
                parts[side].append(read_document(output))
        documents = {side: _merged(parts[side]) for side in parts}
        paths = {side: work / f"{side}.json" for side in documents}
        for side, document in documents.items():
            write_json(paths[side], document)
        after_meta, after_figures = read_document(paths["after"])
        print_figures(console, after_meta, after_figures)
        console.print(f"\n[bold]{revision} -> this checkout[/bold]")
        compare_files(console, paths["before"], paths["after"])
        if json_path is not None:
            write_json(json_path, documents["after"])
            before_path = json_path.with_name(f"{json_path.stem}.before{json_path.suffix}")
            write_json(before_path, documents["before"])
            console.print(f"results written to {json_path} and {before_path}")
    failed = [f.key for side in parts for _, figures in parts[side] for f in figures
              if f.skipped and f.skipped.startswith("FAILED")]
    return 1 if failed else 0
