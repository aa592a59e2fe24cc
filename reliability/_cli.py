"""``workflow-manager`` (also ``python -m reliability``): run, batch, resume and inspect workflows;
``bench`` runs the benchmark harness.

Output is for people by default (tables, colour only on a terminal); ``--json`` prints one
JSON document on stdout instead. Exit codes: 0 every workflow the command ran completed
(or the command did what was asked); 1 some failed, timed out or were interrupted, or the
command could not do it; 2 a usage or configuration error; 130 stopped by Ctrl-C/SIGTERM.
An error is one line on stderr; ``--log-level DEBUG`` adds the traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import logging.handlers
import os
import queue
import signal
import sys
import time
import traceback
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ._analytics import stage_statistics
from ._batch import (
    NOT_STARTED,
    RESUME_ALL,
    BatchDisplay,
    BatchTracker,
    batch_report,
    default_report_path,
    expand_prompt_paths,
    register_batch,
    run_batch,
)
from ._cluster import migrate_store, submit_many
from ._cluster import postgres as postgres_store
from ._config import (
    DURABILITY_MODES,
    LOG_LEVELS,
    WorkflowConfiguration,
    environment_secrets,
    load_configuration,
)
from ._context import DefinitionLike
from ._diagnostics import build_bundle, redact, redact_text, stored_diagnostics, write_private_json
from ._errors import ConfigurationError, WorkflowError, WorkflowLockedError
from ._ids import validate_workflow_id
from ._logging import (
    DetailedFormatter,
    JsonFormatter,
    _WorkflowIdFilter,
    configure_logging,
    logger,
    shutdown_logging,
)
from ._metrics import MetricsServer
from ._plugins import load_plugins
from ._postgres._url import url_passwords
from ._runtime import Runtime, WorkflowResult, resolve_definition
from ._state import STATUSES, WorkflowRun

__all__ = ["EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "build_parser", "main"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
PROG = "workflow-manager"

Command = Callable[[argparse.Namespace, WorkflowConfiguration, Path], Coroutine[Any, Any, int]]


# --------------------------------------------------------------------------- parser


def _examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {PROG} {line}" for line in lines)


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("common options")
    group.add_argument("--config", metavar="FILE",
                       help="JSON configuration file (WORKFLOW_* variables beat it; "
                            "options beat both)")
    group.add_argument("--project-root", metavar="DIR", default=".",
                       help="the project's directory; state, logs and reports live under it "
                            "(default: the current directory)")
    group.add_argument("--log-level", choices=LOG_LEVELS, type=str.upper,
                       help="log level for the console and the daily log file; DEBUG also "
                            "shows tracebacks of errors")
    group.add_argument("--json", action="store_true",
                       help="print one JSON document on stdout instead of tables")
    group.add_argument("--store", metavar="URL",
                       help="where workflows live: postgresql://user@host/database shares "
                            "them with workers on many hosts (the password belongs in "
                            "PGPASSWORD, not here: a command line is visible to every user "
                            "of the host in ps; no output shows it); default: "
                            "WORKFLOW_STORE_URL, "
                            "else the file store under the project root")
    return common


def _runner_options() -> argparse.ArgumentParser:
    runner = argparse.ArgumentParser(add_help=False)
    group = runner.add_argument_group("reliability options")
    group.add_argument("--enable-monitoring", action=argparse.BooleanOptionalAction,
                       default=None, help="stage logs, daily log file, loop-lag monitor")
    group.add_argument("--enable-health-checks", action=argparse.BooleanOptionalAction,
                       default=None, help="health checks before critical stages, during "
                                          "long ones, and admission control")
    group.add_argument("--max-retries", type=int, metavar="N",
                       help="retries per stage for transient failures (0-100)")
    group.add_argument("--durability", choices=DURABILITY_MODES,
                       help="strict (default): each stage's record is on disk before the "
                            "next stage starts; overlapped: the next stage starts while it "
                            "is written, and a crash may re-run one more stage")
    return runner


def metrics_options() -> argparse.ArgumentParser:
    """``--metrics-port``/``--metrics-host``: a parent parser for the commands that run
    workflows for long (``run``, ``batch``, ``worker``); see ``metrics_served``."""
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("metrics")
    group.add_argument("--metrics-port", type=int, metavar="PORT",
                       help="serve Prometheus metrics at http://HOST:PORT/metrics while the "
                            "command runs (0 picks a free port; needs prometheus_client)")
    group.add_argument("--metrics-host", metavar="HOST", default="127.0.0.1",
                       help="the address to serve metrics on (default: 127.0.0.1, this "
                            "machine only)")
    return parser


@contextlib.asynccontextmanager
async def observed(runtime: Runtime, args: argparse.Namespace,
                   console: Console | None = None) -> AsyncIterator[MetricsServer | None]:
    """For a command that runs workflows (``run``, ``batch``, ``resume``, ``worker``):
    count its events (``Telemetry``), publish its live view for the dashboard, and serve
    Prometheus metrics when ``--metrics-port`` was given (the server is yielded)."""
    from ._observe import Telemetry, live_publisher

    telemetry = Telemetry().attach(runtime)
    published = live_publisher(telemetry, runtime)
    published.start(runtime)
    server = None
    try:
        port = getattr(args, "metrics_port", None)
        if port is not None:
            from ._metrics import serve_metrics

            try:
                _, server = serve_metrics(runtime, host=args.metrics_host, port=port,
                                          telemetry=telemetry)
            except OSError as error:
                raise ConfigurationError(f"cannot serve metrics on {args.metrics_host}:{port}: "
                                         f"{error.strerror or error}") from None
            (console or Console(stderr=True)).print(
                f"Metrics: http://{_host_for_url(server.host)}:{server.port}/metrics",
                style="dim")
        yield server
    finally:
        if server is not None:
            await asyncio.to_thread(server.close)
        await published.stop()


def _host_for_url(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _definition_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--definition", metavar="MODULE:NAME",
                        help="a workflow definition to run instead of the installed default "
                             "(the development workflow); each prompt path is passed to it "
                             "as the input 'prompt_file'")


def build_parser() -> argparse.ArgumentParser:
    """The ``workflow-manager`` argument parser, one subcommand per action."""
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run reliable, resumable workflows: one prompt, a batch, or resume.",
        epilog=_examples("run prompts/feature.md", "batch prompts/ --concurrency 8",
                         "resume --all", "list --status interrupted",
                         "diagnostics workflow-20240115-142315-a7b3") + "\n\n"
        "exit codes: 0 all completed, 1 some failed or were interrupted, 2 usage or "
        "configuration error, 130 stopped by Ctrl-C")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common, runner, metrics = _common_options(), _runner_options(), metrics_options()

    def add(name: str, help_text: str, examples: str,
            parents: Sequence[argparse.ArgumentParser]) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help_text, description=help_text,
                                   epilog=examples, parents=list(parents),
                                   formatter_class=argparse.RawDescriptionHelpFormatter)

    run = add("run", "run one workflow for a prompt file and wait for it to end",
              _examples("run prompts/feature.md",
                        "run prompts/feature.md --max-retries 5 --log-level DEBUG",
                        "run notes.md --definition mypackage.flows:REPORT --json",
                        "run prompts/feature.md --metrics-port 9464"),
              [common, runner, metrics])
    run.add_argument("prompt", metavar="PROMPT", help="the prompt file (Markdown)")
    _definition_option(run)

    batch = add("batch", "run many prompts concurrently, with live progress",
                _examples("batch prompts/", "batch a.md b.md prompts/ --concurrency 4",
                          "batch prompts/ --processes 2   # two event loops, two cores",
                          "batch prompts/ --report report.json --json",
                          "batch prompts/ --metrics-port 9464"), [common, runner, metrics])
    batch.add_argument("paths", metavar="PATH", nargs="+",
                       help="prompt files, or directories whose *.md files are prompts")
    batch.add_argument("--concurrency", type=int, metavar="N",
                       help="workflows running at once (default: configuration's concurrency)")
    batch.add_argument("--processes", type=int, metavar="N", default=1,
                       help="run the batch in N processes, one event loop (one core) each, "
                            "sharing its workflows and --concurrency; with --metrics-port "
                            "PORT, process i serves on PORT+i (default: 1)")
    batch.add_argument("--report", metavar="FILE",
                       help="where to write the JSON report (default: "
                            ".github/workflow-reports/batch-YYYYMMDD-HHMMSS.json)")
    _definition_option(batch)

    resume = add("resume", "continue a stopped workflow from its last completed stage",
                 _examples("resume workflow-20240115-142315-a7b3", "resume --all"),
                 [common, runner])
    target = resume.add_mutually_exclusive_group(required=True)
    target.add_argument("workflow_id", metavar="ID", nargs="?", help="the workflow to resume")
    target.add_argument("--all", action="store_true",
                        help="resume every interrupted, pending or orphaned workflow")

    diagnostics = add("diagnostics", "show a workflow's stages, errors, health and performance",
                      _examples("diagnostics workflow-20240115-142315-a7b3",
                                "diagnostics workflow-20240115-142315-a7b3 --json"), [common])
    diagnostics.add_argument("workflow_id", metavar="ID")

    listing = add("list", "list stored workflows, optionally with per-stage statistics",
                  _examples("list", "list --status interrupted", "list --stats --json"),
                  [common])
    listing.add_argument("--status", choices=[*STATUSES, "corrupted"],
                         help="only workflows with this status")
    listing.add_argument("--stats", action="store_true",
                         help="per-stage p50/p90/p99 durations and bottlenecks across them")

    cancel = add("cancel", "mark a stored, stopped workflow cancelled so it is never resumed",
                 _examples("cancel workflow-20240115-142315-a7b3"), [common])
    cancel.add_argument("workflow_id", metavar="ID")

    bundle = add("bundle", "write a support bundle (diagnostics, health, config, logs, "
                           "state) with secrets redacted",
                 _examples("bundle workflow-20240115-142315-a7b3",
                           "bundle workflow-20240115-142315-a7b3 --output /tmp/b.json"),
                 [common])
    bundle.add_argument("workflow_id", metavar="ID")
    bundle.add_argument("--output", metavar="FILE",
                        help="default: diagnostic-bundle-ID.json in the project root")

    signal_command = add(
        "signal", "send a signal to a workflow (kept until a stage waits for it; a "
                  "workflow waiting for it is woken by any open runtime)",
        _examples("signal workflow-20240115-142315-a7b3 review",
                  "signal workflow-20240115-142315-a7b3 review --data '{\"state\": "
                  "\"approved\"}'"), [common])
    signal_command.add_argument("workflow_id", metavar="ID")
    signal_command.add_argument("name", metavar="NAME", help="the signal's name")
    signal_command.add_argument("--data", metavar="JSON", help="its payload, as JSON")
    _cluster_commands(add, common, runner)
    dashboard = add("dashboard", "serve a live web dashboard of this project's workflows "
                                 "(read-only unless --allow-actions)",
                    _examples("dashboard", "dashboard --port 9000",
                              "dashboard --allow-actions   # with WORKFLOW_DASHBOARD_TOKEN set"),
                    [common])
    dashboard.add_argument("--port", type=int, default=8765, metavar="PORT",
                           help="the port to serve on (default: 8765; 0 picks a free one)")
    dashboard.add_argument("--host", default="127.0.0.1", metavar="HOST",
                           help="the address to serve on (default: 127.0.0.1, this machine "
                                "only; anything else exposes workflow data to the network)")
    dashboard.add_argument("--allow-actions", action="store_true",
                           help="allow cancel and resume (POST, with the token from "
                                "WORKFLOW_DASHBOARD_TOKEN in 'Authorization: Bearer')")
    dashboard.add_argument("--poll-interval", type=float, default=0.5, metavar="SECONDS",
                           help="how often the store is read for changes (default: 0.5)")

    report = add("report", "render a batch report (the JSON 'batch' writes) as one "
                           "self-contained HTML file with each workflow's stage timeline",
                 _examples("report .github/workflow-reports/batch-20240115-142315.json --html",
                           "report run.json --html --output run.html"), [common])
    report.add_argument("report_file", metavar="RUN.json")
    report.add_argument("--html", action="store_true", required=True,
                        help="write HTML (the only format; the JSON is the input)")
    report.add_argument("--output", metavar="FILE",
                        help="default: the report's path with .html instead of .json")

    # Listed for --help only: main() hands "bench ..." to the benchmark harness as is.
    bench = add("bench", "measure the runtime against its performance targets (the same "
                         "as python -m benchmarks; 'bench --help' for its options)",
                _examples("bench --quick", "bench --json results.json",
                          "bench compare old.json new.json"), [])
    bench.add_argument("arguments", metavar="ARGS", nargs=argparse.REMAINDER,
                       help="options of the benchmark harness")
    return parser


def _cluster_commands(add: Callable[..., argparse.ArgumentParser],
                      common: argparse.ArgumentParser,
                      runner: argparse.ArgumentParser) -> None:
    """submit, worker, migrate: workflows shared by worker processes (``_cluster.py``)."""
    submit = add("submit", "queue workflows for workers (workflow-manager worker) and print "
                           "their IDs",
                 _examples("submit prompts/a.md prompts/b.md --store postgresql://db/wf",
                           "submit --definition mypackage.flows:REPORT --count 100 --json",
                           "submit --definition m:NAME --context '{\"day\": 1}' --queue nightly"),
                 [common])
    submit.add_argument("prompts", metavar="PROMPT", nargs="*",
                        help="prompt files (each is one workflow; with --definition it gets "
                             "the input 'prompt_file')")
    _definition_option(submit)
    submit.add_argument("--context", metavar="JSON",
                        help="a JSON object: the workflows' inputs")
    submit.add_argument("--count", type=int, default=1, metavar="N",
                        help="queue N workflows for each prompt (or N of the definition)")
    submit.add_argument("--queue", default="default", metavar="NAME",
                        help="the queue (workers take from theirs; default: default)")

    worker = add("worker", "claim queued workflows (and those of dead workers) and run them "
                           "until stopped; Ctrl-C or SIGTERM gives their claims back",
                 _examples("worker --store postgresql://db/wf --concurrency 16",
                           "worker --queue nightly --exit-when-idle",
                           "worker --processes 4",
                           "worker --store postgresql://db/wf --metrics-port 9464"),
                 [common, runner, metrics_options()])
    worker.add_argument("--concurrency", type=int, metavar="N",
                        help="workflows running at once (default: configuration's concurrency)")
    worker.add_argument("--queue", default="default", metavar="NAME",
                        help="the queue to take workflows from (default: default)")
    worker.add_argument("--processes", type=int, metavar="N",
                        help="run N worker processes, one event loop (one core) each, with "
                             "--concurrency workflows each (default: one per CPU)")
    worker.add_argument("--exit-when-idle", action="store_true",
                        help="exit 0 once nothing of the queue is queued or running on any "
                             "worker")

    add("migrate", "bring the PostgreSQL store's schema up to this version (the first "
                   "process that opens the store does it too)",
        _examples("migrate --store postgresql://db/wf"), [common])


# --------------------------------------------------------------------------- entry point


def entry() -> None:
    """The console script: run, then exit with the command's code.

    SIGINT stays ignored from the end of the command to the exit, so a late second Ctrl-C
    cannot turn a clean 130 into a KeyboardInterrupt while logs are flushed.
    """
    sys.exit(main(keep_sigint_ignored=True))


def main(argv: Sequence[str] | None = None, *, keep_sigint_ignored: bool = False) -> int:
    """Parse ``argv``, run the command, and return the exit code (see module docstring)."""
    previous = signal.getsignal(signal.SIGINT)
    try:
        return _main(argv)
    except KeyboardInterrupt:  # arrived between the loop's end and the line below
        return EXIT_INTERRUPTED
    finally:
        if not keep_sigint_ignored:
            signal.signal(signal.SIGINT, previous)


def _main(argv: Sequence[str] | None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["bench"]:
        return _bench(arguments[1:])
    args = build_parser().parse_args(arguments)
    load_plugins()  # installed workflow packages: their settings, the default target
    debug = (args.log_level or os.environ.get("WORKFLOW_LOG_LEVEL", "")).upper() == "DEBUG"
    try:
        root, config = _prepare(args)
        return asyncio.run(_COMMANDS[args.command](args, config, root))
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (WorkflowError, OSError) as error:
        if debug:
            traceback.print_exc()
        print(f"{PROG} {args.command}: error: {redact_text(str(error), _secrets())}",
              file=sys.stderr)
        return EXIT_USAGE if isinstance(error, ConfigurationError) else EXIT_FAILED
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the work is done; see entry()
        shutdown_logging()


def _bench(arguments: list[str]) -> int:
    """The benchmark harness (``benchmarks/``). It is not in the wheel: it runs from the
    checkout this package was installed from (editable) or is run in."""
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "benchmarks" / "__init__.py").is_file() and str(checkout) not in sys.path:
        sys.path.append(str(checkout))  # an editable install maps only the wheel's packages
    try:
        from benchmarks import main as run_benchmarks
    except ModuleNotFoundError as error:
        if error.name != "benchmarks":
            raise  # the harness is here but something it imports is not: show that
        print(f"{PROG} bench: error: the benchmark harness is not installed with the "
              "package; run 'python -m benchmarks' (or 'make bench') in a checkout of "
              "the repository", file=sys.stderr)
        return EXIT_USAGE
    return run_benchmarks(arguments, prog=f"{PROG} bench")


_STORE_SECRETS: list[str] = []  # the store URL's password, once the configuration is read


def _secrets() -> list[str]:
    # The configuration's own secrets are registered (redact_text applies them) when its
    # runtime is made; these are the environment's, which nothing may have read yet.
    return [*environment_secrets(), *_STORE_SECRETS]


def _prepare(args: argparse.Namespace) -> tuple[Path, WorkflowConfiguration]:
    root = Path(args.project_root).expanduser()
    if not root.is_dir():
        raise ConfigurationError(f"project root {args.project_root} is not a directory")
    return root.resolve(), _load_config(args)


# Commands that run workflows for long: they tune the interpreter unless the configuration
# says otherwise (a library leaves it alone; the command line owns its process).
_LONG_RUNNING = frozenset({"run", "batch", "resume", "worker"})


def _load_config(args: argparse.Namespace) -> WorkflowConfiguration:
    defaults = {"tune_interpreter": True} if args.command in _LONG_RUNNING else {}
    overrides = {"log_level": args.log_level,
                 "enable_monitoring": getattr(args, "enable_monitoring", None),
                 "enable_health_checks": getattr(args, "enable_health_checks", None),
                 "max_retries": getattr(args, "max_retries", None),
                 "durability": getattr(args, "durability", None),
                 "concurrency": getattr(args, "concurrency", None),
                 "store_url": getattr(args, "store", None)}
    config = load_configuration(args.config, defaults=defaults, **overrides)
    _STORE_SECRETS[:] = url_passwords(config.store_url) if config.store_url else []
    return config


# --------------------------------------------------------------------------- logging


class _ConsoleLogHandler(logging.Handler):
    """Prints log records through a rich console, so they appear above a live display."""

    def __init__(self, console: Console) -> None:
        super().__init__()
        self._console = console

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._console.print(self.format(record), markup=False, highlight=False,
                                soft_wrap=True)
        except Exception:
            self.handleError(record)


@contextlib.contextmanager
def _logging_for(config: WorkflowConfiguration, root: Path, console: Console,
                 console_level: str) -> Iterator[None]:
    """The daily file gets everything at log_level; the console only ``console_level``+.

    Console records are queued to a thread of their own, like the file's, so a slow
    terminal never stalls the loop.
    """
    log_dir = Path(config.log_directory)
    configure_logging(level=config.log_level, log_format=config.log_format, console=False,
                      directory=(log_dir if log_dir.is_absolute() else root / log_dir)
                      if config.enable_monitoring else None)
    handler = _ConsoleLogHandler(console)
    handler.setFormatter(JsonFormatter() if config.log_format == "json" else DetailedFormatter())
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    front = logging.handlers.QueueHandler(records)
    front.setLevel(max(logging.getLevelName(console_level),
                       logging.getLevelName(config.log_level)))
    front.addFilter(_WorkflowIdFilter())
    listener = logging.handlers.QueueListener(records, handler)
    listener.start()
    logger.addHandler(front)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(front)
        listener.stop()


class _SignalGuard:
    """SIGINT/SIGTERM become ``runtime.request_shutdown()`` for the rest of the command.

    Installed on the loop for the whole command, not only while the runtime is open (as
    ``Runtime(handle_signals=True)`` would be): a second Ctrl-C while the summary and the
    report are written is absorbed, never a KeyboardInterrupt in the middle of them.
    """

    def __init__(self) -> None:
        self.runtime: Runtime | None = None

    def install(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self._on_signal, signum)

    def _on_signal(self, signum: int) -> None:
        if self.runtime is not None:
            self.runtime.request_shutdown(signum)  # idempotent: repeats are harmless


@contextlib.asynccontextmanager
async def open_runtime(config: WorkflowConfiguration, root: Path, *, console_level: str,
                       handle_signals: bool = False,
                       console: Console | None = None) -> AsyncIterator[Runtime]:
    """A started runtime with the command's logging; with ``handle_signals``, Ctrl-C stops
    its workflows at a safe point (``runtime.shutting_down`` then stays true)."""
    guard = _SignalGuard()
    if handle_signals:
        guard.install()
    console = console or Console(stderr=True)
    with _logging_for(config, root, console, console_level):
        async with Runtime(config, root, configure_logs=False) as runtime:
            guard.runtime = runtime
            try:
                yield runtime
            finally:
                guard.runtime = None
                await close_saying_why_it_waits(runtime, console)


CLOSE_NOTICE_AFTER = 1.0  # seconds of closing before the command says what it waits for


async def close_saying_why_it_waits(runtime: Runtime, console: Console,
                                    after: float = CLOSE_NOTICE_AFTER) -> None:
    """Close ``runtime``; if that takes a while, say why instead of looking hung.

    After a burst of thousands of workflows the store's writer still creates their state
    and checkpoint files (seconds here); they are durable in its journal already."""
    closing = asyncio.ensure_future(runtime.close())
    try:
        done, _ = await asyncio.wait({closing}, timeout=after)
        if not done:
            console.print("Writing the state files of this run (already durable in the "
                          "journal)...", style="dim")
        await closing
    except asyncio.CancelledError:
        closing.cancel()
        raise


# --------------------------------------------------------------------------- output


def _stdout() -> Console:
    # Piped output is read by people too (logs, CI): wide enough that IDs never wrap.
    console = Console(soft_wrap=False)
    return console if console.is_terminal else Console(soft_wrap=False, width=160)


def _print_json(document: Any) -> None:
    sys.stdout.write(json.dumps(redact(document, _secrets()), indent=2, default=str) + "\n")


def _when(wall_time: object) -> str:
    if not isinstance(wall_time, (int, float)) or not wall_time:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(wall_time))


_STATUS_STYLE = {"completed": "green", "failed": "red", "timed_out": "red",
                 "interrupted": "yellow", "cancelled": "dim", "corrupted": "red bold",
                 NOT_STARTED: "dim"}


def _status(status: str) -> str:
    style = _STATUS_STYLE.get(status)
    return f"[{style}]{escape(status)}[/]" if style else escape(status)


def _results_table(results: Sequence[WorkflowResult], title: str) -> Table:
    table = Table(title=title)
    table.add_column("workflow", no_wrap=True)
    for column in ("status", "stage", "PR", "grade", "error"):
        table.add_column(column, overflow="fold")
    for result in results:
        pr = result.outputs.get("pr_url") or result.outputs.get("pr_number") or "-"
        table.add_row(result.workflow_id, _status(result.status),
                      escape(str(result.current_stage or "-")), escape(str(pr)),
                      escape(str(result.reliability_metrics.get("performance_grade", "-"))),
                      escape(redact_text(result.error or "", _secrets())))
    return table


def _show_results(results: Sequence[WorkflowResult], args: argparse.Namespace,
                  title: str) -> None:
    if args.json:
        documents = [r.to_dict() for r in results]
        _print_json(documents[0] if args.command == "run" else documents)
        return
    console = _stdout()
    console.print(_results_table(results, title))
    for result in results:
        for advice in result.recovery_recommendations:
            console.print(f"{result.workflow_id}: {escape(advice)}")


def _exit_code(statuses: Sequence[str], interrupted: bool) -> int:
    if interrupted:
        return EXIT_INTERRUPTED
    return EXIT_OK if all(s == "completed" for s in statuses) else EXIT_FAILED


def _interrupted_note(runtime: Runtime, args: argparse.Namespace) -> None:
    if runtime.shutting_down and not args.json:
        print(f"Stopped by a signal; interrupted workflows are resumable: {RESUME_ALL}",
              file=sys.stderr)


# --------------------------------------------------------------------------- run, resume


def _prompt_path(raw: str, root: Path) -> Path:
    path = Path(raw).expanduser()
    for candidate in (path, root / path):
        if candidate.is_file():
            return candidate.resolve()
    for candidate in (path, root / path):
        if candidate.exists():  # stat only: a device such as /dev/zero is never read
            kind = "a directory" if candidate.is_dir() else "a device, pipe or socket"
            raise ConfigurationError(f"prompt file {raw} is not a regular file ({candidate} "
                                     f"is {kind}); give the path of a Markdown file")
    raise ConfigurationError(f"prompt file {raw} does not exist (looked in the current "
                             f"directory and in {root})")


def _definition(args: argparse.Namespace) -> DefinitionLike | None:
    return resolve_definition(args.definition) if args.definition else None


def _console_level(config: WorkflowConfiguration, args: argparse.Namespace) -> str:
    return "WARNING" if args.json else config.log_level


async def _cmd_run(args: argparse.Namespace, config: WorkflowConfiguration, root: Path) -> int:
    prompt = _prompt_path(args.prompt, root)
    definition = _definition(args)
    async with open_runtime(config, root, console_level=_console_level(config, args),
                        handle_signals=True) as runtime, observed(runtime, args):
        if definition is None:
            result = await runtime.run(str(prompt))
        else:
            result = await runtime.run(definition, context={"prompt_file": str(prompt)})
        _interrupted_note(runtime, args)
        interrupted = runtime.shutting_down
    _show_results([result], args, "Workflow")
    return _exit_code([result.status], interrupted)


async def _cmd_resume(args: argparse.Namespace, config: WorkflowConfiguration,
                      root: Path) -> int:
    if not args.all:
        validate_workflow_id(args.workflow_id)
    async with open_runtime(config, root, console_level=_console_level(config, args),
                        handle_signals=True) as runtime, observed(runtime, args):
        if args.all:
            results = await runtime.resume_all()
            # Parked workflows whose deadline passed (or whose signal came) while no
            # process ran were woken when the runtime opened: run them to their end too.
            results += await runtime.settle_woken()
        else:
            results = [await runtime.resume(args.workflow_id)]
        _interrupted_note(runtime, args)
        interrupted = runtime.shutting_down
    if not results and not args.json:
        _stdout().print("No workflow to resume: none is pending, running or interrupted.")
        return EXIT_OK
    _show_results(results, args, "Resumed workflows")
    return _exit_code([r.status for r in results], interrupted)


# --------------------------------------------------------------------------- batch


async def _cmd_batch(args: argparse.Namespace, config: WorkflowConfiguration,
                     root: Path) -> int:
    prompts = expand_prompt_paths(args.paths, base=root)
    definition = _definition(args)
    report_path = Path(args.report) if args.report else None
    err = Console(stderr=True)
    live = not args.json and err.is_terminal
    started_at = time.time()
    # Many workflows' INFO lines would bury the summary: the console shows warnings and
    # worse (all of it at DEBUG); the daily log file always gets everything.
    console_level = "DEBUG" if config.log_level == "DEBUG" else "WARNING"
    if args.processes < 1:
        raise ConfigurationError(f"--processes must be >= 1, got {args.processes}")
    if args.processes > 1:
        rows, label, interrupted, run_seconds, run_cpu = await _batch_in_processes(
            args, config, root, prompts, definition, err if live else None, console_level)
    else:
        async with open_runtime(config, root, handle_signals=True, console=err,
                            console_level=console_level) as runtime, observed(runtime, args,
                                                                              err):
            tracker = BatchTracker(runtime, len(prompts))
            runtime.add_listener(tracker)
            clock = runtime.clock
            began = [(clock.monotonic(), time.process_time())]

            def registered() -> None:
                began.append((clock.monotonic(), time.process_time()))

            items = await _batch_with_display(runtime, prompts, definition, config, tracker,
                                              err if live else None, registered)
            run_seconds = clock.monotonic() - began[-1][0]
            run_cpu = time.process_time() - began[-1][1]
            interrupted = runtime.shutting_down
        rows = [item.to_dict() for item in items]
        label = args.definition or _default_label(runtime, prompts)
    report = batch_report(
        rows, project_root=root, definition=label, concurrency=config.concurrency,
        started_at=started_at, finished_at=time.time(), interrupted=interrupted,
        processes=args.processes, run_seconds=run_seconds, run_cpu_seconds=run_cpu)
    report_path = report_path or default_report_path(root, started_at)
    report_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_private_json(report_path, redact(report, config.secret_values()))
    _show_batch(report, report_path, args)
    return _exit_code([row["status"] for row in report["workflows"]], interrupted)


async def _batch_with_display(runtime: Runtime, prompts: list[Path],
                              definition: DefinitionLike | None,
                              config: WorkflowConfiguration, tracker: BatchTracker,
                              console: Console | None,
                              on_registered: Callable[[], None]) -> list[Any]:
    if console is None:
        return await run_batch(runtime, prompts, definition=definition,
                               concurrency=config.concurrency, on_registered=on_registered)
    with BatchDisplay(console, tracker) as display:
        follower = asyncio.create_task(display.follow())
        try:
            return await run_batch(runtime, prompts, definition=definition,
                                   concurrency=config.concurrency,
                                   on_registered=on_registered)
        finally:
            follower.cancel()
            await asyncio.gather(follower, return_exceptions=True)


async def _batch_in_processes(args: argparse.Namespace, config: WorkflowConfiguration,
                              root: Path, prompts: list[Path],
                              definition: DefinitionLike | None, console: Console | None,
                              console_level: str
                              ) -> tuple[list[dict[str, Any]], str, bool, float | None,
                                         float | None]:
    """``batch --processes N`` (``_processes.py``): every workflow registered here, run in
    N children; the report's rows, its definition label, whether it was interrupted, and
    the run's seconds and CPU seconds."""
    from ._processes import ChildSpec, Family, run_batch_processes, split_concurrency
    per_process = split_concurrency(config.concurrency, args.processes)
    specs = [ChildSpec("run", index, str(root), config, per_process, console_level,
                       progress=console is not None, metrics_host=args.metrics_host,
                       metrics_port=_nth_port(args.metrics_port, index))
             for index in range(args.processes)]
    family = Family(specs)
    family.install_signals()  # from here on, for the registration too
    err = Console(stderr=True)
    async with open_runtime(config, root, console=err, console_level=console_level) as runtime:
        family.on_stop.append(runtime.request_shutdown)
        work = await register_batch(runtime, prompts, definition=definition)
        label = args.definition or _default_label(runtime, prompts)
        family.on_stop.clear()
    # Closed: every state file is written, before any child writes a newer one.
    run_seconds = run_cpu = None
    if not family.stopping:
        _, run_seconds, run_cpu = await run_batch_processes(family, work, console)
    rows = [family.rows.get(workflow_id) or family.missing_row(workflow_id, prompt)
            for workflow_id, prompt, _ in work]
    return rows, label, family.stopping, run_seconds, run_cpu


