"""A throwaway PostgreSQL server for the tests and for developers (``make postgres``).

``PostgresServer.start()`` runs ``initdb`` in a fresh temporary directory and starts a
server on it: fsync and synchronous commit on (what a real deployment has, so what the
tests measure is real), listening on 127.0.0.1 on a free port and on a Unix socket in the
same directory, password authentication for a superuser whose password is random (so the
tests see a real password to keep out of errors and logs). ``stop()`` stops it and removes
the directory.

PostgreSQL refuses to run as root, and CI runs as root: then the server runs as the
``postgres`` user Debian's package creates (or an unprivileged ``workflowpg`` user this
module creates), in a directory that user owns.

Binaries, first found wins: ``$WORKFLOW_POSTGRES_BIN``, ``pg_config --bindir`` on the
PATH, Debian's ``/usr/lib/postgresql/<version>/bin`` (newest first), the server shipped
by the ``pgserver`` wheel (in the test extra, for a machine with only Python and git).
Version 15 or newer.

As a script: starts one server, prints its URL, and stops it on Ctrl-C or SIGTERM::

    python tests/postgres_server.py            # what ``make postgres`` runs
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MINIMUM_VERSION = 15
SUPERUSER = "workflow"
DATABASE = "postgres"
UNPRIVILEGED_USER = "workflowpg"  # created only when running as root without ``postgres``


class ServerUnavailable(RuntimeError):
    """No PostgreSQL server could be started here; the message says why and what to do."""


def _version(bindir: Path) -> int | None:
    try:
        out = subprocess.run([str(bindir / "postgres"), "--version"], capture_output=True,
                             text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"\(PostgreSQL\) (\d+)", out)
    return int(match.group(1)) if match else None


def _candidates() -> Iterator[Path]:
    explicit = os.environ.get("WORKFLOW_POSTGRES_BIN")
    if explicit:
        yield Path(explicit)
        return
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            yield Path(subprocess.run([pg_config, "--bindir"], capture_output=True, text=True,
                                      timeout=30, check=True).stdout.strip())
    debian = Path("/usr/lib/postgresql")
    if debian.is_dir():
        versions = sorted((p for p in debian.iterdir() if p.name.isdigit()),
                          key=lambda p: int(p.name), reverse=True)
        yield from (p / "bin" for p in versions)
    try:
        import pgserver  # type: ignore[import-not-found,import-untyped,unused-ignore]
    except ImportError:
        return
    yield Path(pgserver.__file__).parent / "pginstall" / "bin"


def find_binaries() -> Path:
    """The directory of a PostgreSQL 15+ server's binaries; ServerUnavailable if none."""
    tried = []
    for bindir in _candidates():
        version = _version(bindir) if (bindir / "initdb").exists() else None
        if version is not None and version >= MINIMUM_VERSION:
            return bindir
        tried.append(f"{bindir} ({'version ' + str(version) if version else 'no server'})")
    raise ServerUnavailable(
        "no PostgreSQL 15+ server binaries found (tried: " + (", ".join(tried) or "nothing")
        + "); install Debian's postgresql package, or the test extra "
          "(pip install -e '.[test]', which brings pgserver), or set WORKFLOW_POSTGRES_BIN")


def _server_account() -> pwd.struct_passwd | None:
    """The unprivileged account the server runs as when we are root; None when we are not."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", UNPRIVILEGED_USER):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    try:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                        UNPRIVILEGED_USER], check=True, capture_output=True, timeout=60)
    except (OSError, subprocess.CalledProcessError) as error:
        raise ServerUnavailable(f"running as root, and no unprivileged user to run PostgreSQL "
                                f"as: useradd {UNPRIVILEGED_USER} failed: {error}") from None
    return pwd.getpwnam(UNPRIVILEGED_USER)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


# Runs beside the server: when the process that started it dies without stopping it (a
# SIGKILLed pytest), the end of its stdin says so, and this stops the server and removes
# its directory, so no server outlives its owner.
_REAPER = """
import os, shutil, subprocess, sys
pg_ctl, data, directory, uid, gid = sys.argv[1:6]
sys.stdin.buffer.read()
if os.path.exists(os.path.join(data, "postmaster.pid")):
    owner = {} if uid == "-" else {"user": int(uid), "group": int(gid), "extra_groups": []}
    subprocess.run([pg_ctl, "stop", "-w", "-t", "60", "-m", "immediate", "-D", data],
                   capture_output=True, check=False, cwd=directory, **owner)
