"""The dashboard over a store, served by uvicorn in the test's loop: JSON in the CLI's
shapes, live events with IDs that a reconnecting client resumes from, escaping and
redaction, read-only unless actions are allowed with the token, the host check, metrics;
the timeline model; the HTML report."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

import httpx

from machines import StageContext, StageSpec, WorkflowDefinition
from reliability import ConfigurationError, MemoryStore, Runtime, WorkflowConfiguration
from reliability._cli import main
from reliability._dashboard import create_app, estimated_finish, start_server, timeline
from reliability._diagnostics import stored_diagnostics

TOKEN = "s3cret-dashboard-token"
GITHUB_LIKE = "ghp_" + "A1b2C3d4E5f6G7h8I9j0"
HOSTILE = "<script>window.owned = 1</script>"


async def hostile(ctx: StageContext) -> dict[str, Any]:
    return {"title": HOSTILE, "note": f"pushed with {GITHUB_LIKE}"}


HOSTILE_FLOW = WorkflowDefinition("hostile", [StageSpec("write", hostile)])


class Served:
    def __init__(self, runtime: Runtime, url: str) -> None:
        self.runtime, self.url = runtime, url
        self.client = httpx.AsyncClient(base_url=url, timeout=30)


@contextlib.asynccontextmanager
async def served(tmp_path: Path, **options: Any) -> AsyncIterator[Served]:
    config = WorkflowConfiguration(enable_health_checks=False)
    async with Runtime(config, tmp_path, store=MemoryStore(), configure_logs=False) as runtime:
        app = create_app(runtime, poll_interval=0.05, **options)
        server = await start_server(app, "127.0.0.1", 0, handle_signals=False)
        handle = Served(runtime, f"http://127.0.0.1:{server.port}")
        try:
            yield handle
        finally:
            await handle.client.aclose()
            await server.stop()


async def test_json_has_the_shapes_of_list_and_diagnostics(tmp_path: Path) -> None:
    """/api/workflows is {"workflows": list_workflows()}; /api/workflows/ID is the
    diagnostics document (redacted), with the same keys as 'diagnostics --json'."""
    async with served(tmp_path) as handle:
        result = await handle.runtime.run(HOSTILE_FLOW)
        listed = (await handle.client.get("/api/workflows")).json()
        assert listed == {"workflows": json.loads(json.dumps(
            await handle.runtime.list_workflows(), default=str))}
        filtered = (await handle.client.get("/api/workflows?status=failed")).json()
        assert filtered == {"workflows": []}
        bad = await handle.client.get("/api/workflows?status=nonsense")
        assert bad.status_code == 400
        detail = (await handle.client.get(f"/api/workflows/{result.workflow_id}")).json()
        expected = await stored_diagnostics(handle.runtime, result.workflow_id)
        assert set(detail) == set(expected)
        assert detail["outputs"]["title"] == HOSTILE
        assert GITHUB_LIKE not in json.dumps(detail)
        missing = await handle.client.get("/api/workflows/not-an-id")
        assert missing.status_code == 404


async def test_workflow_strings_are_escaped_and_secrets_redacted_in_pages(
        tmp_path: Path) -> None:
    """An output holding <script> appears as text (escaped) on the workflow page and the
    list; a token-shaped secret is shown as ***; pages forbid inline script by CSP."""
    async with served(tmp_path) as handle:
        result = await handle.runtime.run(HOSTILE_FLOW)
        page = await handle.client.get(f"/workflows/{result.workflow_id}")
        assert page.status_code == 200
        assert HOSTILE not in page.text
        assert "&lt;script&gt;window.owned = 1&lt;/script&gt;" in page.text
        assert GITHUB_LIKE not in page.text and "pushed with ***" in page.text
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert "http://" not in page.text.replace(handle.url, "")  # no CDN assets


async def test_events_have_ids_and_a_reconnecting_client_misses_nothing(
        tmp_path: Path) -> None:
    """Each change is an event with an increasing ID; reconnecting with Last-Event-ID
    replays what happened while away, starting right after that ID."""
    async with served(tmp_path) as handle:
        first = await handle.runtime.run(HOSTILE_FLOW)
        seen = await read_events(handle, {}, until=lambda e: e.get("data", {}).get(
            "workflow_id") == first.workflow_id, after="0")
        last_id = int(seen[-1]["id"])
        assert [int(e["id"]) for e in seen] == sorted(int(e["id"]) for e in seen)
        # Away: two more workflows finish while no client listens.
        second = await handle.runtime.run(HOSTILE_FLOW)
        third = await handle.runtime.run(HOSTILE_FLOW)
        replay = await read_events(handle, {"Last-Event-ID": str(last_id)},
                                   until=lambda e: e.get("data", {}).get(
                                       "workflow_id") == third.workflow_id)
        assert int(replay[0]["id"]) == last_id + 1
        rows = [e["data"]["workflow_id"] for e in replay if e["event"] == "row"]
        assert second.workflow_id in rows and third.workflow_id in rows
        assert first.workflow_id not in rows


async def read_events(handle: Served, headers: dict[str, str], until: Any,
                      after: str | None = None) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    url = "/events" + (f"?after={after}" if after is not None else "")
    async with handle.client.stream("GET", url, headers=headers) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        current: dict[str, Any] = {}
        async for line in response.aiter_lines():
            if not line:
                if "id" in current:
                    events.append(current)
                    if until(current):
                        return events
                current = {}
            elif line.startswith("id: "):
                current["id"] = line[4:]
            elif line.startswith("event: "):
                current["event"] = line[7:]
            elif line.startswith("data: "):
                current["data"] = json.loads(line[6:])
    raise AssertionError(f"stream ended after {events}")


async def test_actions_are_refused_without_allow_actions_or_the_token(tmp_path: Path) -> None:
    """Read-only: 403. With --allow-actions: no or a wrong token 401, the token 200 (the
    stored workflow is cancelled). Allowing actions without a token is refused at start."""
    async with served(tmp_path) as handle:
        workflow_id = await register(handle.runtime)
        refused = await handle.client.post(f"/api/workflows/{workflow_id}/cancel")
        assert refused.status_code == 403
    with pytest.raises(ConfigurationError, match="WORKFLOW_DASHBOARD_TOKEN"):
        async with served(tmp_path, allow_actions=True, token=None):
            pass
    async with served(tmp_path, allow_actions=True, token=TOKEN) as handle:
        workflow_id = await register(handle.runtime)
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            response = await handle.client.post(f"/api/workflows/{workflow_id}/cancel",
                                                headers=headers)
            assert response.status_code == 401, headers
        assert (await handle.runtime.store.load(workflow_id)).state["status"] == "pending"
        response = await handle.client.post(f"/api/workflows/{workflow_id}/cancel",
                                            headers={"Authorization": f"Bearer {TOKEN}"})
        assert response.status_code == 200 and response.json()["cancelled"] is True
        assert (await handle.runtime.store.load(workflow_id)).state["status"] == "cancelled"
        assert (await handle.client.get(f"/api/workflows/{workflow_id}/cancel")
                ).status_code == 405  # GET never acts


async def register(runtime: Runtime) -> str:
    from workflows_for_tests import RECORDING

    return await runtime.register(RECORDING, context={"prompt_file": "p.md"})


async def test_a_foreign_host_header_is_refused(tmp_path: Path) -> None:
    """DNS rebinding: a request naming another host gets 400, loopback names are served."""
    async with served(tmp_path) as handle:
        assert (await handle.client.get("/", headers={"Host": "evil.example"})
                ).status_code == 400
        assert (await handle.client.get("/", headers={"Host": "localhost"})).status_code == 200


async def test_dashboard_metrics_count_stored_workflows_by_status(tmp_path: Path) -> None:
    """/metrics: workflows_current by definition and status from the store, build info."""
    async with served(tmp_path) as handle:
        await handle.runtime.run(HOSTILE_FLOW)
        await register(handle.runtime)
        while True:
            text = (await handle.client.get("/metrics")).text
            if 'state="pending"' in text and 'state="completed"' in text:
                break
            await asyncio.sleep(0.02)
    assert 'workflow_manager_workflows_current{state="pending",workflow=' in text
    assert "workflow_manager_build_info{" in text


def test_timeline_has_a_bar_per_attempt_a_retry_gap_marks_and_baseline_bands() -> None:
    """Attempt 1 (from its error), attempt 2 (from history), the gap between them, the
    warning mark in attempt 1, and each bar's baseline band; a running stage runs to now."""
    state = {
        "status": "running", "current_stage": "publish", "stage_start_time": 130.0,
        "attempt": 1,
        "monitoring_state": {
            "stage_history": [
                {"stage": "fetch", "started_at": 100.0, "duration": 5.0, "baseline": 10.0,
                 "attempts": 1, "status": "completed"},
                {"stage": "build", "started_at": 120.0, "duration": 8.0, "baseline": 4.0,
                 "attempts": 2, "status": "completed"}],
            "errors": [{"stage": "build", "attempt": 1, "started_at": 105.0, "at": 115.0,
                        "message": "503", "category": "transient"}],
            "watchdog_events": [{"stage": "build", "attempt": 1, "level": "warning",
                                 "at": 109.0}],
        },
    }
    drawn = timeline(state, now=140.0)
    rows = {row["stage"]: row for row in drawn["rows"]}
    assert list(rows) == ["fetch", "build", "publish"]
    build = rows["build"]
    assert [(b["attempt"], b["status"], b["start"], b["end"]) for b in build["bars"]] == [
        (1, "failed-attempt", 105.0, 115.0), (2, "completed", 120.0, 128.0)]
    assert [g["seconds"] for g in build["gaps"]] == [5.0]
    assert [(m["level"], m["left"]) for m in build["marks"]] == [("warning", 22.5)]
    assert build["bars"][1]["grade"] == "slow"  # 8 s against a 4 s baseline
    assert build["bars"][1]["band_width"] == 10.0  # 4 s of a 40 s axis
    assert rows["publish"]["bars"][0]["status"] == "running"
    assert rows["publish"]["bars"][0]["end"] == 140.0
    assert drawn["start"] == 100.0 and drawn["end"] == 140.0


