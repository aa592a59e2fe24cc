"""How big each figure's workload is, from the command line."""

from __future__ import annotations

import itertools
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Plan"]

_counter = itertools.count()


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """Workload sizes. ``workflows`` is the big N (10,000 in the full suite)."""

    workflows: int = 10_000
    overhead_workflows: int = 100
    # DBOS on SQLite has a 20-connection pool: at 1,000 concurrent workflows it times out
    # waiting for connections (30 s each) and measures the pool, not the engine.
    peer_workflows: int = 200
    health_calls: int = 1_000
    repeats: int = 5
    quick: bool = False
    # False for the tests: figures start at once instead of on a settled machine, so the
    # harness's output can be checked on a busy one (its numbers are then not comparable).
    wait_idle: bool = True
    scratch: Path = field(default_factory=lambda: Path(tempfile.gettempdir()))

    def __post_init__(self) -> None:
        for name in ("workflows", "overhead_workflows", "peer_workflows", "health_calls",
                     "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")

    @classmethod
    def quick_plan(cls, scratch: Path, workflows: int | None = None) -> Plan:
        n = workflows or 100
        return cls(workflows=n, overhead_workflows=min(n, 20), peer_workflows=min(n, 20),
                   health_calls=100, repeats=1, quick=True, scratch=scratch)

    @classmethod
    def full_plan(cls, scratch: Path, workflows: int | None = None) -> Plan:
        n = workflows or 10_000
        return cls(workflows=n, overhead_workflows=min(n, 100), peer_workflows=min(n, 200),
                   health_calls=1_000, repeats=5, quick=False, scratch=scratch)

    @property
    def levels(self) -> tuple[int, ...]:
        """Concurrency levels of the throughput figure: N/10 and N (1,000 and 10,000)."""
        return tuple(sorted({max(1, self.workflows // 10), self.workflows}))

    def fresh_root(self, name: str) -> Path:
        """A new empty project root under the scratch directory, so no figure sees another's
        files (a resume scan must find exactly its own workflows)."""
        root = self.scratch / f"{name}-{next(_counter)}"
        root.mkdir(parents=True)
        return root
