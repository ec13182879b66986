-- The task protocol: claim (SKIP LOCKED, leases, fencing tokens), heartbeat, complete, fail,
-- release, reap, abandon; NOTIFY carries ids only.
--
-- LOCK ORDER, one for every function here and every transition of 04_stage_transitions.sql,
-- 06_compensation.sql and 07_breakers.sql (tests/sql/test_lock_order.py races them):
--   1. the execution row (workflow_executions, FOR UPDATE). A function that may take several
--      (task_claim, task_reap; lifecycle.audit_prune) takes them SKIP LOCKED and never waits for
--      one: an execution that another transaction is changing (a cancel, a stage completing) is
--      skipped until its next call.
--   2. the agent row (agents, FOR NO KEY UPDATE): task_claim, for an agent with a concurrency
--      limit only, so that its claims count its tasks in flight one at a time. After the
--      execution, never before: stage_start routes a stage (breaker rows) and inserts its task (a
--      foreign key check: KEY SHARE on the agent row, which NO KEY UPDATE does not block) with its
--      execution locked.
--   3. the stage log (workflow_execution_logs) of that execution;
--   4. the task (task_queue) of that stage;
--   then, as they are written, the breaker rows (the agent's, then the capability's) and the audit
--   streams (pg_advisory_xact_lock: the execution's, then the global one); or (task_claim and
--   lifecycle.stage_rate_take, which write no breaker row) the rate buckets, the agent's then the
--   capability's (16_rate_limits.sql), after the task they are taken for.
-- The logs and tasks of an execution are locked only by the transaction that holds its row, so
-- they never take part in a wait cycle. A task without an execution has no rows 1 and 3: it is
-- locked alone (SKIP LOCKED where a claim or the reaper may meet another). task_heartbeat locks
-- one task row and takes nothing after it. The trigger workflow_executions_close_tasks runs inside
-- the UPDATE of an execution row (held): it takes that execution's pending tasks after it.

-- lifecycle.task_abandon
CREATE OR REPLACE FUNCTION lifecycle.task_abandon(p_task_id uuid, p_reason text, p_now timestamp with time zone DEFAULT now()) RETURNS text
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_task public.task_queue;
BEGIN
  -- LOCK: the execution first, then the task
  PERFORM 1 FROM public.workflow_executions e
   WHERE e.id = (SELECT t.workflow_execution_id FROM public.task_queue t WHERE t.id = p_task_id) FOR UPDATE;
  SELECT * INTO v_task FROM public.task_queue t WHERE t.id = p_task_id FOR UPDATE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'unknown task %', p_task_id USING ERRCODE = 'no_data_found';
  END IF;

  -- TRANSITION: an open task -> cancelled (its lease, if any, is revoked)
  IF v_task.status IN ('pending', 'in_progress') THEN
    UPDATE public.task_queue t
       SET status = 'cancelled', lease_token = least(t.lease_token, 9223372036854775806) + 1, error_message = p_reason,
           completed_at = p_now, updated_at = p_now
     WHERE t.id = p_task_id;
  END IF;
  RETURN v_task.status;
END
$$;

REVOKE ALL ON FUNCTION lifecycle.task_abandon(p_task_id uuid, p_reason text, p_now timestamp with time zone) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.task_abandon(p_task_id uuid, p_reason text, p_now timestamp with time zone) TO service_role;


-- lifecycle.task_claim
CREATE OR REPLACE FUNCTION lifecycle.task_claim(p_worker text, p_agent_name text, p_limit integer DEFAULT 1, p_lease_s double precision DEFAULT 30, p_now timestamp with time zone DEFAULT now()) RETURNS TABLE(task_id uuid, lease_token bigint, execution_id uuid, stage_id text, capability text, attempt integer, input_data jsonb, lease_expires_at timestamp with time zone)
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_agent public.agents;
  v_caps  text[];
  v_limit integer;
  v_busy  integer;
  v_want  integer;
  v_n     integer;
  v_got   integer := 0;
  v_execs uuid[];
  v_cand  record;
  v_task  record;
  v_rated boolean;
  v_dry   text[] := '{}';
  v_take  record;
