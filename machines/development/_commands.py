"""Running external commands (agent, tests, git) so that a timeout really stops them.

Every command leads its own process group. Cancelling the task that awaits ``run_command``
(how the watchdog enforces a stage timeout) sends SIGTERM to the whole group, waits a grace
period, sends SIGKILL, then re-raises ``CancelledError``: no grandchild outlives the stage.
"""

from __future__ import annotations

import asyncio
import codecs
import errno
import os
import shlex
import signal
import string
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio
import psutil

from reliability._errors import ConfigurationError, ResourceError

__all__ = ["OUTPUT_TAIL_LINES", "CommandResult", "format_command", "run_command"]

OUTPUT_TAIL_LINES = 200
"""How many of the last output lines a ``CommandResult`` keeps."""

_CHUNK_BYTES = 64 * 1024
_MAX_LINE_CHARS = 64 * 1024  # a longer run without newline is passed on in pieces
_DRAIN_SECONDS = 1.0  # after the group is dead, how long unread output may still trickle in
_REAP_SECONDS = 5.0  # how long to wait for the kernel to report a SIGKILLed leader's exit
_RESOURCE_ERRNOS = frozenset({errno.EAGAIN, errno.ENOMEM, errno.EMFILE, errno.ENFILE})

LineSink = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class CommandResult:
    """How a finished command ended; a non-zero ``returncode`` is reported, never raised.

    ``output_tail`` holds at most the last ``OUTPUT_TAIL_LINES`` lines of output (stdout
    and stderr interleaved as the command wrote them), joined with newlines.
    """

    argv: tuple[str, ...]
    returncode: int
    output_tail: str
    duration_seconds: float

    @property
    def ok(self) -> bool:
        """True when the command exited with status 0."""
        return self.returncode == 0


async def run_command(
    command: str | Sequence[str],
    *,
    cwd: Path,
    env: Mapping[str, str] | None = None,
    on_line: LineSink | None = None,
    on_stderr_line: LineSink | None = None,
    kill_grace_seconds: float = 5.0,
) -> CommandResult:
    """Run ``command`` in ``cwd`` and return how it ended, streaming its output line by line.

    A string is split with ``shlex`` and never given to a shell. ``env`` is laid over the
    current environment. Each output line (UTF-8, undecodable bytes replaced, no newline)
    goes to ``on_line`` as soon as it arrives; callers use that as a heartbeat. If
    ``on_stderr_line`` is given, stderr lines go there instead of to ``on_line``.

    Guarantees: when this returns or raises, no process of the command's process group is
    left running. Cancellation (or an error raised by a callback) sends SIGTERM to the group,
    SIGKILL after ``kill_grace_seconds``, then re-raises. A missing command or working
    directory raises ``ConfigurationError``.
    """
    argv = _argv(command)
    if kill_grace_seconds < 0:
        raise ConfigurationError(f"kill_grace_seconds must be >= 0, got {kill_grace_seconds}")
    started = time.monotonic()
    tail: deque[str] = deque(maxlen=OUTPUT_TAIL_LINES)
    process = await _spawn(argv, cwd, env, separate_stderr=on_stderr_line is not None)
    pumps = _start_pumps(process, tail, on_line, on_stderr_line)
    try:
        returncode = await _supervise(process, pumps, kill_grace_seconds)
    except BaseException:
        await _terminate(process, pumps, kill_grace_seconds)
        raise
    finally:
        for pump in pumps:
            pump.cancel()
        # Leftovers that closed their output (daemons) die with the call, too.
        await _kill_group(process.pid)
    return CommandResult(
        argv=tuple(argv),
        returncode=returncode,
        output_tail="\n".join(tail),
        duration_seconds=time.monotonic() - started,
    )