def _nth_port(port: int | None, index: int) -> int | None:
    """Process ``index``'s metrics port: PORT, PORT+1, ... (0: each picks a free one)."""
    return None if port is None else port + index if port else 0


def _default_label(runtime: Runtime, prompts: list[Path]) -> str:
    """The definition the target resolver runs prompts with, for the batch report."""
    definition = runtime.resolve_target(str(prompts[0])).definition
    return definition.import_path or definition.name


def _show_batch(report: dict[str, Any], report_path: Path, args: argparse.Namespace) -> None:
    if args.json:
        _print_json({**report, "report_file": str(report_path)})
        return
    console = _stdout()
    table = Table(title="Batch summary")
    table.add_column("workflow", no_wrap=True)
    for column in ("prompt", "status", "duration", "PR", "grade"):
        table.add_column(column, overflow="fold")
    for row in report["workflows"]:
        duration = f"{row['duration']:.1f}s" if row["duration"] is not None else "-"
        pr = row["pr_url"] or row["pr_number"] or "-"
        table.add_row(row["workflow_id"] or "-", escape(Path(row["prompt"]).name),
                      _status(row["status"]), duration, escape(str(pr)),
                      escape(str(row["grade"] or "-")))
    console.print(table)
    counts = ", ".join(f"{count} {status}" for status, count in report["counts"].items())
    console.print(f"{len(report['workflows'])} workflows: {counts}")
    if report["interrupted"]:
        console.print("Stopped by a signal: running workflows were interrupted and "
                      "checkpointed; those not started were saved as pending.")
    if report["resume_command"]:
        console.print(f"To finish the batch: [bold]{report['resume_command']}[/]")
    console.print(f"Report: {escape(str(report_path))}")


