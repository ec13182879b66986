-- 0005_compensation: saga compensation. Artifacts (the checkable effects of stages), the runbook's
-- perform_workflow_compensation fixed, per-stage compensation in strict reverse topological
-- order, execution heartbeats and the queries of the failure sensor and the reconciler.
-- Lock order as before: execution row, then stage log.

-- ---------------------------------------------------------------------------------------------
-- Artifacts: what a completed stage did. A stage output's "artifacts" array
-- ([{"kind", "key", "data"}]) is stored by a trigger in the transaction that completes the stage;
-- compensation voids exactly the ones the undo names, in the transaction that compensates it.
CREATE TABLE lifecycle_artifacts (
  id            bigint      GENERATED ALWAYS AS IDENTITY,
  execution_id  uuid        NOT NULL,
  stage_id      text        NOT NULL,
  kind          text        NOT NULL,
  key           text        NOT NULL,
  data          jsonb       NOT NULL DEFAULT '{}'::jsonb,
  created_at    timestamptz NOT NULL DEFAULT now(),
  voided_at     timestamptz,
  voided_reason text,
  CONSTRAINT lifecycle_artifacts_pkey PRIMARY KEY (id),
  CONSTRAINT lifecycle_artifacts_execution_fkey FOREIGN KEY (execution_id)
    REFERENCES workflow_executions (id) ON DELETE CASCADE,
  CONSTRAINT lifecycle_artifacts_one_per_key UNIQUE (execution_id, stage_id, kind, key),
  CONSTRAINT lifecycle_artifacts_void_has_reason CHECK ((voided_at IS NULL) = (voided_reason IS NULL))
);

CREATE INDEX lifecycle_artifacts_live_idx ON lifecycle_artifacts (execution_id, stage_id) WHERE voided_at IS NULL;

CREATE FUNCTION lifecycle_store_artifacts() RETURNS trigger
LANGUAGE plpgsql
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
  INSERT INTO lifecycle_artifacts (execution_id, stage_id, kind, key, data, created_at)
  SELECT NEW.execution_id, NEW.stage_id, a ->> 'kind', a ->> 'key', coalesce(a -> 'data', '{}'::jsonb),
         coalesce(NEW.completed_at, now())
  FROM jsonb_array_elements(v_items) a
  ON CONFLICT ON CONSTRAINT lifecycle_artifacts_one_per_key DO NOTHING;
  RETURN NEW;
END
$$;

CREATE TRIGGER workflow_execution_logs_artifacts
  AFTER INSERT OR UPDATE OF status ON workflow_execution_logs
  FOR EACH ROW WHEN (NEW.status = 'completed') EXECUTE FUNCTION lifecycle_store_artifacts();

-- ---------------------------------------------------------------------------------------------
-- Heartbeats and compensation bookkeeping on the execution row.
ALTER TABLE workflow_executions ADD COLUMN heartbeat_at timestamptz;
-- the Dagster run that owns the compensation (claimed by its first op; taken over only by a run
-- launched for that purpose once the owner finished)
ALTER TABLE workflow_executions ADD COLUMN compensation_run_id text;

-- Is this stage of the definition compensable at all (its DAG entry does not say compensate: false)?
CREATE FUNCTION lifecycle_stage_compensable(p_definition_id uuid, p_stage_id text) RETURNS boolean
LANGUAGE sql STABLE
AS $$
  SELECT coalesce((
    SELECT NOT (s ? 'compensate' AND s -> 'compensate' = 'false'::jsonb)
    FROM workflow_definitions d, jsonb_array_elements(d.dag_schema -> 'stages') s
    WHERE d.id = p_definition_id AND s ->> 'id' = p_stage_id), false)
$$;

-- Stages of an execution still waiting to be compensated: completed and compensable.
CREATE FUNCTION lifecycle_stages_to_compensate(p_execution_id uuid) RETURNS text[]
LANGUAGE sql STABLE
AS $$
  SELECT coalesce(array_agg(l.stage_id ORDER BY l.stage_id), '{}')
  FROM workflow_execution_logs l JOIN workflow_executions e ON e.id = l.execution_id
  WHERE l.execution_id = p_execution_id AND l.status = 'completed'
    AND lifecycle_stage_compensable(e.workflow_definition_id, l.stage_id)
$$;

