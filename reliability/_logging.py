"""Structured logs: every record carries the workflow ID of the task that logged it.

The ID lives in a context variable, so it follows each workflow's task (and the threads it
hands work to via ``asyncio.to_thread``) without being passed around. Records go to the
console and to a daily file ``{log_directory}/workflow-YYYYMMDD.log``, in the spec's
``detailed`` text format or as one JSON object per line.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import logging.handlers
import math
import os
import queue
import threading
import time
from asyncio import _get_running_loop as asyncio_running_loop
from json.encoder import encode_basestring_ascii as _json_string  # what json.dumps uses
from pathlib import Path
from typing import Any

__all__ = ["LOGGER_NAME", "DailyFileHandler", "configure_logging", "current_workflow_id",
           "hand_over_held_records", "log_soon", "logger", "redact_secrets", "register_secret",
           "shutdown_logging", "workflow_id_var"]

LOGGER_NAME = "workflow_manager"
logger = logging.getLogger(LOGGER_NAME)
# Our formats never show the caller's file, line or function, and finding them walks the
# stack on every record (~5 us, on the event loop): skip it for this logger only.
logger.findCaller = lambda stack_info=False, stacklevel=1: (  # type: ignore[method-assign]
    "(unknown file)", 0, "(unknown function)", None)
workflow_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "workflow_id", default=None)


def current_workflow_id() -> str | None:
    return workflow_id_var.get()


# Values no log line and no stored error may contain. Replaced, never changed in place:
# the logging thread redacts deferred records (``log_soon``) while the loop may register
# one, and iterating a set that another thread grows raises.
_secrets: frozenset[str] = frozenset()


def register_secret(value: str) -> None:
    """From now on, ``value`` (a token) is written as ``***`` in logs and stored errors.

    Commands the workflows run inherit the environment, and their output (a git URL with
    credentials, an agent printing its environment) reaches logs and error messages.
    """
    global _secrets
    if value and value.strip() and value not in _secrets:
        _secrets = _secrets | {value}


def redact_secrets(text: str) -> str:
    """``text`` with every registered secret replaced by ``***``."""
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, "***")
    return text


class _WorkflowIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "workflow_id"):
            record.workflow_id = workflow_id_var.get() or "-"
        if _secrets:
            message = record.getMessage()
            redacted = redact_secrets(message)
            if redacted != message:
                record.msg, record.args = redacted, None
            if record.exc_info and not record.exc_text:
                record.exc_text = redact_secrets(
                    logging.Formatter().formatException(record.exc_info))
        return True


_DETAILED = "%(asctime)s - %(name)s - %(levelname)s - [%(workflow_id)s] %(message)s"
_DETAILED_DATE = "%Y-%m-%d %H:%M:%S"


class DetailedFormatter(logging.Formatter):
    """``2024-01-15 14:23:15 - workflow_manager - INFO - [workflow-...] message``."""

    def __init__(self) -> None:
        super().__init__(_DETAILED, datefmt=_DETAILED_DATE)


class JsonFormatter(logging.Formatter):
    """One JSON object per line; fields given via ``extra={"fields": {...}}`` are merged."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                    + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "workflow_id": getattr(record, "workflow_id", None),
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:  # queued records carry only the text (see _InPlaceQueueHandler)
            entry["exception"] = record.exc_text
        return json.dumps(entry, default=str)


