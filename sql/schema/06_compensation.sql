-- Compensation (sagas): undo completed stages in reverse order; artifacts to void.

-- lifecycle.compensation_due
CREATE OR REPLACE FUNCTION lifecycle.compensation_due() RETURNS TABLE(execution_id uuid, reason text)
    LANGUAGE sql STABLE
    AS $$
  SELECT e.id, coalesce(e.error_message, e.status)
  FROM public.workflow_executions e JOIN public.workflow_definitions d ON d.id = e.workflow_definition_id
  WHERE e.status = 'failed' AND coalesce(d.dag_schema ->> 'on_failure', 'compensate') = 'compensate'
  UNION ALL
  SELECT e.id, coalesce(e.error_message, 'cancelled')
  FROM public.workflow_executions e
  WHERE e.status = 'cancelled'
    AND coalesce((SELECT (ev.metadata ->> 'compensate')::boolean FROM public.workflow_events ev
                  WHERE ev.execution_id = e.id AND ev.event_type = 'workflow_cancelled'
                  ORDER BY ev.id DESC LIMIT 1), true)
$$;

REVOKE ALL ON FUNCTION lifecycle.compensation_due() FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.compensation_due() TO service_role;


-- lifecycle.undo_complete
CREATE OR REPLACE FUNCTION lifecycle.undo_complete(p_log_id uuid, p_void jsonb DEFAULT '[]'::jsonb, p_result jsonb DEFAULT '{}'::jsonb, p_attempt integer DEFAULT 1, p_now timestamp with time zone DEFAULT now()) RETURNS text
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_exec   public.workflow_executions;
  v_log    public.workflow_execution_logs;
  v_voided integer;
  v_done   jsonb;
BEGIN
  -- GUARD: p_void shape
  IF jsonb_typeof(coalesce(p_void, '[]'::jsonb)) <> 'array' THEN
    RAISE EXCEPTION 'p_void must be an array of {"kind", "key"}' USING ERRCODE = 'invalid_parameter_value';
  END IF;

  -- LOCK: execution, then stage log
  SELECT e.* INTO v_exec FROM public.workflow_executions e
   WHERE e.id = (SELECT l.execution_id FROM public.workflow_execution_logs l WHERE l.id = p_log_id) FOR UPDATE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'unknown stage log %', p_log_id USING ERRCODE = 'no_data_found';
  END IF;
  SELECT * INTO v_log FROM public.workflow_execution_logs l WHERE l.id = p_log_id FOR UPDATE;
  IF v_exec.status <> 'compensating' OR v_log.status <> 'completed' THEN
    RAISE EXCEPTION 'stage % of execution % is % (execution %): its compensation cannot complete',
      v_log.stage_id, v_log.execution_id, v_log.status, v_exec.status
      USING ERRCODE = 'object_not_in_prerequisite_state';
  END IF;

  -- TRANSITION: artifacts, log
  UPDATE lifecycle.artifacts a
     SET voided_at = p_now, voided_reason = format('compensation of stage %s', v_log.stage_id)
   WHERE a.execution_id = v_log.execution_id AND a.stage_id = v_log.stage_id AND a.voided_at IS NULL
     AND EXISTS (SELECT 1 FROM jsonb_array_elements(coalesce(p_void, '[]'::jsonb)) v
                 WHERE v ->> 'kind' = a.kind AND v ->> 'key' = a.key);
  GET DIAGNOSTICS v_voided = ROW_COUNT;
  UPDATE public.workflow_execution_logs l SET status = 'compensated' WHERE l.id = p_log_id;
  INSERT INTO public.workflow_events (execution_id, event_type, stage_id, metadata, "timestamp")
  VALUES (v_log.execution_id, 'stage_compensated', v_log.stage_id,
          jsonb_build_object('attempt', p_attempt, 'voided', v_voided,
                             'summary', p_result ->> 'summary', 'undo', p_result ->> 'undo'),
          p_now);

  -- TRANSITION: execution rolled back once nothing is left
  IF cardinality(lifecycle.compensation_stages(v_exec.id)) = 0 THEN
    SELECT coalesce(jsonb_agg(l.stage_id ORDER BY ev.id), '[]'::jsonb) INTO v_done
    FROM public.workflow_events ev JOIN public.workflow_execution_logs l
      ON l.execution_id = ev.execution_id AND l.stage_id = ev.stage_id
    WHERE ev.execution_id = v_exec.id AND ev.event_type = 'stage_compensated';
    UPDATE public.workflow_executions e SET status = 'rolled_back', updated_at = p_now WHERE e.id = v_exec.id;
    INSERT INTO public.workflow_events (execution_id, event_type, stage_id, metadata, "timestamp")
    VALUES (v_exec.id, 'workflow_rolled_back', 'compensation',
            jsonb_build_object('reason', v_exec.error_message, 'compensated', v_done), p_now);
    RETURN 'rolled_back';
  END IF;
  RETURN 'compensating';