-- Record the heartbeat of the running execution of a Dagster run (stage ops do this every few
-- seconds while they work). Returns whether a running execution was found.
CREATE FUNCTION lifecycle_heartbeat(p_run_id text, p_now timestamptz DEFAULT now()) RETURNS boolean
LANGUAGE sql
AS $$
  WITH hit AS (
    UPDATE workflow_executions SET heartbeat_at = p_now
    WHERE dagster_run_id = p_run_id AND status = 'in_progress'
    RETURNING 1
  )
  SELECT EXISTS (SELECT 1 FROM hit)
$$;

-- Fail a running execution that lost its run (the run failed or crashed, the heartbeat went
-- stale). Compare-and-set: only an in_progress execution (bound to p_run_id when given) changes;
-- its running stage logs fail, its running tasks fail. Returns whether it changed.
CREATE FUNCTION lifecycle_fail_execution(
  p_execution_id uuid,
  p_reason       text,
  p_run_id       text DEFAULT NULL,
  p_now          timestamptz DEFAULT now()
) RETURNS boolean
LANGUAGE plpgsql
AS $$
DECLARE
  v_exec workflow_executions;
BEGIN
  -- LOCK: execution
  SELECT * INTO v_exec FROM workflow_executions e WHERE e.id = p_execution_id FOR UPDATE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'unknown workflow execution %', p_execution_id USING ERRCODE = 'no_data_found';
  END IF;
  IF v_exec.status <> 'in_progress' OR (p_run_id IS NOT NULL AND v_exec.dagster_run_id IS DISTINCT FROM p_run_id) THEN
    RETURN false;
  END IF;
  UPDATE workflow_execution_logs l
     SET status = 'failed', completed_at = p_now, error_message = p_reason
   WHERE l.execution_id = p_execution_id AND l.status = 'in_progress';
  UPDATE task_queue t
     SET status = 'failed', completed_at = p_now, updated_at = p_now, error_message = p_reason
   WHERE t.workflow_execution_id = p_execution_id AND t.status = 'in_progress';
  UPDATE workflow_executions e
     SET status = 'failed', error_message = p_reason, updated_at = p_now
   WHERE e.id = p_execution_id;
  INSERT INTO workflow_events (execution_id, event_type, stage_id, metadata, "timestamp")
  VALUES (p_execution_id, 'workflow_failed', v_exec.current_stage,
          jsonb_build_object('error', p_reason, 'error_code', 'run_lost', 'dagster_run_id', v_exec.dagster_run_id),
          p_now);
  RETURN true;
END
$$;

-- ---------------------------------------------------------------------------------------------
-- The runbook's perform_workflow_compensation (section 2), callable exactly as before and fixed.
-- Idempotent: on an execution already compensating, rolled back or compensation_failed it changes
-- nothing and writes no event. Otherwise: pending -> cancelled, in_progress -> failed, then
-- compensating; pending and in_progress stage logs become skipped and open tasks cancelled;
-- workflow_compensating names the stages to undo. The execution becomes rolled_back (with
-- workflow_rolled_back, once) only when no stage is left to compensate: at once when none is,
-- otherwise when the last compensation completes. A completed execution is never compensated.
CREATE FUNCTION perform_workflow_compensation(
  p_execution_id uuid,
  p_reason       text,
  p_now          timestamptz DEFAULT now()
) RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
  v_exec    workflow_executions;
  v_pending text[];
  v_reason  text := coalesce(nullif(p_reason, ''), 'compensation requested');
BEGIN
  -- LOCK: execution
  SELECT * INTO v_exec FROM workflow_executions e WHERE e.id = p_execution_id FOR UPDATE;
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
    UPDATE workflow_executions e SET status = 'cancelled', error_message = v_reason, updated_at = p_now
     WHERE e.id = p_execution_id;
    INSERT INTO workflow_events (execution_id, event_type, metadata, "timestamp")
    VALUES (p_execution_id, 'workflow_cancelled',
            jsonb_build_object('reason', v_reason, 'previous_status', 'pending', 'compensate', true), p_now);
  ELSIF v_exec.status = 'in_progress' THEN
    UPDATE workflow_executions e SET status = 'failed', error_message = v_reason, updated_at = p_now
     WHERE e.id = p_execution_id;
    INSERT INTO workflow_events (execution_id, event_type, metadata, "timestamp")
    VALUES (p_execution_id, 'workflow_failed', jsonb_build_object('error', v_reason, 'error_code', 'compensation_requested'), p_now);
  END IF;

  UPDATE workflow_execution_logs l
     SET status = 'skipped', completed_at = p_now, error_message = coalesce(l.error_message, v_reason)
   WHERE l.execution_id = p_execution_id AND l.status IN ('pending', 'in_progress');
  UPDATE task_queue t
     SET status = 'cancelled', completed_at = p_now, updated_at = p_now
   WHERE t.workflow_execution_id = p_execution_id AND t.status IN ('pending', 'in_progress');

  UPDATE workflow_executions e
     SET status = 'compensating', updated_at = p_now,
         error_message = coalesce(e.error_message, v_reason)
   WHERE e.id = p_execution_id;
  v_pending := lifecycle_stages_to_compensate(p_execution_id);
  INSERT INTO workflow_events (execution_id, event_type, stage_id, metadata, "timestamp")
  VALUES (p_execution_id, 'workflow_compensating', 'compensation',
          jsonb_build_object('reason', v_reason, 'stages', to_jsonb(v_pending)), p_now);

  IF cardinality(v_pending) = 0 THEN
    UPDATE workflow_executions e SET status = 'rolled_back', updated_at = p_now WHERE e.id = p_execution_id;
    INSERT INTO workflow_events (execution_id, event_type, stage_id, metadata, "timestamp")
    VALUES (p_execution_id, 'workflow_rolled_back', 'compensation',
            jsonb_build_object('reason', v_reason, 'compensated', '[]'::jsonb), p_now);
  END IF;
