-- Durable waits on PostgreSQL (docs/architecture.md, "Durable waits"): the signals sent to
-- workflows, and the index of parked workflows with their deadlines on the database's clock.

-- One row per signal sent, per workflow and name in the order sent (id: senders of one
-- workflow take an advisory lock, so ids commit in order). A workflow's state counts how
-- many of each name it took; its rows go when it ends.
CREATE TABLE workflow_wait_signals (
    id          bigserial PRIMARY KEY,
    workflow_id text NOT NULL REFERENCES workflows ON DELETE CASCADE,
    name        text NOT NULL,
    payload     jsonb NOT NULL,
    sent_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX workflow_wait_signals_by_name ON workflow_wait_signals (workflow_id, name, id);

-- One row per parked workflow: what it waits for, written (fenced by owner and epoch)
-- before the state that says 'waiting'. deadline is the runtime's (epoch seconds, as its
-- state records it); due_at is the same moment on the database's clock, which decides when
-- any worker wakes it, whatever the workers' clocks say.
CREATE TABLE workflow_parked (
    workflow_id  text PRIMARY KEY REFERENCES workflows ON DELETE CASCADE,
    deadline     double precision NOT NULL,
    signal       text NOT NULL,
    signal_index integer NOT NULL,
    due_at       timestamptz NOT NULL,
    parked_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX workflow_parked_due ON workflow_parked (due_at);