END
$$;

REVOKE ALL ON FUNCTION lifecycle.undo_complete(p_log_id uuid, p_void jsonb, p_result jsonb, p_attempt integer, p_now timestamp with time zone) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.undo_complete(p_log_id uuid, p_void jsonb, p_result jsonb, p_attempt integer, p_now timestamp with time zone) TO service_role;


-- lifecycle.undo_fail
CREATE OR REPLACE FUNCTION lifecycle.undo_fail(p_log_id uuid, p_error text, p_final boolean, p_attempt integer DEFAULT 1, p_delay_s double precision DEFAULT NULL::double precision, p_now timestamp with time zone DEFAULT now()) RETURNS text
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_exec public.workflow_executions;
  v_log  public.workflow_execution_logs;
  v_msg  text := coalesce(nullif(p_error, ''), 'compensation failed');
BEGIN
  -- GUARD: arguments (the next attempt is counted in bigint: no attempt number overflows)
  IF p_attempt IS NULL OR p_attempt < 1 THEN
    RAISE EXCEPTION 'attempt must be >= 1, got %', p_attempt USING ERRCODE = 'invalid_parameter_value';
  END IF;
  -- LOCK: execution, then stage log
  SELECT e.* INTO v_exec FROM public.workflow_executions e
   WHERE e.id = (SELECT l.execution_id FROM public.workflow_execution_logs l WHERE l.id = p_log_id) FOR UPDATE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'unknown stage log %', p_log_id USING ERRCODE = 'no_data_found';
  END IF;
  SELECT * INTO v_log FROM public.workflow_execution_logs l WHERE l.id = p_log_id FOR UPDATE;
  IF v_exec.status <> 'compensating' OR v_log.status <> 'completed' THEN
    RAISE EXCEPTION 'stage % of execution % is % (execution %): no compensation to fail',
      v_log.stage_id, v_log.execution_id, v_log.status, v_exec.status
      USING ERRCODE = 'object_not_in_prerequisite_state';
  END IF;

  IF NOT p_final THEN
    INSERT INTO public.workflow_events (execution_id, event_type, stage_id, metadata, "timestamp")
    VALUES (v_log.execution_id, 'stage_compensation_retrying', v_log.stage_id,
            jsonb_build_object('attempt', p_attempt::bigint + 1, 'failed_attempt', p_attempt, 'delay_s', p_delay_s,
                               'error', v_msg), p_now);
    RETURN 'compensating';
  END IF;

  UPDATE public.workflow_execution_logs l SET status = 'compensation_failed', error_message = v_msg WHERE l.id = p_log_id;
  UPDATE public.workflow_executions e
     SET status = 'compensation_failed', updated_at = p_now,
         error_message = format('compensation of stage %s failed: %s', v_log.stage_id, v_msg)
   WHERE e.id = v_exec.id;
  INSERT INTO public.workflow_events (execution_id, event_type, stage_id, metadata, "timestamp")
  VALUES (v_log.execution_id, 'stage_compensation_failed', v_log.stage_id,
          jsonb_build_object('attempt', p_attempt, 'error', v_msg), p_now),
         (v_log.execution_id, 'workflow_compensation_failed', v_log.stage_id,
          jsonb_build_object('stage', v_log.stage_id, 'error', v_msg), p_now);
  RETURN 'compensation_failed';
END
$$;

REVOKE ALL ON FUNCTION lifecycle.undo_fail(p_log_id uuid, p_error text, p_final boolean, p_attempt integer, p_delay_s double precision, p_now timestamp with time zone) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.undo_fail(p_log_id uuid, p_error text, p_final boolean, p_attempt integer, p_delay_s double precision, p_now timestamp with time zone) TO service_role;


