"""The dashboard end to end in headless Chromium (Debian's package, driven by Playwright with
``executable_path``): real batch and dashboard processes, live updates, the timeline, the
health page during an outage, escaping, refused actions. Each test saves a screenshot to
``test-output/browser/``.

Outside CI the tests skip, saying why, when no Chromium or Playwright is installed; under
CI (``CI`` set, as ``.ci/run`` does) a missing browser is a failure. Every wait is for a
page state (Playwright's ``expect``) or a process; none depends on timing margins.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest

REPO = Path(__file__).resolve().parent.parent
SCREENSHOTS = REPO / "test-output" / "browser"
WAIT_MS = 90_000  # Playwright's upper bound for a page state; reached only on a failure


def _chromium() -> str:
    found = os.environ.get("WORKFLOW_CHROMIUM") or shutil.which("chromium") or shutil.which(
        "chromium-browser")
    if found:
        return found
    message = ("no Chromium found (install Debian's 'chromium' package, or set "
               "WORKFLOW_CHROMIUM to a Chromium executable)")
    if os.environ.get("CI"):
        pytest.fail(message + "; CI must run the browser tests")
    pytest.skip(message)


try:
    from playwright.sync_api import Browser, Page, expect, sync_playwright
except ImportError:  # pragma: no cover - the test extra installs it
    if os.environ.get("CI"):
        raise
    pytest.skip("Playwright is not installed (pip install 'workflow-manager[test]')",
                allow_module_level=True)

pytestmark = pytest.mark.timeout(300)
# Refused actions are what some tests ask for (and assert themselves).
_EXPECTED = re.compile(r"status of (401|403) ")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    executable = _chromium()
    with sync_playwright() as playwright:
        # As root (CI containers) Chromium's sandbox cannot start.
        args = ["--no-sandbox"] if os.geteuid() == 0 else []
        launched = playwright.chromium.launch(executable_path=executable, args=args)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def page(browser: Browser, dashboards: list[Dashboard]) -> Iterator[Page]:
    """A fresh page, closed before the test's dashboards stop (their end is no error)."""
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    opened = context.new_page()
    # Every wait (a locator's action, an expect) ends on the page's state, not a clock: the
    # defaults' 5 s is only an upper bound, too tight for a machine busy with other tests.
    opened.set_default_timeout(WAIT_MS)
    expect.set_options(timeout=WAIT_MS)
    errors: list[str] = []
    opened.on("pageerror", lambda error: errors.append(str(error)))
    # Console errors include what the content security policy refused.
    opened.on("console", lambda message: errors.append(message.text)
              if message.type == "error" and not _EXPECTED.search(message.text) else None)
    opened.on("response", lambda response: errors.append(f"{response.status} {response.url}")
              if response.status >= 400 and response.status not in (401, 403) else None)
    try:
        yield opened
    finally:
        context.close()
    assert errors == [], f"the page reported errors: {errors}"


def shot(page: Page, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WORKFLOW_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests")])
    env.update(extra)
    return env


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    (root / "prompts").mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({
        "enable_health_checks": False, "retry_base_delay": 0.3, "max_retries": 100,
        "circuit_breakers": {"forge": {"failure_threshold": 2, "recovery_timeout": 1.0}}}))
    return root


def prompts(root: Path, count: int, stem: str = "task") -> Path:
    directory = root / "prompts"
    for index in range(count):
        (directory / f"{stem}-{index}.md").write_text(f"# {stem} {index}\n")
    return directory


def start_batch(root: Path, definition: str, count: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "reliability", "batch", str(prompts(root, count)),
         "--definition", f"dashboard_workflows:{definition}", "--project-root", str(root),
         "--config", str(root / "config.json"), "--report", str(root / "run.json"), "--json"],
        env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=root)


def finish(process: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = process.communicate(timeout=240)
    assert process.returncode == 0, err
    return json.loads(out)  # type: ignore[no-any-return]


class Dashboard:
    def __init__(self, root: Path, *options: str, env: dict[str, str] | None = None) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "reliability", "dashboard", "--port", "0",
             "--poll-interval", "0.2", "--project-root", str(root),
             "--config", str(root / "config.json"), *options],
            env=environment(**(env or {})), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
            text=True, cwd=root)
        assert self.process.stderr is not None
        self.lines: list[str] = []
        for line in self.process.stderr:  # the first line names the address
            self.lines.append(line)
            found = re.search(r"Dashboard: (http://\S+/)", line)
            if found:
                self.url = found.group(1)
                # Keep reading, so a chatty log never fills the pipe and stalls it.
                self._drainer = threading.Thread(target=self._drain, daemon=True)
                self._drainer.start()
                return
        raise AssertionError(f"the dashboard did not start: {''.join(self.lines)}")

    def _drain(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)
        self._drainer.join(timeout=60)
        assert self.process.stderr is not None
        self.process.stderr.close()