# --------------------------------------------------------------------------- inspection


async def _cmd_diagnostics(args: argparse.Namespace, config: WorkflowConfiguration,
                           root: Path) -> int:
    validate_workflow_id(args.workflow_id)
    async with open_runtime(config, root, console_level="WARNING") as runtime:
        diagnostics = await stored_diagnostics(runtime, args.workflow_id)
    if args.json:
        _print_json(diagnostics)
    else:
        _show_diagnostics(redact(diagnostics, config.secret_values()))
    return EXIT_OK


def _show_diagnostics(diagnostics: dict[str, Any]) -> None:
    console = _stdout()
    current = diagnostics["current_stage"]
    report = diagnostics["performance_report"]
    summary = Table(title=f"Workflow {diagnostics['workflow_id']}", show_header=False)
    summary.add_column("field", style="bold")
    summary.add_column("value", overflow="fold")
    for name, value in (
            ("status", _status(diagnostics["status"])),
            ("current stage", escape(f"{current['stage']} (attempt {current['attempt']}, "
                                     f"{current['duration']:.1f}s)")),
            ("completed stages", str(len(diagnostics["completed_stages"]))),
            ("errors / retries / recoveries", f"{diagnostics['error_count']} / "
             f"{diagnostics['retry_count']} / {diagnostics['recovery_attempts']}"),
            ("performance", f"{report['performance_grade']} "
                            f"(score {report['performance_score']:.2f})"),
            ("error", escape(str(diagnostics["error"] or "-"))),
            ("state", escape(diagnostics["files"].get("state_file", "-")))):
        summary.add_row(name, value)
    console.print(summary)
    stages = Table(title="Stages")
    for column in ("stage", "status", "duration", "baseline", "attempts"):
        stages.add_column(column)
    for name, entry in diagnostics["stage_history"].items():
        stages.add_row(escape(name), _status(str(entry["status"])), f"{entry['duration']:.2f}s",
                       f"{float(entry.get('baseline') or 0):.0f}s", str(entry.get("attempts", 1)))
    console.print(stages)
    for error in diagnostics["recent_errors"]:
        console.print(f"[red]error[/] in {escape(str(error.get('stage')))} (attempt "
                      f"{error.get('attempt')}): {escape(str(error.get('message')))}")
    for check in diagnostics["recent_health_checks"][-1:]:
        console.print(f"last health check: {escape(str(check.get('status')))}")


