"""The PostgreSQL store's schema: numbered SQL migrations shipped in the package.

``migrate(connection)`` applies those the database lacks, in order, in one transaction
that first takes an advisory lock: of two processes opening the store at once, one
applies them and the other waits for its commit, then finds nothing left to do. A
database migrated by newer code than this is refused (SchemaVersionError, one line).
"""

from __future__ import annotations

import importlib.resources
import re
from dataclasses import dataclass
from typing import Any

from .._errors import SchemaVersionError

__all__ = ["MIGRATION_LOCK", "Migration", "current_version", "latest_version", "migrate",
           "migrations"]

# pg_advisory_xact_lock key: "workflow" in ASCII, so it is unlikely to meet another app's.
MIGRATION_LOCK = 0x776F726B666C6F77
_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
_TABLE = "workflow_schema_migrations"


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations() -> list[Migration]:
    """The package's migrations, in order; their numbers run 1, 2, 3... without a gap."""
    found = []
    for entry in importlib.resources.files(__package__).joinpath("migrations").iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), entry.name, entry.read_text("utf-8")))
    found.sort(key=lambda m: m.version)
    if [m.version for m in found] != list(range(1, len(found) + 1)):
        raise RuntimeError(f"migrations are not numbered 1..n: {[m.name for m in found]}")
    return found


def latest_version() -> int:
    return len(migrations())


async def current_version(connection: Any) -> int:
    """The newest migration applied to the database (0 for an empty one)."""
    exists = await connection.fetchval("SELECT to_regclass($1) IS NOT NULL", _TABLE)
    if not exists:
        return 0
    return int(await connection.fetchval(f"SELECT coalesce(max(version), 0) FROM {_TABLE}"))


def _too_new(database: int, known: int) -> SchemaVersionError:
    return SchemaVersionError(
        f"the database's schema is at version {database}, newer than this workflow-manager "
        f"knows (up to {known}): upgrade workflow-manager on this host")


async def migrate(connection: Any) -> list[int]:
    """Bring the database's schema up to this code's; the versions applied here."""
    known = migrations()
    # Outside the lock first: an up-to-date database (every start but the first) costs one
    # query and takes no lock.
    database = await current_version(connection)
    if database > len(known):
        raise _too_new(database, len(known))
    if database == len(known):
        return []
    applied = []
    async with connection.transaction():
        await connection.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        await connection.execute(
            f"CREATE TABLE IF NOT EXISTS {_TABLE} (version integer PRIMARY KEY, "
            "name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())")
        database = await current_version(connection)  # again: another may have just done it
        if database > len(known):
            raise _too_new(database, len(known))
        for migration in known[database:]:
            await connection.execute(migration.sql)
            await connection.execute(f"INSERT INTO {_TABLE} (version, name) VALUES ($1, $2)",
                                     migration.version, migration.name)
            applied.append(migration.version)
    return applied