@pytest.fixture
def dashboards() -> Iterator[list[Dashboard]]:
    started: list[Dashboard] = []
    try:
        yield started
    finally:
        for dashboard in started:
            dashboard.close()


def test_a_batch_appears_and_changes_status_live(page: Page, project: Path,
                                                  dashboards: list[Dashboard]) -> None:
    """The page open before the batch starts gets its rows, running, then completed, by
    server-sent events (the page is never reloaded)."""
    dashboard = Dashboard(project)
    dashboards.append(dashboard)
    page.goto(dashboard.url)
    expect(page.locator("#live")).to_have_text("live", timeout=WAIT_MS)
    page.evaluate("window.__notReloaded = true")
    batch = start_batch(project, "LIVE", 3)
    rows = page.locator("#workflows tbody tr")
    expect(rows).to_have_count(3, timeout=WAIT_MS)
    for index in range(3):
        expect(rows.nth(index).locator(".stage")).to_have_text("wait", timeout=WAIT_MS)
        expect(rows.nth(index).locator(".status")).to_have_text("running")
    expect(page.locator("#counts")).to_contain_text("running 3")
    shot(page, "live-running")
    (project / "release").write_text("go")
    for index in range(3):
        expect(rows.nth(index).locator(".status")).to_have_text("completed", timeout=WAIT_MS)
    expect(page.locator("#counts")).to_contain_text("completed 3", timeout=WAIT_MS)
    assert page.evaluate("window.__notReloaded") is True
    shot(page, "live-completed")
    finish(batch)
    # Filters live in the URL and keep applying to live rows.
    page.goto(dashboard.url + "?status=completed&stage=completed")
    expect(page.locator("#workflows tbody tr")).to_have_count(3)
    page.goto(dashboard.url + "?status=running")
    expect(page.locator("#workflows tbody tr")).to_have_count(0)
    expect(page.locator("#no-rows")).to_be_visible()


def timeline_boxes(page: Page, stage: str) -> list[dict[str, float]]:
    """The x and width of ``stage``'s two bars, its gap and its mark, read in one turn of
    the page's script: the page swaps its body for a fresh one on live events (a health
    sample every few seconds), and boxes read one call apart could straddle a swap."""
    return cast(list[dict[str, float]], page.evaluate("""(stage) => {
        const row = document.querySelector(`.tl-row[data-stage="${stage}"]`);
        const bars = row.querySelectorAll(".bar");
        return [bars[0], bars[1], row.querySelector(".gap"), row.querySelector(".mark")]
            .map((element) => {
                const box = element.getBoundingClientRect();
                return {x: box.x, width: box.width};
            });
    }""", stage))


@pytest.fixture(scope="module")
def retried(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A finished RETRYING workflow: build failed once after its warning, then passed."""
    root = tmp_path_factory.mktemp("retried") / "project"
    (root / "prompts").mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"enable_health_checks": False,
                                                  "retry_base_delay": 0.3}))
    report = finish(start_batch(root, "RETRYING", 1))
    return root, report["workflows"][0]["workflow_id"]


def test_a_retry_is_a_second_bar_with_the_warning_marker(
        page: Page, retried: tuple[Path, str], dashboards: list[Dashboard]) -> None:
    """The workflow page's timeline: build has two bars (failed attempt 1, completed
    attempt 2), a retry gap between them and the watchdog's warning mark in attempt 1."""
    root, workflow_id = retried
    dashboard = Dashboard(root)
    dashboards.append(dashboard)
    page.goto(f"{dashboard.url}workflows/{workflow_id}")
    build = page.locator('.tl-row[data-stage="build"]')
    bars = build.locator(".bar")
    expect(bars).to_have_count(2)
    expect(bars.nth(0)).to_have_attribute("data-status", "failed-attempt")
    expect(bars.nth(1)).to_have_attribute("data-status", "completed")
    expect(build.locator(".gap")).to_have_count(1)
    expect(build.locator('.mark[data-level="warning"]')).to_have_count(1)
    # Drawn where they belong: attempt 1, the wait, attempt 2 from left to right, and the
    # warning inside attempt 1.
    first, second, gap, warning = timeline_boxes(page, "build")
    assert first["x"] + first["width"] <= gap["x"] + 1 and gap["x"] + gap["width"] <= (
        second["x"] + 1)
    assert gap["width"] > 10  # the 0.3 s retry wait is visible, not a sliver
    middle = warning["x"] + warning["width"] / 2
    assert first["x"] <= middle <= first["x"] + first["width"]
    expect(page.locator('.tl-row[data-stage="fetch"] .bar')).to_have_count(1)
    expect(page.locator(".errors")).to_contain_text("the build server answered 503")
    shot(page, "workflow-retry")


