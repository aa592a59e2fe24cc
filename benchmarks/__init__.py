"""Benchmarks of the workflow runtime against its performance targets.

``python -m benchmarks`` runs the suite and prints one table per figure (``--json FILE``
also writes the results, ``--quick`` runs a small version in seconds);
``python -m benchmarks compare OLD.json NEW.json`` prints new/old per figure;
``python -m benchmarks profile`` shows where the throughput case spends its time.
The targets, the latest full table and its history are in ``benchmarks/README.md``;
targets live here, never in timed tests. The harness runs from a checkout (it is not
installed with the package). ``--no-wait-idle`` skips waiting for a settled machine
before each figure (the tests use it; its numbers are not comparable).
"""

from ._cli import FIGURES, main

__all__ = ["FIGURES", "main"]
