"""``python -m benchmarks.cluster``: worker processes on one PostgreSQL server vs DBOS (see
_cluster)."""

from ._cluster import main

if __name__ == "__main__":
    raise SystemExit(main())