def test_estimated_finish_adds_the_baselines_still_to_come() -> None:
    """Running stage: its baseline from its start (or now, once past it) plus the stages
    after it; an ended workflow has no estimate."""
    state = {"status": "running", "current_stage": "b", "stage_start_time": 100.0}
    remaining = [("b", 10.0), ("c", 20.0), ("d", 5.0)]
    assert estimated_finish(state, 104.0, remaining) == 135.0  # 110 + 25
    assert estimated_finish(state, 130.0, remaining) == 155.0  # past its baseline: now + 25
    assert estimated_finish({**state, "status": "completed"}, 104.0, remaining) is None


def test_report_html_is_one_self_contained_file_with_timelines(tmp_path: Path) -> None:
    """'report RUN.json --html' writes the summary table and each workflow's timeline with
    the stylesheet inlined and nothing loaded from elsewhere; strings escaped."""
    from workflows_for_tests import RECORDING  # noqa: F401 - importable for the batch

    prompts = tmp_path / "prompts"
    prompts.mkdir()
    for name in ("a", "b"):
        (prompts / f"{name}<i>.md").write_text("# hi\n")
    report = tmp_path / "run.json"
    code = main(["batch", str(prompts), "--project-root", str(tmp_path), "--definition",
                 "workflows_for_tests:RECORDING", "--report", str(report), "--json"])
    assert code == 0
    code = main(["report", str(report), "--html", "--project-root", str(tmp_path)])
    assert code == 0
    html = (tmp_path / "run.html").read_text()
    assert html.count('class="tl-row"') == 6  # 2 workflows x 3 stages
    assert html.count('class="bar s-completed') == 6
    assert "<style>" in html and ".timeline" in html
    assert "<script" not in html and 'src="' not in html and "stylesheet" not in html
    assert "a&lt;i&gt;.md" in html and "a<i>.md" not in html


def test_dashboard_and_report_refuse_in_one_line_without_the_extra(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Without the [dashboard] extra's packages both commands exit 2 naming what is missing
    and the extra to install, and start nothing."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("jinja2", "uvicorn") else real(name, *a))
    report = tmp_path / "run.json"
    report.write_text('{"workflows": []}')
    assert main(["dashboard", "--project-root", str(tmp_path)]) == 2
    assert main(["report", str(report), "--html", "--project-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "the dashboard needs the dashboard extra (missing: uvicorn, jinja2)" in err
    assert "the HTML report needs the dashboard extra (missing: jinja2)" in err
    assert err.count("workflow-manager[dashboard]") == 2
    assert not (tmp_path / "run.html").exists()
