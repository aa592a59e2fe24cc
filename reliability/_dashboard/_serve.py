"""Serving the dashboard app with uvicorn on the caller's event loop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

__all__ = ["RunningServer", "start_server"]


class RunningServer:
    """A uvicorn server started by ``start_server``: its bound ``port``, ``wait`` for it to
    end (Ctrl-C when it owns the signals), ``stop``."""

    def __init__(self, server: Any, task: asyncio.Future[None], port: int) -> None:
        self._server, self._task, self.port = server, task, port

    async def wait(self) -> None:
        await self._task

    async def stop(self) -> None:
        self._server.should_exit = True
        await self._task


async def start_server(app: Any, host: str, port: int, *,
                       handle_signals: bool = True) -> RunningServer:
    """Start serving ``app`` on ``host:port`` (0: a free port); return once it listens.
    Raises ``OSError`` when it cannot listen there."""
    import uvicorn

    ready = asyncio.Event()

    class Server(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            ready.set()

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if handle_signals:  # Ctrl-C stops it (and is raised again once it stopped)
                with super().capture_signals():
                    yield
            else:  # embedded (tests): the caller stops it
                yield

    # Live event streams never end by themselves: on shutdown give them a moment, then
    # close them.
    server = Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                   lifespan="on", access_log=False,
                                   timeout_graceful_shutdown=1))
    task = asyncio.ensure_future(server.serve())
    waiting = asyncio.ensure_future(ready.wait())
    await asyncio.wait({task, waiting}, return_when=asyncio.FIRST_COMPLETED)
    waiting.cancel()
    if not server.started:
        if task.done() and task.exception() is not None:
            raise OSError(f"cannot serve on {host}:{port}: {task.exception()}")
        task.cancel()
        raise OSError(f"cannot serve on {host}:{port} (in use, or not an address here)")
    bound = server.servers[0].sockets[0].getsockname()[1]
    return RunningServer(server, task, int(bound))
