"""Structured logs through the queue listener: IDs, exceptions, redaction, buffering."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import logging.handlers
import math
import queue
import sys
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

import reliability._logging
from reliability import Runtime, WorkflowConfiguration
from reliability._logging import (
    HAND_OVER_INTERVAL,
    LOGGER_NAME,
    _BatchListener,
    _Held,
    _InPlaceQueueHandler,
    _WorkflowIdFilter,
    configure_logging,
    log_soon,
    logger,
    register_secret,
    shutdown_logging,
    workflow_id_var,
)

WID = "workflow-20240115-142315-a7b3"


@pytest.fixture
def quiet_logger() -> Iterator[None]:
    yield
    shutdown_logging()
    logging.getLogger(LOGGER_NAME).setLevel(logging.WARNING)
    logging.getLogger(LOGGER_NAME).propagate = True


def log_lines(directory: Path) -> list[str]:
    paths = list(directory.glob("workflow-*.log"))
    return paths[0].read_text().splitlines() if paths else []


def _fail_and_log() -> None:
    try:
        raise ValueError("the disk said no")
    except ValueError:
        logger.exception("Stage failed")


@pytest.mark.usefixtures("quiet_logger")
def test_detailed_records_carry_the_workflow_id_and_the_traceback(tmp_path: Path) -> None:
    configure_logging(level="INFO", log_format="detailed", directory=tmp_path, console=False)
    token = workflow_id_var.set(WID)
    try:
        logger.info("Stage transition: %s -> %s", "plan", "build")
        _fail_and_log()
    finally:
        workflow_id_var.reset(token)
    shutdown_logging()
    text = "\n".join(log_lines(tmp_path))
    assert f"- workflow_manager - INFO - [{WID}] Stage transition: plan -> build" in text
    assert f"- ERROR - [{WID}] Stage failed" in text
    assert "ValueError: the disk said no" in text and "Traceback" in text


@pytest.mark.usefixtures("quiet_logger")
def test_json_records_keep_the_exception_text(tmp_path: Path) -> None:
    configure_logging(level="INFO", log_format="json", directory=tmp_path, console=False)
    _fail_and_log()
    shutdown_logging()
    (line,) = log_lines(tmp_path)
    entry = json.loads(line)
    assert entry["message"] == "Stage failed" and entry["level"] == "ERROR"
    assert "ValueError: the disk said no" in entry["exception"]


@pytest.mark.usefixtures("quiet_logger")
def test_secrets_are_redacted_before_the_record_is_queued(tmp_path: Path) -> None:
    secret = "ghp_" + "s3cr3t" * 6
    register_secret(secret)
    configure_logging(level="INFO", log_format="detailed", directory=tmp_path, console=False)
    logger.info("cloning with %s", secret)
    shutdown_logging()
    (line,) = log_lines(tmp_path)
    assert secret not in line and "cloning with" in line


@pytest.mark.usefixtures("quiet_logger")
def test_a_burst_of_records_all_reach_the_file_in_order(tmp_path: Path) -> None:
    """Writes are buffered per burst; none is lost or reordered, and the file is complete
    once the burst has drained (not only at shutdown)."""
    configure_logging(level="INFO", log_format="detailed", directory=tmp_path, console=False)
    for index in range(2_000):
        logger.info("record %d", index)
    while len(log_lines(tmp_path)) < 2_000:  # pytest's timeout bounds a lost record
        time.sleep(0.01)  # the listener thread flushes when its queue runs dry
    lines = log_lines(tmp_path)
    assert [int(line.rsplit(" ", 1)[1]) for line in lines] == list(range(2_000))
    shutdown_logging()


class _FrozenTime:
    """Time that moves only when a test moves it: the hand-over interval's clock (the
    logging module's ``time.monotonic``) and the event loop's, so a loaded machine
    cannot make an iteration outlast the interval."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def monotonic(self) -> float:
        return self.now

    def loop(self) -> asyncio.AbstractEventLoop:
        frozen = self

        class FrozenLoop(asyncio.SelectorEventLoop):
            def time(self) -> float:
                return frozen.now

        return FrozenLoop()


@pytest.fixture
def frozen(monkeypatch: pytest.MonkeyPatch) -> _FrozenTime:
    clock = _FrozenTime()
    everything_else = {name: getattr(time, name) for name in dir(time)
                       if not name.startswith("_")}  # the file's date, records' times
    monkeypatch.setattr(reliability._logging, "time",
                        types.SimpleNamespace(**{**everything_else,
                                                 "monotonic": clock.monotonic}))
    return clock