async def _cmd_list(args: argparse.Namespace, config: WorkflowConfiguration, root: Path) -> int:
    statistics = None
    async with open_runtime(config, root, console_level="WARNING") as runtime:
        rows = await runtime.list_workflows(args.status)
        if args.stats:
            states = await runtime.store.list_states({args.status} if args.status else None)
            statistics = stage_statistics(
                (s.state.get("monitoring_state") or {}).get("stage_history") or ()
                for s in states)
    if args.json:
        document: dict[str, Any] = {"workflows": rows}
        if statistics is not None:
            document["stage_statistics"] = statistics
        _print_json(document)
        return EXIT_OK
    _show_list(rows, statistics)
    return EXIT_OK


def _show_list(rows: list[dict[str, Any]], statistics: dict[str, Any] | None) -> None:
    console = _stdout()
    table = Table(title=f"Workflows ({len(rows)})")
    table.add_column("workflow", no_wrap=True)
    for column in ("status", "stage", "prompt", "updated"):
        table.add_column(column, overflow="fold")
    for row in rows:
        prompt = Path(str(row["prompt_file"])).name if row["prompt_file"] else "-"
        table.add_row(str(row["workflow_id"]), _status(str(row["status"])),
                      escape(str(row["current_stage"] or "-")), escape(prompt),
                      _when(row["updated_at"]))
    console.print(table)
    if statistics is None:
        return
    stats = Table(title="Stage statistics (completed runs)")
    for column in ("stage", "runs", "p50", "p90", "p99", "baseline", "slow runs"):
        stats.add_column(column)
    for name, entry in statistics["stages"].items():
        stats.add_row(escape(name), str(entry["runs"]), f"{entry['p50']:.2f}s",
                      f"{entry['p90']:.2f}s", f"{entry['p99']:.2f}s",
                      f"{entry['baseline']:.0f}s", str(entry["slow_runs"]))
    console.print(stats)
    bottlenecks = ", ".join(statistics["bottlenecks"]) or "none"
    console.print(f"Bottlenecks (slower than baseline in most runs): {escape(bottlenecks)}")


