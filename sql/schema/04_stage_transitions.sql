-- Stage transitions: one execution and its stage logs. Each function is one transaction
-- that locks the execution row first (GUARD / LOCK / TRANSITION).

-- lifecycle.execution_cancel
CREATE OR REPLACE FUNCTION lifecycle.execution_cancel(p_execution_id uuid, p_reason text DEFAULT 'cancelled'::text, p_compensate boolean DEFAULT true, p_now timestamp with time zone DEFAULT now()) RETURNS TABLE(cancelled boolean, status text, previous_status text, dagster_run_id text)
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_exec public.workflow_executions;
BEGIN
  -- LOCK: execution
  SELECT * INTO v_exec FROM public.workflow_executions e WHERE e.id = p_execution_id FOR UPDATE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'unknown workflow execution %', p_execution_id USING ERRCODE = 'no_data_found';
  END IF;
  IF v_exec.status NOT IN ('pending', 'in_progress', 'waiting') THEN
    RETURN QUERY SELECT false, v_exec.status, v_exec.status, v_exec.dagster_run_id;
    RETURN;
  END IF;

  UPDATE public.workflow_executions e
     SET status = 'cancelled', updated_at = p_now,
         error_message = coalesce(nullif(p_reason, ''), 'cancelled')
   WHERE e.id = p_execution_id;
  UPDATE public.workflow_execution_logs l
     SET status = 'skipped', completed_at = p_now, error_message = 'execution cancelled'
   WHERE l.execution_id = p_execution_id AND l.status IN ('pending', 'waiting');
  UPDATE public.task_queue t
     SET status = 'cancelled', updated_at = p_now, completed_at = p_now
   WHERE t.workflow_execution_id = p_execution_id AND t.status = 'pending';
  INSERT INTO public.workflow_events (execution_id, event_type, metadata, "timestamp")
  VALUES (p_execution_id, 'workflow_cancelled',
          jsonb_build_object('reason', coalesce(nullif(p_reason, ''), 'cancelled'),
                             'previous_status', v_exec.status, 'compensate', p_compensate,
                             'dagster_run_id', v_exec.dagster_run_id),
          p_now);
  RETURN QUERY SELECT true, 'cancelled'::text, v_exec.status, v_exec.dagster_run_id;
END
$$;

REVOKE ALL ON FUNCTION lifecycle.execution_cancel(p_execution_id uuid, p_reason text, p_compensate boolean, p_now timestamp with time zone) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.execution_cancel(p_execution_id uuid, p_reason text, p_compensate boolean, p_now timestamp with time zone) TO service_role;


-- lifecycle.stage_complete
CREATE OR REPLACE FUNCTION lifecycle.stage_complete(p_log_id uuid, p_task_id uuid DEFAULT NULL::uuid, p_output jsonb DEFAULT '{}'::jsonb, p_now timestamp with time zone DEFAULT now(), p_attempt integer DEFAULT NULL::integer) RETURNS text
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_exec   public.workflow_executions;
  v_log    public.workflow_execution_logs;
  v_reason text;
  v_problem text;