async def _run_due_timers() -> None:
    """Two iterations: the first moves due timers to the ready queue and runs them after
    this task's step, the second resumes this task."""
    await asyncio.sleep(0)
    await asyncio.sleep(0)


def _count_hand_overs() -> list[int]:
    (front,) = [h for h in logger.handlers if isinstance(h, logging.handlers.QueueHandler)]
    handed: list[int] = []
    real = front.queue

    class Counting:
        def put_nowait(self, item: list[logging.LogRecord]) -> None:
            handed.append(len(item))
            real.put_nowait(item)

    front.queue = Counting()  # type: ignore[assignment]
    return handed


async def _quiet_spell() -> None:
    """Longer than the hand-over interval since anything was handed over (an earlier
    test's loop ran in this thread), so the next record goes when its iteration ends."""
    await asyncio.sleep(HAND_OVER_INTERVAL * 2)


async def test_records_of_one_loop_iteration_are_handed_over_together(
        tmp_path: Path) -> None:
    """On an event loop, the records logged in one iteration reach the writing thread as
    one queue item (one wake-up, not one per record), complete and in order."""
    configure_logging(level="INFO", log_format="detailed", directory=tmp_path, console=False)
    handed = _count_hand_overs()
    await _quiet_spell()
    for index in range(300):
        logger.info("record %d", index)
    assert handed == []  # held until the iteration ends
    await asyncio.sleep(0)
    assert handed == [300]
    shutdown_logging()
    lines = log_lines(tmp_path)
    assert [int(line.rsplit(" ", 1)[1]) for line in lines] == list(range(300))


@pytest.mark.usefixtures("quiet_logger")
def test_a_busy_loop_hands_records_over_at_most_every_interval(
        tmp_path: Path, frozen: _FrozenTime) -> None:
    """Records of iterations that follow a hand-over closely wait for the interval to end
    (one wake-up of the writing thread for several iterations), then arrive together; a
    record after a quiet spell goes when its iteration ends, with no wait."""
    configure_logging(level="INFO", log_format="detailed", directory=tmp_path, console=False)
    handed = _count_hand_overs()

    async def busy_then_quiet() -> None:
        logger.info("record %d", 0)  # the first since the handler was made: no wait
        await asyncio.sleep(0)
        assert handed == [1]
        for index in (1, 2, 3):  # three more iterations within the interval
            logger.info("record %d", index)
            await asyncio.sleep(0)
        frozen.now += HAND_OVER_INTERVAL / 2
        await _run_due_timers()
        assert handed == [1]
        frozen.now += HAND_OVER_INTERVAL / 2  # the interval has passed: its timer runs
        await _run_due_timers()
        assert handed == [1, 3]
        frozen.now += HAND_OVER_INTERVAL * 2  # quiet: the next record goes at once
        logger.info("record %d", 4)
        await asyncio.sleep(0)
        assert handed == [1, 3, 1]

    with asyncio.Runner(loop_factory=frozen.loop) as runner:
        runner.run(busy_then_quiet())
    shutdown_logging()
    assert [int(line.rsplit(" ", 1)[1]) for line in log_lines(tmp_path)] == [0, 1, 2, 3, 4]


@pytest.mark.usefixtures("quiet_logger")
def test_records_a_finished_loop_still_held_go_with_the_next_loop_s(
        tmp_path: Path, frozen: _FrozenTime) -> None:
    """asyncio.run ends without running the hand-over timer; the records it held go out
    with the next loop's first hand-over in the same thread, not after 512 more."""
    configure_logging(level="INFO", log_format="detailed", directory=tmp_path, console=False)
    handed = _count_hand_overs()

    async def log_twice() -> None:
        logger.info("record %d", 0)
        await asyncio.sleep(0)  # handed over at once
        logger.info("record %d", 1)  # held for the interval; this loop ends first

    async def log_once() -> None:
        logger.info("record %d", 2)
        frozen.now += HAND_OVER_INTERVAL
        await _run_due_timers()

    with asyncio.Runner(loop_factory=frozen.loop) as runner:
        runner.run(log_twice())
    assert handed == [1]
    with asyncio.Runner(loop_factory=frozen.loop) as runner:
        runner.run(log_once())
    assert handed == [1, 2]
    shutdown_logging()
    assert [int(line.rsplit(" ", 1)[1]) for line in log_lines(tmp_path)] == [0, 1, 2]