async def _cmd_cancel(args: argparse.Namespace, config: WorkflowConfiguration,
                      root: Path) -> int:
    workflow_id = validate_workflow_id(args.workflow_id)
    async with open_runtime(config, root, console_level="WARNING") as runtime:
        before = WorkflowRun.from_state((await runtime.store.load(workflow_id)).state)
        try:
            cancelled = await runtime.cancel(workflow_id, abandon=True)
        except WorkflowLockedError:
            requested = await _request_remote_cancel(runtime, workflow_id)
            if requested is not None:
                return _cancel_outcome(args, workflow_id, True, before.status, requested)
            message = (f"workflow {workflow_id} is running in another process; this command "
                       "cannot signal it. Press Ctrl-C in that process (or send it SIGTERM): "
                       "it stops at a safe point, then run this command again")
            return _cancel_outcome(args, workflow_id, False, before.status, message)
    if cancelled:
        return _cancel_outcome(args, workflow_id, True, "cancelled",
                               f"workflow {workflow_id} is cancelled and will not be resumed")
    return _cancel_outcome(args, workflow_id, False, before.status,
                           f"workflow {workflow_id} is already {before.status}; "
                           "nothing to cancel")


async def _cmd_signal(args: argparse.Namespace, config: WorkflowConfiguration,
                      root: Path) -> int:
    try:
        payload = None if args.data is None else json.loads(args.data)
    except json.JSONDecodeError as error:
        print(f"{PROG} signal: error: --data is not JSON: {error}", file=sys.stderr)
        return EXIT_FAILED
    try:
        async with open_runtime(config, root, console_level="WARNING") as runtime:
            await runtime.signal(args.workflow_id, args.name, payload)
    except WorkflowError as error:  # unknown, finished or invalid ID, a bad name: one line
        print(f"{PROG} signal: error: {error}", file=sys.stderr)
        return EXIT_FAILED
    message = f"signal {args.name!r} sent to workflow {args.workflow_id}"
    if args.json:
        _print_json({"workflow_id": args.workflow_id, "signal": args.name, "sent": True})
    else:
        print(message)
    return EXIT_OK


