"""Shared fixtures: a real PostgreSQL server for the tests that need one.

One throwaway server per test session (``tests/postgres_server.py``), started only when a
test asks for ``postgres_url`` (``own_server``: one per test module, for tests that stop
and start it); ``WORKFLOW_TEST_POSTGRES_URL`` names an existing server
instead. Each test gets a database of its own, dropped afterwards. Where no server can
be started the tests that need one are skipped, except in CI (``CI=true``), where that is
a failure: they must always run there.
"""

from __future__ import annotations

import asyncio
import gc
import os
import secrets
import sys
from collections.abc import Iterator

import pytest
from postgres_server import PostgresServer, ServerUnavailable, execute

_URL_VARIABLE = "WORKFLOW_TEST_POSTGRES_URL"


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI must run the PostgreSQL tests, but: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer | str]:
    """The session's server (or the URL of the one ``WORKFLOW_TEST_POSTGRES_URL`` names)."""
    given = os.environ.get(_URL_VARIABLE)
    if given:
        yield given
        return
    try:
        import asyncpg  # noqa: F401
    except ImportError:
        _unavailable("asyncpg is not installed (pip install -e '.[test]')")
    yield from _throwaway_server()


@pytest.fixture(scope="module")
def own_server() -> Iterator[PostgresServer]:
    """A server of the test module's own, which its tests may stop and start."""
    yield from _throwaway_server()


def _throwaway_server() -> Iterator[PostgresServer]:
    """A started server, destroyed when the fixture ends; skipped or failed when none
    can start (failed in CI)."""
    try:
        server = PostgresServer().start()
    except ServerUnavailable as error:
        _unavailable(str(error))
        raise  # not reached: _unavailable skips or fails
    try:
        yield server
    finally:
        server.destroy()


def _base_url(server: PostgresServer | str) -> str:
    return server if isinstance(server, str) else server.url


@pytest.fixture
def postgres_url(postgres_server: PostgresServer | str) -> Iterator[str]:
    """A fresh, empty database on the session's server, for this test only."""
    base = _base_url(postgres_server)
    name = f"test_{secrets.token_hex(6)}"  # generated here: safe to put in a statement
    asyncio.run(execute(base, f"CREATE DATABASE {name}"))
    try:
        yield base.rsplit("/", 1)[0] + "/" + name
    finally:
        asyncio.run(execute(base, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


@pytest.fixture
def cpython_defaults() -> Iterator[None]:
    """The interpreter as a fresh CPython has it (GC thresholds, switch interval) for the
    test, and the suite's own settings back afterwards: tuning tests start from the defaults
    whatever ran before them."""
    saved = gc.get_threshold(), sys.getswitchinterval()
    gc.set_threshold(700, 10, 10)
    sys.setswitchinterval(0.005)
    yield
    gc.set_threshold(*saved[0])
    sys.setswitchinterval(saved[1])
