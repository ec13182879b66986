-- 0003_retries: capped, jittered retries; attempt fencing and timeouts; cancellation; the
-- runbook's retry_stage, fixed. Same lock order as 0002: execution row, stage log, task.

ALTER TABLE workflow_execution_logs ADD COLUMN not_before timestamptz;
ALTER TABLE task_queue ADD COLUMN not_before timestamptz;
-- the attempt's deadline (started + timeout_s): a result recorded after it is refused
ALTER TABLE task_queue ADD COLUMN deadline_at timestamptz;

-- Backoff delay in seconds; mirrors lifecycle_dagster.retry.retry_delay exactly (see there).
-- p_u is the uniform draw in [0, 1) so callers (and tests) control the jitter.
CREATE FUNCTION lifecycle_retry_delay(
  p_attempt    integer,
  p_base       double precision,
  p_cap        double precision,
  p_multiplier double precision,
  p_jitter     text,
  p_u          double precision
) RETURNS double precision
LANGUAGE plpgsql IMMUTABLE STRICT
AS $$
DECLARE
  v_exponent double precision;
  v_raw      double precision;
BEGIN
  -- GUARD: arguments
  IF p_attempt < 1 THEN
    RAISE EXCEPTION 'attempt must be >= 1, got %', p_attempt USING ERRCODE = 'invalid_parameter_value';
  END IF;
  v_exponent := p_attempt::double precision - 1;
  IF p_base < 0 OR p_cap < 0 OR p_base = 'Infinity' OR p_cap = 'Infinity' OR p_base = 'NaN' OR p_cap = 'NaN' THEN
    RAISE EXCEPTION 'delays must be finite and >= 0, got base %, cap %', p_base, p_cap
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF NOT p_multiplier >= 1 OR p_multiplier = 'Infinity' OR p_multiplier = 'NaN' THEN  -- NaN sorts above all
    RAISE EXCEPTION 'multiplier must be a finite number >= 1, got %', p_multiplier
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF NOT (p_u >= 0 AND p_u < 1) OR p_u = 'NaN' THEN
    RAISE EXCEPTION 'u must be in [0, 1), got %', p_u USING ERRCODE = 'invalid_parameter_value';
  END IF;

  IF p_base = 0 OR p_cap = 0 THEN
    v_raw := 0;
  ELSIF p_base >= p_cap THEN
    v_raw := p_cap;
  ELSIF p_multiplier = 1 OR v_exponent = 0 THEN
    v_raw := p_base;
  ELSIF v_exponent * ln(p_multiplier) >= ln(p_cap) - ln(p_base) THEN
    v_raw := p_cap;  -- clamped: power() is never called with an exponent that could overflow
  ELSE
    v_raw := least(p_cap, p_base * power(p_multiplier, v_exponent));
  END IF;

  IF p_jitter = 'none' THEN
    RETURN v_raw;
  ELSIF p_jitter = 'full' THEN
    RETURN p_u * v_raw;
  ELSIF p_jitter = 'equal' THEN
    RETURN v_raw / 2.0::double precision + p_u * v_raw / 2.0::double precision;
  END IF;
  RAISE EXCEPTION 'jitter must be one of none, full, equal; got %', p_jitter
    USING ERRCODE = 'invalid_parameter_value';
END
$$;

-- The retry policy of one stage of a definition, resolved like lifecycle_dagster.retry
-- .resolve_policy: the stage's retry over defaults.retry over the built-in defaults.
CREATE FUNCTION lifecycle_stage_retry_policy(p_definition_id uuid, p_stage_id text)
RETURNS jsonb
LANGUAGE sql STABLE
AS $$
  WITH d AS (
    SELECT d.dag_schema FROM workflow_definitions d WHERE d.id = p_definition_id
  ), s AS (
    SELECT st FROM d, jsonb_array_elements(d.dag_schema -> 'stages') st WHERE st ->> 'id' = p_stage_id
  ), merged AS (
    SELECT '{"max_attempts": 3, "base_delay_s": 1.0, "max_delay_s": 60.0, "multiplier": 2.0,
             "jitter": "full", "non_retryable": []}'::jsonb
           || coalesce((SELECT d.dag_schema -> 'defaults' -> 'retry' FROM d), '{}'::jsonb)
           || coalesce((SELECT s.st -> 'retry' FROM s), '{}'::jsonb) AS p,
           ((SELECT d.dag_schema -> 'defaults' -> 'retry' FROM d) ? 'max_delay_s'
             OR (SELECT s.st -> 'retry' FROM s) ? 'max_delay_s') AS cap_given
  )
  SELECT CASE
    WHEN NOT coalesce(cap_given, false) AND (p ->> 'base_delay_s')::float8 > (p ->> 'max_delay_s')::float8
    THEN p || jsonb_build_object('max_delay_s', p -> 'base_delay_s')
    ELSE p END
  FROM merged
