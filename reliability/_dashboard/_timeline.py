"""A workflow's stage timeline from its stored state, for the dashboard and the HTML report.

Pure: a state document (and, for a running workflow, the time now and the stages still to
come) in, rows of bars out, positions in percent of the drawn span. One bar per attempt:
failed attempts come from the recorded errors (each names when its attempt started and
when it failed), the last attempt of a stage from its history entry, a running stage from
its start until now. The gap between two attempts of a stage is the retry wait. Watchdog
warnings and timeouts are marks at their time; each bar carries its baseline band.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["estimated_finish", "timeline"]


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else (
        None)


def estimated_finish(state: Mapping[str, Any], now: float,
                     remaining: Sequence[tuple[str, float]]) -> float | None:
    """When a running workflow should end if every stage left takes its baseline: the
    current stage's baseline (or now, once past it) plus the baselines of ``remaining``
    (the stages after it)."""
    if state.get("status") != "running":
        return None
    started = _number(state.get("stage_start_time"))
    current = next((b for name, b in remaining if name == state.get("current_stage")), None)
    later = [b for name, b in remaining if name != state.get("current_stage")]
    base = now if started is None else max(now, started + (current or 0.0))
    return base + sum(later)


def timeline(state: Mapping[str, Any], *, now: float,
             baselines: Mapping[str, float] | None = None,
             live_events: Sequence[Mapping[str, Any]] = (),
             finish: float | None = None) -> dict[str, Any]:
    """Rows of attempt bars, retry gaps and watchdog marks, positioned on one time axis."""
    monitoring = state.get("monitoring_state") or {}
    history = list(monitoring.get("stage_history") or [])
    errors = list(monitoring.get("errors") or [])
    marks_in = [*list(monitoring.get("watchdog_events") or []), *live_events]
    baselines = dict(baselines or {})
    for entry in history:
        if entry.get("stage") and _number(entry.get("baseline")):
            baselines.setdefault(str(entry["stage"]), float(entry["baseline"]))
    bars: dict[str, list[dict[str, Any]]] = {}

    def add(stage: str, attempt: Any, start: float | None, end: float | None, status: str,
            **extra: Any) -> None:
        if start is None or end is None:
            return
        bars.setdefault(stage, []).append({"attempt": attempt, "start": start,
                                           "end": max(start, end), "status": status, **extra})

    for error in errors:
        add(str(error.get("stage")), error.get("attempt"), _number(error.get("started_at")),
            _number(error.get("at")), "failed-attempt",
            message=str(error.get("message") or ""), category=error.get("category"))
    for entry in history:
        start = _number(entry.get("started_at"))
        duration = _number(entry.get("duration")) or 0.0
        add(str(entry.get("stage")), entry.get("attempts", 1), start,
            None if start is None else start + duration, str(entry.get("status")))
    current = state.get("current_stage")
    if state.get("status") == "running" and current:
        started = _number(state.get("stage_start_time"))
        done = {(e.get("stage"), e.get("started_at")) for e in history}
        if (current, started) not in done:
            add(str(current), state.get("attempt"), started, now, "running")
    # Bars of failed attempts that a history entry also covers (the last attempt failed
    # for good) are drawn once, as the stage's outcome.
    for items in bars.values():
        final_starts = {b["start"] for b in items if b["status"] != "failed-attempt"}
        items[:] = sorted((b for b in items if not (b["status"] == "failed-attempt"
                                                   and b["start"] in final_starts)),
                          key=lambda b: b["start"])
    times = [t for items in bars.values() for b in items for t in (b["start"], b["end"])]
    times += [t for m in marks_in if (t := _number(m.get("at"))) is not None]
    if finish is not None:
        times.append(finish)
    if not times:
        return {"rows": [], "start": None, "end": None, "span": 0.0, "ticks": [],
                "finish": None}
    first, last = float(min(times)), float(max(times))
    # The axis spans what happened (and the estimated finish); a baseline band reaching
    # past it is clipped: a stage far under its baseline shows a band running off the edge.
    span: float = max(last - first, 1e-6)

    def pct(t: float) -> float:
        return round(float(t - first) / span * 100.0, 3)

    rows = []
    for stage, items in sorted(bars.items(), key=lambda kv: kv[1][0]["start"]):
        baseline = baselines.get(stage, 0.0)
        drawn = []
        for b in items:
            duration = b["end"] - b["start"]
            grade = ("slow" if baseline and duration > 1.2 * baseline else
                     "fast" if baseline and duration < 0.8 * baseline else "normal")
            drawn.append({**b, "duration": duration, "left": pct(b["start"]),
                          "width": max(pct(b["end"]) - pct(b["start"]), 0.4),
                          "band_left": pct(b["start"]),
                          "band_width": min(pct(b["start"] + baseline), 100.0) - pct(b["start"])
                          if baseline else 0.0,
                          "grade": grade})
        gaps = [{"left": pct(a["end"]), "width": pct(b["start"]) - pct(a["end"]),
                 "seconds": b["start"] - a["end"], "before_attempt": b["attempt"]}
                for a, b in itertools.pairwise(items) if b["start"] > a["end"]]
        marks = [{"level": str(m.get("level")), "left": pct(float(m["at"])),
                  "attempt": m.get("attempt"), "at": float(m["at"])}
                 for m in marks_in if m.get("stage") == stage and _number(m.get("at"))]
        rows.append({"stage": stage, "baseline": baseline, "bars": drawn, "gaps": gaps,
                     "marks": marks, "status": drawn[-1]["status"] if drawn else "-"})
    ticks = [{"left": i * 20.0, "seconds": span * i / 5} for i in range(6)]
    return {"rows": rows, "start": first, "end": last, "span": span, "ticks": ticks,
            "finish": None if finish is None else {"at": finish, "left": pct(finish)}}
