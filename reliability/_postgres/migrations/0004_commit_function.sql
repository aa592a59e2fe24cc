-- A group commit in one round trip: the store calls this function as a statement of its
-- own (an implicit transaction, committed with synchronous_commit on before the reply).
-- Before it, a batch cost BEGIN, the idempotency mark, the writes, the release and
-- COMMIT, and the pool's reset of the connection, each a round trip (and on a busy
-- worker each also a wait for its event loop's next turn).
--
-- In order, as the separate statements did:
-- 1. the idempotency mark: this (worker, lane) row takes the batch's ID. No row changed
--    means the row holds this ID already: the batch committed before and only its reply
--    was lost; its refusals then are returned and nothing is written again. If that
--    earlier transaction is still open on a dying backend, the INSERT waits on the row's
--    lock until it ended either way (each statement below reads a new snapshot).
-- 2. the fenced writes: applied only where owner and epoch still match; checkpoints of
--    those applied; every write audited, applied or refused.
-- 3. registrations: writes of workflows this worker holds no claim on, allowed only while
--    nobody ever claimed them (owner NULL, epoch 0); audited.
--    For each write of 2 and 3 applied with a status in p_ended (the workflow ended), a
--    NOTIFY on the result channel for whoever waits for its result on any host: sent
--    with the commit, where a statement of its own per workflow cost two round trips.
-- 4. the refusals of 2 and 3 recorded on the mark, for a retry of 1.
-- 5. the releases, audited, and a NOTIFY for each queue that got a claimable workflow back.
-- Returns the IDs refused (fenced writes and registrations), in no particular order.
CREATE FUNCTION workflow_commit(
    p_worker text, p_lane smallint, p_batch bigint, p_schema smallint,
    p_ids text[], p_epochs bigint[], p_states jsonb[], p_statuses text[],
    p_revisions bigint[], p_checkpoint_ids text[], p_checkpoint_stages text[],
    p_new_ids text[], p_new_states jsonb[], p_new_statuses text[], p_new_revisions bigint[],
    p_new_definitions text[], p_release_ids text[], p_release_epochs bigint[],
    p_claimable text[], p_channel text, p_ended text[], p_result_channel text)
RETURNS text[]
LANGUAGE plpgsql AS $$
DECLARE
    v_refused text[] := '{}';
    v_queue text;