def _cancel_outcome(args: argparse.Namespace, workflow_id: str, cancelled: bool, status: str,
                    message: str) -> int:
    if args.json:
        _print_json({"workflow_id": workflow_id, "cancelled": cancelled, "status": status,
                     "message": message})
    else:
        print(message, file=sys.stdout if cancelled else sys.stderr)
    return EXIT_OK if cancelled else EXIT_FAILED


async def _cmd_bundle(args: argparse.Namespace, config: WorkflowConfiguration,
                      root: Path) -> int:
    workflow_id = validate_workflow_id(args.workflow_id)
    output = Path(args.output) if args.output else root / f"diagnostic-bundle-{workflow_id}.json"
    async with open_runtime(config, root, console_level="WARNING") as runtime:
        bundle = await build_bundle(runtime, workflow_id)
    await asyncio.to_thread(write_private_json, output, bundle)
    if args.json:
        _print_json({"workflow_id": workflow_id, "bundle": str(output)})
    else:
        _stdout().print(f"Diagnostic bundle written to {escape(str(output))} (mode 0600; "
                        "secrets redacted)")
    return EXIT_OK


async def _request_remote_cancel(runtime: Runtime, workflow_id: str) -> str | None:
    """With the PostgreSQL store: ask the worker running it to cancel it; the message."""
    store = postgres_store(runtime.store)
    if store is None:
        return None
    await store.request_cancel(workflow_id)
    return (f"cancel of workflow {workflow_id} requested: the worker running it stops it "
            f"within {store.lease_seconds / 3:g}s and marks it cancelled")


