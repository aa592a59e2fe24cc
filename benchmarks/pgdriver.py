"""``python -m benchmarks.pgdriver``: asyncpg vs psycopg 3 on the store's work (see _pgdriver)."""

from ._pgdriver import main

if __name__ == "__main__":
    raise SystemExit(main())
