"""The throwaway PostgreSQL server the tests run against (tests/postgres_server.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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


_OWNER = """
import sys, time
sys.path.insert(0, sys.argv[1])
from postgres_server import PostgresServer
server = PostgresServer().start()
print(server.directory, flush=True)
time.sleep(3600)
"""


def test_a_server_outlives_no_killed_owner(postgres_url: str) -> None:
    """SIGKILL the process that started a server: the server stops and its directory is
    removed (a killed test run leaves no server behind)."""
    tests = Path(__file__).parent
    with subprocess.Popen([sys.executable, "-c", _OWNER, str(tests)],
                          stdout=subprocess.PIPE, text=True) as owner:
        assert owner.stdout is not None
        directory = Path(owner.stdout.readline().strip())
        server_pid = int((directory / "data" / "postmaster.pid").read_text().split()[0])
        owner.send_signal(signal.SIGKILL)
    for _ in range(1200):  # an upper bound, reached only on a failure
        if not directory.exists() and not Path(f"/proc/{server_pid}").exists():
            break
        time.sleep(0.1)
    assert not Path(f"/proc/{server_pid}").exists(), "the server outlived its owner"
    assert not directory.exists()
