-- 0009_audit: the tamper-evident audit feed.
--
-- 1. workflow_events is append-only: UPDATE, DELETE and TRUNCATE are refused for every role
--    (triggers fire for superusers and table owners too). The one exception is retention,
--    lifecycle_audit_prune(p_before), which deletes whole finished streams and records a
--    checkpoint per stream (lifecycle_audit_checkpoints).
-- 2. A hash chain per stream: one stream per execution_id, one ("global") for the events with
--    execution_id NULL (publishes, activations, breaker transitions). Each new event gets
--    prev_hash (the stream's head) and hash = hex(sha256(utf8(prev_hash || E'\n' || canonical))),
--    canonical being lifecycle_audit_canonical_event(...) (below). Rows stored before this
--    migration keep NULL hashes; a stream's chain starts at its first new event.
-- 3. workflow_audit_feed: the runbook's section 5 view, one row per event.
-- 4. An index for "latest N events".
--
-- Tamper evidence, not prevention: a superuser can still disable the triggers
-- (ALTER TABLE ... DISABLE TRIGGER, session_replication_role = replica) and rewrite rows; the
-- chain makes such an edit visible to `lifecycle-dagster audit verify` (lifecycle_dagster.audit),
-- which recomputes every hash from the rows. Deleting the newest events of a stream, or rewriting
-- a whole stream's chain, is not detectable from the rows alone (keep a copy of the heads
-- elsewhere for that).

ALTER TABLE workflow_events ADD COLUMN prev_hash text, ADD COLUMN hash text;

-- The genesis: prev_hash of the first event of a stream that has no checkpoint.
CREATE FUNCTION lifecycle_audit_genesis() RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT repeat('0', 64) $$;

-- ---------------------------------------------------------------------------------------------
-- Canonical JSON (RFC 8785, JSON Canonicalization Scheme, as far as practical):
--   * object members sorted by key, compared by Unicode code point (COLLATE "C" on UTF-8;
--     RFC 8785 sorts by UTF-16 code units: the orders differ only between keys holding
--     characters above U+FFFF and keys holding U+E000..U+FFFF at the same position);
--   * no insignificant whitespace (separators ',' and ':');
--   * strings escaped as to_json(text) does: \" \\ \b \f \n \r \t, other characters below
--     U+0020 as \u00xx (lowercase hex), everything else as is (UTF-8) — the same as RFC 8785;
--   * numbers as jsonb prints them (numeric_out: exact decimal, no exponent, -0 is 0, the scale
--     kept: 1.0 stays 1.0, 1e300 is 1 followed by 300 zeros) — NOT RFC 8785's ECMAScript
--     double form, because jsonb keeps numbers as exact decimals;
--   * true, false, null.
-- jsonb::text is not canonical (it prints ', ' and ': ').
CREATE FUNCTION lifecycle_canonical_json(p_value jsonb) RETURNS text
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE
AS $$
DECLARE
  v_out text;
BEGIN
  CASE jsonb_typeof(p_value)
    WHEN 'object' THEN
      SELECT '{' || coalesce(string_agg(to_json(m.key)::text || ':' || lifecycle_canonical_json(m.value), ','
                                        ORDER BY m.key COLLATE "C"), '') || '}'
        INTO v_out
        FROM jsonb_each(p_value) AS m(key, value);
    WHEN 'array' THEN
      SELECT '[' || coalesce(string_agg(lifecycle_canonical_json(a.value), ',' ORDER BY a.n), '') || ']'
        INTO v_out
        FROM jsonb_array_elements(p_value) WITH ORDINALITY AS a(value, n);
    ELSE
      v_out := p_value::text;  -- a scalar: jsonb prints strings escaped as to_json(text) does
  END CASE;
  RETURN v_out;
END
$$;

COMMENT ON FUNCTION lifecycle_canonical_json(jsonb) IS
  'Canonical JSON text (RFC 8785 as far as practical: sorted keys by code point, compact separators, '
  'to_json string escaping; numbers as jsonb prints them). Mirrored by lifecycle_dagster.audit.canonical_json.';

