-- Idempotent group commits: each store's committer sends one batch at a time, and records
-- that batch's random ID here in the batch's own transaction. After a lost connection it
-- cannot know whether its COMMIT went through; a retry that finds its ID here knows it did
-- (and which writes were refused then), instead of sending the writes again, which a
-- release in that same batch would now refuse.
CREATE TABLE workflow_commits (
    worker_id    text PRIMARY KEY,
    batch        bigint NOT NULL,
    refused      text[] NOT NULL DEFAULT '{}',
    committed_at timestamptz NOT NULL DEFAULT now()
);

-- The version of the state document's format (reliability's SCHEMA_VERSION), per row: a
-- state written in a format this code does not read is refused, as by the file store.
ALTER TABLE workflows ADD COLUMN schema_version smallint NOT NULL DEFAULT 1;
ALTER TABLE workflow_checkpoints ADD COLUMN schema_version smallint NOT NULL DEFAULT 1;