def format_command(template: str, **values: str) -> str:
    """``template`` with each ``{name}`` replaced by ``shlex.quote(values[name])``.

    ``{python}`` defaults to the running interpreter. ``{{`` and ``}}`` are literal braces.
    An unknown placeholder, a conversion or format spec, or an unbalanced brace raises
    ``ConfigurationError`` naming it, so a typo in configuration fails before anything runs.
    """
    values = {"python": sys.executable, **values}
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as error:
        raise ConfigurationError(f"command template {template!r} is malformed: {error}") from error
    pieces: list[str] = []
    for literal, name, spec, conversion in parts:
        pieces.append(literal)
        if name is None:
            continue
        if name not in values or spec or conversion:
            known = ", ".join(f"{{{key}}}" for key in sorted(values))
            raise ConfigurationError(
                f"command template {template!r} has unknown placeholder "
                f"{{{name}{'!' + conversion if conversion else ''}{':' + spec if spec else ''}}};"
                f" known placeholders: {known}"
            )
        pieces.append(shlex.quote(values[name]))
    return "".join(pieces)


def _argv(command: str | Sequence[str]) -> list[str]:
    try:
        argv = shlex.split(command) if isinstance(command, str) else [str(a) for a in command]
    except ValueError as error:  # unbalanced quotes
        raise ConfigurationError(f"cannot parse command {command!r}: {error}") from error
    if not argv:
        raise ConfigurationError("the command is empty")
    return argv


async def _spawn(
    argv: list[str], cwd: Path, env: Mapping[str, str] | None, *, separate_stderr: bool
) -> asyncio.subprocess.Process:
    try:
        return await asyncio.create_subprocess_exec(
            *argv,
            cwd=cwd,
            env={**os.environ, **env} if env is not None else None,
            stdin=asyncio.subprocess.DEVNULL,  # nothing may wait for a human to type
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE if separate_stderr else asyncio.subprocess.STDOUT,
            start_new_session=True,  # the child leads a process group we can kill as one
        )
    except OSError as error:
        raise _spawn_error(argv[0], cwd, error) from error


def _spawn_error(program: str, cwd: Path, error: OSError) -> Exception:
    # subprocess names the directory in ``filename`` when the child could not chdir into it.
    if error.filename is not None and os.fsdecode(error.filename) == os.fspath(cwd):
        return ConfigurationError(
            f"cannot run {program!r}: working directory {cwd} is not usable ({error.strerror})"
        )
    if isinstance(error, FileNotFoundError):
        return ConfigurationError(
            f"command {program!r} not found (cwd {cwd}); install it or fix the configured command"
        )
    if isinstance(error, PermissionError):
        return ConfigurationError(f"command {program!r} is not executable (cwd {cwd}): {error}")
    if error.errno in _RESOURCE_ERRNOS:
        return ResourceError(f"cannot start {program!r} (cwd {cwd}): {error}")
    return error


def _start_pumps(
    process: asyncio.subprocess.Process,
    tail: deque[str],
    on_line: LineSink | None,
    on_stderr_line: LineSink | None,
) -> list[asyncio.Task[None]]:
    streams = [(process.stdout, on_line), (process.stderr, on_stderr_line)]
    return [
        asyncio.create_task(_pump(stream, _sink(tail, callback)))
        for stream, callback in streams
        if stream is not None
    ]


def _sink(tail: deque[str], callback: LineSink | None) -> LineSink:
    def sink(line: str) -> None:
        tail.append(line)
        if callback is not None:
            callback(line)

    return sink