class _InPlaceQueueHandler(logging.handlers.QueueHandler):
    """QueueHandler whose ``prepare`` renders the message into the record itself.

    The stock one copies every record first (``copy.copy``, ~7 us on the event loop per
    record) so that other handlers still see the original. Records of our logger reach no
    other handler (``propagate`` is off while ours are installed), so there is nothing
    to protect.
    """

    def __init__(self, records: queue.SimpleQueue[Any]) -> None:
        super().__init__(records)
        self._batches = threading.local()

    def enqueue(self, record: logging.LogRecord) -> None:
        """On an event loop's thread, hand the records of one loop iteration over
        together: one wake-up of the writing thread instead of one per record (each
        took the GIL back and forth ~5 times: 10 futex calls per stage, measured).

        A busy loop hands over at most every HAND_OVER_INTERVAL: waking the writing
        thread once per iteration cost a loop running 1,000 workflows 8 % of its time
        (py-spy; -8 to -12 % loop CPU per stage once spaced). A record that follows a
        quiet spell is handed over when its iteration ends, as before, with no timer."""
        # The running loop or None, without raising in a thread that has none: asyncio's
        # helper for libraries (sniffio and anyio use it the same way).
        loop = asyncio_running_loop()
        if loop is None:
            self.queue.put_nowait(record)
            return
        self._hold(record, loop)

    def _hold(self, record: Any, loop: asyncio.AbstractEventLoop) -> None:
        """Hold back ``record`` for ``loop``'s next hand-over (``enqueue``).

        ``log_soon`` repeats this method's common case inline (a batch of this loop with
        room left): a change to how records are held must be made there too."""
        held = self._batches
        batch: list[logging.LogRecord] | None = getattr(held, "records", None)
        # A batch left by a loop that ended before handing it over (asyncio.run does not
        # wait for timers) is handed over by the next loop of this thread.
        if batch is None or held.loop is not loop:
            if batch is None:
                batch = held.records = _Held()
            held.loop = loop
            wait = getattr(held, "handed_at", -math.inf) + HAND_OVER_INTERVAL - time.monotonic()
            if wait <= 0:
                loop.call_soon(self.hand_over)
            else:
                loop.call_later(wait, self.hand_over)
        batch.append(record)
        if len(batch) >= _BATCH_LIMIT:
            self.hand_over()

    def hand_over(self) -> None:
        """Queue the records this thread holds back (also called before shutting down)."""
        held = self._batches
        batch = getattr(held, "records", None)
        held.records = None
        if batch:
            held.handed_at = time.monotonic()
            self.queue.put_nowait(batch)

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        message = record.getMessage()
        if record.exc_info:
            record.exc_text = record.exc_text or logging.Formatter().formatException(
                record.exc_info)
        record.message = record.msg = message
        record.args = None
        record.exc_info = None  # tracebacks hold frames; the text above is what is kept
        return record


_BATCH_LIMIT = 512  # records held back at most, however long an iteration runs
HAND_OVER_INTERVAL = 0.005  # seconds: how late a busy loop's records may reach the file


class _Held(list[Any]):
    """The records one thread holds back, with that thread's name and ID for the records
    the logging thread builds (``log_soon``)."""

    __slots__ = ("thread", "thread_name")

    def __init__(self) -> None:
        super().__init__()
        current = threading.current_thread()
        self.thread, self.thread_name = current.ident, current.name