# --------------------------------------------------------------------------- workers


def _context_option(raw: str | None) -> dict[str, Any]:
    if raw is None:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as error:
        raise ConfigurationError(f"--context is not valid JSON: {error.msg}") from None
    if not isinstance(value, dict):
        raise ConfigurationError("--context must be a JSON object")
    return value


async def _cmd_submit(args: argparse.Namespace, config: WorkflowConfiguration,
                      root: Path) -> int:
    if args.count < 1:
        raise ConfigurationError(f"--count must be >= 1, got {args.count}")
    if not args.prompts and not args.definition:
        raise ConfigurationError("give prompt files, or --definition MODULE:NAME")
    context = _context_option(args.context)
    definition = _definition(args)
    prompts = [_prompt_path(p, root) for p in args.prompts]
    async with open_runtime(config, root, console_level="WARNING") as runtime:
        targets: list[tuple[Any, dict[str, Any]]] = []
        if not prompts:
            targets = [(definition, context)] * args.count
        for prompt in prompts:
            target: Any = definition if definition is not None else str(prompt)
            inputs = {**context, "prompt_file": str(prompt)} if definition is not None else (
                context)
            targets.extend([(target, inputs)] * args.count)
        ids = await submit_many(runtime, targets, queue=args.queue)
    if args.json:
        _print_json({"workflow_ids": ids})
    else:
        sys.stdout.write("".join(f"{workflow_id}\n" for workflow_id in ids))
    return EXIT_OK


