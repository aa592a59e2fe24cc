"""The dashboard's ASGI app (starlette): pages, JSON, server-sent events, metrics, actions.

Safety: every page is a Jinja2 template with autoescape on, and the script only ever sets
``textContent``, so a title, output, error or stage name from a workflow is shown as text;
every value is redacted as a support bundle is; the content security policy allows no
script or style from anywhere but the app itself (no CDN). The app is read-only unless it
was made with ``allow_actions`` and a token: then cancel and resume are POSTs that must
carry ``Authorization: Bearer TOKEN`` (a cross-site form cannot set that header). Requests
must name the host the server was started for (no DNS rebinding).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import sys
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._diagnostics import redact, stored_diagnostics
from .._errors import ConfigurationError, WorkflowError, WorkflowLockedError
from .._ids import validate_workflow_id
from ._source import DashboardSource
from ._timeline import estimated_finish, timeline

if TYPE_CHECKING:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response

    from .._runtime import Runtime

__all__ = ["RESUMABLE_STATUSES", "create_app", "render_report", "timeline_context"]

_HERE = Path(__file__).parent
_ENDED = frozenset({"completed", "failed", "timed_out", "cancelled", "interrupted"})
RESUMABLE_STATUSES = ("pending", "running", "interrupted")
# Scripts and style sheets only from the app itself. Style attributes are allowed: the
# timeline places its bars with them (numbers the server computed), and they run no code.
_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; "
        "style-src-attr 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")


def _templates() -> Any:
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    environment = Environment(loader=FileSystemLoader(_HERE / "templates"),
                              autoescape=select_autoescape(default=True,
                                                           default_for_string=True))
    environment.filters["when"] = _when
    environment.filters["seconds"] = _seconds
    return environment


def _when(value: Any) -> str:
    if isinstance(value, str) and value:
        return value.replace("T", " ").removesuffix("Z")  # already a time (ISO 8601)
    if not isinstance(value, (int, float)) or not value:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))


def _seconds(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "-"
    if value < 1:
        return f"{value * 1000:.0f} ms"
    if value < 120:
        return f"{value:.1f} s"
    return f"{value / 60:.1f} min"


def _stage_baselines(runtime: Runtime, state: Mapping[str, Any]) -> list[tuple[str, float]]:
    """(stage, baseline) of the workflow's definition, when this process can import it."""
    path = state.get("definition")
    if not isinstance(path, str):
        return []
    from .._runtime import resolve_definition

    try:
        definition = resolve_definition(path)
    except (WorkflowError, Exception):  # any import failure: no estimate, nothing else
        return []
    overrides = runtime.config.performance_baselines
    return [(s.name, float(overrides.get(s.name, s.baseline_seconds)))
            for s in definition.stages]


