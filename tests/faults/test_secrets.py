"""Secrets: with GITHUB_TOKEN set, failing workflows never write the token anywhere, and
everything they write is private to the user.

One project, GitHub emulators on loopback, and three development workflows run by the
real CLI, each failing differently: GitHub refuses the token (401), GitHub is down (502)
until retries run out, and the agent command prints the token and exits 1. Then every
log, state file, checkpoint, journal, report, bundle and CLI output is searched for it.
"""

from __future__ import annotations

import json
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from dev_helpers import PROMPTS, git, make_example_repo
from fault_helpers import AGENT_COMMAND, cli, cli_env
from github_emulator import GitHubEmulator

# Not shaped like a GitHub token, so only knowing the value can keep it out of files.
SECRET = "wm-Secret-7f3a9c1e5b2d4086"
LEAKY_AGENT = """
import os, sys
token = os.environ.get("GITHUB_TOKEN", "")
print(f"agent: pushing to https://x-access-token:{token}@github.com/acme/widgets.git")
print(f"agent: the token is {token}", file=sys.stderr)
sys.exit(1)
"""


@pytest.fixture
def project(tmp_path: Path) -> Iterator[tuple[Path, GitHubEmulator]]:
    repo = make_example_repo(tmp_path / "repo")
    bare = tmp_path / "origin.git"
    subprocess.run(["git", "init", "-q", "--bare", str(bare)], check=True)
    git(repo, "remote", "add", "origin", str(bare))
    git(repo, "push", "-q", "origin", "main")
    with GitHubEmulator(owner="acme", repo="widgets", token=SECRET, bare_repo=bare) as gh:
        yield repo, gh


def _env(gh: GitHubEmulator, **extra: str) -> dict[str, str]:
    settings = {"GITHUB_TOKEN": SECRET, "WORKFLOW_FORGE": "github",
                "WORKFLOW_GITHUB_REPOSITORY": "acme/widgets", "WORKFLOW_GITHUB_API_URL": gh.url,
                "WORKFLOW_AGENT_COMMAND": AGENT_COMMAND, "WORKFLOW_LOG_LEVEL": "DEBUG",
                "WORKFLOW_MAX_RETRIES": "1", "WORKFLOW_RETRY_BUDGET_SECONDS": "20",
                "WORKFLOW_CIRCUIT_BREAKERS": '{"github": {"failure_threshold": 50, '
                                             '"recovery_timeout": 1}}'}
    return cli_env(**{**settings, **extra})


def _private(root: Path) -> list[str]:
    """Files under the runtime's directories that are not 0600, directories not 0700."""
    wrong = []
    for top in ("workflow-states", "workflow-checkpoints", "workflow-logs", "workflow-reports"):
        assert (root / ".github" / top).is_dir(), top
        for path in [root / ".github" / top, *(root / ".github" / top).rglob("*")]:
            mode = stat.S_IMODE(path.lstat().st_mode)
            if mode != (0o700 if path.is_dir() else 0o600):
                wrong.append(f"{path} {mode:o}")
    return wrong


def test_token_never_written_and_files_are_private_when_every_failure_happens(
        project: tuple[Path, GitHubEmulator], tmp_path: Path) -> None:
    """401, an outage and an agent that prints the token: the token is in no log, state,
    checkpoint, journal, report, bundle or CLI output; files 0600, directories 0700."""
    repo, gh = project
    leaky = tmp_path / "leaky_agent.py"
    leaky.write_text(LEAKY_AGENT)
    outputs: list[str] = []

    def run(command: str = "run", **extra: str) -> subprocess.CompletedProcess[str]:
        completed = cli(repo, command, str(PROMPTS[0]), "--json", env=_env(gh, **extra))
        outputs.extend([completed.stdout, completed.stderr])
        assert completed.returncode == 1, completed.stderr[-2000:]
        return completed

    with GitHubEmulator(owner="acme", repo="widgets", token="a-different-token") as other:
        run(WORKFLOW_GITHUB_API_URL=other.url)  # the token is refused: 401
    gh.outage(3600, status=502)
    run("batch")  # a batch also writes its report
    gh.outage(0)
    run(WORKFLOW_AGENT_COMMAND=f"{{python}} {leaky} {{prompt_file}}")

    listing = cli(repo, "list", "--json", env=_env(gh))
    outputs.extend([listing.stdout, listing.stderr])
    workflows = {w["workflow_id"]: w for w in json.loads(listing.stdout)["workflows"]}
    assert len(workflows) == 3 and {w["status"] for w in workflows.values()} == {"failed"}
    bundles = []
    for index, workflow_id in enumerate(workflows):
        completed = cli(repo, "diagnostics", workflow_id, *(("--json",) if index else ()),
                        env=_env(gh))
        outputs.extend([completed.stdout, completed.stderr])
        bundle = tmp_path / f"bundle-{workflow_id}.json"
        completed = cli(repo, "bundle", workflow_id, "--output", str(bundle), env=_env(gh))
        assert completed.returncode == 0, completed.stderr
        outputs.extend([completed.stdout, completed.stderr])
        assert stat.S_IMODE(bundle.stat().st_mode) == 0o600
        bundles.append(bundle)

    errors = " | ".join(str(w["error"]) for w in workflows.values())
    assert "401" in errors and "502" in errors and "agent command" in errors  # all three
    written = [p for p in (repo / ".github").rglob("*") if p.is_file()
               and "workflow-forge" not in p.parts] + bundles
    assert any(p.name.endswith(".log") for p in written)  # the daily log is among them
    leaks = [str(p) for p in written if SECRET.encode() in p.read_bytes()]
    leaks += [f"CLI output {i}" for i, text in enumerate(outputs) if SECRET in text]
    assert leaks == []
    assert _private(repo) == []
