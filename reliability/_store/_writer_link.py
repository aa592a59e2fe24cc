"""The event loop's end of FileStore's writer process (``_writer.py``): start it, send it
frames, hand its answers to the store, notice when it stops."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ._platform import LINUX, require_file_locks
from ._writer import encode_frame, take_frames

__all__ = ["WriterLink", "WriterStartError"]

_WRITER_SCRIPT = str(Path(__file__).with_name("_writer.py"))
_F_SETPIPE_SZ = 1031  # Linux: a 1 MiB pipe holds a burst of records without a wake-up each
_PIPE_SIZE = 1 << 20
_READ_SIZE = 1 << 16

Message = tuple[Any, ...]


class WriterStartError(Exception):
    """The writer could not open its journal: ``errno``, ``path``, ``message``."""

    def __init__(self, errno: int, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.errno, self.path, self.message = errno, path, message


class WriterLink:
    """One writer process. ``on_message`` gets every frame after "ready", ``on_read``
    is called after each read's frames (to act once on several answers); ``on_exit`` is
    called once when its output ends (it finished, or it died)."""

    def __init__(self, process: subprocess.Popen[bytes], journal_directory: str,
                 on_message: Callable[[Message], None], on_read: Callable[[], None],
                 on_exit: Callable[[], None]) -> None:
        self.process = process
        self._journal_directory = journal_directory
        self._on_message = on_message
        self._on_read = on_read
        self._on_exit = on_exit
        self._loop = asyncio.get_running_loop()
        self._ready: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._transport: asyncio.WriteTransport | None = None
        assert process.stdout is not None
        self._answers_file = process.stdout
        self._answers = process.stdout.fileno()
        self._buffer = bytearray()
        # One buffer for every read (POSIX only, as a FileStore is): os.read allocated
        # _READ_SIZE and shrank it to the answer's size at each answer.
        self._chunk = bytearray(_READ_SIZE)
        self._chunk_view = memoryview(self._chunk)
        self._reading = False
        self.journal_path = ""
        self.finishing = False

    @classmethod
    async def start(cls, arguments: list[str], on_message: Callable[[Message], None],
                    on_read: Callable[[], None], on_exit: Callable[[], None]) -> WriterLink:
        """Start the writer and wait until its journal is open and locked.

        Started from the loop's thread on purpose: Linux's parent-death signal is tied to
        the thread that started the process, and this one lives as long as the store is
        open. (Without that signal, ``portable``, the writer exits when its input pipe
        closes, which this process's death does too.) ``-I -S``: the standard library
        only, no site packages to import.
        """
        # Blocking for the fork and exec only (~1 ms), once per store.
        process = subprocess.Popen(  # noqa: ASYNC220
            [sys.executable, "-I", "-S", _WRITER_SCRIPT, str(os.getpid()), *arguments],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True,
            # A session of its own: a terminal's Ctrl-C (SIGINT to the whole foreground
            # group) is for the runtime, which then still needs its writer to save the
            # interrupted states. It ends when its input does, or with its parent.
            start_new_session=True)
        assert process.stdin is not None and process.stdout is not None
        if LINUX:  # elsewhere a pipe's size is the kernel's to choose
            fcntl = require_file_locks()
            for pipe in (process.stdin, process.stdout):
                with contextlib.suppress(OSError):
                    fcntl.fcntl(pipe.fileno(), _F_SETPIPE_SZ, _PIPE_SIZE)
        link = cls(process, arguments[0], on_message, on_read, on_exit)
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await loop.connect_write_pipe(asyncio.BaseProtocol, process.stdin)
            link._transport = transport
            os.set_blocking(link._answers, False)
            link.read_answers(True)
            ready = await link._ready
        except BaseException:
            link.kill()
            raise
        if ready[0] == "X":
            transport.close()
            await link.wait_closed()
            raise WriterStartError(*ready[1:])
        link.journal_path = ready[1]
        return link

    def send(self, message: Message) -> None:
        self.send_frame(encode_frame(message))

    def send_frame(self, frame: bytes) -> None:
        assert self._transport is not None
        if not self._transport.is_closing():
            self._transport.write(frame)

    def read_answers(self, wanted: bool) -> None:
        """Watch the writer's answers, or leave them in the pipe until someone waits.

        Reading an answer nobody waits for wakes the loop in the middle of other work's
        sleep, and asyncio rounds the sleep that is left up to the next millisecond:
        ~0.8 ms lost per 10 ms stage (measured). Its death shows when reading resumes.
        """
        if wanted == self._reading or self.finishing or self._answers_file.closed:
            return
        self._reading = wanted
        if wanted:
            self._loop.add_reader(self._answers, self.read_available)
        else:
            self._loop.remove_reader(self._answers)

    def read_available(self) -> None:
        """Handle every answer waiting in the pipe now, without waiting for more."""
        if self._answers_file.closed:
            return  # its descriptor number may belong to another file by now
        try:
            count = os.readv(self._answers, (self._chunk,))
        except BlockingIOError:
            return
        except OSError:
            count = 0
        if not count:  # it exited (or died): nothing more will come
            self._close_answers()
            self.ended()
            return
        self._buffer += self._chunk_view[:count]
        for message in take_frames(self._buffer):
            self.received(message)
        self._on_read()

    def _close_answers(self) -> None:
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._answers)
        self._answers_file.close()

    @property
    def alive(self) -> bool:
        return not self._ended.done()

    def received(self, message: Message) -> None:
        if not self._ready.done():
            self._ready.set_result(message)
        else:
            self._on_message(message)

    def ended(self) -> None:
        if not self._ready.done():
            self._ready.set_result(("X", 0, self._journal_directory,
                                    "the writer process stopped while starting"))
        if not self._ended.done():
            self._ended.set_result(None)
            self._on_exit()

    async def finish(self) -> int:
        """End its input; it writes what it holds, deletes its journal and exits.

        Returns its exit status (negative: the signal that ended it)."""
        self.read_answers(True)  # its end of output is what this waits for
        self.finishing = True
        if self._transport is not None:
            self.send(("Q",))  # an end of input without this means "the parent died"
            self._transport.close()  # end of input, after everything buffered is written
        return await self.wait_closed()

    async def wait_closed(self) -> int:
        await asyncio.shield(self._ended)
        return await asyncio.to_thread(self.process.wait)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()
        if self._transport is not None:
            self._transport.close()
        self._close_answers()