class _BatchListener(logging.handlers.QueueListener):
    """QueueListener that also takes the lists ``_InPlaceQueueHandler`` hands over, and
    builds the records ``log_soon`` deferred (here, off the event loop).

    While its handlers are the ones ``configure_logging`` installs (our formatters, no
    filters, one format), a handed-over list is rendered once, line by line straight
    from the deferred tuples without a ``LogRecord``, and each handler gets its lines in
    one write: building, filtering, formatting and writing a record per line cost this
    thread ~10x as much (``python -m benchmarks.logthread``), and it holds the GIL the
    event loop waits for. The lines are the ones the records would make, byte for byte;
    anything else (other handlers, formatters or filters) takes the record path, and
    records the loop built are formatted as before.
    """

    def __init__(self, records: queue.SimpleQueue[Any], front: _InPlaceQueueHandler,
                 *handlers: logging.Handler) -> None:
        super().__init__(records, *handlers, respect_handler_level=True)
        self._front = front
        self._level_names: dict[int, str] = {}
        # The time prefix changes once a second: (second, its text), per format.
        self._detailed_second: tuple[int, str] = (-1, "")
        self._json_second: tuple[int, str] = (-1, "")

    def handle(self, record: Any) -> None:
        if not isinstance(record, list):
            super().handle(record)
            return
        kind = self._direct_kind()
        if kind is None:
            for each in record:
                if isinstance(each, tuple):
                    each = self._build(each, record)
                    if each is None:
                        continue
                super().handle(each)
            return
        self._write_lines(record, kind)

    def _direct_kind(self) -> str | None:
        """The format all handlers' lines can be rendered in without records
        (``detailed`` or ``json``, one for all as ``configure_logging`` installs them);
        None where records are needed."""
        front_filters = self._front.filters
        if len(front_filters) != 1 or type(front_filters[0]) is not _WorkflowIdFilter:
            return None
        kinds = set()
        for handler in self.handlers:
            if type(handler) not in _DIRECT_HANDLERS or handler.filters:
                return None
            formatter = handler.formatter
            if type(formatter) is JsonFormatter:
                kinds.add("json")
            elif (type(formatter) is DetailedFormatter and formatter._fmt == _DETAILED
                  and formatter.datefmt == _DETAILED_DATE
                  and formatter.converter is logging.Formatter.converter):
                kinds.add("detailed")
            else:
                return None
        return kinds.pop() if len(kinds) == 1 else None

    def _write_lines(self, batch: list[Any], kind: str) -> None:
        """Render ``batch`` once and write each handler its lines (those at or above its
        level) at once."""
        handlers = self.handlers
        formatter = handlers[0].formatter
        assert formatter is not None  # _direct_kind checked it
        render = self._detailed_line if kind == "detailed" else self._json_line
        levels: list[int] = []
        lines: list[str] = []
        for each in batch:
            if type(each) is tuple:
                created, level, msg, args, workflow_id = each
                # The message as LogRecord.getMessage renders it, redacted. A record
                # given one mapping formats with the mapping itself: wrapped in the tuple
                # it renders the same or raises here and takes the record path.
                try:
                    message = str(msg) % args if args else str(msg)
                except Exception:  # the record path reports it as logging does
                    message = None
                if message is not None:
                    if _secrets:
                        message = redact_secrets(message)
                    levels.append(level)
                    lines.append(render(created, level, workflow_id, message))
                    continue
                each = self._build(each, batch)
                if each is None:
                    continue
            try:  # records the loop built: their formatter's line (all handlers' alike)
                lines.append(formatter.format(each))
                levels.append(each.levelno)
            except Exception:
                for handler in handlers:
                    if each.levelno >= handler.level:
                        handler.handleError(each)
        lowest = min(levels, default=0)
        for handler in handlers:
            level = handler.level
            chosen = lines if level <= lowest else [
                line for line, at in zip(lines, levels, strict=True) if at >= level]
            if chosen:
                self._write(handler, chosen)

    def _level_name(self, level: int) -> str:
        name = self._level_names.get(level)
        if name is None:
            name = self._level_names[level] = logging.getLevelName(level)
        return name

    def _detailed_line(self, created: float, level: int, workflow_id: str,
                       message: str) -> str:
        """DetailedFormatter's line for the record ``_build`` would build."""
        second = int(created)
        cached, asctime = self._detailed_second
        if cached != second:  # asctime: logging.Formatter.formatTime with our datefmt
            asctime = time.strftime(_DETAILED_DATE, logging.Formatter.converter(created))
            self._detailed_second = (second, asctime)
        level_name = self._level_names.get(level) or self._level_name(level)
        return f"{asctime} - {LOGGER_NAME} - {level_name} - [{workflow_id}] {message}"

    def _json_line(self, created: float, level: int, workflow_id: str, message: str) -> str:
        """JsonFormatter's line for the record ``_build`` would build."""
        second = int(created)
        cached, stamp = self._json_second
        if cached != second:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
            self._json_second = (second, stamp)
        level_name = self._level_names.get(level) or self._level_name(level)
        # json.dumps of JsonFormatter's dict: its separators, its string escaping.
        return (f'{{"time": "{stamp}.{int((created - second) * 1000):03d}Z", '
                f'"level": {_json_string(level_name)}, "logger": "{LOGGER_NAME}", '
                f'"workflow_id": {_json_string(workflow_id)}, '
                f'"message": {_json_string(message)}}}')

    @staticmethod
    def _write(handler: logging.Handler, lines: list[str]) -> None:
        """One write of ``lines`` to ``handler``'s stream: what ``emit`` writes for each
        line, flushed as ``emit`` would after the last."""
        handler.acquire()
        try:
            if isinstance(handler, DailyFileHandler):
                stream = handler._stream_for_today()
                stream.write("\n".join(lines) + "\n")
                if handler._drained is not None and handler._drained():
                    stream.flush()
            else:
                stream_handler: logging.StreamHandler[Any] = handler  # type: ignore[assignment]
                terminator = stream_handler.terminator
                stream_handler.stream.write(terminator.join(lines) + terminator)
                stream_handler.flush()
        except Exception:
            handler.handleError(logging.makeLogRecord(
                {"name": LOGGER_NAME, "msg": "%d log lines", "args": (len(lines),)}))
        finally:
            handler.release()

    def _build(self, deferred: tuple[Any, ...], held: Any) -> logging.LogRecord | None:
        created, level, msg, args, workflow_id = deferred
        record = logger.makeRecord(LOGGER_NAME, level, "(unknown file)", 0, msg, args, None,
                                   "(unknown function)")
        # As LogRecord.__init__ would have set them on the loop's thread, at log time.
        record.created = created
        record.msecs = int((created - int(created)) * 1000) + 0.0
        record.relativeCreated = (created - logging._startTime) * 1000  # type: ignore[attr-defined]
        record.thread = getattr(held, "thread", None)
        record.threadName = getattr(held, "thread_name", None)
        record.workflow_id = workflow_id
        front = self._front
        # What the front handler does to a record on the loop: its filters (secrets),
        # then the message rendered; a message that cannot be rendered is reported as
        # the front handler's emit reports it (an exception here would end this thread).
        try:
            if not front.filter(record):
                return None
            return front.prepare(record)
        except Exception:
            front.handleError(record)
            return None


