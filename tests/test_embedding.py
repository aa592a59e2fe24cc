"""The runtime embedded in a program: ordinary Python in, nothing process-wide changed,
no workflow package imported unless asked, stored workflows listed without the CLI."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from machines import StageContext, StageSpec, WorkflowDefinition
from reliability import (
    ConfigurationError,
    MemoryStore,
    ResolvedTarget,
    Runtime,
    WorkflowConfiguration,
    register_target_resolver,
)
from reliability._plugins import default_target_resolver

REPO = Path(__file__).resolve().parent.parent


async def _ok(ctx: StageContext) -> dict[str, Any]:
    return {"ok": ctx.stage}


async def _echo(ctx: StageContext) -> dict[str, Any]:
    return {"seen": {k: ctx.context.get(k) for k in ("source", "day")}}


async def _broken(ctx: StageContext) -> None:
    raise ValueError("broken on purpose")


LISTED = WorkflowDefinition("listed", [StageSpec("only", _ok)])
BROKEN = WorkflowDefinition("broken", [StageSpec("only", _broken, max_retries=0)])
ECHO = WorkflowDefinition("echo", [StageSpec("echo", _echo)])


def _python(code: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("WORKFLOW_") and k != "GITHUB_TOKEN"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)




@pytest.mark.usefixtures("cpython_defaults")
async def test_a_default_runtime_leaves_the_interpreter_alone(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    """With defaults, gc thresholds and the switch interval are the same inside and after
    ``async with Runtime()``."""
    monkeypatch.chdir(tmp_path)
    for key in [k for k in os.environ if k.startswith("WORKFLOW_")]:
        monkeypatch.delenv(key)
    before = gc.get_threshold(), sys.getswitchinterval()
    async with Runtime() as runtime:
        assert (await runtime.run(LISTED)).status == "completed"
        assert (gc.get_threshold(), sys.getswitchinterval()) == before
    assert (gc.get_threshold(), sys.getswitchinterval()) == before


def test_importing_reliability_imports_no_workflow_package() -> None:
    """``import reliability`` and a runtime with core settings load nothing of machines."""
    completed = _python("""
        import asyncio, sys
        import reliability
        async def main():
            config = reliability.WorkflowConfiguration(max_retries=1)
            async with reliability.Runtime(config, store=reliability.MemoryStore(),
                                           configure_logs=False):
                pass
        asyncio.run(main())
        print(sorted(m for m in sys.modules if m == "machines" or m.startswith("machines.")))
    """)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "[]"


def test_installed_workflow_package_is_found_without_importing_it() -> None:
    """Without importing machines: development settings are accepted and a path resolves
    to the development workflow (through the package's entry point)."""
    completed = _python("""
        import sys
        from reliability import Runtime, WorkflowConfiguration
        assert "machines" not in sys.modules
        config = WorkflowConfiguration(forge="github", github_repository="o/r",
                                       reviewers=["alice"])
        runtime = Runtime(config, configure_logs=False)
        resolved = runtime.resolve_target("prompts/feature.md")
        print(config.forge, config.reviewers, resolved.definition.import_path,
              resolved.context["prompt_file"].endswith("prompts/feature.md"))
    """)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.split() == ["github", "('alice',)",
                                        "machines.development:DEVELOPMENT_WORKFLOW", "True"]


class TestTargets:
    @pytest.fixture
    def no_default_resolver(self) -> Iterator[None]:
        previous = default_target_resolver()
        register_target_resolver(None)
        yield
        register_target_resolver(previous)

    @pytest.mark.usefixtures("no_default_resolver")
    async def test_a_path_without_a_resolver_is_one_clear_error(self, tmp_path: Path) -> None:
        """No resolver registered: running a path says what to do instead."""
        async with Runtime(WorkflowConfiguration(), tmp_path, store=MemoryStore(),
                           configure_logs=False) as runtime:
            with pytest.raises(ConfigurationError, match="a path needs a target resolver"):
                await runtime.run("prompts/feature.md")

    async def test_a_runtime_s_own_resolver_turns_paths_into_workflows(
            self, tmp_path: Path) -> None:
        """Runtime(target_resolver=...) decides what a path runs, with the given context."""
        def resolver(target: str | os.PathLike[str],
                     context: Mapping[str, Any]) -> ResolvedTarget:
            return ResolvedTarget(ECHO, {**context, "source": os.fspath(target)},
                                  os.fspath(target))

        async with Runtime(WorkflowConfiguration(), tmp_path, store=MemoryStore(),
                           configure_logs=False, target_resolver=resolver) as runtime:
            result = await runtime.run("data.csv", context={"day": 1})
        assert result.status == "completed"
        assert result.outputs["seen"] == {"source": "data.csv", "day": 1}


class TestListWorkflows:
    async def test_rows_are_what_list_json_prints(self, tmp_path: Path) -> None:
        """list_workflows() equals 'workflow-manager list --json' (oldest first), and the
        status filter keeps only that status."""
        config = WorkflowConfiguration(enable_health_checks=False)
        async with Runtime(config, tmp_path, configure_logs=False) as runtime:
            done = await runtime.run(LISTED, context={"prompt_file": "a.md"})
            failed = await runtime.run(BROKEN)
            pending = await runtime.register(LISTED)
        async with Runtime(config, tmp_path, configure_logs=False) as runtime:
            rows = await runtime.list_workflows()
            only_failed = await runtime.list_workflows("failed")
            two = await runtime.list_workflows(["completed", "pending"])
        assert [r["workflow_id"] for r in rows] == [done.workflow_id, failed.workflow_id,
                                                    pending]
        assert [r["status"] for r in rows] == ["completed", "failed", "pending"]
        assert rows[0]["prompt_file"] == "a.md" and rows[0]["definition"]
        assert "broken on purpose" in rows[1]["error"]
        assert [r["workflow_id"] for r in only_failed] == [failed.workflow_id]
        assert {r["status"] for r in two} == {"completed", "pending"}
        command = [sys.executable, "-m", "reliability", "list", "--json", "--project-root",
                   str(tmp_path)]
        printed = await asyncio.to_thread(
            subprocess.run, command, cwd=REPO, capture_output=True, text=True, timeout=60,
            env={k: v for k, v in os.environ.items() if not k.startswith("WORKFLOW_")})
        assert printed.returncode == 0, printed.stderr
        assert json.loads(printed.stdout)["workflows"] == json.loads(json.dumps(rows))

    async def test_an_unknown_status_is_refused(self, tmp_path: Path) -> None:
        """A misspelt status is a ValueError listing the real ones, not an empty list."""
        async with Runtime(WorkflowConfiguration(), tmp_path, store=MemoryStore(),
                           configure_logs=False) as runtime:
            with pytest.raises(ValueError, match="unknown status 'complete'; known: pending"):
                await runtime.list_workflows("complete")
