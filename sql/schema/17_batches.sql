-- Batch runs (docs/batches.md): one Dagster run carries many executions of one definition
-- version. The launch sensor forms a batch (lifecycle.batch_form) and launches its run (run key
-- 'batch:<id>'); the run's first op binds every member to the run (lifecycle.batch_ensure); each
-- stage op starts its stage for every live member in one statement (lifecycle.batch_stage_start),
-- calls the agents, then records every outcome in one statement (lifecycle.batch_stage_record)
-- and asks which edges fired for any member (lifecycle.batch_stage_edges).
--
-- Same truth: each member goes through the very transitions a run of its own would make
-- (lifecycle.execution_ensure, stage_readiness, stage_start, stage_complete, stage_schedule_retry,
-- stage_fail), each in a subtransaction of the batch's statement, so the rows, events, audit
-- chain and breaker outcomes are the ones one run per execution writes. A member whose
-- transition raises is left out (it leaves the batch, with why), never the whole statement.
--
-- LOCK ORDER: members are taken in execution id order, each execution row first (as every
-- transition locks it), then lifecycle.batch_members rows, then the lifecycle.batches row.
-- A member leaves the batch (left_at, left_reason) when its stage is to be retried ('retry': the
-- resume sensor resumes it alone once its not-before time passed), failed for good ('failed':
-- compensation as usual), its execution stopped or was taken over ('stopped'), or a transition
-- refused it ('not_runnable').

-- lifecycle.batch_leave: a member leaves its batch (no-op when it has left already)
CREATE OR REPLACE FUNCTION lifecycle.batch_leave(p_execution_id uuid, p_reason text, p_now timestamp with time zone DEFAULT now()) RETURNS void
    LANGUAGE sql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
  UPDATE lifecycle.batch_members m SET left_at = p_now, left_reason = p_reason
   WHERE m.execution_id = p_execution_id AND m.left_at IS NULL
$$;

REVOKE ALL ON FUNCTION lifecycle.batch_leave(p_execution_id uuid, p_reason text, p_now timestamp with time zone) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.batch_leave(p_execution_id uuid, p_reason text, p_now timestamp with time zone) TO service_role;


-- lifecycle.batch_form: one batch of at most p_max_executions pending executions of definition
-- p_definition_id that no run and no batch holds, oldest first (locked SKIP LOCKED: two sensors
-- never take the same rows). Formed only when full, or when its oldest row has waited
-- p_max_wait_s seconds; otherwise nothing is returned (the next tick tries again). Returns the
-- batch's id and size.
CREATE OR REPLACE FUNCTION lifecycle.batch_form(p_definition_id uuid, p_max_executions integer, p_max_wait_s double precision, p_now timestamp with time zone DEFAULT now()) RETURNS TABLE(batch_id uuid, size integer)
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_ids    uuid[];
  v_oldest timestamptz;
  v_batch  uuid;
BEGIN
  -- GUARD: arguments (the rules of the DAG's `batch` key)
  IF p_max_executions IS NULL OR p_max_executions < 1 OR p_max_executions > 10000 THEN
    RAISE EXCEPTION 'batch_form: max_executions must be an integer from 1 to 10000, got %', p_max_executions
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF p_max_wait_s IS NULL OR NOT (p_max_wait_s >= 0 AND p_max_wait_s <= 3600) THEN
    RAISE EXCEPTION 'batch_form: max_wait_s must be a number from 0 to 3600, got %', p_max_wait_s
      USING ERRCODE = 'invalid_parameter_value';
  END IF;

  -- LOCK: the pending executions, oldest first
  SELECT array_agg(x.id ORDER BY x.created_at, x.id), min(x.created_at) INTO v_ids, v_oldest
  FROM (SELECT e.id, e.created_at FROM public.workflow_executions e
         WHERE e.workflow_definition_id = p_definition_id AND e.status = 'pending' AND e.dagster_run_id IS NULL
           AND NOT EXISTS (SELECT 1 FROM lifecycle.batch_members m WHERE m.execution_id = e.id)
         ORDER BY e.created_at, e.id
         LIMIT p_max_executions
         FOR UPDATE OF e SKIP LOCKED) x;
  IF v_ids IS NULL THEN
    RETURN;
  END IF;
  IF cardinality(v_ids) < p_max_executions AND v_oldest > p_now - make_interval(secs => p_max_wait_s) THEN
    RETURN;  -- not full, and nobody has waited long enough: wait for more
  END IF;

  -- TRANSITION: the batch and its members
  INSERT INTO lifecycle.batches (workflow_definition_id, size, max_executions, max_wait_s, created_at)
  VALUES (p_definition_id, cardinality(v_ids), p_max_executions, p_max_wait_s, p_now)
  RETURNING id INTO v_batch;
  INSERT INTO lifecycle.batch_members (execution_id, batch_id)
  SELECT u.id, v_batch FROM unnest(v_ids) AS u(id);
  UPDATE public.workflow_executions e SET batch_id = v_batch WHERE e.id = ANY (v_ids);
  RETURN QUERY SELECT v_batch, cardinality(v_ids);
END
$$;

REVOKE ALL ON FUNCTION lifecycle.batch_form(p_definition_id uuid, p_max_executions integer, p_max_wait_s double precision, p_now timestamp with time zone) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.batch_form(p_definition_id uuid, p_max_executions integer, p_max_wait_s double precision, p_now timestamp with time zone) TO service_role;


-- lifecycle.batch_ensure: bind every live member of batch p_batch_id to run p_run_id, each with
-- lifecycle.execution_ensure (started: in_progress, workflow_started), and the batch to the run.
-- A second call by the same run changes nothing; a batch another run bound raises
-- unique_violation, one of another definition invalid_parameter_value, an unknown one
-- no_data_found. A member that may not start (cancelled meanwhile, bound elsewhere) leaves the
-- batch. Returns each member's execution id and code: 'bound', 'stopped' or 'not_runnable' (the
-- last two with the reason). p_after, p_limit: only the next p_limit live members after execution
-- id p_after (NULL: all), in short transactions as lifecycle.batch_stage_start.
CREATE OR REPLACE FUNCTION lifecycle.batch_ensure(p_batch_id uuid, p_definition_id uuid, p_run_id text, p_after uuid DEFAULT NULL::uuid, p_limit integer DEFAULT NULL::integer, p_now timestamp with time zone DEFAULT now()) RETURNS TABLE(execution_id uuid, status text, message text)
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_batch  lifecycle.batches;
  v_member uuid;
  v_status text;
