-- 0002_engine: the transitions the stage runtime makes. Each function is one transaction and
-- locks in one order: the execution row first, then its stage log, then the task. Functions
-- that read the clock take p_now so tests can pin time.

-- Routing: the active agent that declares the capability in the latest version of its
-- 'orchestration' ontology (the runbook's section 7 shape: knowledge = {"capability": ...}).
-- Ties go to the agent whose name sorts first, so routing is deterministic.
CREATE FUNCTION lifecycle_route_capability(p_capability text)
RETURNS TABLE (agent_id uuid, agent_name text, agent_kind text)
LANGUAGE sql STABLE
AS $$
  SELECT a.id, a.name, a.kind
  FROM agents a
  JOIN LATERAL (
    SELECT o.knowledge
    FROM agent_ontologies o
    WHERE o.agent_id = a.id AND o.domain = 'orchestration'
    ORDER BY o.version DESC
    LIMIT 1
  ) latest ON true
  WHERE a.is_active AND latest.knowledge ->> 'capability' = p_capability
  ORDER BY a.name
  LIMIT 1
$$;

-- Start (or adopt) the execution of a Dagster run.
--   p_execution_id given: adopt that row (launched by inserting a row, or by the CLI);
--   otherwise: the execution keyed by p_run_id, created on first call (UI or `dagster job
--   execute` launches). Idempotent: every stage op calls it; the first call moves the execution
--   pending -> in_progress and writes workflow_started.
CREATE FUNCTION lifecycle_ensure_execution(
  p_definition_id uuid,
  p_run_id        text,
  p_execution_id  uuid  DEFAULT NULL,
  p_context       jsonb DEFAULT '{}'::jsonb,
  p_now           timestamptz DEFAULT now()
) RETURNS workflow_executions
LANGUAGE plpgsql
AS $$
DECLARE
  v workflow_executions;
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
    IF v.dagster_run_id IS NOT NULL AND v.dagster_run_id <> p_run_id THEN
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
  IF v.status = 'pending' OR (v.status = 'in_progress' AND v.dagster_run_id IS NULL) THEN
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

-- Start one attempt of a stage: checks every ancestor completed, writes the stage log
-- (in_progress, attempt, input_data = {context, upstream: {stage: {capability, output}}}), moves
-- current_stage, writes stage_started, routes the capability and records the dispatch in
-- task_queue. Returns agent_id NULL (and no task) when no active agent serves the capability.
--   p_ancestors: {"<stage_id>": "<capability>", ...} for every ancestor of the stage.
CREATE FUNCTION lifecycle_start_stage(
  p_execution_id uuid,
  p_stage_id     text,
  p_capability   text,
  p_ancestors    jsonb DEFAULT '{}'::jsonb,
  p_attempt      integer DEFAULT 1,
  p_now          timestamptz DEFAULT now()
) RETURNS TABLE (log_id uuid, task_id uuid, agent_id uuid, agent_name text, agent_kind text,
                 input_data jsonb)
LANGUAGE plpgsql
AS $$
DECLARE
  v_exec     workflow_executions;
  v_missing  text;
  v_upstream jsonb;
  v_input    jsonb;
  v_log_id   uuid;
  v_agent    record;
  v_task_id  uuid;
BEGIN
  -- GUARD: arguments
  IF p_attempt IS NULL OR p_attempt < 1 THEN
    RAISE EXCEPTION 'stage %: attempt must be >= 1, got %', p_stage_id, p_attempt
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

  -- TRANSITION: stage log -> in_progress (the transition guard refuses a completed stage)
  INSERT INTO workflow_execution_logs AS l (execution_id, stage_id, status, attempt_number,
                                            started_at, input_data)
  VALUES (p_execution_id, p_stage_id, 'in_progress', p_attempt, p_now, v_input)
  ON CONFLICT ON CONSTRAINT workflow_execution_logs_one_per_stage DO UPDATE
    SET status = 'in_progress', attempt_number = EXCLUDED.attempt_number,
        started_at = EXCLUDED.started_at, completed_at = NULL,
        input_data = EXCLUDED.input_data, output_data = NULL, error_message = NULL
  RETURNING l.id INTO v_log_id;

  UPDATE workflow_executions e SET current_stage = p_stage_id, updated_at = p_now
   WHERE e.id = p_execution_id;

  SELECT r.agent_id, r.agent_name, r.agent_kind INTO v_agent
  FROM lifecycle_route_capability(p_capability) r;

  IF v_agent.agent_id IS NOT NULL THEN
    INSERT INTO task_queue (workflow_execution_id, task_type, input_data, status, agent_id,
                            stage_log_id, attempt, created_at, updated_at, started_at)
    VALUES (p_execution_id, p_stage_id, v_input, 'in_progress', v_agent.agent_id, v_log_id,
            p_attempt, p_now, p_now, p_now)
    RETURNING id INTO v_task_id;
  END IF;

  INSERT INTO workflow_events (execution_id, event_type, stage_id, metadata, "timestamp")
  VALUES (p_execution_id, 'stage_started', p_stage_id,
          jsonb_build_object('attempt', p_attempt, 'capability', p_capability,
                             'agent', v_agent.agent_name, 'task_id', v_task_id),
          p_now);

  RETURN QUERY SELECT v_log_id, v_task_id, v_agent.agent_id, v_agent.agent_name,
                      v_agent.agent_kind, v_input;
END
$$;

-- Record a stage's output. When every stage of the execution's definition has completed, the
-- execution completes too (workflow_completed), in the same transaction: the execution row lock
-- serialises siblings that finish at the same moment, so the last one always sees the others.
-- Returns the execution's status afterwards.
CREATE FUNCTION lifecycle_complete_stage(
  p_log_id  uuid,
  p_task_id uuid  DEFAULT NULL,
  p_output  jsonb DEFAULT '{}'::jsonb,
  p_now     timestamptz DEFAULT now()
) RETURNS text
LANGUAGE plpgsql
AS $$
DECLARE
  v_exec      workflow_executions;
  v_log       workflow_execution_logs;
  v_stages    jsonb;
  v_done      integer;
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
  IF v_log.status <> 'in_progress' THEN
    RAISE EXCEPTION 'stage % of execution % is %, not in_progress: it cannot complete',
      v_log.stage_id, v_log.execution_id, v_log.status
      USING ERRCODE = 'object_not_in_prerequisite_state';
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
  IF v_exec.status = 'in_progress' AND v_done = jsonb_array_length(v_stages) THEN
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

-- Record a stage's failure for good: stage log and task failed, stage_failed, and the execution
-- failed with workflow_failed (once: a sibling failing later adds its stage_failed only).
-- Returns the execution's status afterwards.
CREATE FUNCTION lifecycle_fail_stage(
  p_log_id     uuid,
  p_task_id    uuid DEFAULT NULL,
  p_error      text DEFAULT NULL,
  p_error_code text DEFAULT NULL,
  p_now        timestamptz DEFAULT now()
) RETURNS text
LANGUAGE plpgsql
AS $$
DECLARE
  v_exec workflow_executions;
  v_log  workflow_execution_logs;
  v_msg  text := coalesce(nullif(p_error, ''), 'stage failed');
BEGIN
  -- LOCK: execution, then stage log
  SELECT e.* INTO v_exec FROM workflow_executions e
   WHERE e.id = (SELECT l.execution_id FROM workflow_execution_logs l WHERE l.id = p_log_id)
   FOR UPDATE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'unknown stage log %', p_log_id USING ERRCODE = 'no_data_found';
  END IF;
  SELECT * INTO v_log FROM workflow_execution_logs l WHERE l.id = p_log_id FOR UPDATE;
  IF v_log.status <> 'in_progress' THEN
    RAISE EXCEPTION 'stage % of execution % is %, not in_progress: it cannot fail',
      v_log.stage_id, v_log.execution_id, v_log.status
      USING ERRCODE = 'object_not_in_prerequisite_state';
  END IF;

  -- TRANSITION: log, task
  UPDATE workflow_execution_logs l
     SET status = 'failed', error_message = v_msg, completed_at = p_now
   WHERE l.id = p_log_id;
  IF p_task_id IS NOT NULL THEN
    UPDATE task_queue t
       SET status = 'failed', error_message = v_msg, completed_at = p_now, updated_at = p_now
     WHERE t.id = p_task_id AND t.stage_log_id = p_log_id;
  END IF;
  INSERT INTO workflow_events (execution_id, event_type, stage_id, metadata, "timestamp")
  VALUES (v_log.execution_id, 'stage_failed', v_log.stage_id,
          jsonb_build_object('attempt', v_log.attempt_number, 'task_id', p_task_id,
                             'error', v_msg, 'error_code', p_error_code),
          p_now);

  -- TRANSITION: execution
  IF v_exec.status = 'in_progress' THEN
    UPDATE workflow_executions e
       SET status = 'failed', updated_at = p_now,
           error_message = format('stage %s failed: %s', v_log.stage_id, v_msg)
     WHERE e.id = v_exec.id;
    INSERT INTO workflow_events (execution_id, event_type, stage_id, metadata, "timestamp")
    VALUES (v_exec.id, 'workflow_failed', v_log.stage_id,
            jsonb_build_object('stage', v_log.stage_id, 'error', v_msg, 'error_code', p_error_code),
            p_now);
    RETURN 'failed';
  END IF;
  RETURN v_exec.status;
END
$$;
