"""A loopback peer for the overhead figure: answers each byte with one byte, DELAY
seconds later. Standard library only; run as ``python _responder.py DELAY``; prints its
port, then serves until killed or its input ends (the benchmark exited or died).

Why a peer and not ``asyncio.sleep``: a timer stand-in measures asyncio's timer rounding
(epoll timeouts are rounded up to whole milliseconds, so a loop that goes idle 0.1 ms
before a timer sleeps a full 1 ms). Measured here: trimming 4 us of CPU per stage moved
the 100-workflow engine-only figure from +2.9 % to +15 %. Awaiting a socket wakes the
loop when the answer arrives, like the network calls stages make. This process keeps
its own time with ``select``'s microsecond timeouts and ``nanosleep``.
"""

from __future__ import annotations

import contextlib
import heapq
import os
import select
import socket
import sys
import time
from typing import Any


def serve(delay: float) -> None:
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen(4096)
    print(server.getsockname()[1], flush=True)
    watched: list[Any] = [server, sys.stdin]
    due: list[tuple[float, int, socket.socket]] = []
    while True:
        timeout = max(0.0, due[0][0] - time.monotonic()) if due else None
        if timeout is not None and timeout < 0.0002:
            time.sleep(timeout)  # the last fraction: nanosleep is finer than select
            timeout = 0.0
        for ready in select.select(watched, [], [], timeout)[0]:
            if ready is sys.stdin:
                if not os.read(0, 4096):
                    return  # the benchmark ended (or died): so does its peer
                continue
            if ready is server:
                peer, _ = server.accept()
                peer.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                watched.append(peer)
                continue
            data = ready.recv(4096)
            if not data:
                watched.remove(ready)
                ready.close()
                continue
            for _ in data:
                heapq.heappush(due, (time.monotonic() + delay, id(ready), ready))
        now = time.monotonic()
        while due and due[0][0] <= now:
            _, _, peer = heapq.heappop(due)
            with contextlib.suppress(OSError):
                peer.send(b"r")


if __name__ == "__main__":
    serve(float(sys.argv[1]))
