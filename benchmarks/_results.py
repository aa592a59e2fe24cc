"""The result model: figures made of rows made of metrics, and their JSON form.

One shape serves the table, the JSON file and ``compare``: a metric knows its unit and
which direction is better, so a comparison can say "better" or "worse" without knowing
what the figure measures.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["SCHEMA_VERSION", "Figure", "Metric", "Row", "Target", "figure_from_json"]

SCHEMA_VERSION = 1


@dataclass(frozen=True, slots=True)
class Metric:
    """One measured number. ``higher_is_better`` drives the verdict in ``compare``."""

    value: float
    unit: str
    higher_is_better: bool = False

    def __post_init__(self) -> None:
        # JSON has no NaN/inf; a benchmark that produced one is broken, not slow.
        if not math.isfinite(self.value):
            raise ValueError(f"metric value must be finite, not {self.value!r}")

    def to_json(self) -> dict[str, Any]:
        return {"value": self.value, "unit": self.unit,
                "higher_is_better": self.higher_is_better}


@dataclass(frozen=True, slots=True)
class Target:
    """A performance target on one metric of a row, ``metric op value`` (the targets and
    where they come from: benchmarks/README.md)."""

    metric: str
    op: str  # "<=" or ">="
    value: float
    text: str

    def met_by(self, metrics: Mapping[str, Metric]) -> bool | None:
        metric = metrics.get(self.metric)
        if metric is None:
            return None
        if self.op == ">=":
            return metric.value >= self.value
        return metric.value <= self.value

    def to_json(self, metrics: Mapping[str, Metric]) -> dict[str, Any]:
        return {"metric": self.metric, "op": self.op, "value": self.value, "text": self.text,
                "met": self.met_by(metrics)}


@dataclass(slots=True)
class Row:
    """One case of a figure; ``skipped`` says why it has no metrics."""

    key: str
    label: str
    metrics: dict[str, Metric] = field(default_factory=dict)
    note: str = ""
    targets: tuple[Target, ...] = ()
    skipped: str | None = None

    def add(self, name: str, value: float, unit: str, *, higher_is_better: bool = False) -> Row:
        self.metrics[name] = Metric(float(value), unit, higher_is_better)
        return self

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "label": self.label,
                "metrics": {k: m.to_json() for k, m in self.metrics.items()},
                "note": self.note,
                "targets": [t.to_json(self.metrics) for t in self.targets],
                "skipped": self.skipped}


@dataclass(slots=True)
class Figure:
    """One numbered figure of the suite, measured side by side in one run."""

    key: str
    title: str
    rows: list[Row] = field(default_factory=list)
    skipped: str | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def row(self, key: str, label: str, *, note: str = "",
            targets: tuple[Target, ...] = ()) -> Row:
        row = Row(key, label, note=note, targets=targets)
        self.rows.append(row)
        return row

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "title": self.title, "skipped": self.skipped,
                "seconds": round(self.seconds, 3), "notes": list(self.notes),
                "rows": [r.to_json() for r in self.rows]}


def figure_from_json(data: Mapping[str, Any]) -> Figure:
    """Rebuild a figure from ``to_json`` output (for ``compare``)."""
    figure = Figure(str(data["key"]), str(data.get("title", data["key"])),
                    skipped=data.get("skipped"), seconds=float(data.get("seconds", 0.0)),
                    notes=list(data.get("notes", ())))
    for row_data in data.get("rows", ()):
        row = figure.row(str(row_data["key"]), str(row_data.get("label", row_data["key"])),
                         note=str(row_data.get("note", "")))
        row.skipped = row_data.get("skipped")
        row.targets = tuple(Target(str(t["metric"]), str(t["op"]), float(t["value"]),
                                   str(t.get("text", ""))) for t in row_data.get("targets", ()))
        for name, metric in row_data.get("metrics", {}).items():
            row.add(name, float(metric["value"]), str(metric.get("unit", "")),
                    higher_is_better=bool(metric.get("higher_is_better", False)))
    return figure
