"""Output: the rich tables, the JSON document, and ``compare OLD NEW``."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ._results import SCHEMA_VERSION, Figure, Metric, Row, figure_from_json

__all__ = ["compare_files", "format_value", "print_figures", "read_document", "to_document",
           "write_json"]

_SAME = 0.05  # ratios within 5 % of 1 read as "same": run-to-run noise on a small machine


def format_value(metric: Metric) -> str:
    value, unit = metric.value, metric.unit
    if unit == "/s":
        return f"{value:,.0f}/s"
    if unit == "B":
        return f"{value / 1024:,.1f} KiB"
    if unit == "%":
        return f"{value:+.1f} %"
    if unit == "ms":
        return f"{value:.3f} ms" if value < 1 else f"{value:.1f} ms"
    if unit == "s":
        return f"{value:.3f} s"
    if unit == "x":
        return f"{value:.2f}x"
    return f"{value:g} {unit}".strip()


def _metrics_cell(row: Row) -> str:
    if row.skipped:
        return f"[yellow]skipped: {row.skipped}[/yellow]"
    return "\n".join(f"{name}: {format_value(m)}" for name, m in row.metrics.items())


def _targets_cell(row: Row) -> str:
    marks = []
    for target in row.targets:
        met = target.met_by(row.metrics)
        mark = "[green]✓[/green]" if met else "[red]✗[/red]" if met is False else "?"
        marks.append(f"{mark} {target.text}")
    return "\n".join(marks)


def _figure_table(number: int, figure: Figure) -> Table:
    table = Table(title=f"{number}. {figure.title}", title_justify="left", show_lines=True)
    table.add_column("case", ratio=3)
    table.add_column("measured", ratio=3)
    table.add_column("target (benchmarks/README.md)", ratio=2)
    if figure.skipped:
        table.add_row("[yellow]skipped[/yellow]", figure.skipped, "")
    for row in figure.rows:
        label = row.label + (f"\n[dim]{row.note}[/dim]" if row.note else "")
        table.add_row(label, _metrics_cell(row), _targets_cell(row))
    if figure.notes:
        table.caption = "; ".join(figure.notes) + f" ({figure.seconds:.1f} s)"
    return table


def print_figures(console: Console, meta: Mapping[str, Any], figures: Sequence[Figure]) -> None:
    console.print(f"[bold]workflow-manager benchmarks[/bold]: Python {meta['python']} "
                  f"({meta['implementation']}), {meta['cores']} cores, {meta['platform']}; "
                  f"N = {meta['plan']['workflows']}{' (quick)' if meta['plan']['quick'] else ''}"
                  f"{_unsettled(meta)}"
                  f"; total {meta.get('seconds', 0.0):.0f} s; load average "
                  f"{_load(meta, 'load_average_start')} at start, "
                  f"{_load(meta, 'load_average_end')} at end; scratch on "
                  f"{meta.get('scratch_filesystem', '?')}")
    for number, figure in enumerate(figures, start=1):
        console.print(_figure_table(number, figure))


def _unsettled(meta: Mapping[str, Any]) -> str:
    if meta["plan"].get("wait_idle", True):
        return ""
    return " (--no-wait-idle: figures did not wait for a settled machine; not comparable)"


def _load(meta: Mapping[str, Any], key: str) -> str:
    values = meta.get(key) or ()
    return "/".join(f"{v:.1f}" for v in values) or "?"


def to_document(meta: Mapping[str, Any], figures: Sequence[Figure]) -> dict[str, Any]:
    return {"schema_version": SCHEMA_VERSION, "meta": dict(meta),
            "figures": [f.to_json() for f in figures]}


def write_json(path: Path, document: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # allow_nan=False: a NaN would make the file unreadable to strict JSON parsers.
    path.write_text(json.dumps(document, indent=2, allow_nan=False) + "\n")


# --------------------------------------------------------------------------- compare


def read_document(path: Path) -> tuple[dict[str, Any], list[Figure]]:
    """A results file's machine description and figures."""
    document = json.loads(path.read_text())
    if document.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{path}: schema version {document.get('schema_version')!r} is not "
                         f"{SCHEMA_VERSION}")
    return dict(document.get("meta", {})), [figure_from_json(f) for f in document["figures"]]


def _verdict(old: Metric, new: Metric) -> tuple[str, str]:
    if old.value == 0:
        return ("-", "same" if new.value == 0 else "new")
    ratio = new.value / old.value
    if not math.isfinite(ratio) or abs(ratio - 1) <= _SAME:
        return (f"{ratio:.2f}x", "same")
    better = (ratio > 1) == new.higher_is_better
    return (f"{ratio:.2f}x", "[green]better[/green]" if better else "[red]worse[/red]")


def compare_files(console: Console, old_path: Path, new_path: Path) -> None:
    """Print new/old per metric present in both files; rows only in one are listed too."""
    old_meta, old_figures = read_document(old_path)
    new_meta, new_figures = read_document(new_path)
    old_rows = {(f.key, r.key): r for f in old_figures for r in f.rows}
    table = Table(title=f"{old_path} -> {new_path}", title_justify="left")
    for column in ("figure", "case", "metric", "old", "new", "new/old", "verdict"):
        table.add_column(column)
    for figure in new_figures:
        for row in figure.rows:
            old_row = old_rows.pop((figure.key, row.key), None)
            for name, metric in row.metrics.items():
                old_metric = old_row.metrics.get(name) if old_row else None
                if old_metric is None:
                    table.add_row(figure.key, row.label, name, "-", format_value(metric), "-",
                                  "new")
                    continue
                ratio, verdict = _verdict(old_metric, metric)
                table.add_row(figure.key, row.label, name, format_value(old_metric),
                              format_value(metric), ratio, verdict)
    for (figure_key, _), row in old_rows.items():
        table.add_row(figure_key, row.label, "", "", "", "", "[yellow]gone[/yellow]")
    console.print(f"old: {_describe(old_meta)}\nnew: {_describe(new_meta)}")
    console.print(table)


def _describe(meta: Mapping[str, Any]) -> str:
    plan = meta.get("plan", {})
    return (f"{meta.get('started_at', '?')}, Python {meta.get('python', '?')}, "
            f"{meta.get('cores', '?')} cores, N = {plan.get('workflows', '?')}")