$$;

-- ---------------------------------------------------------------------------------------------
-- As in 0002, plus p_resume: a run that resumes an execution (a re-execution from Dagster, or a
-- run the resume sensor launched for a stage set back to pending) may take over an execution bound
-- to an earlier run, and resumes a failed one (failed -> in_progress, the explicit retry of the
-- state machine, refused once compensation began). Writes workflow_resumed.
DROP FUNCTION lifecycle_ensure_execution(uuid, text, uuid, jsonb, timestamptz);

CREATE FUNCTION lifecycle_ensure_execution(
  p_definition_id uuid,
  p_run_id        text,
  p_execution_id  uuid  DEFAULT NULL,
  p_context       jsonb DEFAULT '{}'::jsonb,
  p_now           timestamptz DEFAULT now(),
  p_resume        boolean DEFAULT false
) RETURNS workflow_executions
LANGUAGE plpgsql
AS $$
DECLARE
  v workflow_executions;
  v_previous_run text;
BEGIN
  -- GUARD: arguments
  IF p_run_id IS NULL OR p_run_id = '' THEN
    RAISE EXCEPTION 'lifecycle_ensure_execution: a Dagster run id is required'
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF NOT EXISTS (SELECT 1 FROM workflow_definitions d WHERE d.id = p_definition_id) THEN
    RAISE EXCEPTION 'unknown workflow definition %', p_definition_id
      USING ERRCODE = 'no_data_found';
  END IF;
  IF p_resume AND p_execution_id IS NULL THEN
    RAISE EXCEPTION 'lifecycle_ensure_execution: resuming needs an execution id'
      USING ERRCODE = 'invalid_parameter_value';
  END IF;

  -- LOCK: the execution row
  IF p_execution_id IS NOT NULL THEN
    SELECT * INTO v FROM workflow_executions e WHERE e.id = p_execution_id FOR UPDATE;
    IF NOT FOUND THEN
      RAISE EXCEPTION 'unknown workflow execution %', p_execution_id
        USING ERRCODE = 'no_data_found';
    END IF;
    IF v.workflow_definition_id <> p_definition_id THEN
      RAISE EXCEPTION 'execution % belongs to definition %, but the run executes definition %',
        v.id, v.workflow_definition_id, p_definition_id
        USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF v.dagster_run_id IS NOT NULL AND v.dagster_run_id <> p_run_id AND NOT p_resume THEN
      RAISE EXCEPTION 'execution % is already bound to Dagster run %', v.id, v.dagster_run_id
        USING ERRCODE = 'unique_violation';
    END IF;
  ELSE
    INSERT INTO workflow_executions AS e (workflow_definition_id, status, context, dagster_run_id,
                                          created_at, updated_at)
    VALUES (p_definition_id, 'pending', coalesce(p_context, '{}'::jsonb), p_run_id, p_now, p_now)
    ON CONFLICT (dagster_run_id) DO NOTHING;
    SELECT * INTO v FROM workflow_executions e WHERE e.dagster_run_id = p_run_id FOR UPDATE;
    IF v.workflow_definition_id <> p_definition_id THEN
      RAISE EXCEPTION 'Dagster run % already executes definition %, not %',
        p_run_id, v.workflow_definition_id, p_definition_id
        USING ERRCODE = 'invalid_parameter_value';
    END IF;
  END IF;

  -- TRANSITION
  IF p_resume AND v.dagster_run_id IS DISTINCT FROM p_run_id AND v.status IN ('in_progress', 'failed') THEN
    v_previous_run := v.dagster_run_id;
    UPDATE workflow_executions e
       SET status = 'in_progress', dagster_run_id = p_run_id, updated_at = p_now,
           error_message = CASE WHEN v.status = 'failed' THEN NULL ELSE e.error_message END
     WHERE e.id = v.id
    RETURNING * INTO v;
    INSERT INTO workflow_events (execution_id, event_type, metadata, "timestamp")
    VALUES (v.id, 'workflow_resumed',
            jsonb_build_object('dagster_run_id', p_run_id, 'previous_dagster_run_id', v_previous_run),
            p_now);
  ELSIF v.status = 'pending' OR (v.status = 'in_progress' AND v.dagster_run_id IS NULL) THEN
    UPDATE workflow_executions e
       SET status = 'in_progress', dagster_run_id = p_run_id, updated_at = p_now
     WHERE e.id = v.id
    RETURNING * INTO v;
    INSERT INTO workflow_events (execution_id, event_type, metadata, "timestamp")
    VALUES (v.id, 'workflow_started', jsonb_build_object('dagster_run_id', p_run_id), p_now);
  ELSIF v.status <> 'in_progress' THEN
    RAISE EXCEPTION 'execution % is % and runs no more stages', v.id, v.status
      USING ERRCODE = 'object_not_in_prerequisite_state';
  END IF;
  RETURN v;