BEGIN
  -- GUARD: output is a JSON object
  IF jsonb_typeof(p_output) IS DISTINCT FROM 'object' THEN
    RAISE EXCEPTION 'stage output must be a JSON object, got %', coalesce(jsonb_typeof(p_output), 'NULL')
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  -- GUARD: an `end` in it is well formed (docs/branches.md)
  v_problem := lifecycle.end_problem(p_output);
  IF v_problem IS NOT NULL THEN
    RAISE EXCEPTION '%', v_problem USING ERRCODE = 'invalid_parameter_value';
  END IF;

  -- LOCK: execution, then stage log
  SELECT e.* INTO v_exec FROM public.workflow_executions e
   WHERE e.id = (SELECT l.execution_id FROM public.workflow_execution_logs l WHERE l.id = p_log_id)
   FOR UPDATE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'unknown stage log %', p_log_id USING ERRCODE = 'no_data_found';
  END IF;
  SELECT * INTO v_log FROM public.workflow_execution_logs l WHERE l.id = p_log_id FOR UPDATE;

  -- GUARD: fencing
  v_reason := lifecycle.stage_refuse_late_result(v_exec, v_log, p_task_id, p_attempt, 'completed', p_now);
  IF v_reason IS NOT NULL THEN
    -- the current attempt of a running stage is refused only when it timed out
    IF v_exec.status = 'in_progress' AND v_log.status = 'in_progress'
       AND (p_attempt IS NULL OR p_attempt = v_log.attempt_number) THEN
      PERFORM lifecycle.breaker_record_task(p_task_id, false, 'timeout', p_now);
    END IF;
    RETURN v_reason;  -- a refused_* code
  END IF;

  -- TRANSITION: log, task
  UPDATE public.workflow_execution_logs l
     SET status = 'completed', output_data = p_output, completed_at = p_now, error_message = NULL
   WHERE l.id = p_log_id;
  IF p_task_id IS NOT NULL THEN
    UPDATE public.task_queue t
       SET status = 'completed', output_data = p_output, completed_at = p_now, updated_at = p_now
     WHERE t.id = p_task_id AND t.stage_log_id = p_log_id;
    IF NOT FOUND THEN
      RAISE EXCEPTION 'task % does not belong to stage log %', p_task_id, p_log_id
        USING ERRCODE = 'invalid_parameter_value';
    END IF;
  END IF;
  INSERT INTO public.workflow_events (execution_id, event_type, stage_id, metadata, "timestamp")
  VALUES (v_log.execution_id, 'stage_completed', v_log.stage_id,
          jsonb_build_object('attempt', v_log.attempt_number, 'task_id', p_task_id,
                             'duration_ms', round(extract(epoch FROM (p_now - v_log.started_at)) * 1000)),
          p_now);

  -- TRANSITION: breakers
  PERFORM lifecycle.breaker_record_task(p_task_id, true, NULL, p_now);

  -- TRANSITION: an output with `end` completes the execution early (lifecycle.execution_end);
  -- otherwise the stages no fired edge reaches are skipped and the execution completes when every
  -- stage is completed or skipped, or waits for an approval (lifecycle.execution_advance)
  IF p_output ? 'end' THEN
    RETURN lifecycle.execution_end(v_exec.id, v_log.stage_id, p_output #>> '{end,outcome}',
                                   p_output #>> '{end,reason}', p_now);
  END IF;
  RETURN lifecycle.execution_advance(v_exec.id, p_now);
END
$$;

REVOKE ALL ON FUNCTION lifecycle.stage_complete(p_log_id uuid, p_task_id uuid, p_output jsonb, p_now timestamp with time zone, p_attempt integer) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.stage_complete(p_log_id uuid, p_task_id uuid, p_output jsonb, p_now timestamp with time zone, p_attempt integer) TO service_role;


-- lifecycle.execution_ensure
CREATE OR REPLACE FUNCTION lifecycle.execution_ensure(p_definition_id uuid, p_run_id text, p_execution_id uuid DEFAULT NULL::uuid, p_context jsonb DEFAULT '{}'::jsonb, p_now timestamp with time zone DEFAULT now(), p_resume boolean DEFAULT false) RETURNS public.workflow_executions
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v public.workflow_executions;
  v_previous_run text;
BEGIN
  -- GUARD: arguments
  IF p_run_id IS NULL OR p_run_id = '' THEN
    RAISE EXCEPTION 'lifecycle.execution_ensure: a Dagster run id is required'
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF NOT EXISTS (SELECT 1 FROM public.workflow_definitions d WHERE d.id = p_definition_id) THEN
    RAISE EXCEPTION 'unknown workflow definition %', p_definition_id
      USING ERRCODE = 'no_data_found';
  END IF;
  IF p_resume AND p_execution_id IS NULL THEN
    RAISE EXCEPTION 'lifecycle.execution_ensure: resuming needs an execution id'
      USING ERRCODE = 'invalid_parameter_value';
  END IF;

  -- LOCK: the execution row
  IF p_execution_id IS NOT NULL THEN
    SELECT * INTO v FROM public.workflow_executions e WHERE e.id = p_execution_id FOR UPDATE;
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
    INSERT INTO public.workflow_executions AS e (workflow_definition_id, status, context, dagster_run_id,
                                          created_at, updated_at)
    VALUES (p_definition_id, 'pending', coalesce(p_context, '{}'::jsonb), p_run_id, p_now, p_now)
    ON CONFLICT (dagster_run_id) WHERE batch_id IS NULL DO NOTHING;  -- one run, one execution (outside batches)
    SELECT * INTO v FROM public.workflow_executions e WHERE e.dagster_run_id = p_run_id AND e.batch_id IS NULL FOR UPDATE;
    IF v.workflow_definition_id <> p_definition_id THEN
      RAISE EXCEPTION 'Dagster run % already executes definition %, not %',
        p_run_id, v.workflow_definition_id, p_definition_id
        USING ERRCODE = 'invalid_parameter_value';
    END IF;
  END IF;

  -- TRANSITION
  IF p_resume AND v.dagster_run_id IS DISTINCT FROM p_run_id AND v.status IN ('in_progress', 'failed') THEN
    v_previous_run := v.dagster_run_id;
    UPDATE public.workflow_executions e
       SET status = 'in_progress', dagster_run_id = p_run_id, updated_at = p_now,
           error_message = CASE WHEN v.status = 'failed' THEN NULL ELSE e.error_message END
     WHERE e.id = v.id
    RETURNING * INTO v;
    INSERT INTO public.workflow_events (execution_id, event_type, metadata, "timestamp")
    VALUES (v.id, 'workflow_resumed',
            jsonb_build_object('dagster_run_id', p_run_id, 'previous_dagster_run_id', v_previous_run),
            p_now);
  ELSIF v.status = 'pending' OR (v.status = 'in_progress' AND v.dagster_run_id IS NULL) THEN
    UPDATE public.workflow_executions e
       SET status = 'in_progress', dagster_run_id = p_run_id, updated_at = p_now
     WHERE e.id = v.id
    RETURNING * INTO v;
    INSERT INTO public.workflow_events (execution_id, event_type, metadata, "timestamp")
    VALUES (v.id, 'workflow_started', jsonb_build_object('dagster_run_id', p_run_id), p_now);
  ELSIF v.status IN ('waiting', 'completed') AND v.dagster_run_id = p_run_id THEN
    NULL;  -- its own run's other ops: an approval waits, or a stage ended the execution early
           -- (lifecycle.stage_readiness tells each op to leave its stage)
  ELSIF v.status = 'waiting' THEN
    RAISE EXCEPTION 'execution % is waiting for a decision on an approval stage and runs no more stages until then', v.id
      USING ERRCODE = 'object_not_in_prerequisite_state',
            HINT = 'decide it: lifecycle-dagster decide EXECUTION_ID STAGE approve|reject';
  ELSIF v.status <> 'in_progress' THEN
    RAISE EXCEPTION 'execution % is % and runs no more stages', v.id, v.status
      USING ERRCODE = 'object_not_in_prerequisite_state';
  END IF;
  RETURN v;
END
$$;

REVOKE ALL ON FUNCTION lifecycle.execution_ensure(p_definition_id uuid, p_run_id text, p_execution_id uuid, p_context jsonb, p_now timestamp with time zone, p_resume boolean) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.execution_ensure(p_definition_id uuid, p_run_id text, p_execution_id uuid, p_context jsonb, p_now timestamp with time zone, p_resume boolean) TO service_role;


-- lifecycle.execution_fail
CREATE OR REPLACE FUNCTION lifecycle.execution_fail(p_execution_id uuid, p_reason text, p_run_id text DEFAULT NULL::text, p_now timestamp with time zone DEFAULT now()) RETURNS boolean
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_exec public.workflow_executions;
BEGIN
  -- LOCK: execution
  SELECT * INTO v_exec FROM public.workflow_executions e WHERE e.id = p_execution_id FOR UPDATE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'unknown workflow execution %', p_execution_id USING ERRCODE = 'no_data_found';
  END IF;
  IF v_exec.status <> 'in_progress' OR (p_run_id IS NOT NULL AND v_exec.dagster_run_id IS DISTINCT FROM p_run_id) THEN
    RETURN false;
  END IF;
  UPDATE public.workflow_execution_logs l
     SET status = 'failed', completed_at = p_now, error_message = p_reason
   WHERE l.execution_id = p_execution_id AND l.status = 'in_progress';
  UPDATE public.task_queue t
     SET status = 'failed', completed_at = p_now, updated_at = p_now, error_message = p_reason
   WHERE t.workflow_execution_id = p_execution_id AND t.status = 'in_progress';
  UPDATE public.workflow_executions e
     SET status = 'failed', error_message = p_reason, updated_at = p_now
   WHERE e.id = p_execution_id;
  INSERT INTO public.workflow_events (execution_id, event_type, stage_id, metadata, "timestamp")
  VALUES (p_execution_id, 'workflow_failed', v_exec.current_stage,
          jsonb_build_object('error', p_reason, 'error_code', 'run_lost', 'dagster_run_id', v_exec.dagster_run_id),
          p_now);
  RETURN true;
END
$$;

REVOKE ALL ON FUNCTION lifecycle.execution_fail(p_execution_id uuid, p_reason text, p_run_id text, p_now timestamp with time zone) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.execution_fail(p_execution_id uuid, p_reason text, p_run_id text, p_now timestamp with time zone) TO service_role;


-- lifecycle.stage_fail
CREATE OR REPLACE FUNCTION lifecycle.stage_fail(p_log_id uuid, p_task_id uuid DEFAULT NULL::uuid, p_error text DEFAULT NULL::text, p_error_code text DEFAULT NULL::text, p_now timestamp with time zone DEFAULT now(), p_attempt integer DEFAULT NULL::integer) RETURNS text
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_exec   public.workflow_executions;
  v_log    public.workflow_execution_logs;
  v_msg    text := coalesce(nullif(p_error, ''), 'stage failed');
  v_reason text;
BEGIN
  -- LOCK: execution, then stage log
  SELECT e.* INTO v_exec FROM public.workflow_executions e
   WHERE e.id = (SELECT l.execution_id FROM public.workflow_execution_logs l WHERE l.id = p_log_id)
   FOR UPDATE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'unknown stage log %', p_log_id USING ERRCODE = 'no_data_found';
  END IF;
  SELECT * INTO v_log FROM public.workflow_execution_logs l WHERE l.id = p_log_id FOR UPDATE;

  -- GUARD: fencing (a deadline that passed does not stop a failure from being recorded)
  IF (p_attempt IS NOT NULL AND p_attempt <> v_log.attempt_number)
     OR v_log.status <> 'in_progress' OR v_exec.status <> 'in_progress' THEN
    v_reason := lifecycle.stage_refuse_late_result(v_exec, v_log, p_task_id, p_attempt, 'failed', p_now);
    RETURN v_reason;  -- a refused_* code
  END IF;

  -- TRANSITION: log, task
  UPDATE public.workflow_execution_logs l
     SET status = 'failed', error_message = v_msg, completed_at = p_now
   WHERE l.id = p_log_id;
  IF p_task_id IS NOT NULL THEN
    UPDATE public.task_queue t
       SET status = 'failed', error_message = v_msg, completed_at = p_now, updated_at = p_now
     WHERE t.id = p_task_id AND t.stage_log_id = p_log_id AND t.status = 'in_progress';
  END IF;
  INSERT INTO public.workflow_events (execution_id, event_type, stage_id, metadata, "timestamp")
  VALUES (v_log.execution_id, 'stage_failed', v_log.stage_id,
          jsonb_build_object('attempt', v_log.attempt_number, 'task_id', p_task_id,
                             'error', v_msg, 'error_code', p_error_code),
          p_now);

  -- TRANSITION: breakers
  PERFORM lifecycle.breaker_record_task(p_task_id, false, p_error_code, p_now);

  -- TRANSITION: execution
  UPDATE public.workflow_executions e
     SET status = 'failed', updated_at = p_now,
         error_message = format('stage %s failed: %s', v_log.stage_id, v_msg)
   WHERE e.id = v_exec.id;
  INSERT INTO public.workflow_events (execution_id, event_type, stage_id, metadata, "timestamp")
  VALUES (v_exec.id, 'workflow_failed', v_log.stage_id,
          jsonb_build_object('stage', v_log.stage_id, 'error', v_msg, 'error_code', p_error_code),
          p_now);
  RETURN 'failed';
END
$$;

REVOKE ALL ON FUNCTION lifecycle.stage_fail(p_log_id uuid, p_task_id uuid, p_error text, p_error_code text, p_now timestamp with time zone, p_attempt integer) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.stage_fail(p_log_id uuid, p_task_id uuid, p_error text, p_error_code text, p_now timestamp with time zone, p_attempt integer) TO service_role;


-- lifecycle.run_heartbeat
CREATE OR REPLACE FUNCTION lifecycle.run_heartbeat(p_run_id text, p_now timestamp with time zone DEFAULT now()) RETURNS boolean
    LANGUAGE sql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
  WITH hit AS (
    -- a forward run beats for its in_progress execution (a batch run for each of its members), a
    -- compensation run for the execution it compensates (the reconciler takes over a compensation
    -- whose run stopped beating). Rows a transition holds are skipped, never waited for: a batch
    -- statement locks its members in id order and a heartbeat locking them in another would
    -- deadlock with it; the transition moves updated_at anyway, which the stale check reads too
    UPDATE public.workflow_executions e SET heartbeat_at = p_now
    WHERE e.id IN (SELECT x.id FROM public.workflow_executions x
                    WHERE (x.status = 'in_progress' AND x.dagster_run_id = p_run_id)
                       OR (x.status = 'compensating' AND x.compensation_run_id = p_run_id)
                    ORDER BY x.id
                    FOR UPDATE SKIP LOCKED)
    RETURNING 1
  )
  SELECT EXISTS (SELECT 1 FROM hit)
$$;

REVOKE ALL ON FUNCTION lifecycle.run_heartbeat(p_run_id text, p_now timestamp with time zone) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.run_heartbeat(p_run_id text, p_now timestamp with time zone) TO service_role;


-- lifecycle.execution_schedule: the pending execution of one schedule tick (p_tick: its key,
-- 'schedule:<definition id>:<tick instant, UTC>'), with p_context, inserted once however often
-- the tick is evaluated. Returns ('created', id) when this call inserted it, ('exists', id) when
-- an earlier call did, ('inactive', NULL) when the definition is no longer the active version (a
-- schedule of a code location not reloaded since: nothing is inserted). Errors: no_data_found
-- (unknown definition), invalid_parameter_value (a key not of that definition).
CREATE OR REPLACE FUNCTION lifecycle.execution_schedule(p_definition_id uuid, p_tick text, p_context jsonb DEFAULT '{}'::jsonb, p_now timestamp with time zone DEFAULT now()) RETURNS TABLE(status text, execution_id uuid)
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
#variable_conflict use_column
DECLARE
  v_active boolean;
  v_id     uuid;
BEGIN
  -- GUARD: the key names this definition
  IF p_tick IS NULL OR left(p_tick, length('schedule:' || p_definition_id::text || ':'))
                      <> 'schedule:' || p_definition_id::text || ':' THEN
    RAISE EXCEPTION 'schedule tick key % is not of definition %', quote_nullable(p_tick), p_definition_id
      USING ERRCODE = 'invalid_parameter_value',
            HINT = 'the key is schedule:<definition id>:<tick instant, UTC>';
  END IF;
  -- LOCK: the definition (shared), so that it stays active until this execution is committed
  SELECT d.is_active INTO v_active FROM public.workflow_definitions d WHERE d.id = p_definition_id FOR SHARE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'unknown workflow definition %', p_definition_id USING ERRCODE = 'no_data_found';
  END IF;
  IF NOT v_active THEN
    RETURN QUERY SELECT 'inactive'::text, NULL::uuid;
    RETURN;
  END IF;
  INSERT INTO public.workflow_executions (workflow_definition_id, status, context, created_by, created_at,
                                          updated_at, schedule_tick)
  VALUES (p_definition_id, 'pending', coalesce(p_context, '{}'::jsonb), NULL, p_now, p_now, p_tick)
  ON CONFLICT (schedule_tick) DO NOTHING
  RETURNING id INTO v_id;
  IF v_id IS NOT NULL THEN
    RETURN QUERY SELECT 'created'::text, v_id;
    RETURN;
  END IF;
  SELECT e.id INTO v_id FROM public.workflow_executions e WHERE e.schedule_tick = p_tick;
  RETURN QUERY SELECT 'exists'::text, v_id;
END
$$;

REVOKE ALL ON FUNCTION lifecycle.execution_schedule(p_definition_id uuid, p_tick text, p_context jsonb, p_now timestamp with time zone) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.execution_schedule(p_definition_id uuid, p_tick text, p_context jsonb, p_now timestamp with time zone) TO service_role;


-- lifecycle.executions_launchable
-- p_jobs: the job names the code location has loaded (<name>__v<version>, as
-- lifecycle_dagster.location.job_factory.job_name makes them): rows of other versions never take
-- a place in the batch, so they cannot keep launchable rows waiting. Batched versions are not in
-- p_jobs (lifecycle_dagster.location.sensors): their rows go to lifecycle.batch_form.
CREATE OR REPLACE FUNCTION lifecycle.executions_launchable(p_jobs text[], p_limit integer DEFAULT 100) RETURNS TABLE(execution_id uuid, workflow_name text, version integer, created_at timestamp with time zone, pending_reason text)
    LANGUAGE sql STABLE
    AS $$
  SELECT e.id, d.name, d.version, e.created_at, e.pending_reason
  FROM public.workflow_executions e JOIN public.workflow_definitions d ON d.id = e.workflow_definition_id
  WHERE e.status = 'pending' AND e.dagster_run_id IS NULL
    AND d.name || '__v' || d.version::text = ANY (p_jobs)
    -- a batch's member is launched with its batch (lifecycle.batch_form)
    AND NOT EXISTS (SELECT 1 FROM lifecycle.batch_members m WHERE m.execution_id = e.id)
  ORDER BY e.created_at, e.id
  LIMIT p_limit
$$;

REVOKE ALL ON FUNCTION lifecycle.executions_launchable(p_jobs text[], p_limit integer) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.executions_launchable(p_jobs text[], p_limit integer) TO service_role;


-- lifecycle.executions_unloaded
-- Pending rows not bound to a run whose job is not among p_jobs (see executions_launchable) and
-- that do not say why they wait yet: the launch sensor gives each its pending_reason, once
CREATE OR REPLACE FUNCTION lifecycle.executions_unloaded(p_jobs text[], p_limit integer DEFAULT 100) RETURNS TABLE(execution_id uuid, workflow_name text, version integer)
    LANGUAGE sql STABLE
    AS $$
  SELECT e.id, d.name, d.version
  FROM public.workflow_executions e JOIN public.workflow_definitions d ON d.id = e.workflow_definition_id
  WHERE e.status = 'pending' AND e.dagster_run_id IS NULL AND e.pending_reason IS NULL
    AND NOT (d.name || '__v' || d.version::text = ANY (p_jobs))
  ORDER BY e.created_at, e.id
  LIMIT p_limit
$$;

REVOKE ALL ON FUNCTION lifecycle.executions_unloaded(p_jobs text[], p_limit integer) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.executions_unloaded(p_jobs text[], p_limit integer) TO service_role;


-- lifecycle.stage_refuse_late_result
CREATE OR REPLACE FUNCTION lifecycle.stage_refuse_late_result(v_exec public.workflow_executions, v_log public.workflow_execution_logs, p_task_id uuid, p_attempt integer, p_outcome text, p_now timestamp with time zone) RETURNS text
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_code     text;
  v_reason   text;
  v_deadline timestamptz;
BEGIN
  -- returns NULL (the result may be recorded) or a status code: refused_stale_attempt,
  -- refused_stage_not_running, refused_execution_stopped, refused_timed_out; the reason in words
  -- goes to the task, the stage log and the stage_result_refused event
  SELECT t.deadline_at INTO v_deadline FROM public.task_queue t WHERE t.id = p_task_id FOR UPDATE;
  IF p_attempt IS NOT NULL AND p_attempt <> v_log.attempt_number THEN
    v_code := 'refused_stale_attempt';
    v_reason := format('attempt %s is not the current attempt %s', p_attempt, v_log.attempt_number);
  ELSIF v_log.status <> 'in_progress' THEN
    v_code := 'refused_stage_not_running';
    v_reason := format('stage is %s, not in_progress', v_log.status);
  ELSIF v_exec.status <> 'in_progress' THEN
    v_code := 'refused_execution_stopped';
    v_reason := format('execution is %s', v_exec.status);
  ELSIF v_deadline IS NOT NULL AND p_now > v_deadline THEN
    v_code := 'refused_timed_out';
    v_reason := format('attempt %s timed out at %s', v_log.attempt_number, v_deadline);
  END IF;
  IF v_code IS NULL THEN
    RETURN NULL;
  END IF;

  IF p_task_id IS NOT NULL THEN
    UPDATE public.task_queue t
       SET status = CASE WHEN v_exec.status = 'in_progress' THEN 'failed' ELSE 'cancelled' END,
           error_message = 'result refused: ' || v_reason, completed_at = p_now, updated_at = p_now
     WHERE t.id = p_task_id AND t.status = 'in_progress';
  END IF;
  IF v_log.status = 'in_progress' AND (p_attempt IS NULL OR p_attempt = v_log.attempt_number) THEN
    IF v_exec.status = 'in_progress' THEN
      -- timed out: the attempt failed (the caller decides on a retry)
      NULL;
    ELSE
      UPDATE public.workflow_execution_logs l
         SET status = 'skipped', completed_at = p_now, error_message = 'result refused: ' || v_reason
       WHERE l.id = v_log.id;
    END IF;
  END IF;
  INSERT INTO public.workflow_events (execution_id, event_type, stage_id, metadata, "timestamp")
  VALUES (v_log.execution_id, 'stage_result_refused', v_log.stage_id,
          jsonb_build_object('attempt', coalesce(p_attempt, v_log.attempt_number),
                             'outcome', p_outcome, 'code', v_code, 'reason', v_reason, 'task_id', p_task_id),
          p_now);
  RETURN v_code;
END
$$;

REVOKE ALL ON FUNCTION lifecycle.stage_refuse_late_result(v_exec public.workflow_executions, v_log public.workflow_execution_logs, p_task_id uuid, p_attempt integer, p_outcome text, p_now timestamp with time zone) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.stage_refuse_late_result(v_exec public.workflow_executions, v_log public.workflow_execution_logs, p_task_id uuid, p_attempt integer, p_outcome text, p_now timestamp with time zone) TO service_role;


-- lifecycle.retry_delay
CREATE OR REPLACE FUNCTION lifecycle.retry_delay(p_attempt integer, p_base double precision, p_cap double precision, p_multiplier double precision, p_jitter text, p_u double precision) RETURNS double precision
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

REVOKE ALL ON FUNCTION lifecycle.retry_delay(p_attempt integer, p_base double precision, p_cap double precision, p_multiplier double precision, p_jitter text, p_u double precision) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.retry_delay(p_attempt integer, p_base double precision, p_cap double precision, p_multiplier double precision, p_jitter text, p_u double precision) TO service_role;


-- lifecycle.stage_schedule_retry
CREATE OR REPLACE FUNCTION lifecycle.stage_schedule_retry(p_log_id uuid, p_task_id uuid, p_attempt integer, p_error text, p_error_code text, p_error_class text, p_delay_s double precision, p_now timestamp with time zone DEFAULT now()) RETURNS text
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_exec   public.workflow_executions;
  v_log    public.workflow_execution_logs;
  v_reason text;
BEGIN
  -- GUARD: arguments
  IF p_delay_s IS NULL OR NOT p_delay_s >= 0 OR p_delay_s = 'Infinity' THEN
    RAISE EXCEPTION 'retry delay must be a finite number of seconds >= 0, got %', p_delay_s
      USING ERRCODE = 'invalid_parameter_value';
  END IF;

  -- LOCK: execution, then stage log
  SELECT e.* INTO v_exec FROM public.workflow_executions e
   WHERE e.id = (SELECT l.execution_id FROM public.workflow_execution_logs l WHERE l.id = p_log_id)
   FOR UPDATE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'unknown stage log %', p_log_id USING ERRCODE = 'no_data_found';
  END IF;
  SELECT * INTO v_log FROM public.workflow_execution_logs l WHERE l.id = p_log_id FOR UPDATE;

  -- GUARD: fencing
  IF p_attempt <> v_log.attempt_number OR v_log.status <> 'in_progress' OR v_exec.status <> 'in_progress' THEN
    v_reason := lifecycle.stage_refuse_late_result(v_exec, v_log, p_task_id, p_attempt, 'retrying', p_now);
    RETURN v_reason;  -- a refused_* code
  END IF;

  -- TRANSITION: log -> pending, task -> failed
  UPDATE public.workflow_execution_logs l
     SET status = 'pending', error_message = p_error,
         not_before = p_now + make_interval(secs => p_delay_s)
   WHERE l.id = p_log_id;
  IF p_task_id IS NOT NULL THEN
    UPDATE public.task_queue t
       SET status = 'failed', error_message = p_error, completed_at = p_now, updated_at = p_now
     WHERE t.id = p_task_id AND t.stage_log_id = p_log_id AND t.status = 'in_progress';
  END IF;
  INSERT INTO public.workflow_events (execution_id, event_type, stage_id, metadata, "timestamp")
  VALUES (v_log.execution_id, 'stage_retrying', v_log.stage_id,
          jsonb_build_object('attempt', p_attempt::bigint + 1, 'failed_attempt', p_attempt,
                             'delay_s', p_delay_s, 'not_before', p_now + make_interval(secs => p_delay_s),
                             'error_code', p_error_code, 'error_class', p_error_class,
                             'error', p_error, 'task_id', p_task_id),
          p_now);

  -- TRANSITION: breakers
  PERFORM lifecycle.breaker_record_task(p_task_id, false, p_error_code, p_now);
  RETURN 'retrying';
END
$$;

REVOKE ALL ON FUNCTION lifecycle.stage_schedule_retry(p_log_id uuid, p_task_id uuid, p_attempt integer, p_error text, p_error_code text, p_error_class text, p_delay_s double precision, p_now timestamp with time zone) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.stage_schedule_retry(p_log_id uuid, p_task_id uuid, p_attempt integer, p_error text, p_error_code text, p_error_class text, p_delay_s double precision, p_now timestamp with time zone) TO service_role;


-- lifecycle.execution_set_pending_reason
CREATE OR REPLACE FUNCTION lifecycle.execution_set_pending_reason(p_execution_id uuid, p_reason text, p_now timestamp with time zone DEFAULT now()) RETURNS boolean
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_exec public.workflow_executions;
BEGIN
  SELECT * INTO v_exec FROM public.workflow_executions e WHERE e.id = p_execution_id FOR UPDATE;
  IF NOT FOUND OR v_exec.status <> 'pending' OR v_exec.pending_reason IS NOT DISTINCT FROM p_reason THEN
    RETURN false;
  END IF;
  UPDATE public.workflow_executions e SET pending_reason = p_reason, updated_at = p_now WHERE e.id = p_execution_id;
  INSERT INTO public.workflow_events (execution_id, event_type, metadata, "timestamp")
  VALUES (p_execution_id, 'launch_waiting', jsonb_build_object('reason', p_reason), p_now);
  RETURN true;
END
$$;

REVOKE ALL ON FUNCTION lifecycle.execution_set_pending_reason(p_execution_id uuid, p_reason text, p_now timestamp with time zone) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.execution_set_pending_reason(p_execution_id uuid, p_reason text, p_now timestamp with time zone) TO service_role;


-- lifecycle.execution_set_trace_parent
-- The execution's trace: p_trace_parent (a W3C traceparent, 00-<trace id>-<span id>-<flags>) is
-- stored when the execution has none yet; returns the one stored, so every run of the execution
-- continues the first run's trace. Raises no_data_found for an unknown execution, check_violation
-- (workflow_executions_trace_parent_valid) for a value that is not a traceparent.
CREATE OR REPLACE FUNCTION lifecycle.execution_set_trace_parent(p_execution_id uuid, p_trace_parent text) RETURNS text
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_exec public.workflow_executions;
BEGIN
  -- LOCK: the execution row first
  SELECT * INTO v_exec FROM public.workflow_executions e WHERE e.id = p_execution_id FOR UPDATE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'unknown workflow execution %', p_execution_id USING ERRCODE = 'no_data_found';
  END IF;
  IF v_exec.trace_parent IS NOT NULL THEN
    RETURN v_exec.trace_parent;
  END IF;
  UPDATE public.workflow_executions e SET trace_parent = p_trace_parent WHERE e.id = p_execution_id;
  RETURN p_trace_parent;
END
$$;

REVOKE ALL ON FUNCTION lifecycle.execution_set_trace_parent(p_execution_id uuid, p_trace_parent text) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.execution_set_trace_parent(p_execution_id uuid, p_trace_parent text) TO service_role;


-- lifecycle.stage_retry_policy
CREATE OR REPLACE FUNCTION lifecycle.stage_retry_policy(p_definition_id uuid, p_stage_id text) RETURNS jsonb
    LANGUAGE sql STABLE
    AS $$
  WITH d AS (
    SELECT d.dag_schema FROM public.workflow_definitions d WHERE d.id = p_definition_id
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

REVOKE ALL ON FUNCTION lifecycle.stage_retry_policy(p_definition_id uuid, p_stage_id text) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.stage_retry_policy(p_definition_id uuid, p_stage_id text) TO service_role;


-- lifecycle.executions_stale
CREATE OR REPLACE FUNCTION lifecycle.executions_stale(p_timeout_s double precision, p_now timestamp with time zone DEFAULT now()) RETURNS TABLE(execution_id uuid, dagster_run_id text, last_seen timestamp with time zone)
    LANGUAGE sql STABLE
    AS $$
  SELECT e.id, e.dagster_run_id, greatest(e.heartbeat_at, e.updated_at)
  FROM public.workflow_executions e
  WHERE e.status = 'in_progress' AND e.dagster_run_id IS NOT NULL
    AND greatest(e.heartbeat_at, e.updated_at) < p_now - make_interval(secs => p_timeout_s)
    AND NOT EXISTS (SELECT 1 FROM public.workflow_execution_logs l
                    WHERE l.execution_id = e.id AND l.status = 'pending'
                      AND l.not_before > p_now - make_interval(secs => p_timeout_s))
    -- continued by a decision after its run's part: that run's silence says nothing of it
    AND NOT lifecycle.execution_continued_after(e.id, e.dagster_run_id)
  ORDER BY e.updated_at
$$;

REVOKE ALL ON FUNCTION lifecycle.executions_stale(p_timeout_s double precision, p_now timestamp with time zone) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.executions_stale(p_timeout_s double precision, p_now timestamp with time zone) TO service_role;


-- lifecycle.stage_start
CREATE OR REPLACE FUNCTION lifecycle.stage_start(p_execution_id uuid, p_stage_id text, p_capability text, p_ancestors jsonb DEFAULT '{}'::jsonb, p_attempt integer DEFAULT 1, p_now timestamp with time zone DEFAULT now(), p_timeout_s double precision DEFAULT NULL::double precision, p_resume boolean DEFAULT false, p_max_attempts integer DEFAULT NULL::integer, p_run_id text DEFAULT NULL::text) RETURNS TABLE(log_id uuid, task_id uuid, agent_id uuid, agent_name text, agent_kind text, input_data jsonb, attempt_number integer, already_completed boolean, output_data jsonb)
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_exec     public.workflow_executions;
  v_missing  text;
  v_upstream jsonb;
  v_input    jsonb;
  v_log_id   uuid;
  v_attempt  integer;
  v_agent    record;
  v_task_id  uuid;
  v_existing public.workflow_execution_logs;
  v_task     public.task_queue;
  v_routed   boolean := false;
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
  SELECT * INTO v_exec FROM public.workflow_executions e WHERE e.id = p_execution_id FOR UPDATE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'unknown workflow execution %', p_execution_id USING ERRCODE = 'no_data_found';
  END IF;
  IF v_exec.status <> 'in_progress' THEN
    RAISE EXCEPTION 'execution % is %: stage % cannot start', p_execution_id, v_exec.status, p_stage_id
      USING ERRCODE = 'object_not_in_prerequisite_state';
  END IF;
  -- the op ensures its execution once per run (lifecycle.execution_ensure), not per stage: a run
  -- that another run took over (a resume) starts no more stages
  IF p_run_id IS NOT NULL AND v_exec.dagster_run_id IS DISTINCT FROM p_run_id THEN
    RAISE EXCEPTION 'execution % is bound to Dagster run %, not %: stage % cannot start',
      p_execution_id, v_exec.dagster_run_id, p_run_id, p_stage_id
      USING ERRCODE = 'unique_violation';
  END IF;

  -- GUARD: every ancestor completed or skipped (a branch not taken); the outputs of the completed
  -- ones are the stage's upstream input (one pass)
  SELECT string_agg(a.key, ', ' ORDER BY a.key) FILTER (WHERE l.status IS NULL OR l.status NOT IN ('completed', 'skipped')),
         coalesce(jsonb_object_agg(a.key, jsonb_build_object('capability', a.value, 'output', l.output_data))
                    FILTER (WHERE l.status = 'completed'),
                  '{}'::jsonb)
    INTO v_missing, v_upstream
  FROM jsonb_each_text(coalesce(p_ancestors, '{}'::jsonb)) a
  LEFT JOIN public.workflow_execution_logs l ON l.execution_id = p_execution_id AND l.stage_id = a.key;
  IF v_missing IS NOT NULL THEN
    RAISE EXCEPTION 'stage % of execution % cannot start: upstream stage(s) % not completed',
      p_stage_id, p_execution_id, v_missing
      USING ERRCODE = 'object_not_in_prerequisite_state';
  END IF;
  v_input := jsonb_build_object('context', v_exec.context, 'upstream', v_upstream);

  -- LOCK: the stage log, if there is one (a resume or a restart decides from it)
  SELECT * INTO v_existing FROM public.workflow_execution_logs l
   WHERE l.execution_id = p_execution_id AND l.stage_id = p_stage_id FOR UPDATE;

  -- RESUME: a completed stage is kept; a failed one becomes pending for its next attempt
  IF p_resume AND v_existing.status = 'completed' THEN
    RETURN QUERY SELECT v_existing.id, NULL::uuid, NULL::uuid, NULL::text, NULL::text,
                        v_existing.input_data, v_existing.attempt_number, true, v_existing.output_data;
    RETURN;
  ELSIF p_resume AND v_existing.status = 'failed' THEN
    PERFORM lifecycle.attempt_after(v_existing.attempt_number, p_execution_id, p_stage_id);
    UPDATE public.workflow_execution_logs l
       SET status = 'pending', attempt_number = l.attempt_number + 1
     WHERE l.id = v_existing.id
    RETURNING * INTO v_existing;
  END IF;

  -- RESTART: the attempt is in progress already (the op runs again after a lost connection, a
  -- second call, a task a worker claimed): it keeps its number and its task, whoever created it
  -- (a reaped lease's requeued task, a hand-enqueued one); nothing is started or counted twice.
  -- An attempt whose task ended unrecorded (abandoned on a timeout) is followed by the next one.
  v_attempt := p_attempt;
  IF v_existing.status = 'in_progress' THEN
    v_attempt := v_existing.attempt_number;
    SELECT t.* INTO v_task FROM public.task_queue t
     WHERE t.stage_log_id = v_existing.id AND t.attempt = v_existing.attempt_number FOR UPDATE;
    IF v_task.id IS NULL THEN
      SELECT r.agent_id, r.agent_name, r.agent_kind INTO v_agent FROM lifecycle.capability_route(p_capability) r;
      v_routed := true;
      IF v_agent.agent_id IS NULL THEN  -- started before with no agent to call: the same answer
        RETURN QUERY SELECT v_existing.id, NULL::uuid, NULL::uuid, NULL::text, NULL::text,
                            v_existing.input_data, v_attempt, false, NULL::jsonb;
        RETURN;
      END IF;
    ELSIF v_task.status IN ('pending', 'in_progress')
          OR (v_task.claimed_by IS DISTINCT FROM 'op' AND v_task.status IN ('completed', 'failed')) THEN
      IF v_task.claimed_by = 'op' THEN  -- the op calls its agent again: a new lease, a new deadline
        UPDATE public.task_queue t
           SET lease_token = least(t.lease_token, 9223372036854775806) + 1, started_at = p_now, updated_at = p_now,
               deadline_at = p_now + make_interval(secs => p_timeout_s), timeout_s = p_timeout_s
         WHERE t.id = v_task.id;
      END IF;
      RETURN QUERY SELECT v_existing.id, v_task.id, a.id, a.name, a.kind, v_existing.input_data, v_attempt,
                          false, NULL::jsonb
                     FROM (SELECT 1) one LEFT JOIN public.agents a ON a.id = v_task.agent_id;
      RETURN;
    ELSE
      v_attempt := lifecycle.attempt_after(v_existing.attempt_number, p_execution_id, p_stage_id);
    END IF;
  ELSIF v_existing.status = 'pending' THEN
    -- the next attempt: after every task the stage had (a hand-enqueued pending task is superseded)
    SELECT lifecycle.attempt_after(greatest(v_existing.attempt_number - 1, p_attempt - 1, max(t.attempt)),
                                   p_execution_id, p_stage_id)
      INTO v_attempt FROM public.task_queue t WHERE t.stage_log_id = v_existing.id;
  END IF;

  -- TRANSITION: stage log -> in_progress (the transition guard refuses a completed stage)
  INSERT INTO public.workflow_execution_logs AS l (execution_id, stage_id, status, attempt_number,
                                            started_at, input_data)
  VALUES (p_execution_id, p_stage_id, 'in_progress', v_attempt, p_now, v_input)
  ON CONFLICT ON CONSTRAINT workflow_execution_logs_one_per_stage DO UPDATE
    SET status = 'in_progress', attempt_number = EXCLUDED.attempt_number,
        started_at = EXCLUDED.started_at, completed_at = NULL, not_before = NULL,
        input_data = EXCLUDED.input_data, output_data = NULL, error_message = NULL
  RETURNING l.id, l.attempt_number INTO v_log_id, v_attempt;

  UPDATE public.workflow_executions e SET current_stage = p_stage_id, updated_at = p_now
   WHERE e.id = p_execution_id;

  IF NOT v_routed THEN
    SELECT r.agent_id, r.agent_name, r.agent_kind INTO v_agent
    FROM lifecycle.capability_route(p_capability) r;
  END IF;

  IF v_agent.agent_id IS NOT NULL THEN
    -- python and http agents: the op is the worker, the task is claimed at once; queue agents: the
    -- task waits, pending, for an external worker (lifecycle.task_claim)
    INSERT INTO public.task_queue (workflow_execution_id, task_type, capability, input_data, status, agent_id,
                            stage_log_id, attempt, max_attempts, created_at, updated_at, started_at,
                            deadline_at, timeout_s, claimed_by, lease_token)
    VALUES (p_execution_id, p_stage_id, p_capability, v_input,
            CASE WHEN v_agent.agent_kind = 'queue' THEN 'pending' ELSE 'in_progress' END,
            v_agent.agent_id, v_log_id, v_attempt, p_max_attempts, p_now, p_now,
            CASE WHEN v_agent.agent_kind = 'queue' THEN NULL ELSE p_now END,
            p_now + make_interval(secs => p_timeout_s), p_timeout_s,
            CASE WHEN v_agent.agent_kind = 'queue' THEN NULL ELSE 'op' END,
            CASE WHEN v_agent.agent_kind = 'queue' THEN 0 ELSE 1 END)
    RETURNING id INTO v_task_id;
  END IF;

  INSERT INTO public.workflow_events (execution_id, event_type, stage_id, metadata, "timestamp")
  VALUES (p_execution_id, 'stage_started', p_stage_id,
          jsonb_build_object('attempt', v_attempt, 'capability', p_capability,
                             'agent', v_agent.agent_name, 'task_id', v_task_id,
                             'timeout_s', p_timeout_s),
          p_now);

  -- the row, as assignments (no statement of its own)
  log_id := v_log_id; task_id := v_task_id; agent_id := v_agent.agent_id; agent_name := v_agent.agent_name;
  agent_kind := v_agent.agent_kind; input_data := v_input; attempt_number := v_attempt;
  already_completed := false; output_data := NULL;
  RETURN NEXT;
END
$$;

REVOKE ALL ON FUNCTION lifecycle.stage_start(p_execution_id uuid, p_stage_id text, p_capability text, p_ancestors jsonb, p_attempt integer, p_now timestamp with time zone, p_timeout_s double precision, p_resume boolean, p_max_attempts integer, p_run_id text) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.stage_start(p_execution_id uuid, p_stage_id text, p_capability text, p_ancestors jsonb, p_attempt integer, p_now timestamp with time zone, p_timeout_s double precision, p_resume boolean, p_max_attempts integer, p_run_id text) TO service_role;


-- lifecycle.stage_retry
CREATE OR REPLACE FUNCTION lifecycle.stage_retry(p_log_id uuid, p_max_attempts integer DEFAULT 3, p_now timestamp with time zone DEFAULT now()) RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_exec   public.workflow_executions;
  v_log    public.workflow_execution_logs;
  v_policy jsonb;
  v_delay  double precision;
BEGIN
  -- GUARD: arguments
  IF p_max_attempts IS NULL OR p_max_attempts < 1 THEN
    RAISE EXCEPTION 'retry_stage: p_max_attempts must be >= 1, got %', p_max_attempts
      USING ERRCODE = 'invalid_parameter_value';
  END IF;

  -- LOCK: execution, then stage log
  SELECT e.* INTO v_exec FROM public.workflow_executions e
   WHERE e.id = (SELECT l.execution_id FROM public.workflow_execution_logs l WHERE l.id = p_log_id)
   FOR UPDATE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'retry_stage: unknown stage log %', p_log_id USING ERRCODE = 'no_data_found';
  END IF;
  SELECT * INTO v_log FROM public.workflow_execution_logs l WHERE l.id = p_log_id FOR UPDATE;
  IF v_log.status NOT IN ('pending', 'in_progress', 'failed') THEN
    RAISE EXCEPTION 'retry_stage: stage % of execution % is % and cannot be retried',
      v_log.stage_id, v_log.execution_id, v_log.status
      USING ERRCODE = 'object_not_in_prerequisite_state';
  END IF;
  IF v_log.status = 'pending' AND v_log.not_before IS NOT NULL THEN
    RAISE EXCEPTION 'retry_stage: stage % of execution % is already waiting to retry (attempt % not before %)',
      v_log.stage_id, v_log.execution_id, v_log.attempt_number::bigint + 1, v_log.not_before
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
        UPDATE public.workflow_execution_logs l SET status = 'in_progress' WHERE l.id = p_log_id;
      END IF;
      UPDATE public.workflow_execution_logs l
         SET status = 'failed', completed_at = p_now, not_before = NULL,
             error_message = coalesce(l.error_message, 'attempts exhausted')
       WHERE l.id = p_log_id;
    END IF;
    INSERT INTO public.workflow_events (execution_id, event_type, stage_id, metadata, "timestamp")
    VALUES (v_log.execution_id, 'stage_failed', v_log.stage_id,
            jsonb_build_object('attempt', v_log.attempt_number, 'max_attempts', p_max_attempts,
                               'error', 'attempts exhausted', 'error_code', 'attempts_exhausted',
                               'source', 'retry_stage'),
            p_now);
    IF v_exec.status = 'in_progress' THEN
      UPDATE public.workflow_executions e
         SET status = 'failed', updated_at = p_now,
             error_message = format('stage %s failed: attempts exhausted (%s)', v_log.stage_id, p_max_attempts)
       WHERE e.id = v_exec.id;
      INSERT INTO public.workflow_events (execution_id, event_type, stage_id, metadata, "timestamp")
      VALUES (v_exec.id, 'workflow_failed', v_log.stage_id,
              jsonb_build_object('stage', v_log.stage_id, 'error', 'attempts exhausted',
                                 'error_code', 'attempts_exhausted'),
              p_now);
    END IF;
    RETURN;
  END IF;

  v_policy := lifecycle.stage_retry_policy(v_exec.workflow_definition_id, v_log.stage_id);
  -- no wait is longer than a year (lifecycle_dagster.retry.MAX_WAIT_S), whatever the policy's cap
  v_delay := least(31536000, lifecycle.retry_delay(v_log.attempt_number,
                                   (v_policy ->> 'base_delay_s')::float8,
                                   (v_policy ->> 'max_delay_s')::float8,
                                   (v_policy ->> 'multiplier')::float8,
                                   v_policy ->> 'jitter', random()));
  UPDATE public.workflow_execution_logs l
     SET status = 'pending', attempt_number = v_log.attempt_number + 1, error_message = NULL,
         completed_at = NULL,
         not_before = p_now + make_interval(secs => v_delay)
   WHERE l.id = p_log_id;
  -- an explicit retry of a failed execution (only before any compensation) resumes it
  IF v_exec.status = 'failed' THEN
    UPDATE public.workflow_executions e SET status = 'in_progress', updated_at = p_now, error_message = NULL
     WHERE e.id = v_exec.id;
  END IF;
  INSERT INTO public.workflow_events (execution_id, event_type, stage_id, metadata, "timestamp")
  VALUES (v_log.execution_id, 'stage_retrying', v_log.stage_id,
          jsonb_build_object('attempt', v_log.attempt_number + 1, 'failed_attempt', v_log.attempt_number,
                             'delay_s', v_delay, 'not_before', p_now + make_interval(secs => v_delay),
                             'max_attempts', p_max_attempts, 'source', 'retry_stage'),
          p_now);
END
$$;

REVOKE ALL ON FUNCTION lifecycle.stage_retry(p_log_id uuid, p_max_attempts integer, p_now timestamp with time zone) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.stage_retry(p_log_id uuid, p_max_attempts integer, p_now timestamp with time zone) TO service_role;


-- lifecycle.attempt_after
CREATE OR REPLACE FUNCTION lifecycle.attempt_after(p_attempt integer, p_execution_id uuid, p_stage_id text) RETURNS integer
    LANGUAGE plpgsql IMMUTABLE
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
BEGIN
  -- the number of the attempt after p_attempt; an attempt counter is an integer: at its largest
  -- value no further attempt can start (a clear refusal, not 'integer out of range')
  IF p_attempt >= 2147483647 THEN
    RAISE EXCEPTION 'stage % of execution %: attempt % is the largest attempt number; no further attempt can start',
      p_stage_id, p_execution_id, p_attempt
      USING ERRCODE = 'object_not_in_prerequisite_state';
  END IF;
  RETURN coalesce(p_attempt, 0) + 1;
END
$$;

REVOKE ALL ON FUNCTION lifecycle.attempt_after(p_attempt integer, p_execution_id uuid, p_stage_id text) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.attempt_after(p_attempt integer, p_execution_id uuid, p_stage_id text) TO service_role;