def test_a_stage_output_holding_script_renders_as_text(
        page: Page, retried: tuple[Path, str], dashboards: list[Dashboard]) -> None:
    """The output '<script>...</script><b>bold</b>' is shown literally: no script ran, no
    element was made from it."""
    from dashboard_workflows import HOSTILE_TITLE

    root, workflow_id = retried
    dashboard = Dashboard(root)
    dashboards.append(dashboard)
    page.goto(f"{dashboard.url}workflows/{workflow_id}")
    outputs = page.locator(".outputs")
    expect(outputs).to_contain_text(HOSTILE_TITLE)
    assert outputs.locator("b").count() == 0 and outputs.locator("script").count() == 0
    assert page.title() != "owned"
    shot(page, "escaped-output")


def test_an_outage_opens_the_breaker_on_health_then_it_closes(
        page: Page, project: Path, dashboards: list[Dashboard]) -> None:
    """While the forge fails, /health shows its breaker open (live, from the batch's
    runtime file); once the forge answers, the probe closes it."""
    dashboard = Dashboard(project)
    dashboards.append(dashboard)
    batch = start_batch(project, "OUTAGE", 1)
    page.goto(dashboard.url + "health")
    state = page.locator('tr[data-dependency="forge"] .breaker-state')
    expect(state).to_have_text("open", timeout=WAIT_MS)
    expect(page.locator(".transitions")).to_contain_text("closed → open")
    shot(page, "health-open")
    (project / "outage-over").write_text("up")
    expect(state).to_have_text("closed", timeout=WAIT_MS)
    expect(page.locator(".transitions")).to_contain_text("half-open → closed")
    shot(page, "health-closed")
    report = finish(batch)
    assert report["workflows"][0]["status"] == "completed"


def test_actions_are_refused_without_the_token(
        page: Page, project: Path, dashboards: list[Dashboard]) -> None:
    """Read-only: no buttons, and a POST is refused (403). With --allow-actions: a POST
    without the token or with a wrong one is refused (401), the Cancel button says so, and
    the interrupted workflow stays as it was."""
    read_only = Dashboard(project)
    dashboards.append(read_only)
    page.goto(read_only.url)
    batch = start_batch(project, "LIVE", 1)
    expect(page.locator("#workflows tbody tr .stage")).to_have_text("wait", timeout=WAIT_MS)
    workflow_id = page.locator("#workflows tbody tr").get_attribute("data-id")
    batch.send_signal(signal.SIGTERM)  # stopped at a safe point: interrupted, resumable
    batch.communicate(timeout=240)
    assert batch.returncode == 130
    page.goto(f"{read_only.url}workflows/{workflow_id}")
    expect(page.locator("#wf-status")).to_have_text("interrupted", timeout=WAIT_MS)
    expect(page.locator("button.action")).to_have_count(0)
    status = page.evaluate(f"fetch('/api/workflows/{workflow_id}/resume', "
                           "{method: 'POST'}).then(r => r.status)")
    assert status == 403
    guarded = Dashboard(project, "--allow-actions",
                        env={"WORKFLOW_DASHBOARD_TOKEN": "right-token-123"})
    dashboards.append(guarded)
    page.goto(f"{guarded.url}workflows/{workflow_id}")
    for headers in ("{}", "{Authorization: 'Bearer wrong'}"):
        status = page.evaluate(f"fetch('/api/workflows/{workflow_id}/cancel', "
                               f"{{method: 'POST', headers: {headers}}}).then(r => r.status)")
        assert status == 401
    page.on("dialog", lambda dialog: dialog.accept("not-the-token"))
    page.locator('button.action[data-action="cancel"]').click()
    expect(page.locator("#action-result")).to_contain_text("a valid token is needed")
    shot(page, "action-refused")
    page.goto(f"{guarded.url}api/workflows/{workflow_id}")
    assert json.loads(page.locator("body").inner_text())["status"] == "interrupted"