-- The canonical form of one event: canonical JSON of
--   {"event_type", "execution_id" (uuid text or null), "id" (number), "metadata",
--    "stage_id" (text or null), "timestamp" (UTC, 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')}
-- (keys already in sorted order).
CREATE FUNCTION lifecycle_audit_canonical_event(
  p_id bigint, p_execution_id uuid, p_event_type text, p_stage_id text, p_metadata jsonb,
  p_timestamp timestamptz
) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
  SELECT '{"event_type":' || coalesce(to_json(p_event_type)::text, 'null')
      || ',"execution_id":' || coalesce(to_json(p_execution_id::text)::text, 'null')
      || ',"id":' || coalesce(p_id::text, 'null')
      || ',"metadata":' || coalesce(lifecycle_canonical_json(p_metadata), 'null')
      || ',"stage_id":' || coalesce(to_json(p_stage_id)::text, 'null')
      || ',"timestamp":' || coalesce(
           to_json(to_char(p_timestamp AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'))::text, 'null')
      || '}'
$$;

-- hash = lowercase hex SHA-256 of the UTF-8 bytes of prev_hash || E'\n' || canonical event.
CREATE FUNCTION lifecycle_audit_hash(p_prev_hash text, p_canonical text) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$ SELECT encode(sha256(convert_to(p_prev_hash || E'\n' || p_canonical, 'UTF8')), 'hex') $$;

-- The advisory lock key of a stream (execution id, or 'global' for execution_id NULL).
CREATE FUNCTION lifecycle_audit_stream_key(p_execution_id uuid) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT hashtextextended(coalesce(p_execution_id::text, 'global'), 7) $$;

-- ---------------------------------------------------------------------------------------------
-- Checkpoints: what retention removed. A stream's head is its newest event's hash, else (every
-- event pruned) its newest checkpoint's last_hash, else the genesis. Append-only too.
CREATE TABLE lifecycle_audit_checkpoints (
  id             bigint      GENERATED ALWAYS AS IDENTITY,
  execution_id   uuid,                       -- NULL: the global stream
  last_event_id  bigint      NOT NULL,       -- the newest event pruned
  last_hash      text,                       -- its hash (NULL: it predates the chain)
  events_pruned  bigint      NOT NULL,
  cutoff         timestamptz NOT NULL,
  created_at     timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT lifecycle_audit_checkpoints_pkey PRIMARY KEY (id)
);

CREATE INDEX lifecycle_audit_checkpoints_stream_idx
  ON lifecycle_audit_checkpoints (execution_id, id);

-- ---------------------------------------------------------------------------------------------
-- The chain: BEFORE INSERT, named to fire after any other BEFORE INSERT trigger (triggers fire
-- in name order), so it hashes the row as it will be stored.
CREATE FUNCTION lifecycle_audit_chain() RETURNS trigger
LANGUAGE plpgsql
AS $$
DECLARE
  v_head_id   bigint;
  v_head_hash text;
  v_found     boolean;
BEGIN
  IF current_setting('transaction_isolation') <> 'read committed' THEN
    -- a snapshot older than the stream lock would miss the event just chained: the chain would fork
    RAISE EXCEPTION 'workflow_events can only be inserted in a READ COMMITTED transaction, not % (the audit hash chain reads the stream head after locking it)',
      upper(current_setting('transaction_isolation'))
      USING ERRCODE = 'invalid_transaction_state';
  END IF;
  IF NOT isfinite(NEW."timestamp")
     OR NEW."timestamp" < '0001-01-01 00:00:00+00' OR NEW."timestamp" >= '10000-01-01 00:00:00+00' THEN
    RAISE EXCEPTION 'workflow_events.timestamp must be a finite time between years 1 and 9999, got %',
      NEW."timestamp"
      USING ERRCODE = 'datetime_field_overflow';
  END IF;

  -- LOCK: one inserter per stream at a time, until commit
  PERFORM pg_advisory_xact_lock(lifecycle_audit_stream_key(NEW.execution_id));

  -- the head, as committed now (READ COMMITTED: this statement takes a fresh snapshot)
  IF NEW.execution_id IS NULL THEN
    SELECT ev.id, ev.hash INTO v_head_id, v_head_hash
      FROM workflow_events ev WHERE ev.execution_id IS NULL ORDER BY ev.id DESC LIMIT 1;
  ELSE
    SELECT ev.id, ev.hash INTO v_head_id, v_head_hash
      FROM workflow_events ev WHERE ev.execution_id = NEW.execution_id ORDER BY ev.id DESC LIMIT 1;
  END IF;
  v_found := FOUND;
  IF NOT v_found THEN
    IF NEW.execution_id IS NULL THEN
      SELECT c.last_event_id, c.last_hash INTO v_head_id, v_head_hash
        FROM lifecycle_audit_checkpoints c WHERE c.execution_id IS NULL ORDER BY c.id DESC LIMIT 1;
    ELSE
      SELECT c.last_event_id, c.last_hash INTO v_head_id, v_head_hash
        FROM lifecycle_audit_checkpoints c WHERE c.execution_id = NEW.execution_id ORDER BY c.id DESC LIMIT 1;
    END IF;
  END IF;

  -- identity values are drawn before this trigger waits for the lock: an inserter that drew a
  -- smaller id may come second. Keep id order = chain order by drawing a new one then.
  IF v_head_id IS NOT NULL AND NEW.id <= v_head_id THEN
    NEW.id := nextval(pg_get_serial_sequence('workflow_events', 'id'));
  END IF;

  NEW.prev_hash := coalesce(v_head_hash, lifecycle_audit_genesis());
  NEW.hash := lifecycle_audit_hash(
    NEW.prev_hash,
    lifecycle_audit_canonical_event(NEW.id, NEW.execution_id, NEW.event_type, NEW.stage_id, NEW.metadata,
                                    NEW."timestamp"));
  RETURN NEW;
END
$$;

CREATE TRIGGER workflow_events_zz_audit_chain
  BEFORE INSERT ON workflow_events
  FOR EACH ROW EXECUTE FUNCTION lifecycle_audit_chain();

-- ---------------------------------------------------------------------------------------------
-- Append-only. DELETE is let through only inside lifecycle_audit_prune (it sets the
-- transaction-local lifecycle.audit_retention = on) and only for events of a finished execution
-- or of the global stream; UPDATE and TRUNCATE never.
CREATE FUNCTION lifecycle_audit_guard() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
  IF TG_OP = 'DELETE' AND TG_TABLE_NAME = 'workflow_events'
     AND coalesce(current_setting('lifecycle.audit_retention', true), '') = 'on' THEN
    IF OLD.execution_id IS NOT NULL AND NOT EXISTS (
         SELECT 1 FROM workflow_executions e
          WHERE e.id = OLD.execution_id AND e.status IN ('completed', 'rolled_back', 'compensation_failed')) THEN
      RAISE EXCEPTION 'audit retention: event % belongs to execution %, which is not finished',
        OLD.id, OLD.execution_id
        USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN OLD;
  END IF;
  RAISE EXCEPTION '% is append-only: % refused (old rows are removed only by lifecycle_audit_prune(before))',
    TG_TABLE_NAME, TG_OP
    USING ERRCODE = 'insufficient_privilege',
          HINT = 'events are never changed; record a new event instead';
END
$$;

CREATE TRIGGER workflow_events_append_only
  BEFORE UPDATE OR DELETE ON workflow_events
  FOR EACH ROW EXECUTE FUNCTION lifecycle_audit_guard();

CREATE TRIGGER workflow_events_no_truncate
  BEFORE TRUNCATE ON workflow_events
  FOR EACH STATEMENT EXECUTE FUNCTION lifecycle_audit_guard();

CREATE TRIGGER lifecycle_audit_checkpoints_append_only
  BEFORE UPDATE OR DELETE ON lifecycle_audit_checkpoints
  FOR EACH ROW EXECUTE FUNCTION lifecycle_audit_guard();

CREATE TRIGGER lifecycle_audit_checkpoints_no_truncate
  BEFORE TRUNCATE ON lifecycle_audit_checkpoints
  FOR EACH STATEMENT EXECUTE FUNCTION lifecycle_audit_guard();

-- ---------------------------------------------------------------------------------------------
-- Retention: delete whole finished streams whose every event is older than p_before, at most
-- p_max_streams executions per call (call again until it returns 0 executions), plus the prefix
-- of the global stream that is older than p_before (the events before the first global event at
-- or after p_before). Each pruned stream gets a checkpoint holding its newest pruned event's id
-- and hash, so the chain continues from it; an `audit_pruned` event in the global stream records
-- the call. One transaction; the permission flag is reset before returning.
CREATE FUNCTION lifecycle_audit_prune(p_before timestamptz, p_max_streams integer DEFAULT 1000)
RETURNS TABLE (executions integer, events bigint, global_events bigint)
LANGUAGE plpgsql
AS $$
DECLARE
  v_exec       record;
  v_last       record;
  v_n          bigint;
  v_execs      integer := 0;
  v_events     bigint := 0;
  v_global     bigint := 0;
  v_stop       bigint;
BEGIN
  IF p_before IS NULL OR NOT isfinite(p_before) THEN
    RAISE EXCEPTION 'lifecycle_audit_prune: p_before must be a finite timestamp, got %', coalesce(p_before::text, 'NULL')
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF p_max_streams IS NULL OR p_max_streams < 1 THEN
    RAISE EXCEPTION 'lifecycle_audit_prune: p_max_streams must be >= 1, got %', coalesce(p_max_streams::text, 'NULL')
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF current_setting('transaction_isolation') <> 'read committed' THEN
    RAISE EXCEPTION 'lifecycle_audit_prune must run in a READ COMMITTED transaction, not %',
      upper(current_setting('transaction_isolation'))
      USING ERRCODE = 'invalid_transaction_state';
  END IF;
  PERFORM set_config('lifecycle.audit_retention', 'on', true);

  -- executions: locked (the engine locks the execution row before writing its events), then
  -- their stream; re-checked under the lock.
  FOR v_exec IN
    SELECT e.id FROM workflow_executions e
     WHERE e.status IN ('completed', 'rolled_back', 'compensation_failed')
       AND EXISTS (SELECT 1 FROM workflow_events ev WHERE ev.execution_id = e.id)
       AND NOT EXISTS (SELECT 1 FROM workflow_events ev WHERE ev.execution_id = e.id AND ev."timestamp" >= p_before)
     ORDER BY e.id
     LIMIT p_max_streams
     FOR UPDATE OF e SKIP LOCKED
  LOOP
    PERFORM pg_advisory_xact_lock(lifecycle_audit_stream_key(v_exec.id));
    CONTINUE WHEN EXISTS (SELECT 1 FROM workflow_events ev
                           WHERE ev.execution_id = v_exec.id AND ev."timestamp" >= p_before);
    SELECT ev.id, ev.hash INTO v_last
      FROM workflow_events ev WHERE ev.execution_id = v_exec.id ORDER BY ev.id DESC LIMIT 1;
    CONTINUE WHEN NOT FOUND;
    DELETE FROM workflow_events ev WHERE ev.execution_id = v_exec.id;
    GET DIAGNOSTICS v_n = ROW_COUNT;
    INSERT INTO lifecycle_audit_checkpoints (execution_id, last_event_id, last_hash, events_pruned, cutoff)
    VALUES (v_exec.id, v_last.id, v_last.hash, v_n, p_before);
    v_execs := v_execs + 1;
    v_events := v_events + v_n;
  END LOOP;

  -- the global stream: its prefix older than the cutoff
  PERFORM pg_advisory_xact_lock(lifecycle_audit_stream_key(NULL));
  SELECT min(ev.id) INTO v_stop FROM workflow_events ev
   WHERE ev.execution_id IS NULL AND ev."timestamp" >= p_before;
  SELECT ev.id, ev.hash INTO v_last
    FROM workflow_events ev
   WHERE ev.execution_id IS NULL AND (v_stop IS NULL OR ev.id < v_stop)
   ORDER BY ev.id DESC LIMIT 1;
  IF FOUND THEN
    DELETE FROM workflow_events ev WHERE ev.execution_id IS NULL AND ev.id <= v_last.id;
    GET DIAGNOSTICS v_global = ROW_COUNT;
    INSERT INTO lifecycle_audit_checkpoints (execution_id, last_event_id, last_hash, events_pruned, cutoff)
    VALUES (NULL, v_last.id, v_last.hash, v_global, p_before);
  END IF;

  PERFORM set_config('lifecycle.audit_retention', 'off', true);

  IF v_execs > 0 OR v_global > 0 THEN
    INSERT INTO workflow_events (execution_id, event_type, metadata)
    VALUES (NULL, 'audit_pruned', jsonb_build_object(
      'before', to_char(p_before AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'), 'executions', v_execs, 'events', v_events, 'global_events', v_global));
  END IF;
  RETURN QUERY SELECT v_execs, v_events, v_global;
END
$$;

COMMENT ON FUNCTION lifecycle_audit_prune(timestamptz, integer) IS
  'Audit retention: delete whole finished streams (completed, rolled_back, compensation_failed) whose '
  'events are all older than p_before (at most p_max_streams per call) and the global stream''s prefix '
  'older than p_before; checkpoints keep the chains verifiable. Returns (executions, events, global_events).';

-- ---------------------------------------------------------------------------------------------
-- "latest N events" (the feed's order); the feed of one execution uses (execution_id, id).
CREATE INDEX workflow_events_timestamp_idx ON workflow_events ("timestamp" DESC, id DESC);

-- The runbook's section 5 view, fixed: ONE row per event of an execution (the runbook joined
-- every stage log with every event: logs × events rows), the stage fields from that event's own
-- stage log (execution_id AND stage_id), newest first.
CREATE OR REPLACE VIEW workflow_audit_feed AS
SELECT
  we.id AS execution_id,
  wd.name AS workflow_name,
  wd.version,
  e.stage_id,
  wel.status AS stage_status,
  wel.attempt_number,
  wel.started_at,
  wel.completed_at,
  wel.error_message,
  we.status AS workflow_status,
  we.circuit_breaker_state,
  we.context,
  e.event_type,
  e.metadata,
  e."timestamp" AS event_timestamp
FROM workflow_events e
JOIN workflow_executions we ON we.id = e.execution_id
JOIN workflow_definitions wd ON wd.id = we.workflow_definition_id
LEFT JOIN workflow_execution_logs wel ON wel.execution_id = e.execution_id AND wel.stage_id = e.stage_id
ORDER BY e."timestamp" DESC, e.id DESC;