-- lifecycle.stage_compensable
CREATE OR REPLACE FUNCTION lifecycle.stage_compensable(p_definition_id uuid, p_stage_id text) RETURNS boolean
    LANGUAGE sql STABLE
    AS $$
  SELECT coalesce((
    -- an approval stage has nothing to undo
    SELECT NOT (s ? 'compensate' AND s -> 'compensate' = 'false'::jsonb) AND s ->> 'kind' IS DISTINCT FROM 'approval'
    FROM public.workflow_definitions d, jsonb_array_elements(d.dag_schema -> 'stages') s
    WHERE d.id = p_definition_id AND s ->> 'id' = p_stage_id), false)
$$;

REVOKE ALL ON FUNCTION lifecycle.stage_compensable(p_definition_id uuid, p_stage_id text) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.stage_compensable(p_definition_id uuid, p_stage_id text) TO service_role;


-- lifecycle.compensation_stages
CREATE OR REPLACE FUNCTION lifecycle.compensation_stages(p_execution_id uuid) RETURNS text[]
    LANGUAGE sql STABLE
    AS $$
  SELECT coalesce(array_agg(l.stage_id ORDER BY l.stage_id), '{}')
  FROM (SELECT jsonb_object_agg(s ->> 'id', NOT (s ? 'compensate' AND s -> 'compensate' = 'false'::jsonb)
                                            AND s ->> 'kind' IS DISTINCT FROM 'approval') AS m
        FROM public.workflow_executions e
        JOIN public.workflow_definitions d ON d.id = e.workflow_definition_id,
             jsonb_array_elements(CASE WHEN jsonb_typeof(d.dag_schema -> 'stages') = 'array'
                                       THEN d.dag_schema -> 'stages' END) s
        WHERE e.id = p_execution_id AND s ->> 'id' IS NOT NULL) c,
       public.workflow_execution_logs l
  WHERE l.execution_id = p_execution_id AND l.status = 'completed'
    AND c.m -> l.stage_id = 'true'::jsonb
$$;

REVOKE ALL ON FUNCTION lifecycle.compensation_stages(p_execution_id uuid) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.compensation_stages(p_execution_id uuid) TO service_role;


-- lifecycle.undo_start
CREATE OR REPLACE FUNCTION lifecycle.undo_start(p_execution_id uuid, p_stage_id text, p_run_id text, p_dependents text[] DEFAULT '{}'::text[], p_attempt integer DEFAULT 1, p_takeover boolean DEFAULT false, p_now timestamp with time zone DEFAULT now()) RETURNS TABLE(action text, log_id uuid, output_data jsonb, context jsonb, agent_name text)
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_exec    public.workflow_executions;
  v_log     public.workflow_execution_logs;
  v_blocked text;
  v_agent   text;
  v_pending text[];