@pytest.mark.usefixtures("quiet_logger")
async def test_a_runtime_closing_hands_over_what_its_loop_still_holds(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Closing a runtime queues the records its loop holds back for the interval, so an
    ``asyncio.run`` that ends right after (not waiting for timers) loses none."""
    configure_logging(level="INFO", log_format="detailed", directory=tmp_path, console=False)
    handed = _count_hand_overs()
    await _quiet_spell()
    logger.info("record %d", 0)
    await asyncio.sleep(0)
    # A timer that never fires: only the close can hand the record over.
    monkeypatch.setattr(reliability._logging, "HAND_OVER_INTERVAL", math.inf)
    logger.info("record %d", 1)  # held: the interval since the first hand-over runs on
    async with Runtime(WorkflowConfiguration(enable_persistence=False), project_root=tmp_path,
                       configure_logs=False, handle_signals=False):
        pass
    assert handed == [1, 1]
    shutdown_logging()


async def test_records_held_back_are_written_by_a_shutdown_in_the_same_iteration(
        tmp_path: Path) -> None:
    """Shutting logging down before the loop hands the iteration's records over still
    writes them all (a runtime closing right after its last log line)."""
    configure_logging(level="INFO", log_format="detailed", directory=tmp_path, console=False)
    for index in range(3):
        logger.info("record %d", index)
    shutdown_logging()
    assert [int(line.rsplit(" ", 1)[1]) for line in log_lines(tmp_path)] == [0, 1, 2]


def _only_ours(monkeypatch: pytest.MonkeyPatch) -> None:
    """Our handler alone on the logger, as in a service: pytest attaches its capture
    handlers to a logger an earlier test left not propagating."""
    monkeypatch.setattr(logger, "handlers", [
        h for h in logger.handlers if isinstance(h, logging.handlers.QueueHandler)])


def _record_builders(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The thread IDs that build records of our logger, from now on."""
    builders: list[int] = []
    real = logging.Logger.makeRecord

    def counting(self: logging.Logger, *args: object, **kwargs: object) -> logging.LogRecord:
        if self.name == LOGGER_NAME:
            builders.append(threading.get_ident())
        return real(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(logging.Logger, "makeRecord", counting)
    return builders


@pytest.mark.usefixtures("quiet_logger")
async def test_log_soon_renders_off_the_loop_with_the_same_fields(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A record logged with log_soon on the loop is rendered by the logging thread, yet
    its line is the one logger.info writes (time, level, workflow ID, message), in order
    with the records around it."""
    configure_logging(level="INFO", log_format="json", directory=tmp_path, console=False)
    _only_ours(monkeypatch)
    builders = _record_builders(monkeypatch)
    token = workflow_id_var.set(WID)
    try:
        logger.info("record %d", 0)
        # The record's time is taken when log_soon is called, not when it is built.
        everything_else = {name: getattr(time, name) for name in dir(time)
                           if not name.startswith("_")}
        monkeypatch.setattr(reliability._logging, "time", types.SimpleNamespace(
            **{**everything_else, "time": lambda: 1_700_000_000.5}))
        log_soon(logging.INFO, "Stage transition: %s -> %s (duration: %.1fs)", "s0", "s1", 0.25)
        logger.warning("record %d", 2)
    finally:
        workflow_id_var.reset(token)
    await asyncio.sleep(0)
    shutdown_logging()
    entries = [json.loads(line) for line in log_lines(tmp_path)]
    assert [e["message"] for e in entries] == [
        "record 0", "Stage transition: s0 -> s1 (duration: 0.2s)", "record 2"]
    assert [e["workflow_id"] for e in entries] == [WID] * 3
    assert [e["level"] for e in entries] == ["INFO", "INFO", "WARNING"]
    assert entries[1]["time"] == "2023-11-14T22:13:20.500Z"
    loop_thread = threading.get_ident()
    # The two logger calls'; log_soon's line is rendered without a record at all.
    assert builders == [loop_thread] * 2


@pytest.mark.usefixtures("quiet_logger")
async def test_log_soon_redacts_secrets_and_respects_the_level(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A deferred record is redacted like any other, and one below the logger's level is
    dropped on the loop."""
    secret = "ghp_" + "d3f3rr3d" * 5
    register_secret(secret)
    configure_logging(level="WARNING", log_format="detailed", directory=tmp_path,
                      console=False)
    _only_ours(monkeypatch)
    log_soon(logging.INFO, "not written %s", "at all")
    log_soon(logging.WARNING, "pushing with %s", secret)
    await asyncio.sleep(0)
    shutdown_logging()
    (line,) = log_lines(tmp_path)
    assert secret not in line and "pushing with ***" in line


@pytest.mark.usefixtures("quiet_logger")
async def test_log_soon_defers_past_a_handler_above_its_level(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The command line adds a console handler at WARNING after ours: an INFO record is
    still rendered by the logging thread (no record built on the loop) and only a record
    the console takes is logged at once."""
    configure_logging(level="INFO", log_format="detailed", directory=tmp_path, console=False)
    # Exactly the command line's pair: ours (the one just installed), then the console's.
    monkeypatch.setattr(logger, "handlers", [reliability._logging._installed[-1]])
    console: list[str] = []
    extra = logging.Handler(logging.WARNING)
    extra.emit = lambda record: console.append(record.getMessage())  # type: ignore[method-assign]
    logger.addHandler(extra)
    builders = _record_builders(monkeypatch)
    try:
        log_soon(logging.INFO, "Stage transition: %s -> %s", "s0", "s1")
        assert builders == []
        log_soon(logging.WARNING, "Health check completed (%s): %s", "before s1", "CRITICAL")
        assert builders == [threading.get_ident()]
    finally:
        logger.removeHandler(extra)
    await asyncio.sleep(0)
    shutdown_logging()
    lines = log_lines(tmp_path)
    assert [line.split("] ", 1)[1] for line in lines] == [
        "Stage transition: s0 -> s1", "Health check completed (before s1): CRITICAL"]
    assert console == ["Health check completed (before s1): CRITICAL"]


async def test_log_soon_without_our_handler_is_an_ordinary_record(
        caplog: pytest.LogCaptureFixture) -> None:
    """With logging not configured (a library user's own handlers), log_soon logs at once
    through the logger, where those handlers see it."""
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    token = workflow_id_var.set(WID)
    try:
        log_soon(logging.INFO, "Health check completed (%s): %s", "before s0", "HEALTHY")
    finally:
        workflow_id_var.reset(token)
    assert [r.getMessage() for r in caplog.records] == [
        "Health check completed (before s0): HEALTHY"]


# The logging thread's direct path: deferred records rendered to lines without LogRecords.

_ALL_DAY = 1_705_328_595.0  # 2024-01-15 14:23:15 UTC


def _deferred_batch() -> _Held:
    """A handed-over list with what the direct path must render like records: times
    across second boundaries (and their milliseconds), every level name, escapes JSON
    needs, a registered secret, a '%' without arguments, a mapping argument."""
    batch = _Held()
    batch += [
        (_ALL_DAY + 0.0004, logging.INFO, "Stage transition: %s -> %s (duration: %.1fs)",
         ("plan", "build", 0.25), WID),
        (_ALL_DAY + 0.9996, logging.WARNING, "Health check completed (%s): %s (CPU: %.0f%%)",
         ("before build", "DEGRADED", 91.4), WID),
        (_ALL_DAY + 1.5, logging.ERROR, 'quote " backslash \\ tab \t ünïcode ✓ %d', (3,), "-"),
        (_ALL_DAY + 1.999, 25, "a level of its own", (), "wf-ß"),
        (_ALL_DAY + 61.25, logging.INFO, "100% done, no arguments", (), WID),
        (_ALL_DAY + 61.5, logging.INFO, "pushing with %s", (_SECRET,), WID),
        (_ALL_DAY + 62.0, logging.INFO, "by name: %(stage)s", ({"stage": "review"},), WID),
        (_ALL_DAY + 3_600.125, logging.DEBUG, "below the console's level", (), WID),
    ]
    return batch


_SECRET = "ghp_" + "f4stp4th" * 5


class _Console(io.StringIO):
    """A terminal that counts its flushes."""

    flushes = 0

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


class _Listening:
    """A ``_BatchListener`` over a daily file (no level) and a console (WARNING), as
    ``configure_logging`` builds them, driven by hand (its thread never started)."""

    def __init__(self, directory: Path, log_format: str, *, record_path: bool) -> None:
        formatter = (reliability._logging.JsonFormatter() if log_format == "json"
                     else reliability._logging.DetailedFormatter())
        self.console = _Console()
        console = logging.StreamHandler(self.console)
        console.setLevel(logging.WARNING)
        self.file = reliability._logging.DailyFileHandler(directory)
        for handler in (console, self.file):
            handler.setFormatter(formatter)
        self.front = _InPlaceQueueHandler(queue.SimpleQueue())
        self.front.addFilter(_WorkflowIdFilter())
        if record_path:  # any filter of the user's makes records necessary
            self.front.addFilter(lambda record: True)
        self.listener = _BatchListener(queue.SimpleQueue(), self.front, self.file, console)
        self.directory = directory

    def written(self) -> tuple[bytes, str]:
        self.file.close()
        (path,) = self.directory.glob("workflow-*.log")
        return path.read_bytes(), self.console.getvalue()


@pytest.fixture(params=["UTC0", "XST-5:30"])
def time_zone(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """UTC, and a local time half an hour off any UTC hour (the detailed format's time is
    local, the JSON one's UTC)."""
    monkeypatch.setenv("TZ", request.param)
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.fixture
def secret_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reliability._logging, "_secrets", frozenset())
    register_secret(_SECRET)


def _logged_record(message: str, *, failing: bool) -> logging.LogRecord:
    """A record as the loop's front handler queues it (filtered, rendered, traceback as
    text)."""
    record = logger.makeRecord(LOGGER_NAME, logging.ERROR, "f", 1, message, (), None)
    record.created, record.msecs = _ALL_DAY + 1.25, 250.0  # the same in both runs
    if failing:
        try:
            raise ValueError("the disk said no")
        except ValueError:
            record.exc_info = sys.exc_info()
    front = _InPlaceQueueHandler(queue.SimpleQueue())
    front.addFilter(_WorkflowIdFilter())
    front.filter(record)
    return front.prepare(record)


@pytest.mark.usefixtures("secret_registered", "time_zone")
@pytest.mark.parametrize("log_format", ["detailed", "json"])
def test_deferred_lines_are_the_records_lines_byte_for_byte(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, log_format: str) -> None:
    """Rendered without records, a batch of deferred records (with records the loop built,
    tracebacks included, between them) writes to the file and the console exactly the
    bytes the record path writes: times, levels, escapes, redaction, handler levels."""
    builders = _record_builders(monkeypatch)
    written = []
    for record_path in (False, True):
        (tmp_path / str(record_path)).mkdir()
        listening = _Listening(tmp_path / str(record_path), log_format,
                               record_path=record_path)
        batch = _deferred_batch()
        batch.insert(2, _logged_record("loop-built, failing", failing=True))
        batch.insert(5, _logged_record("loop-built", failing=False))
        listening.listener.handle(batch)
        written.append(listening.written())
        if not record_path:
            assert len(builders) == 3  # two loop-built records, the mapping's one
    assert len(builders) == 3 + 2 + 8  # the record path: its loop-built two, every deferred
    direct, through_records = written
    assert direct == through_records
    file_text, console_text = direct
    assert len(file_text.splitlines()) >= 10 and _SECRET.encode() not in file_text
    assert b"***" in file_text and b"Traceback" in file_text
    assert "below the console's level" not in console_text
    assert "Health check completed" in console_text


def test_a_batch_is_one_write_per_handler(tmp_path: Path) -> None:
    """However many lines a handed-over batch holds, each handler's stream gets one write
    (and the console one flush)."""
    listening = _Listening(tmp_path, "detailed", record_path=False)
    writes: list[str] = []
    file_stream = listening.file._stream_for_today()

    class Counting:
        def write(self, text: str) -> None:
            writes.append(text)
            file_stream.write(text)

    listening.file._stream_for_today = lambda: Counting()  # type: ignore[method-assign]
    batch = _Held()
    batch += [(_ALL_DAY, logging.WARNING, "line %d", (index,), WID) for index in range(100)]
    listening.listener.handle(batch)
    assert len(writes) == 1 and writes[0].count("\n") == 100
    assert listening.console.flushes == 1
    file_text, console_text = listening.written()
    assert file_text.decode() == writes[0] == console_text


def test_the_direct_path_switches_files_at_utc_midnight(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The daily file is chosen as each batch is written: a batch after UTC midnight goes
    to the next day's file."""
    now = [_ALL_DAY]
    real_gmtime = time.gmtime
    everything_else = {name: getattr(time, name) for name in dir(time)
                       if not name.startswith("_")}
    monkeypatch.setattr(reliability._logging, "time", types.SimpleNamespace(**{
        **everything_else,
        "gmtime": lambda seconds=None: real_gmtime(now[0] if seconds is None else seconds)}))
    listening = _Listening(tmp_path, "json", record_path=False)
    for day in range(2):
        now[0] = _ALL_DAY + day * 86_400
        batch = _Held()
        batch.append((now[0], logging.INFO, "day %d", (day,), WID))
        listening.listener.handle(batch)
    listening.file.close()
    files = {path.name: path.read_text() for path in tmp_path.glob("workflow-*.log")}
    assert sorted(files) == ["workflow-20240115.log", "workflow-20240116.log"]
    assert '"message": "day 0"' in files["workflow-20240115.log"]
    assert '"time": "2024-01-16T14:23:15.000Z"' in files["workflow-20240116.log"]


def test_a_user_handler_gets_records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a handler of the user's among ours, deferred records are built as before: the
    user's handler receives LogRecords with the workflow ID and the rendered message."""
    received: list[logging.LogRecord] = []

    class Collecting(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            received.append(record)

    listening = _Listening(tmp_path, "detailed", record_path=False)
    listening.listener.handlers = (*listening.listener.handlers, Collecting())
    builders = _record_builders(monkeypatch)
    listening.listener.handle(_deferred_batch())
    assert len(builders) == 8
    assert received[0].getMessage() == "Stage transition: plan -> build (duration: 0.2s)"
    assert [getattr(r, "workflow_id", None) for r in received][:2] == [WID, WID]
    assert "Stage transition: plan -> build" in listening.written()[0].decode()


def test_a_deferred_record_that_cannot_render_is_reported_not_fatal(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A deferred record whose arguments do not fit its message is reported as logging
    reports a failed emit, and the batch's other lines are still written (an exception
    would end the logging thread)."""
    listening = _Listening(tmp_path, "detailed", record_path=False)
    reported: list[str] = []
    monkeypatch.setattr(listening.front, "handleError",
                        lambda record: reported.append(str(record.msg)))
    batch = _Held()
    batch += [(_ALL_DAY, logging.INFO, "two %s %s", ("arguments?",), WID),
              (_ALL_DAY, logging.INFO, "fine %s", ("yes",), WID)]
    listening.listener.handle(batch)
    assert reported == ["two %s %s"]
    assert listening.written()[0].decode().endswith(f"[{WID}] fine yes\n")


def test_a_loop_built_record_that_cannot_format_is_reported_not_fatal(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A record the loop built that its formatter cannot render (JSON fields with a key
    JSON has no form for) is reported by each handler as its emit would, and the batch's
    other lines are still written."""
    listening = _Listening(tmp_path, "json", record_path=False)
    reported: list[logging.Handler] = []
    for handler in listening.listener.handlers:
        monkeypatch.setattr(handler, "handleError",
                            lambda record, handler=handler: reported.append(handler))
    record = _logged_record("fields of no JSON form", failing=False)
    record.fields = {(1, 2): "a tuple key"}
    batch = _Held()
    batch += [record, (_ALL_DAY, logging.ERROR, "fine %s", ("yes",), WID)]
    listening.listener.handle(batch)
    assert reported == list(listening.listener.handlers)  # both: ERROR reaches the console
    file_text, console_text = listening.written()
    assert [json.loads(line)["message"] for line in file_text.splitlines()] == ["fine yes"]
    assert console_text == file_text.decode()


def test_handlers_of_different_formats_each_get_their_own(tmp_path: Path) -> None:
    """A JSON file beside a detailed console (not what configure_logging installs) is
    served by the record path: each handler writes its own format."""
    listening = _Listening(tmp_path, "detailed", record_path=False)
    listening.file.setFormatter(reliability._logging.JsonFormatter())
    batch = _Held()
    batch.append((_ALL_DAY, logging.WARNING, "held %s", ("back",), WID))
    listening.listener.handle(batch)
    file_text, console_text = listening.written()
    assert json.loads(file_text)["message"] == "held back"
    assert console_text.endswith(f"- WARNING - [{WID}] held back\n")


def test_the_logging_thread_benchmark_prints_both_paths(
        capsys: pytest.CaptureFixture[str]) -> None:
    """``python -m benchmarks.logthread`` runs both paths and prints their CPU per record
    and the ratio (its shape only: figures belong to the benchmark)."""
    import benchmarks.logthread

    assert benchmarks.logthread.main(["--records", "300", "--batch", "16", "--runs", "1",
                                      "--format", "json"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out] == ["records", "direct", "direct"]
    assert "us CPU per record (json, batch 16)" in out[1] and "x cheaper" in out[2]