class DailyFileHandler(logging.Handler):
    """Appends to ``workflow-YYYYMMDD.log`` (UTC date), switching files at midnight.

    Files are created 0600 in a 0700 directory: logs may name private repositories.
    Writes are buffered and flushed whenever ``drained()`` says no record is waiting
    (one write call per burst, not one per line), and always before the file is closed.
    """

    def __init__(self, directory: Path, drained: Any = None) -> None:
        super().__init__()
        self.directory = directory
        self._drained = drained
        self._day = ""
        self._stream: Any = None

    def _stream_for_today(self) -> Any:
        day = time.strftime("%Y%m%d", time.gmtime())
        if day != self._day or self._stream is None:
            if self._stream is not None:
                self._stream.close()
            # Imported here: the store's modules import this one (for its logger).
            from ._store import make_private_directory

            make_private_directory(self.directory)
            path = self.directory / f"workflow-{day}.log"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            # Line-buffered unless a queue tells us when a burst is over.
            buffering = 1 if self._drained is None else 1 << 16
            self._stream = os.fdopen(fd, "a", encoding="utf-8", buffering=buffering)
            self._day = day
        return self._stream

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            stream = self._stream_for_today()
            stream.write(message + "\n")
            if self._drained is not None and self._drained():
                stream.flush()
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        super().close()


# The handlers whose lines _BatchListener writes without records (their emit exactly).
_DIRECT_HANDLERS = (logging.StreamHandler, DailyFileHandler)

_installed: list[logging.Handler] = []
_listener: list[logging.handlers.QueueListener] = []


def configure_logging(*, level: str, log_format: str, directory: Path | None,
                      console: bool = True) -> None:
    """Install the console and daily-file handlers on the ``workflow_manager`` logger.

    Records are queued and written by a listener thread, so a slow disk or terminal never
    stalls the event loop. Calling it again replaces what it installed before.
    """
    shutdown_logging()
    formatter: logging.Formatter = JsonFormatter() if log_format == "json" else DetailedFormatter()
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    handlers: list[logging.Handler] = []
    if console:
        handlers.append(logging.StreamHandler())
    if directory is not None:
        handlers.append(DailyFileHandler(directory, drained=records.empty))
    for handler in handlers:
        handler.setFormatter(formatter)
    logger.setLevel(level)
    logger.propagate = not handlers
    if not handlers:
        return
    front = _InPlaceQueueHandler(records)
    front.addFilter(_WorkflowIdFilter())  # here, in the logging task, where the ID is set
    logger.addHandler(front)
    _installed.append(front)
    listener = _BatchListener(records, front, *handlers)
    listener.start()
    _listener.append(listener)


def log_soon(level: int, msg: str, *args: Any) -> None:
    """``logger.log(level, msg, *args)``, with the record built and formatted by the
    logging thread when ``configure_logging``'s handler is the logger's first one and any
    other is above ``level`` (the command line's console handler, at WARNING).

    For the runtime's own records on the event loop (a stage transition, a health check:
    one or two per stage). Building a ``LogRecord`` and rendering it cost the loop ~10 us
    each; here the loop takes the time, the workflow ID and the arguments and hands them
    over with the other records of its iteration. ``args`` must not change afterwards
    (strings and numbers). Anywhere else (no running loop, filters on the logger, another
    handler that would take the record, our handler above the level), it is
    ``logger.log``.
    """
    if not logger.isEnabledFor(level):
        return
    handlers = logger.handlers
    if (handlers and type(front := handlers[0]) is _InPlaceQueueHandler
            and level >= front.level and not logger.filters
            and (len(handlers) == 1 or all(level < other.level for other in handlers[1:]))
            and (loop := asyncio_running_loop()) is not None):
        # Held back for the logging thread to build: only the time, the workflow ID, the
        # message and its arguments are taken here; the batch's common case inline.
        record = (time.time(), level, msg, args, workflow_id_var.get() or "-")
        held = front._batches
        batch = getattr(held, "records", None)
        if batch is not None and held.loop is loop and len(batch) < _BATCH_LIMIT - 1:
            batch.append(record)
        else:
            front._hold(record, loop)
        return
    logger.log(level, msg, *args)


def hand_over_held_records() -> None:
    """Queue the records this thread's event loop still holds back (see
    ``_InPlaceQueueHandler.enqueue``): a loop that stops before its next hand-over, as
    ``asyncio.run`` does without waiting for timers, would otherwise keep them."""
    for handler in _installed:
        if isinstance(handler, _InPlaceQueueHandler):
            handler.hand_over()


def shutdown_logging() -> None:
    """Flush queued records and remove the handlers ``configure_logging`` installed."""
    hand_over_held_records()  # this thread's, before the listener stops
    for listener in _listener:
        listener.stop()
        for handler in listener.handlers:
            handler.close()
    _listener.clear()
    for handler in _installed:
        logger.removeHandler(handler)
    _installed.clear()