BEGIN
  -- GUARD: arguments
  IF p_run_id IS NULL OR p_run_id = '' THEN
    RAISE EXCEPTION 'batch_ensure: a Dagster run id is required' USING ERRCODE = 'invalid_parameter_value';
  END IF;
  SELECT * INTO v_batch FROM lifecycle.batches b WHERE b.id = p_batch_id;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'unknown batch %', p_batch_id USING ERRCODE = 'no_data_found';
  END IF;
  IF v_batch.workflow_definition_id <> p_definition_id THEN
    RAISE EXCEPTION 'batch % holds executions of definition %, but the run executes definition %',
      p_batch_id, v_batch.workflow_definition_id, p_definition_id USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF v_batch.run_id IS NOT NULL AND v_batch.run_id <> p_run_id THEN
    RAISE EXCEPTION 'batch % is already bound to Dagster run %', p_batch_id, v_batch.run_id
      USING ERRCODE = 'unique_violation';
  END IF;

  -- LOCK + TRANSITION: each member, in execution id order (lifecycle.execution_ensure locks it)
  FOR v_member IN
    SELECT m.execution_id FROM lifecycle.batch_members m
     WHERE m.batch_id = p_batch_id AND m.left_at IS NULL AND (p_after IS NULL OR m.execution_id > p_after)
     ORDER BY m.execution_id LIMIT p_limit
  LOOP
    execution_id := v_member; message := NULL;
    BEGIN
      PERFORM lifecycle.execution_ensure(p_definition_id, p_run_id, v_member, '{}'::jsonb, p_now, false);
      status := 'bound';
    EXCEPTION WHEN object_not_in_prerequisite_state OR unique_violation OR check_violation OR no_data_found
                   OR invalid_parameter_value THEN
      GET STACKED DIAGNOSTICS message = MESSAGE_TEXT;
      SELECT CASE WHEN e.status IN ('pending', 'in_progress') THEN 'not_runnable' ELSE 'stopped' END
        INTO v_status FROM public.workflow_executions e WHERE e.id = v_member;
      status := coalesce(v_status, 'stopped');
      PERFORM lifecycle.batch_leave(v_member, status, p_now);
    END;
    RETURN NEXT;
  END LOOP;

  -- TRANSITION: the batch row (re-checked under its lock: two runs never both bind it)
  UPDATE lifecycle.batches b SET run_id = p_run_id, bound_at = coalesce(b.bound_at, p_now)
   WHERE b.id = p_batch_id AND (b.run_id IS NULL OR b.run_id = p_run_id);
  IF NOT FOUND THEN
    RAISE EXCEPTION 'batch % was bound to another Dagster run meanwhile', p_batch_id
      USING ERRCODE = 'unique_violation';
  END IF;
END
$$;

REVOKE ALL ON FUNCTION lifecycle.batch_ensure(p_batch_id uuid, p_definition_id uuid, p_run_id text, p_after uuid, p_limit integer, p_now timestamp with time zone) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.batch_ensure(p_batch_id uuid, p_definition_id uuid, p_run_id text, p_after uuid, p_limit integer, p_now timestamp with time zone) TO service_role;