shutil.rmtree(directory, ignore_errors=True)
"""


@dataclass
class PostgresServer:
    """One throwaway server; ``url`` while it runs. Usable as a context manager."""

    bindir: Path | None = None
    max_connections: int = 100
    # More server settings ("name=value"), after the defaults (a later one wins): a
    # benchmark's diagnostics (log_checkpoints, pg_stat_statements...).
    settings: tuple[str, ...] = ()
    directory: Path = field(init=False)
    port: int = field(init=False, default=0)
    password: str = field(init=False, default_factory=lambda: secrets.token_urlsafe(18))
    _account: pwd.struct_passwd | None = field(init=False, default=None)
    _initialized: bool = field(init=False, default=False)
    _reaper: subprocess.Popen[bytes] | None = field(init=False, default=None)

    @property
    def data_directory(self) -> Path:
        return self.directory / "data"

    @property
    def socket_directory(self) -> Path:
        return self.directory

    @property
    def url(self) -> str:
        """The TCP URL, password included: hand it to code, never print it."""
        return f"postgresql://{SUPERUSER}:{self.password}@127.0.0.1:{self.port}/{DATABASE}"

    @property
    def masked_url(self) -> str:
        return f"postgresql://{SUPERUSER}:***@127.0.0.1:{self.port}/{DATABASE}"

    def url_for(self, database: str) -> str:
        return self.url.rsplit("/", 1)[0] + "/" + database

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        assert self.bindir is not None
        command = [str(self.bindir / args[0]), *args[1:]]
        kwargs: dict[str, Any] = {}
        if self._account is not None:
            kwargs = {"user": self._account.pw_uid, "group": self._account.pw_gid,
                      "extra_groups": []}
        # The server's own environment: none of ours (PGPASSWORD, PGDATA...) leaks in.
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "LANG": "C",
               "HOME": str(self.directory)}
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                                env=env, cwd=self.directory, check=False, **kwargs)
        if result.returncode != 0:
            log = self.directory / "server.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise ServerUnavailable(f"{args[0]} failed ({result.returncode}): "
                                    f"{result.stderr.strip() or result.stdout.strip()}\n{tail}")
        return result

    def start(self) -> PostgresServer:
        """initdb (first time only) and start; returns self."""
        if not self._initialized:
            self.bindir = self.bindir or find_binaries()
            self._account = _server_account()
            self.directory = Path(tempfile.mkdtemp(prefix="workflow-pg-"))
            if self._account is not None:
                os.chown(self.directory, self._account.pw_uid, self._account.pw_gid)
            pwfile = self.directory / "pwfile"
            pwfile.write_text(self.password + "\n")
            if self._account is not None:
                os.chown(pwfile, self._account.pw_uid, self._account.pw_gid)
            pwfile.chmod(0o600)
            try:
                self._run("initdb", "-D", str(self.data_directory), "-U", SUPERUSER,
                          f"--pwfile={pwfile}", "--auth-local=scram-sha-256",
                          "--auth-host=scram-sha-256", "--encoding=UTF8", "--no-instructions")
            finally:
                pwfile.unlink()
            self.port = free_port()
            self._initialized = True
            self._start_reaper()
        options = " ".join([
            "-c listen_addresses=127.0.0.1", f"-p {self.port}",
            f"-k {self.socket_directory}", "-c fsync=on", "-c synchronous_commit=on",
            f"-c max_connections={self.max_connections}", "-c shared_buffers=64MB",
            "-c log_min_messages=warning", "-c log_connections=off",
            *(f"-c {setting}" for setting in self.settings),
        ])
        self._run("pg_ctl", "start", "-w", "-t", "60", "-D", str(self.data_directory),
                  "-l", str(self.directory / "server.log"), "-o", options)
        return self

    def _start_reaper(self) -> None:
        assert self.bindir is not None
        account = self._account
        ids = ("-", "-") if account is None else (str(account.pw_uid), str(account.pw_gid))
        self._reaper = subprocess.Popen(
            [sys.executable, "-c", _REAPER, str(self.bindir / "pg_ctl"),
             str(self.data_directory), str(self.directory), *ids],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)  # a Ctrl-C to the owner's group is the owner's

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``immediate``: as a crash would); the data stays for start()."""
        if self._initialized and (self.data_directory / "postmaster.pid").exists():
            self._run("pg_ctl", "stop", "-w", "-t", "60", "-m", mode, "-D",
                      str(self.data_directory))

    def destroy(self) -> None:
        """Stop the server and remove its directory."""
        if not self._initialized:
            return
        try:
            self.stop()
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)
            self._initialized = False
            if self._reaper is not None:  # nothing left for it to do: let it end
                assert self._reaper.stdin is not None
                self._reaper.stdin.close()
                self._reaper.wait(timeout=60)
                self._reaper = None

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.destroy()


async def fetch_rows(url: str, query: str, *args: Any) -> list[Any]:
    """The rows of one query (parameters as ``$1``...), on a connection of its own."""
    import asyncpg
    connection = await asyncpg.connect(url)
    try:
        return list(await connection.fetch(query, *args))
    finally:
        await connection.close()


async def execute(url: str, statement: str) -> None:
    """One statement on a connection of its own (CREATE/DROP DATABASE cannot run in a
    transaction or a pool's session)."""
    import asyncpg
    connection = await asyncpg.connect(url)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Start a throwaway PostgreSQL server, print "
                                                 "its URL, stop it on Ctrl-C.")
    parser.add_argument("--max-connections", type=int, default=100)
    args = parser.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        server = PostgresServer(max_connections=args.max_connections).start()
    except ServerUnavailable as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    try:
        # A developer's own throwaway server: printing its password here is the point.
        print(f"PostgreSQL {_version(server.bindir) if server.bindir else '?'} running in "
              f"{server.directory} (Ctrl-C stops it and removes everything)")
        print(f"export WORKFLOW_STORE_URL='{server.url}'")
        print(f"psql: PGPASSWORD='{server.password}' {server.bindir}/psql -h 127.0.0.1 "
              f"-p {server.port} -U {SUPERUSER} {DATABASE}", flush=True)
        stop.wait()
    finally:
        server.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
