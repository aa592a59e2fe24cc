"""The live view of workers on many hosts, kept in the PostgreSQL store.

With the file store a running process publishes its live view (``_observe.RuntimeFile``)
as a file beside the states, which a dashboard on the same host reads. Workers sharing a
PostgreSQL store run on many hosts, so each publishes it as its row of ``workflow_live``
(migration 0006) instead, and a dashboard anywhere reads every worker's:

- Cheap: one upsert per worker about once a second (``LivePublisher``'s period, or at
  once when a breaker moves), however many stages ran meanwhile, on the store's pool,
  never awaited by a stage. A failed write is skipped (the outage is logged once by the
  store); the next period writes the newer view anyway.
- A row counts while its worker's lease in ``workflow_workers`` runs: a worker killed
  without a word stops showing running workflows when its lease runs out (when its
  workflows become claimable elsewhere), with no reaper of its own. A worker that stops
  leaves its last view, marked stopped; rows of workers gone for a day are deleted by
  the next worker that starts.
- The reader gets a view's document only when its ``version`` changed since the last
  read, so a dashboard polling twice a second reads mostly a few small columns.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import orjson

from .._observe import STALE_SECONDS, LivePublisher

if TYPE_CHECKING:
    from .._observe import Telemetry
    from ._store import PostgresStore

__all__ = ["ENDED_READ", "DatabaseLiveView", "read_live_views"]

ENDED_READ = 3  # views of workers that ended, read besides the live ones (newest first)

_PUT = """
INSERT INTO workflow_live AS l (worker_id, host, pid, view, stopped)
VALUES ($1, $2, $3, $4::json, $5)
ON CONFLICT (worker_id) DO UPDATE
    SET host = EXCLUDED.host, pid = EXCLUDED.pid, view = EXCLUDED.view,
        stopped = EXCLUDED.stopped, version = l.version + 1, published_at = now()
"""

_FORGET = """
DELETE FROM workflow_live l
WHERE l.published_at < now() - make_interval(secs => $1)
  AND NOT EXISTS (SELECT 1 FROM workflow_workers w
                  WHERE w.worker_id = l.worker_id AND w.lease_expires_at > now())
"""

# Every live worker's view and the newest few of those that ended (stopped, or whose
# lease ran out); the document only where its version is not the one the reader has.
_READ = """
WITH views AS (
    SELECT l.worker_id, l.host, l.pid, l.version, l.stopped, l.published_at, l.view,
           coalesce(NOT l.stopped AND w.lease_expires_at > now(), false) AS alive
    FROM workflow_live l LEFT JOIN workflow_workers w ON w.worker_id = l.worker_id),
shown AS (
    SELECT * FROM views WHERE alive
    UNION ALL
    (SELECT * FROM views WHERE NOT alive ORDER BY published_at DESC LIMIT $3))
SELECT s.worker_id, s.host, s.pid, s.version, s.stopped, s.alive,
       CASE WHEN k.version IS NOT DISTINCT FROM s.version THEN NULL ELSE s.view END AS view
FROM shown s
LEFT JOIN unnest($1::text[], $2::bigint[]) AS k(worker_id, version)
    ON k.worker_id = s.worker_id
"""


class DatabaseLiveView(LivePublisher):
    """A worker's live view as its row of ``workflow_live`` in ``store``'s database."""

    def __init__(self, telemetry: Telemetry, store: PostgresStore, *,
                 period: float = 1.0) -> None:
        super().__init__(telemetry, period=period)
        self._store = store
        self._host = socket.gethostname()

    async def _prepare(self) -> None:
        await self._send(_FORGET, STALE_SECONDS)

    def _describe(self, snapshot: dict[str, Any]) -> None:
        snapshot["host"] = self._host
        snapshot["worker_id"] = self._store.worker_id

    async def _put(self, document: bytes, *, stopped: bool) -> None:
        await self._send(_PUT, self._store.worker_id, self._host, os.getpid(),
                         document.decode(), stopped)

    async def _send(self, statement: str, *args: Any) -> None:
        store = self._store
        try:
            # Package-private: the store's pool, which its claims and reads share.
            await store.require_pool().execute(statement, *args)
        except Exception as error:
            # Unreachable: logged once by the store, written again next period. Anything
            # else (the store closed meanwhile) is as harmless to the workflows.
            if not store.unreachable(error):
                from .._logging import logger

                logger.debug("Live view of %s not written: %s", store.worker_id, error)


async def read_live_views(store: PostgresStore,
                          known: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every live worker's view, and the last of the few that ended, keyed by worker ID,
    in the shape of the runtime files (``alive``, ``host``, ``worker_id`` added). A view
    whose version is that of ``known``'s (what the last read returned) is taken from
    ``known`` instead of read again. The views of workers no longer alive list no running
    workflows: those are another worker's, or queued, once the lease ran out."""
    wanted = [(k, int(v["version"])) for k, v in known.items()
              if isinstance(v.get("version"), int)]
    rows = await store.require_pool().fetch(
        _READ, [k for k, _ in wanted], [v for _, v in wanted], ENDED_READ)
    found: dict[str, dict[str, Any]] = {}
    for row in rows:
        worker_id = row["worker_id"]
        if row["view"] is None:
            view = dict(known[worker_id])
        else:
            decoded = orjson.loads(row["view"])
            if not isinstance(decoded, dict):
                continue
            view = decoded
        view.update(worker_id=worker_id, host=row["host"], pid=row["pid"],
                    version=row["version"], alive=bool(row["alive"]))
        if not view["alive"]:
            view["workflows"], view["states"] = {}, {}
            view["stopped"] = bool(row["stopped"])
        found[worker_id] = view
    return found
