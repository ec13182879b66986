-- 0014_input_guards: limits on what clients may hand the database, so that a malformed input is
-- refused at the boundary with an error naming what and where, and never leaves half a state change
-- or a row the engine cannot read back (Python's json module cannot decode deeply nested JSON).
--
-- * Payloads (an execution's context, a stage's output): nested at most 100 objects or arrays deep
--   (lifecycle_dagster/payload.py MAX_JSON_DEPTH) and at most lifecycle.max_payload_bytes bytes as
--   jsonb text (a setting: ALTER DATABASE ... SET lifecycle.max_payload_bytes = '16777216'; default
--   8 MiB, as LIFECYCLE_DAGSTER_MAX_OUTPUT_BYTES on the Python side). A context over a limit is
--   refused on INSERT or UPDATE (check_violation, constraint workflow_executions_context_valid); a
--   stage output over one is refused (invalid_parameter_value), so lifecycle_complete_stage changes
--   nothing; a queue worker's output over one, or not an object, fails its task with bad_output
--   (lifecycle_task_complete returns 'refused: ...'), so the stage op retries or fails the stage.
-- * DAGs: at most 500 stages and 5000 edge entries (lifecycle_dagster/dag.py MAX_STAGES,
--   MAX_EDGES); over a limit that is the only problem reported, so a huge document is refused at
--   once instead of keeping the validator busy for minutes.
-- * Leases and retry hints: a lease is a finite number of seconds in (0, one year]; NaN passed the
--   old guard (NaN > 0 is true in Postgres) and then failed inside make_interval. A worker's
--   retry_after_s that is not a finite number >= 0 is stored as NULL (no hint), one over a year as a
--   year.
-- Rows stored before 0014 are not re-checked.

-- ---------------------------------------------------------------------------------------------
-- Payload limits.

-- lifecycle.max_payload_bytes, or 8 MiB
CREATE FUNCTION lifecycle_max_payload_bytes() RETURNS bigint
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
  SELECT coalesce(nullif(current_setting('lifecycle.max_payload_bytes', true), '')::bigint, 8388608)
$$;

-- Why p_value cannot be stored as p_what ('the context', 'stage output'), or NULL when it can: over
-- the size limit, or nested deeper than 100 levels. The depth test is a jsonpath query that looks no
-- deeper than level 100, so any document is safe to check. NULL and non-objects are left to the
-- callers' own checks.
CREATE FUNCTION lifecycle_payload_problem(p_value jsonb, p_what text) RETURNS text
LANGUAGE plpgsql STABLE PARALLEL SAFE
AS $$
DECLARE
  c_max_depth CONSTANT integer := 100;
  v_size  bigint;
  v_limit bigint := lifecycle_max_payload_bytes();
BEGIN
  IF p_value IS NULL OR jsonb_typeof(p_value) NOT IN ('object', 'array') THEN
    RETURN NULL;
  END IF;
  v_size := octet_length(p_value::text);
  IF v_size > v_limit THEN
    RETURN format('%s is %s bytes, over the %s-byte limit (lifecycle.max_payload_bytes)', p_what, v_size, v_limit);
  END IF;
  -- a container at level 100 (the document itself is level 0) is the 101st enclosing level
  IF jsonb_path_exists(p_value, 'strict $.**{100} ? (@.type() == "object" || @.type() == "array")') THEN
    RETURN format('%s is nested more than %s levels deep (objects and arrays)', p_what, c_max_depth);
  END IF;
  RETURN NULL;
END
$$;

COMMENT ON FUNCTION lifecycle_payload_problem(jsonb, text) IS
  'why a context or stage output cannot be stored (size, nesting), or NULL; lifecycle_dagster/payload.py says the same';

CREATE FUNCTION lifecycle_guard_execution_context() RETURNS trigger
LANGUAGE plpgsql
AS $$
DECLARE
  v_problem text := lifecycle_payload_problem(NEW.context, 'the context');
BEGIN
  IF v_problem IS NOT NULL THEN
    RAISE EXCEPTION 'workflow_executions: %', v_problem
      USING ERRCODE = 'check_violation',
            CONSTRAINT = 'workflow_executions_context_valid',
            TABLE = 'workflow_executions',
            COLUMN = 'context',
            HINT = 'a context is at most 100 levels deep and lifecycle.max_payload_bytes bytes (default 8 MiB)';
  END IF;
  RETURN NEW;
END
$$;

CREATE TRIGGER workflow_executions_context_valid
  BEFORE INSERT OR UPDATE OF context ON workflow_executions
  FOR EACH ROW EXECUTE FUNCTION lifecycle_guard_execution_context();

CREATE FUNCTION lifecycle_guard_stage_output() RETURNS trigger
LANGUAGE plpgsql
AS $$
DECLARE
  v_problem text := lifecycle_payload_problem(NEW.output_data, 'stage output');
BEGIN
  IF v_problem IS NOT NULL THEN
    RAISE EXCEPTION 'stage %: %', NEW.stage_id, v_problem
      USING ERRCODE = 'invalid_parameter_value',
            TABLE = 'workflow_execution_logs',
            COLUMN = 'output_data',
            HINT = 'an output is at most 100 levels deep and lifecycle.max_payload_bytes bytes (default 8 MiB)';
  END IF;
  RETURN NEW;
END
$$;

CREATE TRIGGER workflow_execution_logs_output_valid
  BEFORE INSERT OR UPDATE OF output_data ON workflow_execution_logs
  FOR EACH ROW WHEN (NEW.output_data IS NOT NULL)
  EXECUTE FUNCTION lifecycle_guard_stage_output();

-- ---------------------------------------------------------------------------------------------
-- DAG size limits: the rules of 0007 keep their function (renamed), in front of which the limits
-- are checked. Over a limit, that is the only problem (dag.py's validator does the same).
ALTER FUNCTION lifecycle_validate_dag(jsonb) RENAME TO lifecycle_validate_dag_rules;

COMMENT ON FUNCTION lifecycle_validate_dag_rules(jsonb) IS
  'the rules of lifecycle_dagster/dag.py for a dag_schema within the size limits (lifecycle_validate_dag checks those first)';

CREATE FUNCTION lifecycle_validate_dag(p_dag jsonb)
RETURNS TABLE (code text, stages text[], path text, message text)
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
AS $$
#variable_conflict use_column
DECLARE
  c_max_stages CONSTANT integer := 500;
  c_max_edges  CONSTANT integer := 5000;
  v_stages integer := 0;
  v_edges  integer := 0;
BEGIN
  IF jsonb_typeof(p_dag) = 'object' THEN
    IF jsonb_typeof(p_dag -> 'stages') = 'array' THEN
      v_stages := jsonb_array_length(p_dag -> 'stages');
      SELECT coalesce(sum(jsonb_array_length(s -> 'next')), 0) INTO v_edges
        FROM jsonb_array_elements(p_dag -> 'stages') AS s
       WHERE jsonb_typeof(s) = 'object' AND jsonb_typeof(s -> 'next') = 'array';
    END IF;
    IF jsonb_typeof(p_dag -> 'edges') = 'array' THEN
      v_edges := v_edges + jsonb_array_length(p_dag -> 'edges');
    END IF;
    IF v_stages > c_max_stages THEN
      RETURN QUERY SELECT * FROM lifecycle_dag_report('bad_value', '', 'stages', 'workflow DAG', '{}',
        format('stages has %s entries, over the limit of %s', v_stages, c_max_stages));
    END IF;
    IF v_edges > c_max_edges THEN
      RETURN QUERY SELECT * FROM lifecycle_dag_report('bad_value', '', 'edges', 'workflow DAG', '{}',
        format('the DAG has %s edge entries (edges and next), over the limit of %s', v_edges, c_max_edges));
    END IF;
    IF v_stages > c_max_stages OR v_edges > c_max_edges THEN
      RETURN;
    END IF;
  END IF;
  RETURN QUERY SELECT * FROM lifecycle_validate_dag_rules(p_dag);
END
$$;

COMMENT ON FUNCTION lifecycle_validate_dag(jsonb) IS
  'every problem of a workflow dag_schema (the rules of lifecycle_dagster/dag.py); no rows when valid';

-- As in 0007, plus the payload limits on the whole document (publish's own check says the same): a
-- definition goes into every run's snapshot, so a 20 MB one is refused here too. The DAG's own
-- problems come first (no valid DAG nests more than 5 levels: only its size can be over a limit).
CREATE OR REPLACE FUNCTION lifecycle_guard_definition_insert() RETURNS trigger
LANGUAGE plpgsql
AS $$
DECLARE
  v_problem text;
BEGIN
  IF jsonb_typeof(NEW.dag_schema) = 'object' THEN
    PERFORM lifecycle_assert_valid_dag(NEW.dag_schema, format('workflow %s v%s', NEW.name, NEW.version));
    v_problem := lifecycle_payload_problem(NEW.dag_schema, 'dag_schema');
    IF v_problem IS NOT NULL THEN
      RAISE EXCEPTION 'invalid workflow DAG: workflow % v%: %', NEW.name, NEW.version, v_problem
        USING ERRCODE = 'check_violation',
              CONSTRAINT = 'workflow_definitions_dag_valid',
              TABLE = 'workflow_definitions',
              HINT = 'a definition is at most lifecycle.max_payload_bytes bytes (default 8 MiB) as jsonb text';
    END IF;
  END IF;
  RETURN NEW;
END
$$;

-- ---------------------------------------------------------------------------------------------
-- A task of an execution names a stage of that execution's DAG, as a stage log must (0004): a task
-- for an unknown stage (the runbook's section 7 with a typo) got no capability, so no worker could
-- ever claim it and it stayed pending for good. As in 0008 otherwise.
CREATE OR REPLACE FUNCTION lifecycle_task_fill() RETURNS trigger
LANGUAGE plpgsql
AS $$
DECLARE
  v_stage jsonb;
BEGIN
  IF NEW.workflow_execution_id IS NOT NULL THEN
    SELECT s INTO v_stage
    FROM workflow_executions e JOIN workflow_definitions d ON d.id = e.workflow_definition_id,
         jsonb_array_elements(CASE WHEN jsonb_typeof(d.dag_schema -> 'stages') = 'array'
                                   THEN d.dag_schema -> 'stages' ELSE '[]'::jsonb END) s
    WHERE e.id = NEW.workflow_execution_id AND jsonb_typeof(s) = 'object' AND s ->> 'id' = NEW.task_type;
    IF v_stage IS NULL AND EXISTS (SELECT 1 FROM workflow_executions e WHERE e.id = NEW.workflow_execution_id) THEN
      RAISE EXCEPTION 'task_queue: stage % is not a stage of the DAG that execution % runs',
        coalesce(NEW.task_type, 'NULL'), NEW.workflow_execution_id
        USING ERRCODE = 'check_violation', TABLE = 'task_queue', COLUMN = 'task_type';
    END IF;
    IF NEW.capability IS NULL THEN
      NEW.capability := v_stage ->> 'capability';
    END IF;
  END IF;
  IF NEW.workflow_execution_id IS NOT NULL AND NEW.stage_log_id IS NULL THEN
    SELECT l.id INTO NEW.stage_log_id FROM workflow_execution_logs l
    WHERE l.execution_id = NEW.workflow_execution_id AND l.stage_id = NEW.task_type;
  END IF;
  RETURN NEW;
END
$$;

-- ---------------------------------------------------------------------------------------------
-- The worker protocol of 0008, same signatures.

-- As in 0008; the lease must be a finite number of seconds in (0, one year].
CREATE OR REPLACE FUNCTION lifecycle_task_claim(
  p_worker     text,
  p_agent_name text,
  p_limit      integer DEFAULT 1,
  p_lease_s    double precision DEFAULT 30,
  p_now        timestamptz DEFAULT now()
) RETURNS TABLE (task_id uuid, lease_token bigint, execution_id uuid, stage_id text, capability text,
                 attempt integer, input_data jsonb, lease_expires_at timestamptz)
LANGUAGE plpgsql
AS $$
DECLARE
  v_agent agents;
  v_caps  text[];
  v_limit integer;
  v_busy  integer;
  v_n     integer;
  v_task  record;
BEGIN
  -- GUARD: arguments (NaN is greater than every number in Postgres: the upper bound refuses it)
  IF p_limit IS NULL OR p_limit < 1 OR p_lease_s IS NULL OR NOT (p_lease_s > 0 AND p_lease_s <= 31536000) THEN
    RAISE EXCEPTION 'lifecycle_task_claim: p_limit must be >= 1 and p_lease_s a number of seconds in (0, 31536000] (got %, %)',
      p_limit, p_lease_s
      USING ERRCODE = 'invalid_parameter_value';
  END IF;

  -- LOCK: the agent (claims of one agent serialise)
  SELECT * INTO v_agent FROM agents a WHERE a.name = p_agent_name FOR UPDATE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'unknown agent %', p_agent_name USING ERRCODE = 'no_data_found';
  END IF;
  IF NOT v_agent.is_active THEN
    RETURN;
  END IF;
  v_caps := lifecycle_agent_capabilities(v_agent.id);
  v_limit := nullif(v_agent.config ->> 'concurrency', '')::integer;
  SELECT count(*) INTO v_busy FROM task_queue t WHERE t.agent_id = v_agent.id AND t.status = 'in_progress';
  v_n := CASE WHEN v_limit IS NULL THEN p_limit ELSE least(p_limit, v_limit - v_busy) END;
  IF v_n <= 0 THEN
    RETURN;
  END IF;

  -- TRANSITION: pending -> in_progress, in one statement
  FOR v_task IN
    UPDATE task_queue t
       SET status = 'in_progress', agent_id = v_agent.id, lease_token = t.lease_token + 1,
           lease_expires_at = p_now + make_interval(secs => p_lease_s), claimed_by = p_worker,
           started_at = p_now, updated_at = p_now
      FROM (SELECT q.id FROM task_queue q
             WHERE q.status = 'pending' AND q.capability = ANY (v_caps)
               AND (q.agent_id IS NULL OR q.agent_id = v_agent.id)
               AND (q.not_before IS NULL OR q.not_before <= p_now)
             ORDER BY q.priority DESC, q.created_at, q.id
             FOR UPDATE SKIP LOCKED
             LIMIT v_n) c
     WHERE t.id = c.id
    RETURNING t.id, t.lease_token, t.workflow_execution_id, t.task_type, t.capability, t.attempt, t.input_data,
              t.lease_expires_at, t.stage_log_id
  LOOP
    -- a task enqueued for a pending stage (the runbook's section 7) starts that stage
    UPDATE workflow_execution_logs l
       SET status = 'in_progress', attempt_number = v_task.attempt, started_at = p_now
     WHERE l.id = v_task.stage_log_id AND l.status = 'pending'
       AND EXISTS (SELECT 1 FROM workflow_executions e WHERE e.id = l.execution_id AND e.status = 'in_progress');
    IF FOUND THEN
      INSERT INTO workflow_events (execution_id, event_type, stage_id, metadata, "timestamp")
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

-- As in 0008; the lease must be a finite number of seconds in (0, one year] (a negative one used to
-- be accepted, and expired the lease at once).
CREATE OR REPLACE FUNCTION lifecycle_task_heartbeat(
  p_task_id uuid,
  p_token   bigint,
  p_lease_s double precision DEFAULT 30,
  p_now     timestamptz DEFAULT now()
) RETURNS boolean
LANGUAGE plpgsql
AS $$
BEGIN
  -- GUARD: arguments
  IF p_lease_s IS NULL OR NOT (p_lease_s > 0 AND p_lease_s <= 31536000) THEN
    RAISE EXCEPTION 'lifecycle_task_heartbeat: p_lease_s must be a number of seconds in (0, 31536000], got %', p_lease_s
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  UPDATE task_queue t
     SET lease_expires_at = p_now + make_interval(secs => p_lease_s), updated_at = p_now
   WHERE t.id = p_task_id AND t.lease_token = p_token AND t.status = 'in_progress';
  RETURN FOUND;
END
$$;

-- As in 0008, plus: an output that is not a JSON object, or is over the payload limits, is refused
-- and fails the task (error_code bad_output, retryable), so the stage op waiting for it retries or
-- fails the stage at once instead of waiting for the lease to expire. Returns the execution's
-- status, or 'refused: <reason>'.
CREATE OR REPLACE FUNCTION lifecycle_task_complete(
  p_task_id uuid,
  p_token   bigint,
  p_output  jsonb,
  p_now     timestamptz DEFAULT now()
) RETURNS text
LANGUAGE plpgsql
AS $$
DECLARE
  v_task    task_queue;
  v_reason  text;
  v_problem text;
BEGIN
  -- LOCK: the execution first (the order every transition uses), then the task
  PERFORM 1 FROM workflow_executions e
   WHERE e.id = (SELECT t.workflow_execution_id FROM task_queue t WHERE t.id = p_task_id) FOR UPDATE;
  SELECT * INTO v_task FROM task_queue t WHERE t.id = p_task_id FOR UPDATE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'unknown task %', p_task_id USING ERRCODE = 'no_data_found';
  END IF;
  v_reason := lifecycle_task_refusal(v_task, p_token, 'completed', p_now);
  IF v_reason IS NOT NULL THEN
    RETURN 'refused: ' || v_reason;
  END IF;

  -- GUARD: the output
  v_problem := CASE WHEN jsonb_typeof(p_output) IS DISTINCT FROM 'object'
                    THEN format('output must be a JSON object, got %s', coalesce(jsonb_typeof(p_output), 'NULL'))
                    ELSE lifecycle_payload_problem(p_output, 'output') END;
  IF v_problem IS NOT NULL THEN
    v_problem := format('task %s (stage %s): %s', p_task_id, v_task.task_type, v_problem);
    UPDATE task_queue t
       SET status = 'failed', error_message = v_problem, error_code = 'bad_output', retryable = true,
           retry_after_s = NULL, completed_at = p_now, updated_at = p_now
     WHERE t.id = p_task_id;
    INSERT INTO workflow_events (execution_id, event_type, stage_id, metadata, "timestamp")
    VALUES (v_task.workflow_execution_id, 'task_result_refused', v_task.task_type,
            jsonb_build_object('task_id', v_task.id, 'token', p_token, 'outcome', 'completed',
                               'reason', v_problem, 'error_code', 'bad_output'),
            p_now);
    RETURN 'refused: ' || v_problem;
  END IF;

  IF v_task.stage_log_id IS NULL THEN
    UPDATE task_queue t SET status = 'completed', output_data = p_output, completed_at = p_now, updated_at = p_now
     WHERE t.id = p_task_id;
    RETURN 'completed';
  END IF;
  RETURN lifecycle_complete_stage(v_task.stage_log_id, p_task_id, p_output, p_now, v_task.attempt);
END
$$;

-- As in 0008; a retry hint that is not a finite number of seconds >= 0 is no hint (NULL), one over
-- a year is a year (an agent's hint is advice, and the task's failure must still be recorded).
CREATE OR REPLACE FUNCTION lifecycle_task_fail(
  p_task_id       uuid,
  p_token         bigint,
  p_error         text,
  p_error_code    text DEFAULT 'agent_error',
  p_retryable     boolean DEFAULT true,
  p_retry_after_s double precision DEFAULT NULL,
  p_now           timestamptz DEFAULT now()
) RETURNS text
LANGUAGE plpgsql
AS $$
DECLARE
  v_task   task_queue;
  v_reason text;
  v_after  double precision := CASE WHEN p_retry_after_s >= 0 AND p_retry_after_s <= 'Infinity'::float8
                                    THEN least(p_retry_after_s, 31536000) END;
BEGIN
  PERFORM 1 FROM workflow_executions e
   WHERE e.id = (SELECT t.workflow_execution_id FROM task_queue t WHERE t.id = p_task_id) FOR UPDATE;
  SELECT * INTO v_task FROM task_queue t WHERE t.id = p_task_id FOR UPDATE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'unknown task %', p_task_id USING ERRCODE = 'no_data_found';
  END IF;
  v_reason := lifecycle_task_refusal(v_task, p_token, 'failed', p_now);
  IF v_reason IS NOT NULL THEN
    RETURN 'refused: ' || v_reason;
  END IF;
  UPDATE task_queue t
     SET status = 'failed', error_message = coalesce(nullif(p_error, ''), 'task failed'),
         error_code = coalesce(p_error_code, 'agent_error'), retryable = coalesce(p_retryable, true),
         retry_after_s = v_after, completed_at = p_now, updated_at = p_now
   WHERE t.id = p_task_id;
  RETURN 'failed';
END
$$;

-- ---------------------------------------------------------------------------------------------
-- State-changing functions: SECURITY DEFINER with a fixed search_path, executable by service_role
-- (and the owner) only, exactly as 0011_security.sql does (CREATE OR REPLACE resets SECURITY
-- DEFINER and the search_path; new functions start executable by PUBLIC).
DO $definer$
DECLARE
  v_fn text;
BEGIN
  FOR v_fn IN
    SELECT format('%I(%s)', p.proname, pg_get_function_identity_arguments(p.oid))
    FROM pg_proc p
    WHERE p.pronamespace = 'public'::regnamespace AND p.prokind = 'f' AND p.provolatile = 'v'
      AND (p.proname LIKE 'lifecycle\_%'
           OR p.proname IN ('perform_workflow_compensation', 'retry_stage', 'trip_circuit_breaker'))
    ORDER BY 1
  LOOP
    EXECUTE format('ALTER FUNCTION public.%s SECURITY DEFINER SET search_path = public, pg_temp', v_fn);
    EXECUTE format('REVOKE ALL ON FUNCTION public.%s FROM PUBLIC, anon, authenticated', v_fn);
    EXECUTE format('GRANT EXECUTE ON FUNCTION public.%s TO service_role', v_fn);
  END LOOP;
END
$definer$;

-- ---------------------------------------------------------------------------------------------
SELECT lifecycle_record_schema_fingerprints();
