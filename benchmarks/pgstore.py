"""``python -m benchmarks.pgstore``: PostgresStore alone vs DBOS on one server (see _pgstore)."""

from ._pgstore import main

if __name__ == "__main__":
    raise SystemExit(main())