@pytest.fixture
def shared_store(postgres_server: Any) -> Iterator[str]:
    """A fresh database on the session's PostgreSQL server, made and dropped from a thread:
    Playwright's event loop runs on this one (``postgres_url`` cannot run here)."""
    import secrets
    from concurrent.futures import ThreadPoolExecutor

    asyncpg = pytest.importorskip("asyncpg")
    base = postgres_server if isinstance(postgres_server, str) else postgres_server.url
    name = f"test_{secrets.token_hex(6)}"  # made here: safe in a statement

    async def admin(statement: str) -> None:
        connection = await asyncpg.connect(base)
        try:
            await connection.execute(statement)
        finally:
            await connection.close()

    def run(statement: str) -> None:
        with ThreadPoolExecutor(1) as thread:
            thread.submit(asyncio.run, admin(statement)).result()

    run(f"CREATE DATABASE {name}")
    try:
        yield base.rsplit("/", 1)[0] + "/" + name
    finally:
        run(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def start_worker(root: Path, url: str) -> subprocess.Popen[str]:
    """A worker of the shared store running two workflows at once (lease 1.5 s)."""
    return subprocess.Popen(
        [sys.executable, "-m", "reliability", "worker", "--processes", "1", "--store", url,
         "--project-root",
         str(root), "--config", str(root / "config.json"), "--concurrency", "2",
         "--exit-when-idle", "--log-level", "WARNING"],
        env=environment(WORKFLOW_LEASE_SECONDS="1.5"), stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True, cwd=root)


def test_workers_on_the_shared_store_show_their_running_workflows(
        page: Page, project: Path, shared_store: str, dashboards: list[Dashboard]) -> None:
    """Two worker processes on PostgreSQL, two workflows each in their middle stage: the
    dashboard (reading only the database) lists all four running in that stage, each
    row naming its worker, and /health shows both processes with their host; the one
    SIGKILLed is shown gone and its rows no longer name it."""
    import socket

    postgres_url = shared_store
    subprocess.run(
        [sys.executable, "-m", "reliability", "submit", "--definition",
         "dashboard_workflows:LIVE", "--count", "4", "--store", postgres_url,
         "--project-root", str(project), "--json"],
        env=environment(), cwd=project, check=True, capture_output=True)
    workers = [start_worker(project, postgres_url) for _ in range(2)]
    try:
        dashboard = Dashboard(project, "--store", postgres_url)
        dashboards.append(dashboard)
        page.goto(dashboard.url)
        rows = page.locator("#workflows tbody tr")
        expect(rows).to_have_count(4, timeout=WAIT_MS)
        host = socket.gethostname()
        for process in workers:
            named = page.locator(f"#workflows tbody tr .worker:text-is('{host} pid "
                                 f"{process.pid}')")
            expect(named).to_have_count(2, timeout=WAIT_MS)
        for index in range(4):
            expect(rows.nth(index).locator(".stage")).to_have_text("wait", timeout=WAIT_MS)
            expect(rows.nth(index).locator(".status")).to_have_text("running")
        shot(page, "workers-running")
        page.goto(dashboard.url + "health")
        for process in workers:
            expect(page.locator("#health-body")).to_contain_text(
                f"Process {process.pid} on {host}", timeout=WAIT_MS)
        victim = workers[0]
        victim.kill()
        victim.communicate()
        gone = page.locator("section.runtime.gone h2")
        expect(gone).to_contain_text(f"Process {victim.pid}", timeout=WAIT_MS)
        shot(page, "workers-one-killed")
        page.goto(dashboard.url)
        expect(page.locator(f"#workflows tbody tr .worker:text-is('{host} pid {victim.pid}')"
                            )).to_have_count(0, timeout=WAIT_MS)
        (project / "release").write_text("go")
        expect(page.locator("#counts")).to_contain_text("completed 4", timeout=WAIT_MS)
        _, err = workers[1].communicate(timeout=240)
        assert workers[1].returncode == 0, err
    finally:
        for process in workers:
            if process.poll() is None:
                process.kill()
                process.communicate()
