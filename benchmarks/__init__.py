"""Benchmarks of the workflow runtime against DESIGN.md's performance targets.

``python -m benchmarks`` runs the suite and prints one table per figure (``--json FILE``
also writes the results, ``--quick`` runs a small version in seconds);
``python -m benchmarks compare OLD.json NEW.json`` prints new/old per figure;
``python -m benchmarks profile`` shows where the throughput case spends its time.
Targets live in DESIGN.md, never in timed tests.
"""

from ._cli import FIGURES, main

__all__ = ["FIGURES", "main"]