END
$$;

-- ---------------------------------------------------------------------------------------------
-- Start compensating one stage, in Dagster run p_run_id (the compensation job of the execution).
--   p_dependents: the stages that depended on this one (its descendants in the DAG); every one of
--   them still waiting for compensation blocks this one (strict reverse topological order).
--   p_takeover: the run may take the compensation over from a finished owner run.
-- Returns action 'compensate' (with the stage's log id, output, the agent that ran it), 'skip'
-- (nothing to undo: the stage never completed or opted out) or 'done' (already compensated).
CREATE FUNCTION lifecycle_start_compensation(
  p_execution_id uuid,
  p_stage_id     text,
  p_run_id       text,
  p_dependents   text[] DEFAULT '{}',
  p_attempt      integer DEFAULT 1,
  p_takeover     boolean DEFAULT false,
  p_now          timestamptz DEFAULT now()
) RETURNS TABLE (action text, log_id uuid, output_data jsonb, context jsonb, agent_name text)
LANGUAGE plpgsql
AS $$
DECLARE
  v_exec    workflow_executions;
  v_log     workflow_execution_logs;
  v_blocked text;
  v_agent   text;
BEGIN
  -- LOCK: execution
  SELECT * INTO v_exec FROM workflow_executions e WHERE e.id = p_execution_id FOR UPDATE;
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
    UPDATE workflow_executions e SET compensation_run_id = p_run_id WHERE e.id = p_execution_id;
  ELSIF v_exec.compensation_run_id <> p_run_id THEN
    RAISE EXCEPTION 'execution % is being compensated by Dagster run %', p_execution_id, v_exec.compensation_run_id
      USING ERRCODE = 'lock_not_available';
  END IF;

  SELECT * INTO v_log FROM workflow_execution_logs l
   WHERE l.execution_id = p_execution_id AND l.stage_id = p_stage_id FOR UPDATE;
  IF NOT FOUND OR v_log.status IN ('pending', 'in_progress', 'failed', 'skipped')
     OR NOT lifecycle_stage_compensable(v_exec.workflow_definition_id, p_stage_id) THEN
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

  -- GUARD: strict reverse topological order
  SELECT string_agg(d, ', ' ORDER BY d) INTO v_blocked
  FROM unnest(coalesce(p_dependents, '{}')) d
  WHERE d = ANY (lifecycle_stages_to_compensate(p_execution_id));
  IF v_blocked IS NOT NULL THEN
    RAISE EXCEPTION 'stage % of execution % cannot be compensated before its dependents %',
      p_stage_id, p_execution_id, v_blocked USING ERRCODE = 'object_not_in_prerequisite_state';
  END IF;

  SELECT a.name INTO v_agent
  FROM task_queue t JOIN agents a ON a.id = t.agent_id
  WHERE t.stage_log_id = v_log.id AND t.status = 'completed'
  ORDER BY t.attempt DESC LIMIT 1;

  INSERT INTO workflow_events (execution_id, event_type, stage_id, metadata, "timestamp")
  VALUES (p_execution_id, 'stage_compensating', p_stage_id,
          jsonb_build_object('attempt', p_attempt, 'dagster_run_id', p_run_id, 'agent', v_agent), p_now);
  RETURN QUERY SELECT 'compensate'::text, v_log.id, v_log.output_data, v_exec.context, v_agent;
END
$$;

-- A stage's undo succeeded: void the artifacts it names (of this execution and stage only), mark
-- the log compensated, write stage_compensated; when no stage is left to compensate the execution
-- is rolled_back with workflow_rolled_back. Returns the execution's status.
CREATE FUNCTION lifecycle_complete_compensation(
  p_log_id  uuid,
  p_void    jsonb DEFAULT '[]'::jsonb,
  p_result  jsonb DEFAULT '{}'::jsonb,
  p_attempt integer DEFAULT 1,
  p_now     timestamptz DEFAULT now()
) RETURNS text
LANGUAGE plpgsql
AS $$
DECLARE
  v_exec   workflow_executions;
  v_log    workflow_execution_logs;
  v_voided integer;
  v_done   jsonb;
BEGIN
  -- GUARD: p_void shape
  IF jsonb_typeof(coalesce(p_void, '[]'::jsonb)) <> 'array' THEN
    RAISE EXCEPTION 'p_void must be an array of {"kind", "key"}' USING ERRCODE = 'invalid_parameter_value';
  END IF;

  -- LOCK: execution, then stage log
  SELECT e.* INTO v_exec FROM workflow_executions e
   WHERE e.id = (SELECT l.execution_id FROM workflow_execution_logs l WHERE l.id = p_log_id) FOR UPDATE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'unknown stage log %', p_log_id USING ERRCODE = 'no_data_found';
  END IF;
  SELECT * INTO v_log FROM workflow_execution_logs l WHERE l.id = p_log_id FOR UPDATE;
  IF v_exec.status <> 'compensating' OR v_log.status <> 'completed' THEN
    RAISE EXCEPTION 'stage % of execution % is % (execution %): its compensation cannot complete',
      v_log.stage_id, v_log.execution_id, v_log.status, v_exec.status
      USING ERRCODE = 'object_not_in_prerequisite_state';
  END IF;

  -- TRANSITION: artifacts, log
  UPDATE lifecycle_artifacts a
     SET voided_at = p_now, voided_reason = format('compensation of stage %s', v_log.stage_id)
   WHERE a.execution_id = v_log.execution_id AND a.stage_id = v_log.stage_id AND a.voided_at IS NULL
     AND EXISTS (SELECT 1 FROM jsonb_array_elements(coalesce(p_void, '[]'::jsonb)) v
                 WHERE v ->> 'kind' = a.kind AND v ->> 'key' = a.key);
  GET DIAGNOSTICS v_voided = ROW_COUNT;
  UPDATE workflow_execution_logs l SET status = 'compensated' WHERE l.id = p_log_id;
  INSERT INTO workflow_events (execution_id, event_type, stage_id, metadata, "timestamp")
  VALUES (v_log.execution_id, 'stage_compensated', v_log.stage_id,
          jsonb_build_object('attempt', p_attempt, 'voided', v_voided,
                             'summary', p_result ->> 'summary', 'undo', p_result ->> 'undo'),
          p_now);

  -- TRANSITION: execution rolled back once nothing is left
  IF cardinality(lifecycle_stages_to_compensate(v_exec.id)) = 0 THEN
    SELECT coalesce(jsonb_agg(l.stage_id ORDER BY ev.id), '[]'::jsonb) INTO v_done
    FROM workflow_events ev JOIN workflow_execution_logs l
      ON l.execution_id = ev.execution_id AND l.stage_id = ev.stage_id
    WHERE ev.execution_id = v_exec.id AND ev.event_type = 'stage_compensated';
    UPDATE workflow_executions e SET status = 'rolled_back', updated_at = p_now WHERE e.id = v_exec.id;
    INSERT INTO workflow_events (execution_id, event_type, stage_id, metadata, "timestamp")
    VALUES (v_exec.id, 'workflow_rolled_back', 'compensation',
            jsonb_build_object('reason', v_exec.error_message, 'compensated', v_done), p_now);
    RETURN 'rolled_back';
  END IF;
  RETURN 'compensating';
END
$$;

-- A stage's undo failed. With p_final = false a retry is recorded (stage_compensation_retrying);
-- with p_final = true the stage is compensation_failed and so is the execution, naming the stage.
CREATE FUNCTION lifecycle_fail_compensation(
  p_log_id  uuid,
  p_error   text,
  p_final   boolean,
  p_attempt integer DEFAULT 1,
  p_delay_s double precision DEFAULT NULL,
  p_now     timestamptz DEFAULT now()
) RETURNS text
LANGUAGE plpgsql
AS $$
DECLARE
  v_exec workflow_executions;
  v_log  workflow_execution_logs;
  v_msg  text := coalesce(nullif(p_error, ''), 'compensation failed');
BEGIN
  -- LOCK: execution, then stage log
  SELECT e.* INTO v_exec FROM workflow_executions e
   WHERE e.id = (SELECT l.execution_id FROM workflow_execution_logs l WHERE l.id = p_log_id) FOR UPDATE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'unknown stage log %', p_log_id USING ERRCODE = 'no_data_found';
  END IF;
  SELECT * INTO v_log FROM workflow_execution_logs l WHERE l.id = p_log_id FOR UPDATE;
  IF v_exec.status <> 'compensating' OR v_log.status <> 'completed' THEN
    RAISE EXCEPTION 'stage % of execution % is % (execution %): no compensation to fail',
      v_log.stage_id, v_log.execution_id, v_log.status, v_exec.status
      USING ERRCODE = 'object_not_in_prerequisite_state';
  END IF;

  IF NOT p_final THEN
    INSERT INTO workflow_events (execution_id, event_type, stage_id, metadata, "timestamp")
    VALUES (v_log.execution_id, 'stage_compensation_retrying', v_log.stage_id,
            jsonb_build_object('attempt', p_attempt + 1, 'failed_attempt', p_attempt, 'delay_s', p_delay_s,
                               'error', v_msg), p_now);
    RETURN 'compensating';
  END IF;

  UPDATE workflow_execution_logs l SET status = 'compensation_failed', error_message = v_msg WHERE l.id = p_log_id;
  UPDATE workflow_executions e
     SET status = 'compensation_failed', updated_at = p_now,
         error_message = format('compensation of stage %s failed: %s', v_log.stage_id, v_msg)
   WHERE e.id = v_exec.id;
  INSERT INTO workflow_events (execution_id, event_type, stage_id, metadata, "timestamp")
  VALUES (v_log.execution_id, 'stage_compensation_failed', v_log.stage_id,
          jsonb_build_object('attempt', p_attempt, 'error', v_msg), p_now),
         (v_log.execution_id, 'workflow_compensation_failed', v_log.stage_id,
          jsonb_build_object('stage', v_log.stage_id, 'error', v_msg), p_now);
  RETURN 'compensation_failed';
END
$$;

-- ---------------------------------------------------------------------------------------------
-- What the reconciler looks at. Manual executions (no Dagster run) are never touched.

-- in_progress executions whose heartbeat (or last change) is older than the bound, unless a stage
-- is legitimately waiting for its retry time.
CREATE FUNCTION lifecycle_stale_executions(p_timeout_s double precision, p_now timestamptz DEFAULT now())
RETURNS TABLE (execution_id uuid, dagster_run_id text, last_seen timestamptz)
LANGUAGE sql STABLE
AS $$
  SELECT e.id, e.dagster_run_id, greatest(e.heartbeat_at, e.updated_at)
  FROM workflow_executions e
  WHERE e.status = 'in_progress' AND e.dagster_run_id IS NOT NULL
    AND greatest(e.heartbeat_at, e.updated_at) < p_now - make_interval(secs => p_timeout_s)
    AND NOT EXISTS (SELECT 1 FROM workflow_execution_logs l
                    WHERE l.execution_id = e.id AND l.status = 'pending'
                      AND l.not_before > p_now - make_interval(secs => p_timeout_s))
  ORDER BY e.updated_at
$$;

-- failed executions whose DAG says on_failure: compensate (the default), and cancelled executions
-- whose cancel asked for compensation: compensation is due.
CREATE FUNCTION lifecycle_compensation_due() RETURNS TABLE (execution_id uuid, reason text)
LANGUAGE sql STABLE
AS $$
  SELECT e.id, coalesce(e.error_message, e.status)
  FROM workflow_executions e JOIN workflow_definitions d ON d.id = e.workflow_definition_id
  WHERE e.status = 'failed' AND coalesce(d.dag_schema ->> 'on_failure', 'compensate') = 'compensate'
  UNION ALL
  SELECT e.id, coalesce(e.error_message, 'cancelled')
  FROM workflow_executions e
  WHERE e.status = 'cancelled'
    AND coalesce((SELECT (ev.metadata ->> 'compensate')::boolean FROM workflow_events ev
                  WHERE ev.execution_id = e.id AND ev.event_type = 'workflow_cancelled'
                  ORDER BY ev.id DESC LIMIT 1), true)
$$;
