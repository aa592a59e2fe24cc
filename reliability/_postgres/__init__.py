"""The PostgreSQL store: workflows shared by worker processes on many hosts.

Needs the ``postgres`` extra (asyncpg). Nothing here imports asyncpg until a store opens,
so ``import reliability`` works without it.
"""

from ._schema import current_version, latest_version, migrate
from ._store import RESULT_CHANNEL, WORK_CHANNEL, PostgresStore
from ._url import DatabaseURL, is_postgres_url, mask_url, parse_url, scrub

__all__ = ["RESULT_CHANNEL", "WORK_CHANNEL", "DatabaseURL", "PostgresStore", "current_version",
           "is_postgres_url", "latest_version", "mask_url", "migrate", "parse_url", "scrub"]