BEGIN
    INSERT INTO workflow_commits AS c (worker_id, lane, batch)
    VALUES (p_worker, p_lane, p_batch)
    ON CONFLICT (worker_id, lane) DO UPDATE
        SET batch = EXCLUDED.batch, refused = '{}', committed_at = now()
        WHERE c.batch <> EXCLUDED.batch;
    IF NOT FOUND THEN
        SELECT c.refused INTO v_refused FROM workflow_commits c
        WHERE c.worker_id = p_worker AND c.lane = p_lane;
        RETURN v_refused;
    END IF;

    IF cardinality(p_ids) > 0 THEN
        WITH input AS (
            SELECT * FROM unnest(p_ids, p_epochs, p_states, p_statuses, p_revisions)
                AS i(workflow_id, epoch, state, status, revision)),
        applied AS (
            UPDATE workflows w SET state = i.state, status = i.status, revision = i.revision,
                                   schema_version = p_schema, updated_at = now()
            FROM input i
            WHERE w.workflow_id = i.workflow_id AND w.owner = p_worker AND w.epoch = i.epoch
            RETURNING w.workflow_id),
        checkpoints AS (
            INSERT INTO workflow_checkpoints AS c (workflow_id, stage, epoch, revision, state,
                                                   schema_version)
            SELECT i.workflow_id, s.stage, i.epoch, i.revision, i.state, p_schema
            FROM unnest(p_checkpoint_ids, p_checkpoint_stages) AS s(workflow_id, stage)
            JOIN applied a ON a.workflow_id = s.workflow_id
            JOIN input i ON i.workflow_id = s.workflow_id
            ON CONFLICT (workflow_id, stage) DO UPDATE
                SET epoch = EXCLUDED.epoch, revision = EXCLUDED.revision,
                    state = EXCLUDED.state, schema_version = EXCLUDED.schema_version,
                    created_at = now()),
        audit AS (
            INSERT INTO workflow_writes (workflow_id, owner, epoch, revision, kind, applied)
            SELECT i.workflow_id, p_worker, i.epoch, i.revision, 'save',
                   a.workflow_id IS NOT NULL
            FROM input i LEFT JOIN applied a ON a.workflow_id = i.workflow_id
            RETURNING workflow_id, applied)
        SELECT v_refused || coalesce(array_agg(workflow_id) FILTER (WHERE NOT applied), '{}')
        INTO v_refused FROM audit;
    END IF;

    IF cardinality(p_new_ids) > 0 THEN
        WITH input AS (
            SELECT * FROM unnest(p_new_ids, p_new_states, p_new_statuses, p_new_revisions,
                                 p_new_definitions)
                AS i(workflow_id, state, status, revision, definition)),
        applied AS (
            INSERT INTO workflows AS w (workflow_id, state, status, revision, definition,
                                        queue, schema_version)
            SELECT i.workflow_id, i.state, i.status, i.revision, i.definition, NULL, p_schema
            FROM input i
            ON CONFLICT (workflow_id) DO UPDATE
                SET state = EXCLUDED.state, status = EXCLUDED.status,
                    revision = EXCLUDED.revision, definition = EXCLUDED.definition,
                    queue = EXCLUDED.queue, schema_version = EXCLUDED.schema_version,
                    updated_at = now()
                WHERE w.owner IS NULL AND w.epoch = 0
            RETURNING w.workflow_id),
        audit AS (
            INSERT INTO workflow_writes (workflow_id, owner, epoch, revision, kind, applied)
            SELECT i.workflow_id, NULL, 0, i.revision, 'register', a.workflow_id IS NOT NULL
            FROM input i LEFT JOIN applied a ON a.workflow_id = i.workflow_id
            RETURNING workflow_id, applied)
        SELECT v_refused || coalesce(array_agg(workflow_id) FILTER (WHERE NOT applied), '{}')
        INTO v_refused FROM audit;
    END IF;

    PERFORM pg_notify(p_result_channel, i.workflow_id)
    FROM unnest(p_ids || p_new_ids, p_statuses || p_new_statuses) AS i(workflow_id, status)
    WHERE i.status = ANY(p_ended) AND NOT (i.workflow_id = ANY(v_refused));

    IF cardinality(v_refused) > 0 THEN
        UPDATE workflow_commits SET refused = v_refused
        WHERE worker_id = p_worker AND lane = p_lane;
    END IF;

    IF cardinality(p_release_ids) > 0 THEN
        FOR v_queue IN
            WITH input AS (
                SELECT * FROM unnest(p_release_ids, p_release_epochs) AS i(workflow_id, epoch)),
            released AS (
                UPDATE workflows w SET owner = NULL, claimed_at = NULL
                FROM input i
                WHERE w.workflow_id = i.workflow_id AND w.owner = p_worker
                  AND w.epoch = i.epoch
                RETURNING w.workflow_id, w.epoch, w.queue, w.status),
            audit AS (
                INSERT INTO workflow_writes (workflow_id, owner, epoch, kind, applied)
                SELECT workflow_id, p_worker, epoch, 'release', true FROM released)
            SELECT DISTINCT queue FROM released
            WHERE queue IS NOT NULL AND status = ANY(p_claimable)
        LOOP
            PERFORM pg_notify(p_channel, v_queue);
        END LOOP;
    END IF;
    RETURN v_refused;
END
$$;

-- States (2-4 KB of JSON for a 19-stage workflow) are compressed twice a write (the row
-- and its checkpoint). lz4 instead of the default pglz cut the server's CPU time per
-- 34-row group commit by a third (7.1 -> 4.7 and 7.9 -> 5.3 ms, the backend's own CPU
-- time, interleaved rounds). A server built without lz4 keeps pglz.
DO $$
BEGIN
    ALTER TABLE workflows ALTER COLUMN state SET COMPRESSION lz4;
    ALTER TABLE workflow_checkpoints ALTER COLUMN state SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported THEN
    NULL;
END
$$;