def timeline_context(runtime: Runtime, state: Mapping[str, Any], now: float,
                     live: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The timeline of one stored workflow, with an estimated finish while it runs."""
    stages = _stage_baselines(runtime, state)
    finish = None
    if state.get("status") == "running" and stages:
        done = set(state.get("completed_stages") or ())
        remaining = [(n, b) for n, b in stages if n not in done]
        finish = estimated_finish(state, now, remaining)
    events = [e for e in (live or {}).get("events", ()) if e.get("kind") in (
        "warning", "timeout", "heartbeat")]
    live_marks = [{"stage": e.get("stage"), "level": e.get("kind"), "at": e.get("at"),
                   "attempt": e.get("attempt")} for e in events]
    stored_marks = {(m.get("stage"), m.get("level"), m.get("at")) for m in
                    (state.get("monitoring_state") or {}).get("watchdog_events") or ()}
    live_marks = [m for m in live_marks if (m["stage"], m["level"], m["at"]) not in
                  stored_marks]
    return timeline(state, now=now, baselines=dict(stages), live_events=live_marks,
                    finish=finish)


_SPARKS = (("cpu", 100.0), ("memory", 100.0), ("disk", 100.0), ("loop_lag_ms", 10.0))


def _spark(series: Any, key: str, top: float) -> dict[str, Any] | None:
    """An SVG polyline (300 x 60) of ``key`` over time, scaled to ``top`` or the peak."""
    points = [(float(p["at"]), float(p[key])) for p in series
              if isinstance(p, Mapping) and isinstance(p.get(key), (int, float))
              and isinstance(p.get("at"), (int, float))]
    if len(points) < 2:
        return None
    first, span = points[0][0], (points[-1][0] - points[0][0]) or 1.0
    high = max(top, *(v for _, v in points)) or 1.0
    line = " ".join(f"{(t - first) / span * 300:.1f},{60 - v / high * 58:.1f}"
                    for t, v in points)
    return {"points": line, "now": points[-1][1]}


def _waiting_on(state: Mapping[str, Any], live: Mapping[str, Any] | None,
                now: float) -> str:
    status = state.get("status")
    if live is not None:
        waiting = live.get("waiting")
        if waiting and waiting.get("kind") == "retry":
            left = max(0.0, float(waiting.get("until") or now) - now)
            return (f"a retry of stage {waiting.get('stage')} (attempt "
                    f"{waiting.get('attempt')}) in {_seconds(left)}, after a "
                    f"{waiting.get('category')} error")
        if waiting and waiting.get("kind") == "health":
            return f"system health to recover (now {waiting.get('status')}) before starting"
        progress = live.get("progress")
        said = (f", {float(progress[0]) * 100:.0f} % done: {progress[1]}"
                if isinstance(progress, list) and len(progress) == 2 else "")
        return (f"stage {live.get('stage')} (attempt {live.get('attempt')}) to finish, "
                f"running for {_seconds(now - float(live.get('stage_started') or now))} in "
                f"process {live.get('pid')}{said}")
    if status == "running":
        return (f"stage {state.get('current_stage')} in a process that publishes no live "
                "view; if that process died, 'workflow-manager resume --all' continues it")
    if status == "pending":
        return "a process to start it ('workflow-manager resume --all')"
    if status == "interrupted":
        return f"a resume: 'workflow-manager resume {state.get('workflow_id')}'"
    return "nothing: it has ended"


def create_app(runtime: Runtime, *, allow_actions: bool = False, token: str | None = None,
               poll_interval: float = 0.5, allowed_hosts: tuple[str, ...] = (
                   "127.0.0.1", "localhost", "::1", "[::1]"),
               config_path: str | None = None) -> Starlette:
    """The dashboard over ``runtime``'s store (opened by the caller)."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.middleware.trustedhost import TrustedHostMiddleware
    from starlette.responses import (
        HTMLResponse,
        JSONResponse,
        PlainTextResponse,
        StreamingResponse,
    )
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    if allow_actions and not token:
        raise ConfigurationError("--allow-actions needs a token in WORKFLOW_DASHBOARD_TOKEN "
                                 "(the POSTs that cancel or resume must carry it)")
    secrets = tuple(runtime.config.secret_values()) + ((token,) if token else ())
    source = DashboardSource(runtime, poll_interval=poll_interval, secrets=secrets)
    templates = _templates()
    from .._metrics import version

    common = {"allow_actions": allow_actions, "version": version()}

    def page(name: str, status_code: int = 200, **values: Any) -> HTMLResponse:
        html = templates.get_template(name).render(**common, **values)
        return HTMLResponse(html, status_code=status_code, headers={
            "Content-Security-Policy": _CSP, "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"})

    def json_response(document: Any, status_code: int = 200) -> JSONResponse:
        return JSONResponse(redact(document, secrets), status_code=status_code,
                            headers={"Cache-Control": "no-store"})

    def filters(request: Request) -> dict[str, str]:
        return {k: v for k in ("status", "definition", "stage")
                if (v := request.query_params.get(k, ""))}

    async def index(request: Request) -> Response:
        chosen = filters(request)
        return page("index.html", rows=source.filtered(**chosen), counts=source.counts(),
                    filters=chosen, choices=source.choices(), sequence=source.sequence,
                    total=len(source.rows))

    async def workflow_detail(request: Request) -> Response:
        workflow_id = request.path_params["workflow_id"]
        try:
            validate_workflow_id(workflow_id)
        except ValueError as error:
            return page("missing.html", status_code=404, message=str(error))
        await source.watch(workflow_id)
        raw = source.live_state(workflow_id)
        try:
            loaded = (await runtime.store.load(workflow_id)).state
        except WorkflowError as error:
            if raw is None:
                if source.live(workflow_id) is None:
                    return page("missing.html", status_code=404, message=str(error))
                raw = {"workflow_id": workflow_id, "status": "running",
                       "current_stage": (source.live(workflow_id) or {}).get("stage")}
            loaded = raw
        if raw is None or (loaded.get("status") in _ENDED and float(
                loaded.get("updated_at") or 0) >= float(raw.get("updated_at") or 0)):
            raw = loaded  # the store's record is the newest
        state = redact(raw, secrets)
        now = time.time()
        live = source.live(workflow_id)
        monitoring = state.get("monitoring_state") or {}
        from .._runtime import result_for
        from .._state import WorkflowRun

        advice = result_for(WorkflowRun.from_state(raw)).recovery_recommendations
        return page("workflow.html" if not request.query_params.get("fragment")
                    else "workflow_body.html",
                    state=state, timeline=timeline_context(runtime, state, now, live),
                    live=live, waiting=_waiting_on(state, live, now),
                    errors=list(monitoring.get("errors") or []),
                    advice=redact(list(advice), secrets),
                    files=runtime.store.describe(workflow_id),
                    checkpoints=[e for e in monitoring.get("stage_history") or ()],
                    resumable=state.get("status") in RESUMABLE_STATUSES,
                    sequence=source.sequence, now=now)

    async def health(request: Request) -> Response:
        runtimes = [{**view, "sparks": {key: _spark(view.get("series") or (), key, top)
                                        for key, top in _SPARKS}}
                    for view in source.health()["runtimes"]]
        name = "health_body.html" if request.query_params.get("fragment") else "health.html"
        return page(name, runtimes=runtimes, sequence=source.sequence, now=time.time())

    async def api_workflows(request: Request) -> Response:
        chosen = filters(request)
        status = chosen.pop("status", None)
        try:
            rows = await runtime.list_workflows(status)
        except ValueError as error:
            return json_response({"error": str(error)}, 400)
        rows = [r for r in rows if (not chosen.get("definition") or r.get("definition") ==
                                    chosen["definition"]) and (
            not chosen.get("stage") or r.get("current_stage") == chosen["stage"])]
        return json_response({"workflows": rows})

    async def api_workflow(request: Request) -> Response:
        workflow_id = request.path_params["workflow_id"]
        try:
            validate_workflow_id(workflow_id)
            diagnostics = await stored_diagnostics(runtime, workflow_id)
        except (WorkflowError, ValueError) as error:
            return json_response({"error": str(error)}, 404)
        return json_response(diagnostics)

    async def api_health(request: Request) -> Response:
        return json_response({**source.health(), "counts": source.counts()})

    async def no_icon(request: Request) -> Response:
        from starlette.responses import Response as Empty

        return Empty(status_code=204)  # browsers ask even for JSON pages

    async def events(request: Request) -> Response:
        raw = request.headers.get("last-event-id") or request.query_params.get("after")
        after = int(raw) if raw and raw.isdigit() else None
        return StreamingResponse(source.stream(after), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store",
                                          "X-Accel-Buffering": "no"})

    async def metrics(request: Request) -> Response:
        from prometheus_client import generate_latest

        return PlainTextResponse(generate_latest(registry).decode(),
                                 media_type="text/plain; version=0.0.4")

    def authorized(request: Request) -> Response | None:
        if not allow_actions:
            return json_response({"error": "this dashboard is read-only; start it with "
                                           "--allow-actions to cancel or resume"}, 403)
        given = request.headers.get("authorization", "")
        expected = f"Bearer {token}"
        if not hmac.compare_digest(given.encode(), expected.encode()):
            return json_response({"error": "a valid token is needed (Authorization: Bearer "
                                           "TOKEN, the value of WORKFLOW_DASHBOARD_TOKEN)"},
                                 401)
        return None

    def action_target(request: Request) -> str | Response:
        """The workflow an action names, or the response refusing the action."""
        refused = authorized(request)
        if refused is not None:
            return refused
        workflow_id: str = request.path_params["workflow_id"]
        try:
            validate_workflow_id(workflow_id)
        except ValueError as error:
            return json_response({"error": str(error)}, 404)
        return workflow_id

    async def cancel(request: Request) -> Response:
        workflow_id = action_target(request)
        if not isinstance(workflow_id, str):
            return workflow_id
        try:
            done = await runtime.cancel(workflow_id, abandon=True)
        except WorkflowLockedError:
            return json_response({"error": f"{workflow_id} is running in another process; "
                                           "stop that process (Ctrl-C) first"}, 409)
        except (WorkflowError, ValueError) as error:
            return json_response({"error": str(error)}, 404)
        return json_response({"workflow_id": workflow_id, "cancelled": done},
                             200 if done else 409)

    async def resume(request: Request) -> Response:
        workflow_id = action_target(request)
        if not isinstance(workflow_id, str):
            return workflow_id
        row = source.rows.get(workflow_id)
        if row is None or row.get("status") not in RESUMABLE_STATUSES:
            return json_response({"error": f"{workflow_id} is not resumable"}, 409)
        arguments = [sys.executable, "-m", "reliability", "resume", workflow_id,
                     "--project-root", str(runtime.project_root)]
        if config_path:
            arguments += ["--config", config_path]
        process = await asyncio.create_subprocess_exec(
            *arguments, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL, start_new_session=True)
        return json_response({"workflow_id": workflow_id, "resumed": True,
                              "pid": process.pid}, 202)

    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_StoreCollector(source))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await source.start()
        try:
            yield
        finally:
            await source.stop()

    routes = [
        Route("/", index), Route("/workflows/{workflow_id}", workflow_detail),
        Route("/health", health), Route("/events", events), Route("/metrics", metrics),
        Route("/api/workflows", api_workflows),
        Route("/api/workflows/{workflow_id}", api_workflow),
        Route("/api/health", api_health), Route("/favicon.ico", no_icon),
        Route("/api/workflows/{workflow_id}/cancel", cancel, methods=["POST"]),
        Route("/api/workflows/{workflow_id}/resume", resume, methods=["POST"]),
        Mount("/static", StaticFiles(directory=_HERE / "static"), name="static"),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, middleware=[
        Middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))])
    app.state.source = source
    return app


