-- The live view of each worker process: its running workflows (stage, attempt, when the
-- stage started, what it waits on, warnings), breakers, health and resources, as the
-- dashboard shows them; one row per worker, replaced about once a second
-- (reliability/_postgres/_live.py). A row counts only while its worker's lease runs
-- (workflow_workers): a worker killed without a word stops counting when its lease runs
-- out, and one that stopped leaves its last view, marked stopped. Rows of workers gone
-- for a day are deleted by the next worker that starts.
-- json, not jsonb: the document is only stored and read back whole, never queried, and
-- json keeps the text as sent (no conversion on each write).
CREATE TABLE workflow_live (
    worker_id    text PRIMARY KEY,
    host         text NOT NULL,
    pid          integer NOT NULL,
    view         json NOT NULL,
    stopped      boolean NOT NULL DEFAULT false,
    version      bigint NOT NULL DEFAULT 1,
    published_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX workflow_live_published ON workflow_live (published_at);
