-- 0015_performance: the SQL causes of the benchmark's missed targets (bench/results/results.md),
-- fixed at the root. Behaviour is unchanged; signatures are unchanged.
--
-- 1. Indexes on the task_queue columns the hot paths look tasks up by:
--    * stage_log_id: lifecycle_start_compensation (the agent of a stage's completed task),
--      lifecycle_start_stage (a retry's next attempt number), lifecycle_breaker_record_task's join,
--      and the ON DELETE CASCADE from workflow_execution_logs. Without it each is a sequential
--      scan of task_queue: one undo took 52 ms at 10k events and 731 ms at 1M.
--    * agent_id of in_progress tasks: lifecycle_task_claim (an agent's concurrency limit) and
--      lifecycle_capability_agents (routing orders the agents by their in-flight tasks, on every
--      stage start) count them; both were sequential scans of task_queue. Partial: only the
--      in-flight tasks are ever counted, and the index stays as small as the work in flight.
--      (task_queue_agent_fkey itself is only checked when an agent row is deleted, which no
--      function or query of ours does: that stays a scan.)
-- 2. Compensation in time linear in the DAG, not cubic in it:
--    * lifecycle_stages_to_compensate called lifecycle_stage_compensable once per completed stage,
--      and that scans the DAG's stages: O(stages^2) per call. It now reads the DAG once into a
--      jsonb object and looks each completed stage up in it.
--    * lifecycle_start_compensation's reverse-order check evaluated lifecycle_stages_to_compensate
--      once per dependent stage (500 stages: 576,430 calls, over 45 s); it now computes it once and
--      semi-joins the dependents against it (a hash join, not an array scan per dependent).
-- 3. lifecycle_breaker_record no longer serialises every task completion on the agent's and the
--    capability's breaker rows: an outcome that cannot move the breaker takes the row FOR SHARE
--    (section 3 below says why the breaker still opens exactly at its threshold).
-- Plain CREATE INDEX (a migration runs in a transaction): it blocks writes to task_queue while it
-- builds, about a second per million tasks.

-- ---------------------------------------------------------------------------------------------
-- 1. Indexes
CREATE INDEX IF NOT EXISTS task_queue_stage_log_idx ON task_queue (stage_log_id);
CREATE INDEX IF NOT EXISTS task_queue_agent_in_flight_idx ON task_queue (agent_id) WHERE status = 'in_progress';

-- ---------------------------------------------------------------------------------------------
-- 2. Compensation

-- As in 0005: the stages of an execution still waiting to be compensated (completed and
-- compensable: their DAG entry does not say compensate: false), sorted. The DAG is read once, into
-- a jsonb object {stage id: compensable}, and each completed stage is looked up in it: linear in
-- the stages whatever plan the planner picks (a join of the stage logs with the DAG's elements
-- may be planned as a nested loop, quadratic again).
CREATE OR REPLACE FUNCTION lifecycle_stages_to_compensate(p_execution_id uuid) RETURNS text[]
LANGUAGE sql STABLE
AS $$
  SELECT coalesce(array_agg(l.stage_id ORDER BY l.stage_id), '{}')
  FROM (SELECT jsonb_object_agg(s ->> 'id', NOT (s ? 'compensate' AND s -> 'compensate' = 'false'::jsonb)) AS m
        FROM workflow_executions e
        JOIN workflow_definitions d ON d.id = e.workflow_definition_id,
             jsonb_array_elements(CASE WHEN jsonb_typeof(d.dag_schema -> 'stages') = 'array'
                                       THEN d.dag_schema -> 'stages' END) s
        WHERE e.id = p_execution_id AND s ->> 'id' IS NOT NULL) c,
       workflow_execution_logs l
  WHERE l.execution_id = p_execution_id AND l.status = 'completed'
    AND c.m -> l.stage_id = 'true'::jsonb
$$;

-- As in 0005; the reverse-order guard computes the stages still to compensate once.
CREATE OR REPLACE FUNCTION lifecycle_start_compensation(
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
  v_pending text[];
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

  -- GUARD: strict reverse topological order (the stages still to compensate, computed once)
  v_pending := lifecycle_stages_to_compensate(p_execution_id);
  SELECT string_agg(d, ', ' ORDER BY d) INTO v_blocked
  FROM unnest(coalesce(p_dependents, '{}')) d
  WHERE d IN (SELECT p FROM unnest(v_pending) p);
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

-- ---------------------------------------------------------------------------------------------
-- 3. Recording outcomes without serialising on the breaker row
--
-- lifecycle_breaker_record locked the breaker row FOR UPDATE for every outcome, so every task
-- completion of an agent (and of a capability, whose row every agent serving it shares) waited for
-- the previous one to commit. An outcome that leaves the breaker's state as it is now takes the row
-- FOR SHARE (shared lockers do not wait for each other):
--   * any outcome while the breaker is open (outcomes of calls in flight are only kept; open moves
--     on only in lifecycle_breaker_admit after the cooldown, under FOR UPDATE);
--   * a success while it is closed, when it has no latency SLA and the window's numbers with this
--     success (judged under the share lock, exactly as before) reach neither the failure threshold nor the error budget.
-- Everything else (a failure while closed, a success under a latency SLA or one whose window is
-- over budget, anything while half_open) takes FOR UPDATE and is judged exactly as before.
-- Why it stays exact: while a share lock is held no transition can happen (they all take FOR
-- UPDATE), and a FOR UPDATE waits until every shared locker committed, then (READ COMMITTED) counts
-- their outcomes: every judgement sees exactly the outcomes committed before it, as when every
-- recorder serialised. The failures a shared success sees are exactly those a serialised run would
-- show it (a failure cannot commit while it holds the share lock); the only outcomes it may not see
-- are other shared successes in flight, and more successes only lower the error rate: when it does
-- not open on what it sees, it would not have opened after them either. So the breaker still opens
-- exactly at its threshold. The state is read first without a lock; when, under the share lock, the
-- state moved (open -> half_open) or the success would open the breaker, the share lock and the
-- outcome are given back (the block's subtransaction rolls back) before taking FOR UPDATE: no
-- recorder ever upgrades a share lock (two doing so would deadlock).
-- The failures of a breaker's window, for the shared path's first check: failures are few, the
-- window's successes many (every completed task).
CREATE INDEX IF NOT EXISTS lifecycle_breaker_outcomes_failures_idx
  ON lifecycle_breaker_outcomes (scope, key, at) WHERE NOT success;

CREATE OR REPLACE FUNCTION lifecycle_breaker_record(
  p_scope      text,
  p_key        text,
  p_success    boolean,
  p_latency_ms double precision DEFAULT NULL,
  p_now        timestamptz DEFAULT now(),
  p_task_id    uuid DEFAULT NULL,
  p_error_code text DEFAULT NULL
) RETURNS text
LANGUAGE plpgsql
AS $$
DECLARE
  v_b         lifecycle_breakers;
  v_cfg       jsonb;
  v_n         integer;
  v_w         record;
  v_reason    text;
  v_no_sla    boolean;
  v_shared    boolean;
BEGIN
  -- GUARD: arguments
  IF p_scope IS NULL OR p_scope NOT IN ('agent', 'capability') THEN
    RAISE EXCEPTION 'breaker scope must be agent or capability, got %', coalesce(p_scope, 'NULL')
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF p_key IS NULL OR btrim(p_key) = '' OR p_success IS NULL THEN
    RAISE EXCEPTION 'a breaker outcome needs a key and a success flag (% %)', p_scope, coalesce(p_key, 'NULL')
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF p_latency_ms IS NOT NULL AND NOT (p_latency_ms >= 0 AND p_latency_ms < 'Infinity') THEN
    RAISE EXCEPTION 'latency must be a finite number of ms >= 0, got %', p_latency_ms
      USING ERRCODE = 'invalid_parameter_value';
  END IF;

  -- the breaker row (created closed on first use), read without a lock to choose the lock
  SELECT * INTO v_b FROM lifecycle_breakers b WHERE b.scope = p_scope AND b.key = p_key;
  IF NOT FOUND THEN
    INSERT INTO lifecycle_breakers (scope, key, updated_at) VALUES (p_scope, p_key, p_now)
    ON CONFLICT ON CONSTRAINT lifecycle_breakers_pkey DO NOTHING;
    v_b.state := 'closed';
  END IF;
  v_cfg := lifecycle_breaker_config(p_scope, p_key);
  v_no_sla := jsonb_typeof(v_cfg -> 'latency_sla_ms') IS DISTINCT FROM 'number';
  v_shared := v_b.state = 'open' OR (v_b.state = 'closed' AND p_success AND v_no_sla);

  -- LOCK + RECORD: shared when this outcome leaves the state as it is (see above)
  IF v_shared THEN
    BEGIN
      SELECT * INTO v_b FROM lifecycle_breakers b WHERE b.scope = p_scope AND b.key = p_key FOR SHARE;
      IF NOT FOUND OR NOT (v_b.state = 'open' OR (v_b.state = 'closed' AND p_success AND v_no_sla)) THEN
        RAISE EXCEPTION 'breaker % % moved', p_scope, p_key USING ERRCODE = 'LCB01';
      END IF;
      INSERT INTO lifecycle_breaker_outcomes (scope, key, at, success, latency_ms, task_id, error_code)
      VALUES (p_scope, p_key, p_now, p_success, p_latency_ms, p_task_id, p_error_code)
      ON CONFLICT ON CONSTRAINT lifecycle_breaker_outcomes_one_per_task DO NOTHING;
      GET DIAGNOSTICS v_n = ROW_COUNT;
      IF v_n > 0 AND v_b.state = 'closed' THEN
        -- the window's failures first (the failures index: no scan of the window's successes);
        -- under the threshold nothing can open, whatever the rate
        SELECT count(*) INTO v_n FROM lifecycle_breaker_outcomes o
         WHERE o.scope = p_scope AND o.key = p_key AND NOT o.success
           AND o.at > p_now - make_interval(secs => (v_cfg ->> 'window_s')::float8)
           AND o.at >= coalesce(v_b.state_since, '-infinity'::timestamptz);
        IF v_n >= (v_cfg ->> 'failure_threshold')::integer THEN
          SELECT * INTO v_w
          FROM lifecycle_breaker_window(p_scope, p_key, (v_cfg ->> 'window_s')::float8, v_b.state_since, p_now);
          IF v_w.failures >= (v_cfg ->> 'failure_threshold')::integer
             AND v_w.rate > (v_cfg ->> 'error_budget')::float8 THEN
            RAISE EXCEPTION 'breaker % % over budget', p_scope, p_key USING ERRCODE = 'LCB01';
          END IF;
        END IF;
      END IF;
      RETURN v_b.state;  -- unchanged (or this task's outcome was recorded already)
    EXCEPTION WHEN SQLSTATE 'LCB01' THEN
      NULL;  -- the subtransaction rolled back: share lock and outcome given back, judged below
    END;
  END IF;

  -- LOCK: the breaker row, exclusively
  SELECT * INTO v_b FROM lifecycle_breakers b WHERE b.scope = p_scope AND b.key = p_key FOR UPDATE;

  INSERT INTO lifecycle_breaker_outcomes (scope, key, at, success, latency_ms, task_id, error_code)
  VALUES (p_scope, p_key, p_now, p_success, p_latency_ms, p_task_id, p_error_code)
  ON CONFLICT ON CONSTRAINT lifecycle_breaker_outcomes_one_per_task DO NOTHING;
  GET DIAGNOSTICS v_n = ROW_COUNT;
  IF v_n = 0 THEN
    RETURN v_b.state;  -- this task's outcome was recorded already
  END IF;

  -- TRANSITION: half_open -> open on a failure, -> closed once enough probes succeeded
  IF v_b.state = 'half_open' THEN
    IF NOT p_success THEN
      PERFORM lifecycle_breaker_set_state(p_scope, p_key, 'open', 0,
        jsonb_build_object('reason', 'probe_failed', 'error_code', p_error_code, 'task_id', p_task_id)
          || lifecycle_breaker_numbers(p_scope, p_key, v_cfg, v_b.state_since, p_now), p_now);
      RETURN 'open';
    END IF;
    SELECT count(*) INTO v_n FROM lifecycle_breaker_outcomes o
     WHERE o.scope = p_scope AND o.key = p_key AND o.success AND o.at >= v_b.state_since;
    IF v_n >= (v_cfg ->> 'half_open_probes')::integer THEN
      PERFORM lifecycle_breaker_set_state(p_scope, p_key, 'closed', 0,
        jsonb_build_object('reason', 'probes_succeeded', 'successes', v_n,
                           'half_open_probes', v_cfg -> 'half_open_probes', 'opened_at', v_b.opened_at)
          || lifecycle_breaker_numbers(p_scope, p_key, v_cfg, v_b.state_since, p_now), p_now);
      RETURN 'closed';
    END IF;
    RETURN 'half_open';
  END IF;

  -- TRANSITION: closed -> open on the window's numbers (counted since it last closed)
  IF v_b.state = 'closed' THEN
    SELECT * INTO v_w
    FROM lifecycle_breaker_window(p_scope, p_key, (v_cfg ->> 'window_s')::float8, v_b.state_since, p_now);
    IF v_w.failures >= (v_cfg ->> 'failure_threshold')::integer
       AND v_w.rate > (v_cfg ->> 'error_budget')::float8 THEN
      v_reason := 'error_budget';
    ELSIF jsonb_typeof(v_cfg -> 'latency_sla_ms') = 'number'
          AND v_w.calls >= (v_cfg ->> 'failure_threshold')::integer
          AND v_w.p95_ms > (v_cfg ->> 'latency_sla_ms')::float8 THEN
      v_reason := 'latency_sla';
    END IF;
    IF v_reason IS NOT NULL AND p_scope = 'capability' AND EXISTS (
         SELECT 1 FROM lifecycle_capability_breakers(p_key) c WHERE c.scope = 'agent' AND c.state = 'closed') THEN
      v_reason := NULL;
    END IF;
    IF v_reason IS NOT NULL THEN
      PERFORM lifecycle_breaker_set_state(p_scope, p_key, 'open', 0,
        jsonb_build_object('reason', v_reason)
          || lifecycle_breaker_numbers(p_scope, p_key, v_cfg, v_b.state_since, p_now), p_now);
      RETURN 'open';
    END IF;
  END IF;
  -- open: outcomes of calls still in flight are kept; the state waits for its cooldown
  RETURN v_b.state;
END
$$;

-- ---------------------------------------------------------------------------------------------
-- State-changing functions replaced above: SECURITY DEFINER with a fixed search_path, executable
-- by service_role (and the owner) only, exactly as 0011_security.sql does (CREATE OR REPLACE resets
-- SECURITY DEFINER and the search_path). lifecycle_stages_to_compensate is STABLE: it stays
-- SECURITY INVOKER, its privileges unchanged.
ALTER FUNCTION lifecycle_start_compensation(uuid, text, text, text[], integer, boolean, timestamptz)
  SECURITY DEFINER SET search_path = public, pg_temp;
REVOKE ALL ON FUNCTION lifecycle_start_compensation(uuid, text, text, text[], integer, boolean, timestamptz)
  FROM PUBLIC, anon, authenticated;
GRANT EXECUTE ON FUNCTION lifecycle_start_compensation(uuid, text, text, text[], integer, boolean, timestamptz)
  TO service_role;
ALTER FUNCTION lifecycle_breaker_record(text, text, boolean, double precision, timestamptz, uuid, text)
  SECURITY DEFINER SET search_path = public, pg_temp;
REVOKE ALL ON FUNCTION lifecycle_breaker_record(text, text, boolean, double precision, timestamptz, uuid, text)
  FROM PUBLIC, anon, authenticated;
GRANT EXECUTE ON FUNCTION lifecycle_breaker_record(text, text, boolean, double precision, timestamptz, uuid, text)
  TO service_role;

-- ---------------------------------------------------------------------------------------------
SELECT lifecycle_record_schema_fingerprints();
