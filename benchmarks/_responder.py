"""A loopback peer for the overhead figure: answers each byte with one byte, DELAY
seconds later. Standard library only; run as ``python _responder.py DELAY``; prints its
port, then serves until killed or its input ends (the benchmark exited or died).

Why a peer and not ``asyncio.sleep``: a timer stand-in measures asyncio's timer rounding
(epoll timeouts are rounded up to whole milliseconds, so a loop that goes idle 0.1 ms
before a timer sleeps a full 1 ms). Measured here: trimming 4 us of CPU per stage moved
the 100-workflow engine-only figure from +2.9 % to +15 %. Awaiting a socket wakes the
loop when the answer arrives, like the network calls stages make. This process keeps
its own time: ``epoll`` until 2 ms before an answer is due, then ``nanosleep``.
"""

from __future__ import annotations

import contextlib
import heapq
import os
import select
import socket
import sys
import time


def serve(delay: float) -> None:
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen(4096)
    server.setblocking(False)
    print(server.getsockname()[1], flush=True)
    poller = select.epoll()
    poller.register(server.fileno(), select.EPOLLIN)
    poller.register(0, select.EPOLLIN)
    peers: dict[int, socket.socket] = {}
    due: list[tuple[float, int]] = []  # (when, peer's descriptor): one per byte received
    while True:
        timeout = -1.0
        if due:
            left = due[0][0] - time.monotonic()
            if left < 0.002:  # epoll rounds up to milliseconds: nanosleep the last stretch
                time.sleep(max(0.0, left))
                timeout = 0.0
            else:
                timeout = left - 0.002
        for fd, _ in poller.poll(timeout):
            if fd == 0:
                if not os.read(0, 4096):
                    return  # the benchmark ended (or died): so does its peer
            elif fd == server.fileno():
                with contextlib.suppress(BlockingIOError):
                    while True:
                        peer, _ = server.accept()
                        peer.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                        peers[peer.fileno()] = peer
                        poller.register(peer.fileno(), select.EPOLLIN)
            else:
                data = peers[fd].recv(4096)
                if not data:
                    poller.unregister(fd)
                    peers.pop(fd).close()
                    continue
                when = time.monotonic() + delay
                for _ in data:
                    heapq.heappush(due, (when, fd))
        now = time.monotonic()
        while due and due[0][0] <= now:
            _, fd = heapq.heappop(due)
            answering = peers.get(fd)
            if answering is not None:
                with contextlib.suppress(OSError):
                    answering.send(b"r")


if __name__ == "__main__":
    serve(float(sys.argv[1]))