BEGIN
  -- LOCK: execution
  SELECT * INTO v_exec FROM public.workflow_executions e WHERE e.id = p_execution_id FOR UPDATE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'unknown workflow execution %', p_execution_id USING ERRCODE = 'no_data_found';
  END IF;
  IF v_exec.status = 'rolled_back' THEN
    RETURN QUERY SELECT 'done'::text, NULL::uuid, NULL::jsonb, NULL::jsonb, NULL::text;
    RETURN;
  END IF;
  IF v_exec.status <> 'compensating' THEN
    RAISE EXCEPTION 'execution % is %, not compensating: stage % is not compensated', p_execution_id,
      v_exec.status, p_stage_id USING ERRCODE = 'object_not_in_prerequisite_state';
  END IF;

  -- GUARD: one compensation run at a time
  IF v_exec.compensation_run_id IS NULL OR p_takeover THEN
    UPDATE public.workflow_executions e SET compensation_run_id = p_run_id WHERE e.id = p_execution_id;
  ELSIF v_exec.compensation_run_id <> p_run_id THEN
    RAISE EXCEPTION 'execution % is being compensated by Dagster run %', p_execution_id, v_exec.compensation_run_id
      USING ERRCODE = 'lock_not_available';
  END IF;

  SELECT * INTO v_log FROM public.workflow_execution_logs l
   WHERE l.execution_id = p_execution_id AND l.stage_id = p_stage_id FOR UPDATE;
  IF NOT FOUND OR v_log.status IN ('pending', 'in_progress', 'failed', 'skipped')
     OR NOT lifecycle.stage_compensable(v_exec.workflow_definition_id, p_stage_id) THEN
    RETURN QUERY SELECT 'skip'::text, v_log.id, NULL::jsonb, NULL::jsonb, NULL::text;
    RETURN;
  END IF;
  IF v_log.status = 'compensated' THEN
    RETURN QUERY SELECT 'done'::text, v_log.id, v_log.output_data, NULL::jsonb, NULL::text;
    RETURN;
  END IF;
  IF v_log.status <> 'completed' THEN  -- compensation_failed
    RAISE EXCEPTION 'stage % of execution % is %', p_stage_id, p_execution_id, v_log.status
      USING ERRCODE = 'object_not_in_prerequisite_state';
  END IF;

  -- GUARD: strict reverse topological order (the stages still to compensate, computed once)
  v_pending := lifecycle.compensation_stages(p_execution_id);
  SELECT string_agg(d, ', ' ORDER BY d) INTO v_blocked
  FROM unnest(coalesce(p_dependents, '{}')) d
  WHERE d IN (SELECT p FROM unnest(v_pending) p);
  IF v_blocked IS NOT NULL THEN
    RAISE EXCEPTION 'stage % of execution % cannot be compensated before its dependents %',
      p_stage_id, p_execution_id, v_blocked USING ERRCODE = 'object_not_in_prerequisite_state';
  END IF;

  SELECT a.name INTO v_agent
  FROM public.task_queue t JOIN public.agents a ON a.id = t.agent_id
  WHERE t.stage_log_id = v_log.id AND t.status = 'completed'
  ORDER BY t.attempt DESC LIMIT 1;

  INSERT INTO public.workflow_events (execution_id, event_type, stage_id, metadata, "timestamp")
  VALUES (p_execution_id, 'stage_compensating', p_stage_id,
          jsonb_build_object('attempt', p_attempt, 'dagster_run_id', p_run_id, 'agent', v_agent), p_now);
  RETURN QUERY SELECT 'compensate'::text, v_log.id, v_log.output_data, v_exec.context, v_agent;
END
$$;

REVOKE ALL ON FUNCTION lifecycle.undo_start(p_execution_id uuid, p_stage_id text, p_run_id text, p_dependents text[], p_attempt integer, p_takeover boolean, p_now timestamp with time zone) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.undo_start(p_execution_id uuid, p_stage_id text, p_run_id text, p_dependents text[], p_attempt integer, p_takeover boolean, p_now timestamp with time zone) TO service_role;


-- lifecycle.artifacts_store
CREATE OR REPLACE FUNCTION lifecycle.artifacts_store() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_items jsonb := NEW.output_data -> 'artifacts';
BEGIN
  IF v_items IS NULL OR jsonb_typeof(v_items) = 'null' THEN
    RETURN NEW;
  END IF;
  -- GUARD: shape
  IF jsonb_typeof(v_items) <> 'array' OR EXISTS (
       SELECT 1 FROM jsonb_array_elements(v_items) a
       WHERE jsonb_typeof(a) <> 'object' OR jsonb_typeof(a -> 'kind') IS DISTINCT FROM 'string'
          OR jsonb_typeof(a -> 'key') IS DISTINCT FROM 'string') THEN
    RAISE EXCEPTION 'stage %: output.artifacts must be an array of {"kind": string, "key": string, "data": ...}',
      NEW.stage_id USING ERRCODE = 'invalid_parameter_value';
  END IF;
  INSERT INTO lifecycle.artifacts (execution_id, stage_id, kind, key, data, created_at)
  SELECT NEW.execution_id, NEW.stage_id, a ->> 'kind', a ->> 'key', coalesce(a -> 'data', '{}'::jsonb),
         coalesce(NEW.completed_at, now())
  FROM jsonb_array_elements(v_items) a
  ON CONFLICT ON CONSTRAINT lifecycle_artifacts_one_per_key DO NOTHING;
  RETURN NEW;
END
$$;