class _StoreCollector:
    """The dashboard's /metrics: workflows by status from the store, breaker states and
    health from the runtimes' live files, and the build."""

    def __init__(self, source: DashboardSource) -> None:
        self._source = source

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Any:
        from prometheus_client.core import GaugeMetricFamily

        from .._metrics import BREAKER_STATES, PREFIX, version

        current = GaugeMetricFamily(PREFIX + "workflows_current",
                                    "Stored workflows, by status.", labels=["workflow", "state"])
        counts: dict[tuple[str, str], int] = {}
        for row in list(self._source.rows.values()):
            # Labelled by the definition's name, as the runtimes' own metrics are: one
            # definition is one label value wherever it is scraped.
            key = (str(row.get("definition_name") or row.get("definition")),
                   str(row.get("status")))
            counts[key] = counts.get(key, 0) + 1
        for (workflow, state), count in sorted(counts.items()):
            current.add_metric([workflow, state], count)
        yield current
        breakers = GaugeMetricFamily(PREFIX + "breaker_state", "Circuit breaker state.",
                                     labels=["dependency", "state"])
        health = GaugeMetricFamily(PREFIX + "health_status", "Health: 0, 1 or 2.",
                                   labels=["check"])
        states: dict[str, str] = {}
        levels: dict[str, int] = {}
        for view in list(self._source.runtimes.values()):
            if not view.get("alive"):
                continue
            for name, breaker in (view.get("breakers") or {}).items():
                if states.get(name) != "open":  # open anywhere counts
                    states[name] = str(breaker.get("state"))
            for check, level in (view.get("health") or {}).items():
                levels[check] = max(levels.get(check, 0), int(level))
        for name, state in sorted(states.items()):
            for candidate in BREAKER_STATES:
                breakers.add_metric([name, candidate], 1.0 if candidate == state else 0.0)
        for check, level in sorted(levels.items()):
            health.add_metric([check], level)
        yield breakers
        yield health
        build = GaugeMetricFamily(PREFIX + "build_info", "The running version.",
                                  labels=["version"])
        build.add_metric([version()], 1.0)
        yield build


def render_report(report: Mapping[str, Any], states: Mapping[str, Mapping[str, Any]],
                  runtime: Runtime | None = None) -> str:
    """The batch summary as one self-contained HTML file: the table and each workflow's
    timeline, the dashboard's stylesheet inlined, no script."""
    templates = _templates()
    css = (_HERE / "static" / "dashboard.css").read_text(encoding="utf-8")
    now = time.time()
    timelines = {}
    for workflow_id, state in states.items():
        timelines[workflow_id] = (timeline_context(runtime, state, now) if runtime is not None
                                  else timeline(state, now=now))
    return str(templates.get_template("report.html").render(
        report=report, states=states, timelines=timelines, css=css))