async def _cmd_worker(args: argparse.Namespace, config: WorkflowConfiguration,
                      root: Path) -> int:
    from ._processes import default_worker_processes
    processes = default_worker_processes() if args.processes is None else args.processes
    if processes < 1:
        raise ConfigurationError(f"--processes must be >= 1, got {processes}")
    if processes > 1:
        count, interrupted = await _workers_in_processes(args, config, root, processes)
    else:
        # Observed: the dashboard on any host shows what it runs (its live view goes to
        # the shared store), and --metrics-port serves its metrics.
        async with open_runtime(config, root, console_level=_console_level(config, args),
                            handle_signals=True) as runtime, observed(runtime, args):
            count = await runtime.serve(concurrency=config.concurrency, queue=args.queue,
                                        exit_when_idle=args.exit_when_idle)
            interrupted = runtime.shutting_down
    if args.json:
        _print_json({"workflows_run": count, "interrupted": interrupted})
    elif interrupted:
        print(f"Stopped by a signal after running {count} workflow(s); their claims are "
              "given back, so other workers continue them", file=sys.stderr)
    return EXIT_INTERRUPTED if interrupted else EXIT_OK


async def _workers_in_processes(args: argparse.Namespace, config: WorkflowConfiguration,
                                root: Path, processes: int) -> tuple[int, bool]:
    """``worker --processes N`` (``_processes.py``): N workers, each --concurrency; the
    workflows they ran, and whether they were stopped by a signal."""
    from ._processes import ChildSpec, Family, serve_processes
    mode = "serve" if config.store_url else "run"
    specs = [ChildSpec(mode, index, str(root), config, config.concurrency,
                       _console_level(config, args), queue=args.queue,
                       exit_when_idle=args.exit_when_idle, metrics_host=args.metrics_host,
                       metrics_port=_nth_port(args.metrics_port, index))
             for index in range(processes)]
    family = Family(specs, keep_rows=False)
    family.install_signals()
    state_directory = checkpoint_directory = None
    if mode == "run":  # the file store: this process deals its pending workflows
        state_directory = _under_root(root, config.state_directory)
        checkpoint_directory = _under_root(root, config.checkpoint_directory)
    await serve_processes(family, state_directory=state_directory,
                          checkpoint_directory=checkpoint_directory,
                          exit_when_idle=args.exit_when_idle)
    count = sum(int((child.summary or {}).get("workflows_run", 0))
                for child in family.children)
    return count, family.stopping


def _under_root(root: Path, value: str) -> Path:
    path = Path(value)
    return path if path.is_absolute() else root / path


async def _cmd_migrate(args: argparse.Namespace, config: WorkflowConfiguration,
                       root: Path) -> int:
    if not config.store_url:
        raise ConfigurationError("migrate needs the PostgreSQL store: --store "
                                 "postgresql://... or WORKFLOW_STORE_URL")
    applied, version = await migrate_store(config.store_url)
    if args.json:
        _print_json({"applied": applied, "version": version})
    else:
        done = ", ".join(map(str, applied)) if applied else "none (already up to date)"
        print(f"Schema at version {version}; migrations applied now: {done}")
    return EXIT_OK


def _require_dashboard_extra(what: str, *modules: str) -> None:
    """Refuse ``what`` in one line when the ``[dashboard]`` extra's ``modules`` are missing
    (the dashboard's own modules import them only once used, so an import says nothing)."""
    import importlib.util

    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigurationError(f"{what} needs the dashboard extra (missing: "
                                 f"{', '.join(missing)}); install 'workflow-manager[dashboard]'")


async def _cmd_dashboard(args: argparse.Namespace, config: WorkflowConfiguration,
                         root: Path) -> int:
    _require_dashboard_extra("the dashboard", "starlette", "uvicorn", "jinja2")
    from ._dashboard import create_app, start_server

    token = os.environ.get("WORKFLOW_DASHBOARD_TOKEN") or None
    hosts: tuple[str, ...] = ("127.0.0.1", "localhost", "::1", "[::1]")
    if args.host not in hosts:
        # A wildcard address is reached by any of the machine's names: the user chose that.
        hosts = (*hosts, args.host, "*") if args.host in ("0.0.0.0", "::") else (
            *hosts, args.host)
    config_path = args.config  # the resume subprocess starts in this directory too

    async with open_runtime(config, root, console_level="WARNING") as runtime:
        app = create_app(runtime, allow_actions=args.allow_actions, token=token,
                         poll_interval=args.poll_interval, allowed_hosts=hosts,
                         config_path=config_path)
        try:
            server = await start_server(app, args.host, args.port)
        except OSError as error:
            raise ConfigurationError(str(error)) from None
        print(f"Dashboard: http://{_host_for_url(args.host)}:{server.port}/ "
              f"({'actions allowed with the token' if args.allow_actions else 'read-only'}"
              "; Ctrl-C stops it)", file=sys.stderr, flush=True)
        await server.wait()
    return EXIT_OK


async def _cmd_report(args: argparse.Namespace, config: WorkflowConfiguration,
                      root: Path) -> int:
    _require_dashboard_extra("the HTML report", "jinja2")
    from ._dashboard import render_report

    path = Path(args.report_file)
    try:
        report = json.loads(await asyncio.to_thread(path.read_text, encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ConfigurationError(f"cannot read report {path}: {error}") from None
    if not isinstance(report, dict) or not isinstance(report.get("workflows"), list):
        raise ConfigurationError(f"{path} is not a batch report (no 'workflows' list)")
    output = Path(args.output) if args.output else path.with_suffix(".html")
    async with open_runtime(config, root, console_level="WARNING") as runtime:
        states: dict[str, Any] = {}
        for row in report["workflows"]:
            workflow_id = row.get("workflow_id") if isinstance(row, dict) else None
            if not isinstance(workflow_id, str):
                continue
            try:
                validate_workflow_id(workflow_id)
                states[workflow_id] = (await runtime.store.load(workflow_id)).state
            except (WorkflowError, ValueError):
                continue  # its state is gone: the table still shows the row
        secrets = config.secret_values()
        html = render_report(redact(report, secrets), redact(states, secrets), runtime)
    await asyncio.to_thread(output.write_text, html, encoding="utf-8")
    if args.json:
        _print_json({"report": str(path), "html": str(output)})
    else:
        _stdout().print(f"HTML report written to {escape(str(output))}")
    return EXIT_OK


_COMMANDS: dict[str, Command] = {
    "run": _cmd_run, "batch": _cmd_batch, "resume": _cmd_resume,
    "diagnostics": _cmd_diagnostics, "list": _cmd_list, "cancel": _cmd_cancel,
    "bundle": _cmd_bundle, "signal": _cmd_signal, "submit": _cmd_submit,
    "worker": _cmd_worker, "migrate": _cmd_migrate, "dashboard": _cmd_dashboard,
    "report": _cmd_report,
}