REVOKE ALL ON FUNCTION lifecycle.artifacts_store() FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.artifacts_store() TO service_role;


-- lifecycle.compensation_start
CREATE OR REPLACE FUNCTION lifecycle.compensation_start(p_execution_id uuid, p_reason text, p_now timestamp with time zone DEFAULT now()) RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_exec    public.workflow_executions;
  v_pending text[];
  v_reason  text := coalesce(nullif(p_reason, ''), 'compensation requested');
BEGIN
  -- LOCK: execution
  SELECT * INTO v_exec FROM public.workflow_executions e WHERE e.id = p_execution_id FOR UPDATE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'perform_workflow_compensation: unknown workflow execution %', p_execution_id
      USING ERRCODE = 'no_data_found';
  END IF;

  -- GUARD: idempotence and final states
  IF v_exec.status IN ('compensating', 'rolled_back', 'compensation_failed') THEN
    RETURN;
  END IF;
  IF v_exec.status = 'completed' THEN
    RAISE EXCEPTION 'perform_workflow_compensation: execution % completed; a completed execution is final',
      p_execution_id USING ERRCODE = 'object_not_in_prerequisite_state';
  END IF;

  -- TRANSITION: to a state compensation may start from
  IF v_exec.status = 'pending' THEN
    UPDATE public.workflow_executions e SET status = 'cancelled', error_message = v_reason, updated_at = p_now
     WHERE e.id = p_execution_id;
    INSERT INTO public.workflow_events (execution_id, event_type, metadata, "timestamp")
    VALUES (p_execution_id, 'workflow_cancelled',
            jsonb_build_object('reason', v_reason, 'previous_status', 'pending', 'compensate', true), p_now);
  ELSIF v_exec.status IN ('in_progress', 'waiting') THEN
    UPDATE public.workflow_executions e SET status = 'failed', error_message = v_reason, updated_at = p_now
     WHERE e.id = p_execution_id;
    INSERT INTO public.workflow_events (execution_id, event_type, metadata, "timestamp")
    VALUES (p_execution_id, 'workflow_failed', jsonb_build_object('error', v_reason, 'error_code', 'compensation_requested'), p_now);
  END IF;

  UPDATE public.workflow_execution_logs l
     SET status = 'skipped', completed_at = p_now, error_message = coalesce(l.error_message, v_reason)
   WHERE l.execution_id = p_execution_id AND l.status IN ('pending', 'in_progress', 'waiting');
  UPDATE public.task_queue t
     SET status = 'cancelled', completed_at = p_now, updated_at = p_now
   WHERE t.workflow_execution_id = p_execution_id AND t.status IN ('pending', 'in_progress');

  UPDATE public.workflow_executions e
     SET status = 'compensating', updated_at = p_now,
         error_message = coalesce(e.error_message, v_reason)
   WHERE e.id = p_execution_id;
  v_pending := lifecycle.compensation_stages(p_execution_id);
  INSERT INTO public.workflow_events (execution_id, event_type, stage_id, metadata, "timestamp")
  VALUES (p_execution_id, 'workflow_compensating', 'compensation',
          jsonb_build_object('reason', v_reason, 'stages', to_jsonb(v_pending)), p_now);

  IF cardinality(v_pending) = 0 THEN
    UPDATE public.workflow_executions e SET status = 'rolled_back', updated_at = p_now WHERE e.id = p_execution_id;
    INSERT INTO public.workflow_events (execution_id, event_type, stage_id, metadata, "timestamp")
    VALUES (p_execution_id, 'workflow_rolled_back', 'compensation',
            jsonb_build_object('reason', v_reason, 'compensated', '[]'::jsonb), p_now);
  END IF;
END
$$;

REVOKE ALL ON FUNCTION lifecycle.compensation_start(p_execution_id uuid, p_reason text, p_now timestamp with time zone) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.compensation_start(p_execution_id uuid, p_reason text, p_now timestamp with time zone) TO service_role;


-- trigger workflow_execution_logs workflow_execution_logs_artifacts
CREATE OR REPLACE TRIGGER workflow_execution_logs_artifacts AFTER INSERT OR UPDATE OF status ON public.workflow_execution_logs FOR EACH ROW WHEN ((new.status = 'completed'::text)) EXECUTE FUNCTION lifecycle.artifacts_store();
