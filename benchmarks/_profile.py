"""``python -m benchmarks profile``: cProfile of the throughput case, top functions by tottime.

cProfile sees the event loop's thread only; the store's writer process shows up as the
time the loop spends waiting for its batches (``select``/``_run_once``).
"""

from __future__ import annotations

import asyncio
import cProfile
import pstats
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ._plan import Plan
from ._throughput import RuntimeRun, run_runtime_case

__all__ = ["ProfiledFunction", "profile_throughput", "top_functions"]


@dataclass(frozen=True, slots=True)
class ProfiledFunction:
    where: str
    calls: int
    tottime: float
    cumtime: float


def _short(filename: str, line: int, name: str) -> str:
    for marker in ("site-packages/", "lib/python3.11/", "/work/main/"):
        if marker in filename:
            filename = filename.split(marker, 1)[1]
            break
    return f"{filename}:{line}({name})" if line else name


def top_functions(stats: pstats.Stats, count: int) -> list[ProfiledFunction]:
    # pstats keeps {(file, line, name): (primitive calls, calls, tottime, cumtime, callers)}.
    raw: dict[tuple[str, int, str], Any] = stats.stats  # type: ignore[attr-defined]
    ranked = sorted(raw.items(), key=lambda item: item[1][2], reverse=True)[:count]
    return [ProfiledFunction(_short(*key), int(value[1]), float(value[2]), float(value[3]))
            for key, value in ranked]


def profile_throughput(plan: Plan, kind: str, count: int, top: int,
                       save: Path | None) -> tuple[RuntimeRun, list[ProfiledFunction], float]:
    """Run the throughput case under cProfile; returns (its result, top functions, total
    profiled seconds)."""
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        result = asyncio.run(run_runtime_case(plan, kind, count))
    finally:
        profiler.disable()
    if save is not None:
        profiler.dump_stats(str(save))
    stats = pstats.Stats(profiler)
    total = float(stats.total_tt)  # type: ignore[attr-defined]
    return result, top_functions(stats, top), total


def print_profile(console: Console, kind: str, count: int, result: RuntimeRun,
                  functions: list[ProfiledFunction], total: float) -> None:
    table = Table(title=f"cProfile: runtime + {kind} store, {count} workflows "
                        f"({result.rate:,.0f} transitions/s under the profiler; "
                        f"{total:.1f} s profiled)", title_justify="left")
    for column in ("tottime s", "% of total", "calls", "cumtime s", "function"):
        table.add_column(column, justify="right" if column != "function" else "left")
    for function in functions:
        table.add_row(f"{function.tottime:.3f}", f"{100 * function.tottime / total:.1f}",
                      f"{function.calls:,}", f"{function.cumtime:.3f}", function.where)
    console.print(table)
