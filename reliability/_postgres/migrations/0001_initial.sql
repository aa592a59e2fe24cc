-- The PostgreSQL store's tables. Every time comes from the database's clock (now()), never
-- from a worker's, so leases mean the same to every host.

-- One row per live worker process: its lease runs until lease_expires_at; a worker whose
-- lease ran out is dead, its row deleted and its workflows re-queued with a new epoch.
CREATE TABLE workflow_workers (
    worker_id        text PRIMARY KEY,
    host             text NOT NULL,
    pid              integer NOT NULL,
    started_at       timestamptz NOT NULL DEFAULT now(),
    heartbeat_at     timestamptz NOT NULL DEFAULT now(),
    lease_expires_at timestamptz NOT NULL
);
CREATE INDEX workflow_workers_expiry ON workflow_workers (lease_expires_at);

-- One row per workflow. owner and epoch are the fence: a write for the workflow is applied
-- only where both still match the writer's, and every claim or re-queue raises epoch.
-- state is NULL for a workflow claimed but never saved. queue is NULL for a workflow run
-- by the process that started it (run_workflow), set for one submitted to workers.
CREATE TABLE workflows (
    workflow_id text PRIMARY KEY,
    definition  text,
    status      text NOT NULL DEFAULT 'pending',
    queue       text,
    state       jsonb,
    revision    bigint NOT NULL DEFAULT 0,
    owner       text,
    epoch       bigint NOT NULL DEFAULT 0,
    claimed_at  timestamptz,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX workflows_claimable ON workflows (queue, created_at)
    WHERE owner IS NULL AND queue IS NOT NULL
      AND status IN ('pending', 'running', 'interrupted');
CREATE INDEX workflows_owner ON workflows (owner) WHERE owner IS NOT NULL;
CREATE INDEX workflows_status ON workflows (status);

-- A stage's checkpoint: the state as it was when the stage completed.
CREATE TABLE workflow_checkpoints (
    workflow_id text NOT NULL REFERENCES workflows ON DELETE CASCADE,
    stage       text NOT NULL,
    epoch       bigint NOT NULL,
    revision    bigint NOT NULL,
    state       jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workflow_id, stage)
);

-- Every write, claim, release and re-queue, applied or refused, with the writer's owner and
-- epoch: the evidence that a fenced-off worker wrote nothing more.
CREATE TABLE workflow_writes (
    id          bigserial PRIMARY KEY,
    workflow_id text NOT NULL,
    owner       text,
    epoch       bigint NOT NULL,
    revision    bigint,
    kind        text NOT NULL,
    applied     boolean NOT NULL,
    at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX workflow_writes_workflow ON workflow_writes (workflow_id, id);

-- Requests for a workflow from any host (cancel, say), read by the worker that runs it.
CREATE TABLE workflow_signals (
    id          bigserial PRIMARY KEY,
    workflow_id text NOT NULL,
    kind        text NOT NULL,
    payload     jsonb,
    created_at  timestamptz NOT NULL DEFAULT now(),
    handled_at  timestamptz
);
CREATE INDEX workflow_signals_pending ON workflow_signals (workflow_id) WHERE handled_at IS NULL;
