"""Every core: ``workflow-manager batch --processes N`` on a batch, per workload.

``python -m benchmarks processes [--workflows 4000] [--processes 1,2] [--rounds 3]
[--concurrency 1000] [--workloads noop,json] [--json FILE]`` runs, for each round, each
workload and each process count (the order alternates between rounds, so a change in the
machine's load hits both alike), the command line as a user does: ``batch`` of N prompt
files (strict durability, file store, health checks and monitoring off, WARNING logs, as
in the single-process throughput figure) in a fresh project directory, through one of
two definitions of 19 stages:

- ``noop``: ``NOOP19``, stages that return at once: the runtime's own cost, where the
  store's writer process needs about as much CPU as the event loop;
- ``json``: ``JSON19``, a loop-bound batch: each stage parses a ~20 KB JSON document (a
  page of 24 issues as a forge's REST API returns them) and serialises it again, as a
  handler that processes an API response does, on the event loop; it returns nothing, so
  its durable records are the no-op workload's.

It reports durable stage transitions/s over the batch's run (the report's
``run_seconds``: from the first workflow's start to the last one's end; registration,
child start-up and closing excluded), the command's wall time, the CPU time of all its
processes, split by role (the parent, the event loops' processes, the store writers:
sampled with psutil while the command runs; barely moved by the machine's load, unlike
the rates) and the load average beside each; then the median per workload and process
count and the ratio to one process.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from machines import StageContext, StageSpec, WorkflowDefinition

ROOT = Path(__file__).resolve().parent.parent
DEFINITIONS = {"noop": "benchmarks._processes:NOOP19", "json": "benchmarks._processes:JSON19"}
_SAMPLE_SECONDS = 0.2  # how often the command's processes' CPU times are read


async def _noop(ctx: StageContext) -> None:
    return None


def _api_response() -> str:
    """A page of 24 issues in the shape a forge's REST API returns (~20 KB of JSON)."""
    issues = []
    for number in range(1, 25):
        issues.append({
            "id": 1_000_000 + number, "number": number, "state": "open",
            "title": f"Stage {number} fails when the workflow resumes after a crash",
            "body": (f"Steps to reproduce: start a workflow, stop it in stage {number}, "
                     "resume it. Expected: it continues. Actual: it starts over. "),
            "user": {"login": f"user{number % 7}", "id": 500 + number % 7,
                     "type": "User", "site_admin": False},
            "labels": [{"id": 10 + k, "name": name, "color": "d73a4a", "default": k == 0}
                       for k, name in enumerate(("bug", "durability", "p2")[:1 + number % 3])],
            "assignees": [{"login": "maintainer", "id": 1}] if number % 2 else [],
            "comments": number % 5, "locked": False,
            "created_at": f"2026-11-{1 + number % 28:02d}T10:{number:02d}:00Z",
            "updated_at": f"2026-11-{1 + number % 28:02d}T12:{number:02d}:00Z",
            "closed_at": None, "author_association": "CONTRIBUTOR",
            "url": f"https://forge.example/api/repos/acme/runtime/issues/{number}",
            "html_url": f"https://forge.example/acme/runtime/issues/{number}",
            "reactions": {"total_count": number % 4, "+1": number % 4, "-1": 0},
        })
    return json.dumps(issues)


API_RESPONSE = _api_response()


async def _parse_and_serialise(ctx: StageContext) -> None:
    # On the loop, as an ordinary handler's JSON work is: this is what makes the batch
    # loop-bound (the runtime's own cost per stage is a fraction of it).
    issues = json.loads(API_RESPONSE)
    json.dumps(issues)


NOOP19 = WorkflowDefinition("noop19", [StageSpec(f"stage_{i:02d}", _noop) for i in range(19)])
JSON19 = WorkflowDefinition("json19", [StageSpec(f"stage_{i:02d}", _parse_and_serialise)
                                       for i in range(19)])


class _CpuSampler:
    """The CPU times of a command's processes, read every _SAMPLE_SECONDS until it ends:
    the last reading of each process, by role (a process's CPU after its last reading, in
    its last fraction of a second, is missed)."""

    def __init__(self, root_pid: int) -> None:
        self._root = root_pid
        self._last: dict[int, tuple[str, float]] = {}
        self.loops: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(_SAMPLE_SECONDS):
            try:
                root = psutil.Process(self._root)
                processes = [root, *root.children(recursive=True)]
            except psutil.Error:
                continue
            for process in processes:
                try:
                    times = process.cpu_times()
                    role = self._last.get(process.pid, ("", 0.0))[0] or _role(
                        process, self._root)
                except psutil.Error:
                    continue
                self._last[process.pid] = (role, times.user + times.system)

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        # Each loop process's own share: a second process that runs nothing (the batch
        # dealt to one child) shows here, whatever the machine's load does to the rates.
        self.loops = sorted((round(cpu, 2) for role, cpu in self._last.values()
                             if role == "loops"), reverse=True)
        by_role: dict[str, float] = {}
        for role, cpu in self._last.values():
            by_role[role] = by_role.get(role, 0.0) + cpu
        return by_role


def _role(process: psutil.Process, root_pid: int) -> str:
    if process.pid == root_pid:
        return "parent"
    command = " ".join(process.cmdline())
    if "_writer.py" in command:
        return "writers"
    if "reliability._processes" in command:
        return "loops"
    return "other"


