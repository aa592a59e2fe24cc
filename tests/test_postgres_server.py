"""The throwaway PostgreSQL server the tests run against (tests/postgres_server.py)."""

from __future__ import annotations

import os

import asyncpg
import pytest
from postgres_server import PostgresServer


async def test_server_is_durable_and_runs_unprivileged(postgres_url: str,
                                                       postgres_server: PostgresServer | str
                                                       ) -> None:
    """The session's server commits with fsync on and never runs as root."""
    connection = await asyncpg.connect(postgres_url)
    try:
        assert await connection.fetchval("SHOW fsync") == "on"
        assert await connection.fetchval("SHOW synchronous_commit") == "on"
        assert int((await connection.fetchval("SELECT version()")).split()[1].split(".")[0]) >= 15
    finally:
        await connection.close()
    if isinstance(postgres_server, PostgresServer):
        pid = int((postgres_server.data_directory / "postmaster.pid").read_text().split()[0])
        assert os.stat(f"/proc/{pid}").st_uid != 0


async def test_server_refuses_a_wrong_password(postgres_url: str) -> None:
    """Password authentication is on, so the tests' password handling is exercised."""
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(postgres_url, password="not-the-password")
