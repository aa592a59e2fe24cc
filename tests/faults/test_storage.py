"""Storage that fails under the runtime: a disk that fills up, a directory that is a file.

Tests run as root here, and root ignores permission bits, so "read-only" is not simulated
with chmod: a full disk is ``RLIMIT_FSIZE`` in the CLI child (writes past the limit fail
with EFBIG, which Python receives as an error because it ignores SIGXFSZ), and an unusable
state directory is a regular file where the directory should be.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

from fault_flows import SIX_STAGES, effect_counts
from fault_helpers import (
    ROOT,
    STATES,
    Snapshots,
    cli,
    cli_env,
    decode_every_state_file,
    stored_states,
    write_prompts,
)

FILE_SIZE_LIMIT = 30_000  # bytes: the journal reaches it after a few stages of 5 workflows


def _limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, FILE_SIZE_LIMIT))


def test_disk_full_stops_with_a_resource_error_and_resume_finishes_later(
        tmp_path: Path) -> None:
    """Writes fail with EFBIG mid-batch: each workflow stops with a ResourceError naming the
    journal and the remedy (exit 1), earlier states stay valid and resumable, and with the
    space back ``resume --all`` completes them without re-running completed stages."""
    root = tmp_path / "project"
    root.mkdir()
    prompts = write_prompts(tmp_path / "prompts", 5)
    env = cli_env(WORKFLOW_ENABLE_MONITORING="false")

    full = subprocess.run(
        [sys.executable, "-m", "reliability", "batch", str(prompts), "--definition",
         "fault_flows:LEDGER", "--json", "--project-root", str(root)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=90,
        preexec_fn=_limit_file_size)

    assert full.returncode == 1, full.stderr[-2000:]
    report = json.loads(full.stdout)
    assert report["counts"] == {"failed": 5}
    for row in report["workflows"]:
        assert row["error"].startswith("ResourceError: cannot write "), row
        assert "_journal/journal-" in row["error"] and "File too large" in row["error"]
        assert "free some space, then resume the workflow" in row["error"]
    assert "Traceback" not in full.stderr
    snapshots = Snapshots()
    snapshots.take(root)  # every file decodes, and what was durable is known
    before = stored_states(root)
    assert {s["status"] for s in before.values()} == {"running"}  # resumable
    assert any(s["completed_stages"] for s in before.values())  # earlier work kept

    resumed = cli(root, "resume", "--all", "--json", env=env)

    assert resumed.returncode == 0, resumed.stderr[-2000:]
    after = stored_states(root)
    assert set(after) == set(before)
    assert {s["status"] for s in after.values()} == {"completed"}
    assert all(s["completed_stages"] == list(SIX_STAGES) for s in after.values())
    snapshots.assert_completed_stages_never_ran_again(effect_counts(root))
    assert decode_every_state_file(root) >= 5


def test_state_directory_that_is_a_file_is_a_clear_error(tmp_path: Path) -> None:
    """When the state directory is a file, batch stops before any workflow starts, with one
    line naming the path (exit 1), and leaves the file alone."""
    root = tmp_path / "project"
    (root / ".github").mkdir(parents=True)
    (root / STATES).write_text("not a directory\n")
    prompts = write_prompts(tmp_path / "prompts", 2)

    completed = cli(root, "batch", str(prompts), "--definition", "fault_flows:LEDGER")

    assert completed.returncode == 1
    assert "Traceback" not in completed.stderr
    [line] = completed.stderr.strip().splitlines()
    assert line.startswith("workflow-manager batch: error: ")
    assert "Not a directory" in line and str(root / STATES) in line
    assert (root / STATES).read_text() == "not a directory\n"
    assert not (root / "effects").exists()