-- lifecycle.batch_stage_start: start stage p_stage_id for every live member of batch p_batch_id
-- that run p_run_id holds, as that member's own op would (lifecycle.stage_readiness, then
-- lifecycle.stage_start with resume). One row per member: `state` is the readiness code the op
-- leaves alone ('skipped', 'waiting', 'blocked', 'ended'), 'started' (an attempt: the start's
-- columns), 'completed' (done by an earlier run: its output), or 'stopped' / 'not_runnable'
-- (the member left the batch; `message` says why). p_after, p_limit: only the next p_limit members
-- after execution id p_after (NULL: all), so that a large batch is started in short transactions
-- (each holds its members' execution rows, and a subtransaction per member, until it commits).
CREATE OR REPLACE FUNCTION lifecycle.batch_stage_start(p_batch_id uuid, p_run_id text, p_stage_id text, p_capability text, p_ancestors jsonb DEFAULT '{}'::jsonb, p_timeout_s double precision DEFAULT NULL::double precision, p_max_attempts integer DEFAULT NULL::integer, p_after uuid DEFAULT NULL::uuid, p_limit integer DEFAULT NULL::integer, p_now timestamp with time zone DEFAULT now()) RETURNS TABLE(execution_id uuid, state text, log_id uuid, task_id uuid, agent_id uuid, agent_name text, agent_kind text, input_data jsonb, attempt_number integer, output_data jsonb, message text)
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_member uuid;
  v_run    text;
  v_status text;
  v_ready  text;
  v_start  record;
BEGIN
  FOR v_member IN
    SELECT m.execution_id FROM lifecycle.batch_members m
     WHERE m.batch_id = p_batch_id AND m.left_at IS NULL AND (p_after IS NULL OR m.execution_id > p_after)
     ORDER BY m.execution_id LIMIT p_limit
  LOOP
    execution_id := v_member; log_id := NULL; task_id := NULL; agent_id := NULL; agent_name := NULL;
    agent_kind := NULL; input_data := NULL; attempt_number := NULL; output_data := NULL; message := NULL;
    SELECT e.dagster_run_id, e.status INTO v_run, v_status FROM public.workflow_executions e WHERE e.id = v_member;
    IF v_run IS DISTINCT FROM p_run_id THEN  -- taken over by another run (a resume, a cancel's compensation)
      state := 'stopped';
      message := format('execution %s is bound to Dagster run %s, not %s', v_member, v_run, p_run_id);
      PERFORM lifecycle.batch_leave(v_member, state, p_now);
      RETURN NEXT;
      CONTINUE;
    END IF;
    v_ready := lifecycle.stage_readiness(v_member, p_stage_id);
    IF v_ready IN ('skipped', 'waiting', 'blocked', 'ended') THEN
      state := v_ready;
      RETURN NEXT;
      CONTINUE;
    END IF;
    BEGIN
      SELECT * INTO STRICT v_start
        FROM lifecycle.stage_start(v_member, p_stage_id, p_capability, p_ancestors, 1, p_now, p_timeout_s,
                                   true, p_max_attempts, p_run_id);
      state := CASE WHEN v_start.already_completed THEN 'completed' ELSE 'started' END;
      log_id := v_start.log_id; task_id := v_start.task_id; agent_id := v_start.agent_id;
      agent_name := v_start.agent_name; agent_kind := v_start.agent_kind; input_data := v_start.input_data;
      attempt_number := v_start.attempt_number; output_data := v_start.output_data;
    EXCEPTION WHEN object_not_in_prerequisite_state OR unique_violation OR check_violation OR no_data_found
                   OR invalid_parameter_value THEN
      GET STACKED DIAGNOSTICS message = MESSAGE_TEXT;
      state := CASE WHEN v_status = 'in_progress' THEN 'not_runnable' ELSE 'stopped' END;
      PERFORM lifecycle.batch_leave(v_member, state, p_now);
    END;
    RETURN NEXT;
  END LOOP;
END
$$;

REVOKE ALL ON FUNCTION lifecycle.batch_stage_start(p_batch_id uuid, p_run_id text, p_stage_id text, p_capability text, p_ancestors jsonb, p_timeout_s double precision, p_max_attempts integer, p_after uuid, p_limit integer, p_now timestamp with time zone) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.batch_stage_start(p_batch_id uuid, p_run_id text, p_stage_id text, p_capability text, p_ancestors jsonb, p_timeout_s double precision, p_max_attempts integer, p_after uuid, p_limit integer, p_now timestamp with time zone) TO service_role;


-- lifecycle.batch_stage_record: record the outcomes of a batch's attempts of one stage, each as
-- its own op records it. p_results: a JSON array of objects {execution_id, log_id, task_id,
-- attempt, outcome, output, error, error_code, error_class, delay_s}, outcome 'completed'
-- (lifecycle.stage_complete with output), 'retry' (lifecycle.stage_schedule_retry after delay_s
-- seconds) or 'failed' (lifecycle.stage_fail). Processed in execution id order. One row per
-- result: the transition's own status code, or 'error' with the SQLSTATE and message when it
-- raised a data error (an output the database refuses: the caller records that attempt's failure
-- next). A member whose stage is to be retried leaves the batch ('retry'), one that failed for
-- good ('failed'), one whose result was refused ('stopped').
CREATE OR REPLACE FUNCTION lifecycle.batch_stage_record(p_results jsonb, p_now timestamp with time zone DEFAULT now()) RETURNS TABLE(execution_id uuid, log_id uuid, status text, error_state text, message text)
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  r record;
BEGIN
  -- GUARD: an array of results
  IF jsonb_typeof(p_results) IS DISTINCT FROM 'array' THEN
    RAISE EXCEPTION 'batch_stage_record: p_results must be a JSON array, got %', coalesce(jsonb_typeof(p_results), 'NULL')
      USING ERRCODE = 'invalid_parameter_value';
  END IF;

  FOR r IN
    SELECT x.* FROM jsonb_to_recordset(p_results) AS x(execution_id uuid, log_id uuid, task_id uuid, attempt integer,
                                                      outcome text, output jsonb, error text, error_code text,
                                                      error_class text, delay_s double precision)
     ORDER BY x.execution_id
  LOOP
    execution_id := r.execution_id; log_id := r.log_id; error_state := NULL; message := NULL;
    BEGIN
      IF r.outcome = 'completed' THEN
        status := lifecycle.stage_complete(r.log_id, r.task_id, coalesce(r.output, 'null'::jsonb), p_now, r.attempt);
      ELSIF r.outcome = 'retry' THEN
        status := lifecycle.stage_schedule_retry(r.log_id, r.task_id, r.attempt, r.error, r.error_code,
                                                 r.error_class, r.delay_s, p_now);
        IF status = 'retrying' THEN
          PERFORM lifecycle.batch_leave(r.execution_id, 'retry', p_now);
        END IF;
      ELSIF r.outcome = 'failed' THEN
        status := lifecycle.stage_fail(r.log_id, r.task_id, r.error, r.error_code, p_now, r.attempt);
        IF status = 'failed' THEN
          PERFORM lifecycle.batch_leave(r.execution_id, 'failed', p_now);
        END IF;
      ELSE
        RAISE EXCEPTION 'batch_stage_record: outcome must be completed, retry or failed, got %', r.outcome
          USING ERRCODE = 'invalid_parameter_value';
      END IF;
      IF status LIKE 'refused_%' AND status <> 'refused_timed_out' THEN
        PERFORM lifecycle.batch_leave(r.execution_id, 'stopped', p_now);
      END IF;
    EXCEPTION WHEN data_exception OR program_limit_exceeded OR statement_too_complex THEN
      GET STACKED DIAGNOSTICS error_state = RETURNED_SQLSTATE, message = MESSAGE_TEXT;
      status := 'error';
    END;
    RETURN NEXT;
  END LOOP;
END
$$;

REVOKE ALL ON FUNCTION lifecycle.batch_stage_record(p_results jsonb, p_now timestamp with time zone) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.batch_stage_record(p_results jsonb, p_now timestamp with time zone) TO service_role;


-- lifecycle.batch_stage_edges: the child stages of p_stage_id whose edge fired
-- (lifecycle.stage_edges) for at least one live member of the batch that run p_run_id holds,
-- sorted: the op yields their outputs (a member none of whose edges fired is skipped by the
-- database already, and its later ops find it so: lifecycle.stage_readiness)
CREATE OR REPLACE FUNCTION lifecycle.batch_stage_edges(p_batch_id uuid, p_run_id text, p_stage_id text) RETURNS TABLE(target text)
    LANGUAGE sql STABLE
    AS $$
  SELECT DISTINCT s.target
  FROM lifecycle.batch_members m
  JOIN public.workflow_executions e ON e.id = m.execution_id AND e.dagster_run_id = p_run_id
  CROSS JOIN LATERAL lifecycle.stage_edges(m.execution_id, p_stage_id) s
  WHERE m.batch_id = p_batch_id AND m.left_at IS NULL AND s.fired
  ORDER BY 1
$$;

REVOKE ALL ON FUNCTION lifecycle.batch_stage_edges(p_batch_id uuid, p_run_id text, p_stage_id text) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.batch_stage_edges(p_batch_id uuid, p_run_id text, p_stage_id text) TO service_role;
