"""Structured logs through the queue listener: IDs, exceptions, redaction, buffering."""

from __future__ import annotations

import asyncio
import json
import logging
import logging.handlers
import math
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
async def test_log_soon_builds_records_off_the_loop_with_the_same_fields(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A record logged with log_soon on the loop is built by the logging thread, yet its
    line is the one logger.info writes (time, level, workflow ID, message), in order
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
    assert builders.count(loop_thread) == 2  # the two logger calls; log_soon's was not
    assert len(builders) == 3


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