BEGIN
  -- GUARD: arguments (NaN is greater than every number in Postgres: the upper bound refuses it)
  IF p_limit IS NULL OR p_limit < 1 OR p_lease_s IS NULL OR NOT (p_lease_s > 0 AND p_lease_s <= 31536000) THEN
    RAISE EXCEPTION 'lifecycle.task_claim: p_limit must be >= 1 and p_lease_s a number of seconds in (0, 31536000] (got %, %)',
      p_limit, p_lease_s
      USING ERRCODE = 'invalid_parameter_value';
  END IF;

  -- GUARD: the agent, read without a lock: how many tasks it may take at most
  SELECT * INTO v_agent FROM public.agents a WHERE a.name = p_agent_name;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'unknown agent %', p_agent_name USING ERRCODE = 'no_data_found';
  END IF;
  IF NOT v_agent.is_active THEN
    RETURN;
  END IF;
  v_caps := lifecycle.agent_capabilities(v_agent.id);
  v_limit := nullif(v_agent.config ->> 'concurrency', '')::integer;
  -- rate limits (the agent's config.rate_limit, its capabilities' lifecycle.capability_limits): a
  -- task is claimed only with a token of each (lifecycle.rate_take_call)
  v_rated := EXISTS (SELECT 1 FROM lifecycle.agent_rate_limit(v_agent.config))
             OR EXISTS (SELECT 1 FROM lifecycle.capability_limits c WHERE c.capability = ANY (v_caps));
  v_want := p_limit;
  IF v_limit IS NOT NULL THEN
    SELECT count(*) INTO v_busy FROM public.task_queue t WHERE t.agent_id = v_agent.id AND t.status = 'in_progress';
    v_want := least(p_limit, v_limit - v_busy);
    IF v_want <= 0 THEN
      RETURN;
    END IF;
  END IF;

  -- LOCK: the executions of the first claimable tasks, SKIP LOCKED (claimers do not wait for one
  -- another, nor for an execution being cancelled or completed: its tasks wait for the next claim).
  -- Only an execution in progress has work to hand out (a failed or cancelled one's pending tasks
  -- were cancelled with it: lifecycle.task_close_for_execution), and a task whose lease token is at
  -- its largest value cannot be leased again (a new token would not revoke the old one)
  v_execs := ARRAY(
    SELECT e.id
      FROM public.task_queue q JOIN public.workflow_executions e ON e.id = q.workflow_execution_id
     WHERE q.status = 'pending' AND q.capability = ANY (v_caps)
       AND (q.agent_id IS NULL OR q.agent_id = v_agent.id)
       AND (q.not_before IS NULL OR q.not_before <= p_now)
       AND q.lease_token < 9223372036854775807 AND e.status = 'in_progress'
     ORDER BY q.priority DESC, q.created_at, q.id
     LIMIT v_want
       FOR UPDATE OF e SKIP LOCKED);

  -- LOCK: the agent, when it has a concurrency limit (its claims serialise, so the limit is exact),
  -- read again; an agent with no limit is not locked: its workers claim side by side
  v_n := p_limit;
  IF v_limit IS NOT NULL THEN
    SELECT * INTO v_agent FROM public.agents a WHERE a.id = v_agent.id FOR NO KEY UPDATE;
    IF NOT FOUND OR NOT v_agent.is_active THEN
      RETURN;
    END IF;
    v_caps := lifecycle.agent_capabilities(v_agent.id);
    v_limit := nullif(v_agent.config ->> 'concurrency', '')::integer;
    IF v_limit IS NOT NULL THEN
      SELECT count(*) INTO v_busy FROM public.task_queue t WHERE t.agent_id = v_agent.id AND t.status = 'in_progress';
      v_n := least(p_limit, v_limit - v_busy);
      IF v_n <= 0 THEN
        RETURN;
      END IF;
    END IF;
  END IF;

  -- TRANSITION: pending -> in_progress, in claim order, for the tasks of the executions locked
  -- above and tasks without an execution
  FOR v_cand IN
    SELECT q.id, q.workflow_execution_id, q.stage_log_id, q.capability FROM public.task_queue q
     WHERE q.status = 'pending' AND q.capability = ANY (v_caps)
       AND (q.agent_id IS NULL OR q.agent_id = v_agent.id)
       AND (q.not_before IS NULL OR q.not_before <= p_now)
       AND (q.workflow_execution_id = ANY (v_execs) OR q.workflow_execution_id IS NULL)
       AND q.lease_token < 9223372036854775807
     ORDER BY q.priority DESC, q.created_at, q.id
  LOOP
    EXIT WHEN v_got >= v_n;
    -- LOCK: the stage log, then the task (SKIP LOCKED: a task without an execution may be another
    -- claimer's)
    IF v_cand.workflow_execution_id IS NOT NULL THEN
      PERFORM 1 FROM public.workflow_execution_logs l
       WHERE l.id = v_cand.stage_log_id AND l.execution_id = v_cand.workflow_execution_id FOR UPDATE;
    END IF;
    IF v_rated THEN
      CONTINUE WHEN v_cand.capability = ANY (v_dry);
      PERFORM 1 FROM public.task_queue q WHERE q.id = v_cand.id AND q.status = 'pending'
         AND q.lease_token < 9223372036854775807 FOR UPDATE SKIP LOCKED;
      CONTINUE WHEN NOT FOUND;
      -- LOCK: the rate buckets, after the task: a token of the agent's and of the capability's.
      -- None of the agent's: nothing more is claimed; none of the capability's: its other tasks wait
      SELECT * INTO v_take FROM lifecycle.rate_take_call(v_agent.id, v_cand.capability, p_now) r;
      IF NOT v_take.granted THEN
        EXIT WHEN v_take.scope = 'agent';
        v_dry := v_dry || v_cand.capability;
        CONTINUE;
      END IF;
    END IF;
    UPDATE public.task_queue t
       SET status = 'in_progress', agent_id = v_agent.id, lease_token = t.lease_token + 1,
           lease_expires_at = p_now + make_interval(secs => p_lease_s), claimed_by = p_worker,
           started_at = p_now, updated_at = p_now
     WHERE t.id = (SELECT q.id FROM public.task_queue q WHERE q.id = v_cand.id AND q.status = 'pending'
                      AND q.lease_token < 9223372036854775807
                     FOR UPDATE SKIP LOCKED)
    RETURNING t.id, t.lease_token, t.workflow_execution_id, t.task_type, t.capability, t.attempt, t.input_data,
              t.lease_expires_at, t.stage_log_id
    INTO v_task;
    CONTINUE WHEN NOT FOUND;
    v_got := v_got + 1;

    -- a task enqueued for a pending stage (the runbook's section 7) starts that stage
    UPDATE public.workflow_execution_logs l
       SET status = 'in_progress', attempt_number = v_task.attempt, started_at = p_now
     WHERE l.id = v_task.stage_log_id AND l.execution_id = v_task.workflow_execution_id AND l.status = 'pending'
       AND EXISTS (SELECT 1 FROM public.workflow_executions e WHERE e.id = l.execution_id AND e.status = 'in_progress');
    IF FOUND THEN
      INSERT INTO public.workflow_events (execution_id, event_type, stage_id, metadata, "timestamp")
      VALUES (v_task.workflow_execution_id, 'stage_started', v_task.task_type,
              jsonb_build_object('attempt', v_task.attempt, 'agent', v_agent.name, 'task_id', v_task.id,
                                 'worker', p_worker), p_now);
    END IF;
    task_id := v_task.id;
    lease_token := v_task.lease_token;
    execution_id := v_task.workflow_execution_id;
    stage_id := v_task.task_type;
    capability := v_task.capability;
    attempt := v_task.attempt;
    input_data := v_task.input_data;
    lease_expires_at := v_task.lease_expires_at;
    RETURN NEXT;
  END LOOP;
END
$$;

REVOKE ALL ON FUNCTION lifecycle.task_claim(p_worker text, p_agent_name text, p_limit integer, p_lease_s double precision, p_now timestamp with time zone) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.task_claim(p_worker text, p_agent_name text, p_limit integer, p_lease_s double precision, p_now timestamp with time zone) TO service_role;


-- lifecycle.task_close_for_execution
CREATE OR REPLACE FUNCTION lifecycle.task_close_for_execution() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
BEGIN
  -- an execution that stops being in progress (failed, cancelled, by any function or by hand)
  -- cancels its pending tasks in the same transaction: no worker claims work of an execution that
  -- has stopped. Tasks held by a worker are left to the transition (execution_fail fails them) or
  -- to their worker, whose result is then refused. The execution row is locked (it is being
  -- updated): the lock order holds. The time is the execution's updated_at (the caller's p_now).
  -- A pending task has no lease to revoke: its token stays (the next claim would move it on).
  IF NEW.status NOT IN ('pending', 'in_progress') AND OLD.status IS DISTINCT FROM NEW.status THEN
    UPDATE public.task_queue t
       SET status = 'cancelled', error_message = format('execution is %s', NEW.status),
           completed_at = NEW.updated_at, updated_at = NEW.updated_at
     WHERE t.workflow_execution_id = NEW.id AND t.status = 'pending';
  END IF;
  RETURN NULL;
END
$$;

REVOKE ALL ON FUNCTION lifecycle.task_close_for_execution() FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.task_close_for_execution() TO service_role;


-- lifecycle.task_complete
CREATE OR REPLACE FUNCTION lifecycle.task_complete(p_task_id uuid, p_token bigint, p_output jsonb, p_now timestamp with time zone DEFAULT now()) RETURNS text
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_task    public.task_queue;
  v_reason  text;
  v_problem text;
BEGIN
  -- LOCK: the execution first (the order every transition uses), then its stage log, then the task
  PERFORM 1 FROM public.workflow_executions e
   WHERE e.id = (SELECT t.workflow_execution_id FROM public.task_queue t WHERE t.id = p_task_id) FOR UPDATE;
  PERFORM 1 FROM public.workflow_execution_logs l
   WHERE l.id = (SELECT t.stage_log_id FROM public.task_queue t WHERE t.id = p_task_id)
     AND l.execution_id = (SELECT t.workflow_execution_id FROM public.task_queue t WHERE t.id = p_task_id)
     FOR UPDATE;
  SELECT * INTO v_task FROM public.task_queue t WHERE t.id = p_task_id FOR UPDATE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'unknown task %', p_task_id USING ERRCODE = 'no_data_found';
  END IF;
  v_reason := lifecycle.task_refusal(v_task, p_token, 'completed', p_now);
  IF v_reason IS NOT NULL THEN
    RETURN v_reason;  -- a refused_* code
  END IF;

  -- GUARD: the output
  v_problem := CASE WHEN jsonb_typeof(p_output) IS DISTINCT FROM 'object'
                    THEN format('output must be a JSON object, got %s', coalesce(jsonb_typeof(p_output), 'NULL'))
                    ELSE lifecycle.payload_problem(p_output, 'output') END;
  IF v_problem IS NOT NULL THEN
    v_problem := format('task %s (stage %s): %s', p_task_id, v_task.task_type, v_problem);
    UPDATE public.task_queue t
       SET status = 'failed', error_message = v_problem, error_code = 'bad_output', retryable = true,
           retry_after_s = NULL, completed_at = p_now, updated_at = p_now
     WHERE t.id = p_task_id;
    INSERT INTO public.workflow_events (execution_id, event_type, stage_id, metadata, "timestamp")
    VALUES (v_task.workflow_execution_id, 'task_result_refused', v_task.task_type,
            jsonb_build_object('task_id', v_task.id, 'token', p_token, 'outcome', 'completed',
                               'reason', v_problem, 'error_code', 'bad_output'),
            p_now);
    RETURN 'refused_bad_output';  -- the reason is in the task and the event
  END IF;

  IF v_task.stage_log_id IS NULL THEN
    UPDATE public.task_queue t SET status = 'completed', output_data = p_output, completed_at = p_now, updated_at = p_now
     WHERE t.id = p_task_id;
    RETURN 'completed';
  END IF;
  RETURN lifecycle.stage_complete(v_task.stage_log_id, p_task_id, p_output, p_now, v_task.attempt);
END
$$;

REVOKE ALL ON FUNCTION lifecycle.task_complete(p_task_id uuid, p_token bigint, p_output jsonb, p_now timestamp with time zone) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.task_complete(p_task_id uuid, p_token bigint, p_output jsonb, p_now timestamp with time zone) TO service_role;


-- lifecycle.task_fail
CREATE OR REPLACE FUNCTION lifecycle.task_fail(p_task_id uuid, p_token bigint, p_error text, p_error_code text DEFAULT 'agent_error'::text, p_retryable boolean DEFAULT true, p_retry_after_s double precision DEFAULT NULL::double precision, p_now timestamp with time zone DEFAULT now()) RETURNS text
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_task   public.task_queue;
  v_reason text;
  v_after  double precision := CASE WHEN p_retry_after_s >= 0 AND p_retry_after_s <= 'Infinity'::float8
                                    THEN least(p_retry_after_s, 31536000) END;
BEGIN
  -- LOCK: the execution first, then the task
  PERFORM 1 FROM public.workflow_executions e
   WHERE e.id = (SELECT t.workflow_execution_id FROM public.task_queue t WHERE t.id = p_task_id) FOR UPDATE;
  SELECT * INTO v_task FROM public.task_queue t WHERE t.id = p_task_id FOR UPDATE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'unknown task %', p_task_id USING ERRCODE = 'no_data_found';
  END IF;
  v_reason := lifecycle.task_refusal(v_task, p_token, 'failed', p_now);
  IF v_reason IS NOT NULL THEN
    RETURN v_reason;  -- a refused_* code
  END IF;
  UPDATE public.task_queue t
     SET status = 'failed', error_message = coalesce(nullif(p_error, ''), 'task failed'),
         error_code = coalesce(p_error_code, 'agent_error'), retryable = coalesce(p_retryable, true),
         retry_after_s = v_after, completed_at = p_now, updated_at = p_now
   WHERE t.id = p_task_id;
  RETURN 'failed';
END
$$;

REVOKE ALL ON FUNCTION lifecycle.task_fail(p_task_id uuid, p_token bigint, p_error text, p_error_code text, p_retryable boolean, p_retry_after_s double precision, p_now timestamp with time zone) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.task_fail(p_task_id uuid, p_token bigint, p_error text, p_error_code text, p_retryable boolean, p_retry_after_s double precision, p_now timestamp with time zone) TO service_role;


-- lifecycle.task_fill
CREATE OR REPLACE FUNCTION lifecycle.task_fill() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_stage jsonb;
BEGIN
  IF NEW.workflow_execution_id IS NOT NULL THEN
    SELECT s INTO v_stage
    FROM public.workflow_executions e JOIN public.workflow_definitions d ON d.id = e.workflow_definition_id,
         jsonb_array_elements(CASE WHEN jsonb_typeof(d.dag_schema -> 'stages') = 'array'
                                   THEN d.dag_schema -> 'stages' ELSE '[]'::jsonb END) s
    WHERE e.id = NEW.workflow_execution_id AND jsonb_typeof(s) = 'object' AND s ->> 'id' = NEW.task_type;
    IF v_stage IS NULL AND EXISTS (SELECT 1 FROM public.workflow_executions e WHERE e.id = NEW.workflow_execution_id) THEN
      RAISE EXCEPTION 'task_queue: stage % is not a stage of the DAG that execution % runs',
        coalesce(NEW.task_type, 'NULL'), NEW.workflow_execution_id
        USING ERRCODE = 'check_violation', TABLE = 'task_queue', COLUMN = 'task_type';
    END IF;
    IF NEW.capability IS NULL THEN
      NEW.capability := v_stage ->> 'capability';
    END IF;
    IF NEW.trace_parent IS NULL THEN  -- the worker's spans join the execution's trace
      SELECT e.trace_parent INTO NEW.trace_parent FROM public.workflow_executions e WHERE e.id = NEW.workflow_execution_id;
    END IF;
  END IF;
  IF NEW.workflow_execution_id IS NOT NULL AND NEW.stage_log_id IS NULL THEN
    SELECT l.id INTO NEW.stage_log_id FROM public.workflow_execution_logs l
    WHERE l.execution_id = NEW.workflow_execution_id AND l.stage_id = NEW.task_type;
  END IF;
  RETURN NEW;
END
$$;

REVOKE ALL ON FUNCTION lifecycle.task_fill() FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.task_fill() TO service_role;


-- lifecycle.task_heartbeat
CREATE OR REPLACE FUNCTION lifecycle.task_heartbeat(p_task_id uuid, p_token bigint, p_lease_s double precision DEFAULT 30, p_now timestamp with time zone DEFAULT now()) RETURNS boolean
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
BEGIN
  -- GUARD: arguments
  IF p_lease_s IS NULL OR NOT (p_lease_s > 0 AND p_lease_s <= 31536000) THEN
    RAISE EXCEPTION 'lifecycle.task_heartbeat: p_lease_s must be a number of seconds in (0, 31536000], got %', p_lease_s
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  -- LOCK: the task row only, and nothing after it (no status change: no trigger, no other row)
  UPDATE public.task_queue t
     SET lease_expires_at = p_now + make_interval(secs => p_lease_s), updated_at = p_now
   WHERE t.id = p_task_id AND t.lease_token = p_token AND t.status = 'in_progress';
  RETURN FOUND;
END
$$;

REVOKE ALL ON FUNCTION lifecycle.task_heartbeat(p_task_id uuid, p_token bigint, p_lease_s double precision, p_now timestamp with time zone) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.task_heartbeat(p_task_id uuid, p_token bigint, p_lease_s double precision, p_now timestamp with time zone) TO service_role;


-- lifecycle.task_notify
CREATE OR REPLACE FUNCTION lifecycle.task_notify() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
BEGIN
  IF NEW.status = 'pending' THEN
    PERFORM pg_notify('lifecycle_task', NEW.id::text);
  ELSIF NEW.status IN ('completed', 'failed', 'cancelled') THEN
    PERFORM pg_notify('lifecycle_task_done', NEW.id::text);
  END IF;
  RETURN NULL;
END
$$;

REVOKE ALL ON FUNCTION lifecycle.task_notify() FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.task_notify() TO service_role;


-- lifecycle.task_reap
CREATE OR REPLACE FUNCTION lifecycle.task_reap(p_now timestamp with time zone DEFAULT now()) RETURNS integer
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_cand record;
  v_n    integer := 0;
BEGIN
  FOR v_cand IN
    SELECT t.id, t.workflow_execution_id, t.stage_log_id FROM public.task_queue t
     WHERE t.status = 'in_progress' AND t.lease_expires_at < p_now AND t.claimed_by IS DISTINCT FROM 'op'
     ORDER BY t.lease_expires_at
  LOOP
    -- one task that cannot be reaped (a row no rule foresaw) never stops the others: its own
    -- subtransaction is rolled back, a warning names it, the loop goes on
    BEGIN
      IF lifecycle.task_reap_one(v_cand.id, v_cand.workflow_execution_id, v_cand.stage_log_id, p_now) THEN
        v_n := v_n + 1;
      END IF;
    EXCEPTION WHEN OTHERS THEN
      RAISE WARNING 'lifecycle.task_reap: task % could not be reaped: % (%)', v_cand.id, SQLERRM, SQLSTATE;
    END;
  END LOOP;
  RETURN v_n;
END
$$;

REVOKE ALL ON FUNCTION lifecycle.task_reap(p_now timestamp with time zone) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.task_reap(p_now timestamp with time zone) TO service_role;


-- lifecycle.task_reap_one
CREATE OR REPLACE FUNCTION lifecycle.task_reap_one(p_task_id uuid, p_execution_id uuid, p_log_id uuid, p_now timestamp with time zone) RETURNS boolean
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_exec       public.workflow_executions;
  v_task       public.task_queue;
  v_superseded boolean;
  v_stopped    boolean;
  v_requeued   boolean := false;
BEGIN
  -- LOCK: the execution (SKIP LOCKED: the reaper holds the executions of the tasks it reaped so
  -- far, it must not wait for another; an execution being changed is reaped next time), the stage
  -- log, then the task (SKIP LOCKED, as before: a heartbeat or another reaper has it)
  IF p_execution_id IS NOT NULL THEN
    SELECT * INTO v_exec FROM public.workflow_executions e WHERE e.id = p_execution_id FOR UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
      RETURN false;
    END IF;
    PERFORM 1 FROM public.workflow_execution_logs l WHERE l.id = p_log_id AND l.execution_id = p_execution_id FOR UPDATE;
  END IF;
  SELECT * INTO v_task FROM public.task_queue t WHERE t.id = p_task_id FOR UPDATE SKIP LOCKED;
  -- GUARD: still expired, now that it is locked (a completion or a heartbeat may have come first)
  IF NOT FOUND OR v_task.status <> 'in_progress' OR NOT coalesce(v_task.lease_expires_at < p_now, false)
     OR v_task.claimed_by IS NOT DISTINCT FROM 'op' THEN
    RETURN false;
  END IF;

  v_superseded := v_task.workflow_execution_id IS NOT NULL AND (
    EXISTS (SELECT 1 FROM public.task_queue t2
             WHERE t2.workflow_execution_id = v_task.workflow_execution_id AND t2.task_type = v_task.task_type
               AND t2.attempt > v_task.attempt)
    OR EXISTS (SELECT 1 FROM public.workflow_execution_logs l
                WHERE l.id = v_task.stage_log_id
                  AND (l.status <> 'in_progress' OR l.attempt_number > v_task.attempt)));
  -- an execution that runs no stage again (a cancelled one: execution_cancel left its running
  -- stages to their workers) accepts no result of this task: it is not queued again
  v_stopped := NOT v_superseded
               AND v_exec.status IN ('completed', 'cancelled', 'compensating', 'rolled_back', 'compensation_failed');
  IF v_superseded THEN
    UPDATE public.task_queue t
       SET status = 'cancelled', lease_token = least(t.lease_token, 9223372036854775806) + 1,
           error_message = format('lease of worker %s expired; its attempt %s was superseded', v_task.claimed_by,
                                  v_task.attempt),
           completed_at = p_now, updated_at = p_now
     WHERE t.id = v_task.id;
  ELSIF v_stopped THEN
    UPDATE public.task_queue t
       SET status = 'cancelled', lease_token = least(t.lease_token, 9223372036854775806) + 1,
           error_message = format('lease of worker %s expired; execution is %s', v_task.claimed_by, v_exec.status),
           completed_at = p_now, updated_at = p_now
     WHERE t.id = v_task.id;
    UPDATE public.workflow_execution_logs l
       SET status = 'skipped', completed_at = p_now,
           error_message = format('lease of worker %s expired; execution is %s', v_task.claimed_by, v_exec.status)
     WHERE l.id = v_task.stage_log_id AND l.execution_id = v_exec.id AND l.status = 'in_progress'
       AND l.attempt_number = v_task.attempt;
  ELSIF (v_task.max_attempts IS NOT NULL AND v_task.attempt >= v_task.max_attempts) OR v_task.attempt >= 2147483647 THEN
    -- no attempt after this one: by the task's limit, or the attempt counter is at its largest value
    UPDATE public.task_queue t
       SET status = 'failed',
           error_message = format('lease of worker %s expired; attempts exhausted%s', v_task.claimed_by,
                                  CASE WHEN v_task.attempt >= 2147483647 THEN ' (attempt counter at its largest value)'
                                       ELSE '' END),
           error_code = 'lease_expired', retryable = false, completed_at = p_now, updated_at = p_now
     WHERE t.id = v_task.id;
  ELSE
    v_requeued := true;
    -- the next attempt gets the task's whole time limit from now, never the rest of a dead worker's
    UPDATE public.task_queue t
       SET status = 'pending', attempt = t.attempt + 1, lease_expires_at = NULL, claimed_by = NULL,
           started_at = NULL, updated_at = p_now,
           deadline_at = CASE WHEN t.timeout_s IS NULL THEN t.deadline_at
                              ELSE p_now + make_interval(secs => t.timeout_s) END
     WHERE t.id = v_task.id;
    UPDATE public.workflow_execution_logs l SET attempt_number = v_task.attempt + 1
     WHERE l.id = v_task.stage_log_id AND l.status = 'in_progress';
  END IF;
  INSERT INTO public.workflow_events (execution_id, event_type, stage_id, metadata, "timestamp")
  VALUES (v_task.workflow_execution_id, 'task_reaped', v_task.task_type,
          jsonb_build_object('task_id', v_task.id, 'worker', v_task.claimed_by, 'attempt', v_task.attempt,
                             'lease_expires_at', v_task.lease_expires_at,
                             'requeued', v_requeued, 'superseded', v_superseded)
          || CASE WHEN v_stopped THEN jsonb_build_object('execution_status', v_exec.status) ELSE '{}'::jsonb END,
          p_now);
  RETURN true;
END
$$;

REVOKE ALL ON FUNCTION lifecycle.task_reap_one(p_task_id uuid, p_execution_id uuid, p_log_id uuid, p_now timestamp with time zone) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.task_reap_one(p_task_id uuid, p_execution_id uuid, p_log_id uuid, p_now timestamp with time zone) TO service_role;



-- lifecycle.task_refusal
CREATE OR REPLACE FUNCTION lifecycle.task_refusal(p_task public.task_queue, p_token bigint, p_outcome text, p_now timestamp with time zone) RETURNS text
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_code   text;
  v_reason text;
BEGIN
  IF p_task.lease_token <> p_token THEN
    v_code := 'refused_stale_token';
    v_reason := format('lease token %s is stale (current %s): the lease was lost', p_token, p_task.lease_token);
  ELSIF p_task.status <> 'in_progress' THEN
    v_code := 'refused_task_finished';
    v_reason := format('task is %s', p_task.status);
  ELSIF p_task.claimed_by IS DISTINCT FROM 'op' AND p_task.lease_expires_at IS NOT NULL
        AND p_now > p_task.lease_expires_at THEN
    v_code := 'refused_lease_expired';
    v_reason := format('the lease of worker %s expired at %s', p_task.claimed_by, p_task.lease_expires_at);
  END IF;
  IF v_reason IS NOT NULL THEN
    INSERT INTO public.workflow_events (execution_id, event_type, stage_id, metadata, "timestamp")
    VALUES (p_task.workflow_execution_id, 'task_result_refused', p_task.task_type,
            jsonb_build_object('task_id', p_task.id, 'token', p_token, 'outcome', p_outcome, 'code', v_code, 'reason', v_reason),
            p_now);
  END IF;
  RETURN v_code;  -- NULL, or refused_stale_token / refused_task_finished / refused_lease_expired
END
$$;

REVOKE ALL ON FUNCTION lifecycle.task_refusal(p_task public.task_queue, p_token bigint, p_outcome text, p_now timestamp with time zone) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.task_refusal(p_task public.task_queue, p_token bigint, p_outcome text, p_now timestamp with time zone) TO service_role;


-- lifecycle.task_release
CREATE OR REPLACE FUNCTION lifecycle.task_release(p_task_id uuid, p_token bigint, p_now timestamp with time zone DEFAULT now()) RETURNS boolean
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_exec public.workflow_executions;
  v_task public.task_queue;
BEGIN
  -- LOCK: the execution first, then its stage log, then the task
  SELECT * INTO v_exec FROM public.workflow_executions e
   WHERE e.id = (SELECT t.workflow_execution_id FROM public.task_queue t WHERE t.id = p_task_id) FOR UPDATE;
  PERFORM 1 FROM public.workflow_execution_logs l
   WHERE l.id = (SELECT t.stage_log_id FROM public.task_queue t WHERE t.id = p_task_id) AND l.execution_id = v_exec.id
     FOR UPDATE;
  SELECT * INTO v_task FROM public.task_queue t WHERE t.id = p_task_id FOR UPDATE;
  IF NOT FOUND OR v_task.lease_token <> p_token OR v_task.status <> 'in_progress' THEN
    RETURN false;
  END IF;

  -- TRANSITION: the holder of the current token hands the task back: pending again, unless its
  -- execution runs no stage again (a cancelled one): then, as task_reap does, the task is
  -- cancelled and its running stage skipped (a result of it would only be refused)
  IF v_exec.status IN ('completed', 'cancelled', 'compensating', 'rolled_back', 'compensation_failed') THEN
    UPDATE public.task_queue t
       SET status = 'cancelled', lease_token = least(t.lease_token, 9223372036854775806) + 1, lease_expires_at = NULL,
           error_message = format('released by worker %s; execution is %s', t.claimed_by, v_exec.status),
           completed_at = p_now, updated_at = p_now
     WHERE t.id = p_task_id;
    UPDATE public.workflow_execution_logs l
       SET status = 'skipped', completed_at = p_now,
           error_message = format('released by worker %s; execution is %s', v_task.claimed_by, v_exec.status)
     WHERE l.id = v_task.stage_log_id AND l.execution_id = v_exec.id AND l.status = 'in_progress'
       AND l.attempt_number = v_task.attempt;
  ELSE
    UPDATE public.task_queue t
       SET status = 'pending', lease_token = least(t.lease_token, 9223372036854775806) + 1, lease_expires_at = NULL, claimed_by = NULL,
           started_at = NULL, updated_at = p_now
     WHERE t.id = p_task_id;
  END IF;
  RETURN true;
END
$$;

REVOKE ALL ON FUNCTION lifecycle.task_release(p_task_id uuid, p_token bigint, p_now timestamp with time zone) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.task_release(p_task_id uuid, p_token bigint, p_now timestamp with time zone) TO service_role;


-- lifecycle.task_supersede
CREATE OR REPLACE FUNCTION lifecycle.task_supersede() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
BEGIN
  IF NEW.workflow_execution_id IS NULL THEN
    RETURN NULL;
  END IF;
  UPDATE public.task_queue t
     SET status = 'cancelled', lease_token = least(t.lease_token, 9223372036854775806) + 1, lease_expires_at = NULL,
         error_message = format('superseded by attempt %s (task %s)', NEW.attempt, NEW.id),
         completed_at = NEW.created_at, updated_at = NEW.created_at
   WHERE t.workflow_execution_id = NEW.workflow_execution_id AND t.task_type = NEW.task_type
     AND t.attempt < NEW.attempt AND t.status IN ('pending', 'in_progress');
  RETURN NULL;
END
$$;

REVOKE ALL ON FUNCTION lifecycle.task_supersede() FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.task_supersede() TO service_role;


-- trigger task_queue task_queue_fill
CREATE OR REPLACE TRIGGER task_queue_fill BEFORE INSERT ON public.task_queue FOR EACH ROW EXECUTE FUNCTION lifecycle.task_fill();

-- trigger task_queue task_queue_notify
CREATE OR REPLACE TRIGGER task_queue_notify AFTER INSERT OR UPDATE OF status ON public.task_queue FOR EACH ROW EXECUTE FUNCTION lifecycle.task_notify();

-- trigger task_queue task_queue_supersede
CREATE OR REPLACE TRIGGER task_queue_supersede AFTER INSERT ON public.task_queue FOR EACH ROW EXECUTE FUNCTION lifecycle.task_supersede();

-- trigger workflow_executions workflow_executions_close_tasks
CREATE OR REPLACE TRIGGER workflow_executions_close_tasks AFTER UPDATE OF status ON public.workflow_executions FOR EACH ROW EXECUTE FUNCTION lifecycle.task_close_for_execution();