END
$$;

-- ---------------------------------------------------------------------------------------------
-- Stage transitions, replaced with attempt fencing. The old calls keep working: every new
-- parameter is trailing and defaulted.
DROP FUNCTION lifecycle_start_stage(uuid, text, text, jsonb, integer, timestamptz);
DROP FUNCTION lifecycle_complete_stage(uuid, uuid, jsonb, timestamptz);
DROP FUNCTION lifecycle_fail_stage(uuid, uuid, text, text, timestamptz);

-- As in 0002, plus: p_timeout_s sets the task's deadline_at; a stage cannot start again once it
-- completed, was skipped or was compensated; a pending stage set back by retry_stage keeps its
-- attempt count (the attempt started is the larger of p_attempt and the log's, and is returned).
-- p_resume (a run resuming the execution): a completed stage is not run again (already_completed,
-- with its output), and a failed stage is retried as its next attempt.
CREATE FUNCTION lifecycle_start_stage(
  p_execution_id uuid,
  p_stage_id     text,
  p_capability   text,
  p_ancestors    jsonb DEFAULT '{}'::jsonb,
  p_attempt      integer DEFAULT 1,
  p_now          timestamptz DEFAULT now(),
  p_timeout_s    double precision DEFAULT NULL,
  p_resume       boolean DEFAULT false
) RETURNS TABLE (log_id uuid, task_id uuid, agent_id uuid, agent_name text, agent_kind text,
                 input_data jsonb, attempt_number integer, already_completed boolean,
                 output_data jsonb)
LANGUAGE plpgsql
AS $$
DECLARE
  v_exec     workflow_executions;
  v_missing  text;
  v_upstream jsonb;
  v_input    jsonb;
  v_log_id   uuid;
  v_attempt  integer;
  v_agent    record;
  v_task_id  uuid;
  v_existing workflow_execution_logs;
BEGIN
  -- GUARD: arguments
  IF p_attempt IS NULL OR p_attempt < 1 THEN
    RAISE EXCEPTION 'stage %: attempt must be >= 1, got %', p_stage_id, p_attempt
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF p_timeout_s IS NOT NULL AND NOT p_timeout_s > 0 THEN
    RAISE EXCEPTION 'stage %: timeout must be > 0 seconds, got %', p_stage_id, p_timeout_s
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF jsonb_typeof(coalesce(p_ancestors, '{}'::jsonb)) <> 'object' THEN
    RAISE EXCEPTION 'stage %: p_ancestors must be a JSON object', p_stage_id
      USING ERRCODE = 'invalid_parameter_value';
  END IF;

  -- LOCK: execution
  SELECT * INTO v_exec FROM workflow_executions e WHERE e.id = p_execution_id FOR UPDATE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'unknown workflow execution %', p_execution_id USING ERRCODE = 'no_data_found';
  END IF;
  IF v_exec.status <> 'in_progress' THEN
    RAISE EXCEPTION 'execution % is %: stage % cannot start', p_execution_id, v_exec.status, p_stage_id
      USING ERRCODE = 'object_not_in_prerequisite_state';
  END IF;

  -- GUARD: every ancestor completed
  SELECT string_agg(a.key, ', ' ORDER BY a.key) INTO v_missing
  FROM jsonb_each_text(coalesce(p_ancestors, '{}'::jsonb)) a
  WHERE NOT EXISTS (
    SELECT 1 FROM workflow_execution_logs l
    WHERE l.execution_id = p_execution_id AND l.stage_id = a.key AND l.status = 'completed');
  IF v_missing IS NOT NULL THEN
    RAISE EXCEPTION 'stage % of execution % cannot start: upstream stage(s) % not completed',
      p_stage_id, p_execution_id, v_missing
      USING ERRCODE = 'object_not_in_prerequisite_state';
  END IF;

  SELECT coalesce(jsonb_object_agg(a.key, jsonb_build_object('capability', a.value,
                                                             'output', l.output_data)),
                  '{}'::jsonb)
    INTO v_upstream
  FROM jsonb_each_text(coalesce(p_ancestors, '{}'::jsonb)) a
  JOIN workflow_execution_logs l ON l.execution_id = p_execution_id AND l.stage_id = a.key;
  v_input := jsonb_build_object('context', v_exec.context, 'upstream', v_upstream);

  -- RESUME: a completed stage is kept; a failed one becomes pending for its next attempt
  IF p_resume THEN
    SELECT * INTO v_existing FROM workflow_execution_logs l
     WHERE l.execution_id = p_execution_id AND l.stage_id = p_stage_id FOR UPDATE;
    IF v_existing.status = 'completed' THEN
      RETURN QUERY SELECT v_existing.id, NULL::uuid, NULL::uuid, NULL::text, NULL::text,
                          v_existing.input_data, v_existing.attempt_number, true, v_existing.output_data;
      RETURN;
    ELSIF v_existing.status = 'failed' THEN
      UPDATE workflow_execution_logs l
         SET status = 'pending', attempt_number = l.attempt_number + 1
       WHERE l.id = v_existing.id;
    END IF;
  END IF;

  -- TRANSITION: stage log -> in_progress (the transition guard refuses a completed stage)
  INSERT INTO workflow_execution_logs AS l (execution_id, stage_id, status, attempt_number,
                                            started_at, input_data)
  VALUES (p_execution_id, p_stage_id, 'in_progress', p_attempt, p_now, v_input)
  ON CONFLICT ON CONSTRAINT workflow_execution_logs_one_per_stage DO UPDATE
    SET status = 'in_progress',
        attempt_number = CASE WHEN l.status = 'pending'
                              THEN greatest(l.attempt_number, EXCLUDED.attempt_number)
                              ELSE EXCLUDED.attempt_number END,
        started_at = EXCLUDED.started_at, completed_at = NULL, not_before = NULL,
        input_data = EXCLUDED.input_data, output_data = NULL, error_message = NULL
  RETURNING l.id, l.attempt_number INTO v_log_id, v_attempt;

  UPDATE workflow_executions e SET current_stage = p_stage_id, updated_at = p_now
   WHERE e.id = p_execution_id;

  SELECT r.agent_id, r.agent_name, r.agent_kind INTO v_agent
  FROM lifecycle_route_capability(p_capability) r;

  IF v_agent.agent_id IS NOT NULL THEN
    INSERT INTO task_queue (workflow_execution_id, task_type, input_data, status, agent_id,
                            stage_log_id, attempt, created_at, updated_at, started_at, deadline_at)
    VALUES (p_execution_id, p_stage_id, v_input, 'in_progress', v_agent.agent_id, v_log_id,
            v_attempt, p_now, p_now, p_now,
            p_now + make_interval(secs => p_timeout_s))
    RETURNING id INTO v_task_id;
  END IF;

  INSERT INTO workflow_events (execution_id, event_type, stage_id, metadata, "timestamp")
  VALUES (p_execution_id, 'stage_started', p_stage_id,
          jsonb_build_object('attempt', v_attempt, 'capability', p_capability,
                             'agent', v_agent.agent_name, 'task_id', v_task_id,
                             'timeout_s', p_timeout_s),
          p_now);

  RETURN QUERY SELECT v_log_id, v_task_id, v_agent.agent_id, v_agent.agent_name,
                      v_agent.agent_kind, v_input, v_attempt, false, NULL::jsonb;
END
$$;

-- Refuse a stage result that arrives too late: the execution is no longer in_progress (it was
-- cancelled or failed meanwhile), the attempt is not the log's current one, or the task's
-- deadline passed. Records stage_result_refused; a refused attempt of the current in_progress
-- log ends skipped (execution over) or failed (timed out). Returns the reason, or NULL when the
-- result may be applied. Caller holds the execution and log locks.
CREATE FUNCTION lifecycle_refuse_late_result(
  v_exec    workflow_executions,
  v_log     workflow_execution_logs,
  p_task_id uuid,
  p_attempt integer,
  p_outcome text,
  p_now     timestamptz
) RETURNS text
LANGUAGE plpgsql
AS $$
DECLARE
  v_reason   text;
  v_deadline timestamptz;
BEGIN
  SELECT t.deadline_at INTO v_deadline FROM task_queue t WHERE t.id = p_task_id FOR UPDATE;
  IF p_attempt IS NOT NULL AND p_attempt <> v_log.attempt_number THEN
    v_reason := format('attempt %s is not the current attempt %s', p_attempt, v_log.attempt_number);
  ELSIF v_log.status <> 'in_progress' THEN
    v_reason := format('stage is %s, not in_progress', v_log.status);
  ELSIF v_exec.status <> 'in_progress' THEN
    v_reason := format('execution is %s', v_exec.status);
  ELSIF v_deadline IS NOT NULL AND p_now > v_deadline THEN
    v_reason := format('attempt %s timed out at %s', v_log.attempt_number, v_deadline);
  END IF;
  IF v_reason IS NULL THEN
    RETURN NULL;
  END IF;

  IF p_task_id IS NOT NULL THEN
    UPDATE task_queue t
       SET status = CASE WHEN v_exec.status = 'in_progress' THEN 'failed' ELSE 'cancelled' END,
           error_message = 'result refused: ' || v_reason, completed_at = p_now, updated_at = p_now
     WHERE t.id = p_task_id AND t.status = 'in_progress';
  END IF;
  IF v_log.status = 'in_progress' AND (p_attempt IS NULL OR p_attempt = v_log.attempt_number) THEN
    IF v_exec.status = 'in_progress' THEN
      -- timed out: the attempt failed (the caller decides on a retry)
      NULL;
    ELSE
      UPDATE workflow_execution_logs l
         SET status = 'skipped', completed_at = p_now, error_message = 'result refused: ' || v_reason
       WHERE l.id = v_log.id;
    END IF;
  END IF;
  INSERT INTO workflow_events (execution_id, event_type, stage_id, metadata, "timestamp")
  VALUES (v_log.execution_id, 'stage_result_refused', v_log.stage_id,
          jsonb_build_object('attempt', coalesce(p_attempt, v_log.attempt_number),
                             'outcome', p_outcome, 'reason', v_reason, 'task_id', p_task_id),
          p_now);
  RETURN v_reason;
END
$$;

-- As in 0002, plus fencing: returns 'refused: <reason>' instead of applying a late result.
CREATE FUNCTION lifecycle_complete_stage(
  p_log_id  uuid,
  p_task_id uuid  DEFAULT NULL,
  p_output  jsonb DEFAULT '{}'::jsonb,
  p_now     timestamptz DEFAULT now(),
  p_attempt integer DEFAULT NULL
) RETURNS text
LANGUAGE plpgsql
AS $$
DECLARE
  v_exec   workflow_executions;
  v_log    workflow_execution_logs;
  v_stages jsonb;
  v_done   integer;
  v_reason text;
BEGIN
  -- GUARD: output is a JSON object
  IF jsonb_typeof(p_output) IS DISTINCT FROM 'object' THEN
    RAISE EXCEPTION 'stage output must be a JSON object, got %', coalesce(jsonb_typeof(p_output), 'NULL')
      USING ERRCODE = 'invalid_parameter_value';
  END IF;

  -- LOCK: execution, then stage log
  SELECT e.* INTO v_exec FROM workflow_executions e
   WHERE e.id = (SELECT l.execution_id FROM workflow_execution_logs l WHERE l.id = p_log_id)
   FOR UPDATE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'unknown stage log %', p_log_id USING ERRCODE = 'no_data_found';
  END IF;
  SELECT * INTO v_log FROM workflow_execution_logs l WHERE l.id = p_log_id FOR UPDATE;

  -- GUARD: fencing
  v_reason := lifecycle_refuse_late_result(v_exec, v_log, p_task_id, p_attempt, 'completed', p_now);
  IF v_reason IS NOT NULL THEN
    RETURN 'refused: ' || v_reason;
  END IF;

  -- TRANSITION: log, task
  UPDATE workflow_execution_logs l
     SET status = 'completed', output_data = p_output, completed_at = p_now, error_message = NULL
   WHERE l.id = p_log_id;
  IF p_task_id IS NOT NULL THEN
    UPDATE task_queue t
       SET status = 'completed', output_data = p_output, completed_at = p_now, updated_at = p_now
     WHERE t.id = p_task_id AND t.stage_log_id = p_log_id;
    IF NOT FOUND THEN
      RAISE EXCEPTION 'task % does not belong to stage log %', p_task_id, p_log_id
        USING ERRCODE = 'invalid_parameter_value';
    END IF;
  END IF;
  INSERT INTO workflow_events (execution_id, event_type, stage_id, metadata, "timestamp")
  VALUES (v_log.execution_id, 'stage_completed', v_log.stage_id,
          jsonb_build_object('attempt', v_log.attempt_number, 'task_id', p_task_id,
                             'duration_ms', round(extract(epoch FROM (p_now - v_log.started_at)) * 1000)),
          p_now);

  -- TRANSITION: execution completes when all its definition's stages have
  SELECT d.dag_schema -> 'stages' INTO v_stages
    FROM workflow_definitions d WHERE d.id = v_exec.workflow_definition_id;
  SELECT count(*) INTO v_done
    FROM workflow_execution_logs l
   WHERE l.execution_id = v_exec.id AND l.status = 'completed'
     AND l.stage_id IN (SELECT s ->> 'id' FROM jsonb_array_elements(v_stages) s);
  IF v_done = jsonb_array_length(v_stages) THEN
    UPDATE workflow_executions e
       SET status = 'completed', updated_at = p_now, error_message = NULL
     WHERE e.id = v_exec.id;
    INSERT INTO workflow_events (execution_id, event_type, metadata, "timestamp")
    VALUES (v_exec.id, 'workflow_completed', jsonb_build_object('stages', v_done), p_now);
    RETURN 'completed';
  END IF;
  RETURN v_exec.status;
END
$$;

-- As in 0002, plus fencing (a failure of a stale attempt or of a finished execution is refused
-- and recorded, returning 'refused: <reason>'). A timed-out attempt may still be failed.
CREATE FUNCTION lifecycle_fail_stage(
  p_log_id     uuid,
  p_task_id    uuid DEFAULT NULL,
  p_error      text DEFAULT NULL,
  p_error_code text DEFAULT NULL,
  p_now        timestamptz DEFAULT now(),
  p_attempt    integer DEFAULT NULL
) RETURNS text
LANGUAGE plpgsql
AS $$
DECLARE
  v_exec   workflow_executions;
  v_log    workflow_execution_logs;
  v_msg    text := coalesce(nullif(p_error, ''), 'stage failed');
  v_reason text;
BEGIN
  -- LOCK: execution, then stage log
  SELECT e.* INTO v_exec FROM workflow_executions e
   WHERE e.id = (SELECT l.execution_id FROM workflow_execution_logs l WHERE l.id = p_log_id)
   FOR UPDATE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'unknown stage log %', p_log_id USING ERRCODE = 'no_data_found';
  END IF;
  SELECT * INTO v_log FROM workflow_execution_logs l WHERE l.id = p_log_id FOR UPDATE;

  -- GUARD: fencing (a deadline that passed does not stop a failure from being recorded)
  IF (p_attempt IS NOT NULL AND p_attempt <> v_log.attempt_number)
     OR v_log.status <> 'in_progress' OR v_exec.status <> 'in_progress' THEN
    v_reason := lifecycle_refuse_late_result(v_exec, v_log, p_task_id, p_attempt, 'failed', p_now);
    RETURN 'refused: ' || v_reason;
  END IF;

  -- TRANSITION: log, task
  UPDATE workflow_execution_logs l
     SET status = 'failed', error_message = v_msg, completed_at = p_now
   WHERE l.id = p_log_id;
  IF p_task_id IS NOT NULL THEN
    UPDATE task_queue t
       SET status = 'failed', error_message = v_msg, completed_at = p_now, updated_at = p_now
     WHERE t.id = p_task_id AND t.stage_log_id = p_log_id AND t.status = 'in_progress';
  END IF;
  INSERT INTO workflow_events (execution_id, event_type, stage_id, metadata, "timestamp")
  VALUES (v_log.execution_id, 'stage_failed', v_log.stage_id,
          jsonb_build_object('attempt', v_log.attempt_number, 'task_id', p_task_id,
                             'error', v_msg, 'error_code', p_error_code),
          p_now);

  -- TRANSITION: execution
  UPDATE workflow_executions e
     SET status = 'failed', updated_at = p_now,
         error_message = format('stage %s failed: %s', v_log.stage_id, v_msg)
   WHERE e.id = v_exec.id;
  INSERT INTO workflow_events (execution_id, event_type, stage_id, metadata, "timestamp")
  VALUES (v_exec.id, 'workflow_failed', v_log.stage_id,
          jsonb_build_object('stage', v_log.stage_id, 'error', v_msg, 'error_code', p_error_code),
          p_now);
  RETURN 'failed';
END
$$;

-- One failed attempt that will be retried: the log goes back to pending with not_before set
-- (started_at keeps meaning when the attempt started), the task fails, stage_retrying records
-- the next attempt, the delay, the error class and message. Returns 'retrying', or
-- 'refused: <reason>' when the attempt is stale or the execution is over.
CREATE FUNCTION lifecycle_schedule_retry(
  p_log_id      uuid,
  p_task_id     uuid,
  p_attempt     integer,
  p_error       text,
  p_error_code  text,
  p_error_class text,
  p_delay_s     double precision,
  p_now         timestamptz DEFAULT now()
) RETURNS text
LANGUAGE plpgsql
AS $$
DECLARE
  v_exec   workflow_executions;
  v_log    workflow_execution_logs;
  v_reason text;
BEGIN
  -- GUARD: arguments
  IF p_delay_s IS NULL OR NOT p_delay_s >= 0 OR p_delay_s = 'Infinity' THEN
    RAISE EXCEPTION 'retry delay must be a finite number of seconds >= 0, got %', p_delay_s
      USING ERRCODE = 'invalid_parameter_value';
  END IF;

  -- LOCK: execution, then stage log
  SELECT e.* INTO v_exec FROM workflow_executions e
   WHERE e.id = (SELECT l.execution_id FROM workflow_execution_logs l WHERE l.id = p_log_id)
   FOR UPDATE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'unknown stage log %', p_log_id USING ERRCODE = 'no_data_found';
  END IF;
  SELECT * INTO v_log FROM workflow_execution_logs l WHERE l.id = p_log_id FOR UPDATE;

  -- GUARD: fencing
  IF p_attempt <> v_log.attempt_number OR v_log.status <> 'in_progress' OR v_exec.status <> 'in_progress' THEN
    v_reason := lifecycle_refuse_late_result(v_exec, v_log, p_task_id, p_attempt, 'retrying', p_now);
    RETURN 'refused: ' || v_reason;
  END IF;

  -- TRANSITION: log -> pending, task -> failed
  UPDATE workflow_execution_logs l
     SET status = 'pending', error_message = p_error,
         not_before = p_now + make_interval(secs => p_delay_s)
   WHERE l.id = p_log_id;
  IF p_task_id IS NOT NULL THEN
    UPDATE task_queue t
       SET status = 'failed', error_message = p_error, completed_at = p_now, updated_at = p_now
     WHERE t.id = p_task_id AND t.stage_log_id = p_log_id AND t.status = 'in_progress';
  END IF;
  INSERT INTO workflow_events (execution_id, event_type, stage_id, metadata, "timestamp")
  VALUES (v_log.execution_id, 'stage_retrying', v_log.stage_id,
          jsonb_build_object('attempt', p_attempt + 1, 'failed_attempt', p_attempt,
                             'delay_s', p_delay_s, 'not_before', p_now + make_interval(secs => p_delay_s),
                             'error_code', p_error_code, 'error_class', p_error_class,
                             'error', p_error, 'task_id', p_task_id),
          p_now);
  RETURN 'retrying';
END
$$;

-- ---------------------------------------------------------------------------------------------
-- Cancel an execution (compare-and-set along the state machine). pending and in_progress
-- executions become cancelled: stages not yet started are skipped and queued tasks cancelled; a
-- stage running now finishes into a refusal (lifecycle_refuse_late_result). Returns who won:
-- cancelled = true when this call cancelled it, else the status that stood.
CREATE FUNCTION lifecycle_cancel_execution(
  p_execution_id uuid,
  p_reason       text DEFAULT 'cancelled',
  p_compensate   boolean DEFAULT true,
  p_now          timestamptz DEFAULT now()
) RETURNS TABLE (cancelled boolean, status text, previous_status text, dagster_run_id text)
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
  IF v_exec.status NOT IN ('pending', 'in_progress') THEN
    RETURN QUERY SELECT false, v_exec.status, v_exec.status, v_exec.dagster_run_id;
    RETURN;
  END IF;

  UPDATE workflow_executions e
     SET status = 'cancelled', updated_at = p_now,
         error_message = coalesce(nullif(p_reason, ''), 'cancelled')
   WHERE e.id = p_execution_id;
  UPDATE workflow_execution_logs l
     SET status = 'skipped', completed_at = p_now, error_message = 'execution cancelled'
   WHERE l.execution_id = p_execution_id AND l.status = 'pending';
  UPDATE task_queue t
     SET status = 'cancelled', updated_at = p_now, completed_at = p_now
   WHERE t.workflow_execution_id = p_execution_id AND t.status = 'pending';
  INSERT INTO workflow_events (execution_id, event_type, metadata, "timestamp")
  VALUES (p_execution_id, 'workflow_cancelled',
          jsonb_build_object('reason', coalesce(nullif(p_reason, ''), 'cancelled'),
                             'previous_status', v_exec.status, 'compensate', p_compensate,
                             'dagster_run_id', v_exec.dagster_run_id),
          p_now);
  RETURN QUERY SELECT true, 'cancelled'::text, v_exec.status, v_exec.dagster_run_id;
END
$$;

-- ---------------------------------------------------------------------------------------------
-- The runbook's retry_stage (section 3), kept callable exactly as before and fixed: the delay is
-- the stage's policy (capped, jittered; lifecycle_retry_delay with random()), not_before holds
-- "not before" (started_at keeps meaning when the attempt started), reaching the limit fails the
-- stage with stage_failed, an unknown log id is a clear error, concurrent calls serialise on the
-- execution row. A completed, skipped or compensated stage cannot be retried.
CREATE OR REPLACE FUNCTION retry_stage(
  p_log_id       uuid,
  p_max_attempts integer DEFAULT 3,
  p_now          timestamptz DEFAULT now()
) RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
  v_exec   workflow_executions;
  v_log    workflow_execution_logs;
  v_policy jsonb;
  v_delay  double precision;
BEGIN
  -- GUARD: arguments
  IF p_max_attempts IS NULL OR p_max_attempts < 1 THEN
    RAISE EXCEPTION 'retry_stage: p_max_attempts must be >= 1, got %', p_max_attempts
      USING ERRCODE = 'invalid_parameter_value';
  END IF;

  -- LOCK: execution, then stage log
  SELECT e.* INTO v_exec FROM workflow_executions e
   WHERE e.id = (SELECT l.execution_id FROM workflow_execution_logs l WHERE l.id = p_log_id)
   FOR UPDATE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'retry_stage: unknown stage log %', p_log_id USING ERRCODE = 'no_data_found';
  END IF;
  SELECT * INTO v_log FROM workflow_execution_logs l WHERE l.id = p_log_id FOR UPDATE;
  IF v_log.status NOT IN ('pending', 'in_progress', 'failed') THEN
    RAISE EXCEPTION 'retry_stage: stage % of execution % is % and cannot be retried',
      v_log.stage_id, v_log.execution_id, v_log.status
      USING ERRCODE = 'object_not_in_prerequisite_state';
  END IF;
  IF v_log.status = 'pending' AND v_log.not_before IS NOT NULL THEN
    RAISE EXCEPTION 'retry_stage: stage % of execution % is already waiting to retry (attempt % not before %)',
      v_log.stage_id, v_log.execution_id, v_log.attempt_number + 1, v_log.not_before
      USING ERRCODE = 'object_not_in_prerequisite_state';
  END IF;
  IF v_exec.status NOT IN ('in_progress', 'failed') THEN
    RAISE EXCEPTION 'retry_stage: execution % is %; its stages cannot be retried', v_exec.id, v_exec.status
      USING ERRCODE = 'object_not_in_prerequisite_state';
  END IF;

  IF v_log.attempt_number >= p_max_attempts THEN
    IF v_log.status = 'failed' AND v_exec.status = 'failed' THEN
      RETURN;  -- already failed for good: a repeated call changes nothing and writes nothing
    END IF;
    IF v_log.status <> 'failed' THEN
      IF v_log.status = 'pending' THEN
        UPDATE workflow_execution_logs l SET status = 'in_progress' WHERE l.id = p_log_id;
      END IF;
      UPDATE workflow_execution_logs l
         SET status = 'failed', completed_at = p_now, not_before = NULL,
             error_message = coalesce(l.error_message, 'attempts exhausted')
       WHERE l.id = p_log_id;
    END IF;
    INSERT INTO workflow_events (execution_id, event_type, stage_id, metadata, "timestamp")
    VALUES (v_log.execution_id, 'stage_failed', v_log.stage_id,
            jsonb_build_object('attempt', v_log.attempt_number, 'max_attempts', p_max_attempts,
                               'error', 'attempts exhausted', 'error_code', 'attempts_exhausted',
                               'source', 'retry_stage'),
            p_now);
    IF v_exec.status = 'in_progress' THEN
      UPDATE workflow_executions e
         SET status = 'failed', updated_at = p_now,
             error_message = format('stage %s failed: attempts exhausted (%s)', v_log.stage_id, p_max_attempts)
       WHERE e.id = v_exec.id;
      INSERT INTO workflow_events (execution_id, event_type, stage_id, metadata, "timestamp")
      VALUES (v_exec.id, 'workflow_failed', v_log.stage_id,
              jsonb_build_object('stage', v_log.stage_id, 'error', 'attempts exhausted',
                                 'error_code', 'attempts_exhausted'),
              p_now);
    END IF;
    RETURN;
  END IF;

  v_policy := lifecycle_stage_retry_policy(v_exec.workflow_definition_id, v_log.stage_id);
  -- no wait is longer than a year (lifecycle_dagster.retry.MAX_WAIT_S), whatever the policy's cap
  v_delay := least(31536000, lifecycle_retry_delay(v_log.attempt_number,
                                   (v_policy ->> 'base_delay_s')::float8,
                                   (v_policy ->> 'max_delay_s')::float8,
                                   (v_policy ->> 'multiplier')::float8,
                                   v_policy ->> 'jitter', random()));
  UPDATE workflow_execution_logs l
     SET status = 'pending', attempt_number = v_log.attempt_number + 1, error_message = NULL,
         completed_at = NULL,
         not_before = p_now + make_interval(secs => v_delay)
   WHERE l.id = p_log_id;
  -- an explicit retry of a failed execution (only before any compensation) resumes it
  IF v_exec.status = 'failed' THEN
    UPDATE workflow_executions e SET status = 'in_progress', updated_at = p_now, error_message = NULL
     WHERE e.id = v_exec.id;
  END IF;
  INSERT INTO workflow_events (execution_id, event_type, stage_id, metadata, "timestamp")
  VALUES (v_log.execution_id, 'stage_retrying', v_log.stage_id,
          jsonb_build_object('attempt', v_log.attempt_number + 1, 'failed_attempt', v_log.attempt_number,
                             'delay_s', v_delay, 'not_before', p_now + make_interval(secs => v_delay),
                             'max_attempts', p_max_attempts, 'source', 'retry_stage'),
          p_now);
END
$$;
