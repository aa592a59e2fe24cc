-- A store sends several group commits at once, each on a connection of its own (a lane),
-- and never two batches with writes of one workflow at once. Each lane sends one batch at
-- a time, so the idempotency record is per (worker, lane): a retry finds its own lane's.
ALTER TABLE workflow_commits ADD COLUMN lane smallint NOT NULL DEFAULT 0;
ALTER TABLE workflow_commits DROP CONSTRAINT workflow_commits_pkey;
ALTER TABLE workflow_commits ADD PRIMARY KEY (worker_id, lane);
