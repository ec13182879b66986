-- The audit feed: append-only, hash-chained workflow_events (one chain per execution).

-- lifecycle.audit_canonical_event
CREATE OR REPLACE FUNCTION lifecycle.audit_canonical_event(p_id bigint, p_execution_id uuid, p_event_type text, p_stage_id text, p_metadata jsonb, p_timestamp timestamp with time zone) RETURNS text
    LANGUAGE sql STABLE PARALLEL SAFE
    AS $$
  SELECT '{"event_type":' || coalesce(to_json(p_event_type)::text, 'null')
      || ',"execution_id":' || coalesce(to_json(p_execution_id::text)::text, 'null')
      || ',"id":' || coalesce(p_id::text, 'null')
      || ',"metadata":' || coalesce(lifecycle.canonical_json(p_metadata), 'null')
      || ',"stage_id":' || coalesce(to_json(p_stage_id)::text, 'null')
      || ',"timestamp":' || coalesce(
           to_json(to_char(p_timestamp AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'))::text, 'null')
      || '}'
$$;

REVOKE ALL ON FUNCTION lifecycle.audit_canonical_event(p_id bigint, p_execution_id uuid, p_event_type text, p_stage_id text, p_metadata jsonb, p_timestamp timestamp with time zone) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.audit_canonical_event(p_id bigint, p_execution_id uuid, p_event_type text, p_stage_id text, p_metadata jsonb, p_timestamp timestamp with time zone) TO service_role;


-- lifecycle.audit_chain
CREATE OR REPLACE FUNCTION lifecycle.audit_chain() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
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
  PERFORM pg_advisory_xact_lock(lifecycle.audit_stream_key(NEW.execution_id));

  -- the head, as committed now (READ COMMITTED: this statement takes a fresh snapshot)
  IF NEW.execution_id IS NULL THEN
    SELECT ev.id, ev.hash INTO v_head_id, v_head_hash
      FROM public.workflow_events ev WHERE ev.execution_id IS NULL ORDER BY ev.id DESC LIMIT 1;
  ELSE
    SELECT ev.id, ev.hash INTO v_head_id, v_head_hash
      FROM public.workflow_events ev WHERE ev.execution_id = NEW.execution_id ORDER BY ev.id DESC LIMIT 1;
  END IF;
  v_found := FOUND;
  IF NOT v_found THEN
    IF NEW.execution_id IS NULL THEN
      SELECT c.last_event_id, c.last_hash INTO v_head_id, v_head_hash
        FROM lifecycle.audit_checkpoints c WHERE c.execution_id IS NULL ORDER BY c.id DESC LIMIT 1;
    ELSE
      SELECT c.last_event_id, c.last_hash INTO v_head_id, v_head_hash
        FROM lifecycle.audit_checkpoints c WHERE c.execution_id = NEW.execution_id ORDER BY c.id DESC LIMIT 1;
    END IF;
  END IF;

  -- identity values are drawn before this trigger waits for the lock: an inserter that drew a
  -- smaller id may come second. Keep id order = chain order by drawing a new one then.
  IF v_head_id IS NOT NULL AND NEW.id <= v_head_id THEN
    NEW.id := nextval(pg_get_serial_sequence('public.workflow_events', 'id'));
  END IF;

  NEW.prev_hash := coalesce(v_head_hash, lifecycle.audit_genesis());
  NEW.hash := lifecycle.audit_hash(
    NEW.prev_hash,
    lifecycle.audit_canonical_event(NEW.id, NEW.execution_id, NEW.event_type, NEW.stage_id, NEW.metadata,
                                    NEW."timestamp"));
  -- the stream's head, kept where a DELETE on workflow_events cannot reach: `audit verify` compares
  -- it with the newest stored event (a stream, or its tail, removed outside audit_prune)
  INSERT INTO lifecycle.audit_heads AS h (stream, execution_id, last_event_id, last_hash, updated_at)
  VALUES (coalesce(NEW.execution_id::text, 'global'), NEW.execution_id, NEW.id, NEW.hash, now())
  ON CONFLICT (stream) DO UPDATE
    SET last_event_id = EXCLUDED.last_event_id, last_hash = EXCLUDED.last_hash, updated_at = EXCLUDED.updated_at;
  RETURN NEW;
END
$$;

REVOKE ALL ON FUNCTION lifecycle.audit_chain() FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.audit_chain() TO service_role;


-- lifecycle.audit_genesis
CREATE OR REPLACE FUNCTION lifecycle.audit_genesis() RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$ SELECT repeat('0', 64) $$;

REVOKE ALL ON FUNCTION lifecycle.audit_genesis() FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.audit_genesis() TO service_role;


-- lifecycle.audit_guard
CREATE OR REPLACE FUNCTION lifecycle.audit_guard() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
BEGIN
  -- retention: only inside lifecycle.audit_prune, which marks its transaction in a table no role
  -- but the owner can write (a setting, which any role can change, would not do)
  IF TG_OP = 'DELETE' AND TG_TABLE_NAME = 'workflow_events'
     AND EXISTS (SELECT 1 FROM lifecycle.audit_retention_marks m WHERE m.txid = pg_current_xact_id()) THEN
    IF OLD.execution_id IS NOT NULL AND NOT EXISTS (
         SELECT 1 FROM public.workflow_executions e
          WHERE e.id = OLD.execution_id AND e.status IN ('completed', 'rolled_back', 'compensation_failed')) THEN
      RAISE EXCEPTION 'audit retention: event % belongs to execution %, which is not finished',
        OLD.id, OLD.execution_id
        USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN OLD;
  END IF;
  RAISE EXCEPTION '% is append-only: % refused (old rows are removed only by lifecycle.audit_prune(before))',
    CASE WHEN TG_TABLE_SCHEMA = 'public' THEN TG_TABLE_NAME ELSE TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME END, TG_OP
    USING ERRCODE = 'insufficient_privilege',
          HINT = 'events are never changed; record a new event instead';
END
$$;

REVOKE ALL ON FUNCTION lifecycle.audit_guard() FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.audit_guard() TO service_role;


-- lifecycle.audit_hash
-- plpgsql, not sql: its one RETURN is a simple expression that the trigger evaluates without a
-- statement of its own (a sql function here runs as a nested query per event)
CREATE OR REPLACE FUNCTION lifecycle.audit_hash(p_prev_hash text, p_canonical text) RETURNS text
    LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE
    AS $$
BEGIN
  RETURN encode(sha256(convert_to(p_prev_hash || E'\n' || p_canonical, 'UTF8')), 'hex');
END
$$;

REVOKE ALL ON FUNCTION lifecycle.audit_hash(p_prev_hash text, p_canonical text) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.audit_hash(p_prev_hash text, p_canonical text) TO service_role;


-- lifecycle.audit_prune
CREATE OR REPLACE FUNCTION lifecycle.audit_prune(p_before timestamp with time zone, p_max_streams integer DEFAULT 1000) RETURNS TABLE(executions integer, events bigint, global_events bigint)
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
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
    RAISE EXCEPTION 'lifecycle.audit_prune: p_before must be a finite timestamp, got %', coalesce(p_before::text, 'NULL')
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF p_max_streams IS NULL OR p_max_streams < 1 THEN
    RAISE EXCEPTION 'lifecycle.audit_prune: p_max_streams must be >= 1, got %', coalesce(p_max_streams::text, 'NULL')
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF current_setting('transaction_isolation') <> 'read committed' THEN
    RAISE EXCEPTION 'lifecycle.audit_prune must run in a READ COMMITTED transaction, not %',
      upper(current_setting('transaction_isolation'))
      USING ERRCODE = 'invalid_transaction_state';
  END IF;
  -- executions: locked (the engine locks the execution row before writing its events), then
  -- their stream (lifecycle.audit_prune_stream re-checks both under the locks)
  FOR v_exec IN
    SELECT e.id FROM public.workflow_executions e
     WHERE e.status IN ('completed', 'rolled_back', 'compensation_failed')
       AND EXISTS (SELECT 1 FROM public.workflow_events ev WHERE ev.execution_id = e.id)
       AND NOT EXISTS (SELECT 1 FROM public.workflow_events ev WHERE ev.execution_id = e.id AND ev."timestamp" >= p_before)
     ORDER BY e.id
     LIMIT p_max_streams
     FOR UPDATE OF e SKIP LOCKED
  LOOP
    v_n := lifecycle.audit_prune_stream(v_exec.id, p_before);
    CONTINUE WHEN coalesce(v_n, 0) = 0;
    v_execs := v_execs + 1;
    v_events := v_events + v_n;
  END LOOP;

  -- the global stream: its prefix older than the cutoff
  PERFORM pg_advisory_xact_lock(lifecycle.audit_stream_key(NULL));
  SELECT min(ev.id) INTO v_stop FROM public.workflow_events ev
   WHERE ev.execution_id IS NULL AND ev."timestamp" >= p_before;
  SELECT ev.id, ev.hash INTO v_last
    FROM public.workflow_events ev
   WHERE ev.execution_id IS NULL AND (v_stop IS NULL OR ev.id < v_stop)
   ORDER BY ev.id DESC LIMIT 1;
  IF FOUND THEN
    INSERT INTO lifecycle.audit_retention_marks (txid) VALUES (pg_current_xact_id()) ON CONFLICT DO NOTHING;
    DELETE FROM public.workflow_events ev WHERE ev.execution_id IS NULL AND ev.id <= v_last.id;
    GET DIAGNOSTICS v_global = ROW_COUNT;
    INSERT INTO lifecycle.audit_checkpoints (execution_id, last_event_id, last_hash, events_pruned, cutoff)
    VALUES (NULL, v_last.id, v_last.hash, v_global, p_before);
    DELETE FROM lifecycle.audit_retention_marks m WHERE m.txid = pg_current_xact_id();
  END IF;

  IF v_execs > 0 OR v_global > 0 THEN
    INSERT INTO public.workflow_events (execution_id, event_type, metadata)
    VALUES (NULL, 'audit_pruned', jsonb_build_object(
      'before', to_char(p_before AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'), 'executions', v_execs, 'events', v_events, 'global_events', v_global));
  END IF;
  RETURN QUERY SELECT v_execs, v_events, v_global;
END
$$;

COMMENT ON FUNCTION lifecycle.audit_prune(p_before timestamp with time zone, p_max_streams integer) IS 'Audit retention: delete whole finished streams (completed, rolled_back, compensation_failed) whose events are all older than p_before (at most p_max_streams per call) and the global stream''s prefix older than p_before; checkpoints keep the chains verifiable. Returns (executions, events, global_events).';

REVOKE ALL ON FUNCTION lifecycle.audit_prune(p_before timestamp with time zone, p_max_streams integer) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.audit_prune(p_before timestamp with time zone, p_max_streams integer) TO service_role;


-- lifecycle.audit_prune_stream
-- One execution's whole stream, when the execution is finished and every event of it is older than
-- p_before: deleted, with a checkpoint (its newest event's id and hash) from which the chain and
-- `audit verify` continue. Returns the events deleted (0: the stream has none), or NULL when the
-- stream must stay (the execution is unknown or unfinished, or an event is not older than p_before).
-- Used by audit_prune and executions_prune (sql/schema/15_retention.sql).
CREATE OR REPLACE FUNCTION lifecycle.audit_prune_stream(p_execution_id uuid, p_before timestamp with time zone) RETURNS bigint
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_last record;
  v_n    bigint;
BEGIN
  IF current_setting('transaction_isolation') <> 'read committed' THEN
    RAISE EXCEPTION 'lifecycle.audit_prune_stream must run in a READ COMMITTED transaction, not %',
      upper(current_setting('transaction_isolation'))
      USING ERRCODE = 'invalid_transaction_state';
  END IF;
  -- LOCK: the execution row (the engine locks it before writing its events), then its stream
  PERFORM 1 FROM public.workflow_executions e
   WHERE e.id = p_execution_id AND e.status IN ('completed', 'rolled_back', 'compensation_failed')
   FOR UPDATE;
  IF NOT FOUND THEN
    RETURN NULL;
  END IF;
  PERFORM pg_advisory_xact_lock(lifecycle.audit_stream_key(p_execution_id));
  IF EXISTS (SELECT 1 FROM public.workflow_events ev
              WHERE ev.execution_id = p_execution_id AND ev."timestamp" >= p_before) THEN
    RETURN NULL;
  END IF;
  SELECT ev.id, ev.hash INTO v_last
    FROM public.workflow_events ev WHERE ev.execution_id = p_execution_id ORDER BY ev.id DESC LIMIT 1;
  IF NOT FOUND THEN
    RETURN 0;
  END IF;
  INSERT INTO lifecycle.audit_retention_marks (txid) VALUES (pg_current_xact_id()) ON CONFLICT DO NOTHING;
  DELETE FROM public.workflow_events ev WHERE ev.execution_id = p_execution_id;
  GET DIAGNOSTICS v_n = ROW_COUNT;
  DELETE FROM lifecycle.audit_retention_marks m WHERE m.txid = pg_current_xact_id();
  INSERT INTO lifecycle.audit_checkpoints (execution_id, last_event_id, last_hash, events_pruned, cutoff)
  VALUES (p_execution_id, v_last.id, v_last.hash, v_n, p_before);
  RETURN v_n;
END
$$;

REVOKE ALL ON FUNCTION lifecycle.audit_prune_stream(p_execution_id uuid, p_before timestamp with time zone) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.audit_prune_stream(p_execution_id uuid, p_before timestamp with time zone) TO service_role;


-- lifecycle.stage_log_event
-- A stage log inserted, or its status changed, outside the engine (by hand, as the runbook's section
-- 8 does, or by a function of the user's) records the event the engine would have: stage status
-- changes by anyone are in the audit feed. A change made inside one of the engine's functions
-- (lifecycle.*: each writes its own events, with more detail) is skipped; the call stack
-- (PG_CONTEXT) says which, so no engine function needs to mark its transaction.
CREATE OR REPLACE FUNCTION lifecycle.stage_log_event() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_stack text;
  v_previous text;
BEGIN
  v_previous := CASE WHEN TG_OP = 'UPDATE' THEN OLD.status END;
  IF v_previous IS NOT DISTINCT FROM NEW.status THEN
    RETURN NULL;
  END IF;
  GET DIAGNOSTICS v_stack = PG_CONTEXT;
  IF v_stack ~ '(^|\n)PL/pgSQL function lifecycle\.(?!stage_log_event\()\w+\(' THEN
    RETURN NULL;  -- the engine's own change: its function wrote the event
  END IF;
  INSERT INTO public.workflow_events (execution_id, event_type, stage_id, metadata)
  VALUES (NEW.execution_id,
          CASE NEW.status
            WHEN 'in_progress' THEN 'stage_started'
            WHEN 'pending' THEN CASE WHEN v_previous IS NULL THEN 'stage_pending' ELSE 'stage_retrying' END
            ELSE 'stage_' || NEW.status
          END,
          NEW.stage_id,
          jsonb_strip_nulls(jsonb_build_object(
            'status', NEW.status, 'previous_status', v_previous, 'attempt', NEW.attempt_number,
            'error', NEW.error_message, 'recorded_by', 'stage_log_trigger', 'db_user', session_user::text)));
  RETURN NULL;
END
$$;

REVOKE ALL ON FUNCTION lifecycle.stage_log_event() FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.stage_log_event() TO service_role;


-- lifecycle.audit_stream_key
CREATE OR REPLACE FUNCTION lifecycle.audit_stream_key(p_execution_id uuid) RETURNS bigint
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$ SELECT hashtextextended(coalesce(p_execution_id::text, 'global'), 7) $$;

REVOKE ALL ON FUNCTION lifecycle.audit_stream_key(p_execution_id uuid) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.audit_stream_key(p_execution_id uuid) TO service_role;


-- lifecycle.canonical_json
CREATE OR REPLACE FUNCTION lifecycle.canonical_json(p_value jsonb) RETURNS text
    LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE
    AS $$
DECLARE
  v_out text;
BEGIN
  CASE jsonb_typeof(p_value)
    WHEN 'object' THEN
      SELECT '{' || coalesce(string_agg(to_json(m.key)::text || ':' || lifecycle.canonical_json(m.value), ','
                                        ORDER BY m.key COLLATE "C"), '') || '}'
        INTO v_out
        FROM jsonb_each(p_value) AS m(key, value);
    WHEN 'array' THEN
      SELECT '[' || coalesce(string_agg(lifecycle.canonical_json(a.value), ',' ORDER BY a.n), '') || ']'
        INTO v_out
        FROM jsonb_array_elements(p_value) WITH ORDINALITY AS a(value, n);
    ELSE
      v_out := p_value::text;  -- a scalar: jsonb prints strings escaped as to_json(text) does
  END CASE;
  RETURN v_out;
END
$$;

REVOKE ALL ON FUNCTION lifecycle.canonical_json(p_value jsonb) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.canonical_json(p_value jsonb) TO service_role;

COMMENT ON FUNCTION lifecycle.canonical_json(p_value jsonb) IS 'Canonical JSON text, form version 1: keys sorted by code point, compact separators, to_json string escaping, numbers as jsonb prints them (not RFC 8785). Mirrored by lifecycle_dagster.core.canonical.canonical_json.';


-- trigger lifecycle_audit_checkpoints lifecycle_audit_checkpoints_append_only
CREATE OR REPLACE TRIGGER lifecycle_audit_checkpoints_append_only BEFORE DELETE OR UPDATE ON lifecycle.audit_checkpoints FOR EACH ROW EXECUTE FUNCTION lifecycle.audit_guard();

-- trigger lifecycle_audit_checkpoints lifecycle_audit_checkpoints_no_truncate
CREATE OR REPLACE TRIGGER lifecycle_audit_checkpoints_no_truncate BEFORE TRUNCATE ON lifecycle.audit_checkpoints FOR EACH STATEMENT EXECUTE FUNCTION lifecycle.audit_guard();

-- trigger workflow_events workflow_events_append_only
CREATE OR REPLACE TRIGGER workflow_events_append_only BEFORE DELETE OR UPDATE ON public.workflow_events FOR EACH ROW EXECUTE FUNCTION lifecycle.audit_guard();

-- trigger workflow_events workflow_events_no_truncate
CREATE OR REPLACE TRIGGER workflow_events_no_truncate BEFORE TRUNCATE ON public.workflow_events FOR EACH STATEMENT EXECUTE FUNCTION lifecycle.audit_guard();

-- trigger workflow_events workflow_events_zz_audit_chain
CREATE OR REPLACE TRIGGER workflow_events_zz_audit_chain BEFORE INSERT ON public.workflow_events FOR EACH ROW EXECUTE FUNCTION lifecycle.audit_chain();

-- trigger workflow_execution_logs workflow_execution_logs_zz_event
CREATE OR REPLACE TRIGGER workflow_execution_logs_zz_event AFTER INSERT OR UPDATE OF status ON public.workflow_execution_logs FOR EACH ROW EXECUTE FUNCTION lifecycle.stage_log_event();