def batch_run(processes: int, workflows: int, concurrency: int,
              workload: str = "noop") -> dict[str, Any]:
    """One ``batch --processes`` of ``workflows`` workflows of ``workload`` in a fresh
    directory."""
    with tempfile.TemporaryDirectory(prefix="bench-processes-") as directory:
        root = Path(directory)
        prompts = root / "prompts"
        prompts.mkdir()
        for n in range(workflows):
            (prompts / f"p{n:06d}.md").write_text(f"# p{n}\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith("WORKFLOW_")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        load = os.getloadavg()[0]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        command = subprocess.Popen(
            [sys.executable, "-m", "reliability", "batch", str(prompts), "--definition",
             DEFINITIONS[workload], "--processes", str(processes), "--concurrency",
             str(concurrency), "--json", "--log-level", "WARNING", "--durability", "strict",
             "--no-enable-health-checks", "--no-enable-monitoring",
             "--project-root", str(root)],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        sampler = _CpuSampler(command.pid)
        stdout, stderr = command.communicate()
        by_role = sampler.stop()
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if command.returncode != 0:
        raise RuntimeError(f"batch --processes {processes} failed ({command.returncode}): "
                           f"{stderr[-2000:]}")
    report = json.loads(stdout)
    completed = report["counts"].get("completed", 0)
    if completed != workflows:
        raise RuntimeError(f"{completed} of {workflows} workflows completed")
    transitions = workflows * len(NOOP19.stages)
    # With one process the parent is the loop: its CPU is the loops' then.
    if processes == 1:
        by_role["loops"] = by_role.pop("parent", 0.0) + by_role.get("loops", 0.0)
    return {"processes": processes, "workload": workload, "workflows": workflows,
            "concurrency": concurrency,
            "transitions": transitions, "run_seconds": report["run_seconds"],
            # The loops' processes' CPU over the run, per transition: what a quiet machine
            # with a core per process turns into the rate (the writers' is apart).
            "loop_cpu_us_per_transition": report["run_cpu_seconds"] / transitions * 1e6,
            "transitions_per_s": transitions / report["run_seconds"],
            "wall_seconds": wall, "load_average": load,
            # Every process of the command (parent, children, writers), reaped: a measure
            # the machine's load barely moves, unlike the rates.
            "cpu_seconds": (after.ru_utime + after.ru_stime) - (before.ru_utime
                                                                + before.ru_stime),
            # The same, by role, over the command's whole life (start-up and close too).
            "cpu_by_role": {role: round(cpu, 2) for role, cpu in sorted(by_role.items())},
            "loop_cpu_each": sampler.loops}


def main(argv: list[str] | None = None, *, prog: str = "python -m benchmarks processes") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--workflows", type=int, default=4000)
    parser.add_argument("--processes", default="1,2", help="comma-separated process counts")
    parser.add_argument("--rounds", type=int, default=3,
                        help="paired rounds (each runs every workload and process count once)")
    parser.add_argument("--concurrency", type=int, default=1000,
                        help="the batch's --concurrency (shared by its processes)")
    parser.add_argument("--workloads", default="noop,json",
                        help="comma-separated, of: " + ", ".join(DEFINITIONS))
    parser.add_argument("--json", type=Path, help="also write the runs and medians here")
    args = parser.parse_args(argv)
    counts = [int(x) for x in args.processes.split(",") if x]
    workloads = [w for w in args.workloads.split(",") if w]
    unknown = sorted(set(workloads) - set(DEFINITIONS))
    if unknown:
        parser.error(f"unknown workload(s) {', '.join(unknown)}; choose from "
                     f"{', '.join(DEFINITIONS)}")
    runs: list[dict[str, Any]] = []
    for round_number in range(args.rounds):
        order = counts if round_number % 2 == 0 else list(reversed(counts))
        for workload in workloads:
            for processes in order:
                run = batch_run(processes, args.workflows, args.concurrency, workload)
                runs.append(run)
                roles = ", ".join(f"{role} {cpu:.1f} s"
                                  for role, cpu in run["cpu_by_role"].items())
                if len(run["loop_cpu_each"]) > 1:
                    roles += " (loops each: " + ", ".join(
                        f"{cpu:.1f} s" for cpu in run["loop_cpu_each"]) + ")"
                print(f"round {round_number + 1}, {workload}, {processes} process(es): "
                      f"{run['transitions_per_s']:8,.0f} transitions/s (run "
                      f"{run['run_seconds']:.2f} s, wall {run['wall_seconds']:.1f} s; loop "
                      f"processes' CPU {run['loop_cpu_us_per_transition']:.0f} "
                      f"us/transition, all processes' CPU {run['cpu_seconds']:.1f} s: "
                      f"{roles}; load average {run['load_average']:.1f})", flush=True)
    medians: dict[str, dict[int, float]] = {}
    for workload in workloads:
        medians[workload] = {n: statistics.median(
            r["transitions_per_s"] for r in runs
            if r["processes"] == n and r["workload"] == workload) for n in counts}
        base = medians[workload][counts[0]]
        for n, rate in medians[workload].items():
            print(f"{workload}, {n} process(es): median {rate:,.0f} transitions/s, "
                  f"{rate / base:.2f}x {counts[0]} process(es)")
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "medians": medians,
                                         "command": " ".join(sys.argv)}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