async def _pump(stream: asyncio.StreamReader, sink: LineSink) -> None:
    """Pass every line of ``stream`` to ``sink`` as it arrives, until end of file."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pending = ""
    while chunk := await stream.read(_CHUNK_BYTES):
        pending = _emit_lines(pending + decoder.decode(chunk), sink)
    pending += decoder.decode(b"", final=True)
    if pending:
        sink(pending.removesuffix("\r"))


def _emit_lines(text: str, sink: LineSink) -> str:
    """Send each complete line of ``text`` to ``sink``; return the unfinished rest."""
    *lines, rest = text.split("\n")
    for line in lines:
        sink(line.removesuffix("\r"))
    while len(rest) > _MAX_LINE_CHARS:
        sink(rest[:_MAX_LINE_CHARS])
        rest = rest[_MAX_LINE_CHARS:]
    return rest


async def _supervise(
    process: asyncio.subprocess.Process, pumps: list[asyncio.Task[None]], grace: float
) -> int:
    """The leader's exit status, once all output is read (or the rest of the group is dead)."""
    leader_exit = asyncio.create_task(_wait_for_exit(process, within=None))
    unfinished = set(pumps)
    try:
        while unfinished and not leader_exit.done():
            done, _ = await asyncio.wait(
                {*unfinished, leader_exit}, return_when=asyncio.FIRST_COMPLETED
            )
            for pump in done & unfinished:
                pump.result()  # re-raises an error raised by an on_line callback
            unfinished -= done
    finally:
        leader_exit.cancel()
    if unfinished:
        # The leader is gone but something in its group still holds the output open.
        await asyncio.wait(unfinished, timeout=grace)
        await _kill_group(process.pid)
        await asyncio.wait(unfinished, timeout=_DRAIN_SECONDS)
        for pump in unfinished:
            if pump.done():
                pump.result()
    if process.returncode is not None:
        # Not wait(): a holder that escaped the group (setsid) may keep the pipes open.
        return process.returncode
    return await process.wait()


async def _terminate(
    process: asyncio.subprocess.Process, pumps: list[asyncio.Task[None]], grace: float
) -> None:
    """SIGTERM the group, SIGKILL it after ``grace`` seconds, and wait for the leader's end."""
    _signal_group(process.pid, signal.SIGTERM)
    try:
        # Shielded: a level-triggered (anyio) cancel scope would otherwise cut the grace short.
        with anyio.CancelScope(shield=True):
            await _wait_for_group(process, grace)
            await _kill_group(process.pid)
            await _wait_for_exit(process, within=_REAP_SECONDS)
            # Output still buffered in the pipes is read so the transports see end of file
            # and close themselves.
            await asyncio.wait(pumps, timeout=_DRAIN_SECONDS)
    except asyncio.CancelledError:
        # Cancelled again while waiting (a plain task.cancel()): no more grace.
        _signal_group(process.pid, signal.SIGKILL)
        raise


async def _wait_for_group(process: asyncio.subprocess.Process, within: float) -> None:
    """Return when the leader and every other member of its group are gone, or at ``within``."""
    deadline = time.monotonic() + within
    await _wait_for_exit(process, within=within)
    # Polling: the kernel offers no event for "this process group is now empty".
    while _group_running(process.pid) and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.02)


async def _wait_for_exit(process: asyncio.subprocess.Process, *, within: float | None) -> bool:
    """Whether the leader exited within ``within`` seconds (``None``: wait as long as needed).

    Polls ``returncode`` because ``Process.wait()`` also waits for the pipes to close, which
    a grandchild holding them may delay forever. The interval grows so that thousands of
    long-running commands cost little.
    """
    deadline = None if within is None else time.monotonic() + within
    interval = 0.005
    while process.returncode is None:
        if deadline is not None and time.monotonic() >= deadline:
            return False
        await asyncio.sleep(interval)
        interval = min(interval * 2, 0.5)
    return True


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


async def _kill_group(pgid: int) -> None:
    """SIGKILL every process of the group, then wait (at most a few seconds) until they are gone.

    The wait matters to callers: once we return, no member is still running.
    """
    if not _signal_group(pgid, signal.SIGKILL):
        return
    deadline = time.monotonic() + _REAP_SECONDS
    while _group_running(pgid) and time.monotonic() < deadline:  # noqa: ASYNC110 (no event)
        await asyncio.sleep(0.01)


def _group_running(pgid: int) -> bool:
    """Whether a member of the group is still running (not merely a zombie awaiting its reaper).

    Zombies are skipped because reaping orphans is init's job, and some container inits do it
    only every second or so. The process scan runs only after a kill, when the cheap probe
    still finds the group.
    """
    if not _group_alive(pgid):
        return False
    for pid in psutil.pids():
        try:
            if os.getpgid(pid) == pgid and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return True
        except (OSError, psutil.Error):
            continue  # exited while we looked
    return False


def _signal_group(pgid: int, sig: signal.Signals) -> bool:
    """Send ``sig`` to the group; False if the group no longer exists."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True
