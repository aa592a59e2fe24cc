"""Interpreter settings for a process running thousands of workflows in one loop.

Two process-wide settings, changed only when the application asks (``tune_interpreter``,
off by default; the command line's run, batch and resume turn it on), each replaced only
while a runtime is open, only if the process still has CPython's default, and put back by
the last runtime to close:

Garbage-collector thresholds. Measured here (10,000 workflows x 19 stages in one loop,
MemoryStore): with CPython's (700, 10, 10) the collector ran 2,600 times, 18 of them full
collections of 100-140 ms each (every in-flight workflow's objects walked), 1.8 s in all
(20 % of the run), and the loop-lag p99 was 112 ms. The full collections come from the
"long-lived objects grew by 25 %" rule, which a growing set of in-flight workflows keeps
tripping. ``threshold2=1000`` makes them rare and leaves young collections as they are
(max pause 1.7 ms); larger young thresholds such as (20,000, 20, 100) collect less often
but pause 36-65 ms each, over the loop-lag target. Reference cycles still die young; a
full collection still happens, only rarely.

Thread switch interval, 1 ms instead of 5 ms: how long a thread that wants the GIL waits
for the busy loop thread to give it up. It mattered most when the store's writer was a
thread (checkpoint p50 56 ms -> 15 ms); the writer is now a process, claims are taken on
the loop's thread, and the threads left beside the loop write log records and run what
handlers hand to ``asyncio.to_thread``. Measured again at 10,000 workflows:
checkpoint p50 5.9-6.0 ms with 1 ms, 6.7 ms with 5 ms; throughput and loop lag equal
within noise.
"""

from __future__ import annotations

import gc
import sys
import threading

__all__ = ["RUNTIME_SWITCH_INTERVAL", "RUNTIME_THRESHOLDS", "hold_tuning", "release_tuning"]

RUNTIME_THRESHOLDS = (700, 10, 1_000)
RUNTIME_SWITCH_INTERVAL = 0.001
_CPYTHON_THRESHOLDS = (700, 10, 10)
_CPYTHON_SWITCH_INTERVAL = 0.005

_lock = threading.Lock()
_holders = 0
_replaced_thresholds = False
_replaced_interval = False


def hold_tuning() -> None:
    """While anyone holds the tuning, the interpreter uses the runtime's settings."""
    global _holders, _replaced_thresholds, _replaced_interval
    with _lock:
        _holders += 1
        if _holders > 1:
            return
        if gc.get_threshold() == _CPYTHON_THRESHOLDS:
            gc.set_threshold(*RUNTIME_THRESHOLDS)
            _replaced_thresholds = True
        if _is(sys.getswitchinterval(), _CPYTHON_SWITCH_INTERVAL):
            sys.setswitchinterval(RUNTIME_SWITCH_INTERVAL)
            _replaced_interval = True


def release_tuning() -> None:
    """The last holder puts CPython's defaults back, unless someone changed them since."""
    global _holders, _replaced_thresholds, _replaced_interval
    with _lock:
        _holders = max(0, _holders - 1)
        if _holders:
            return
        if _replaced_thresholds and gc.get_threshold() == RUNTIME_THRESHOLDS:
            gc.set_threshold(*_CPYTHON_THRESHOLDS)
        if _replaced_interval and _is(sys.getswitchinterval(), RUNTIME_SWITCH_INTERVAL):
            sys.setswitchinterval(_CPYTHON_SWITCH_INTERVAL)
        _replaced_thresholds = _replaced_interval = False


def _is(interval: float, expected: float) -> bool:
    return abs(interval - expected) < 1e-7  # kept in microseconds, read back as a float
