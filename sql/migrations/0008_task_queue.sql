-- 0008_task_queue: the task queue as a protocol any language can speak, and agents that are not
-- Python functions in our process. Every dispatch is a task_queue row: python and http agents are
-- run by the stage op, which claims its task itself; queue agents are run by external workers
-- (`lifecycle-dagster agent serve`, or any program) that claim, heartbeat, complete or fail tasks
-- with a fencing token. NOTIFY carries task ids only.

ALTER TABLE task_queue ADD COLUMN capability text;
ALTER TABLE task_queue ADD COLUMN lease_token bigint NOT NULL DEFAULT 0;
ALTER TABLE task_queue ADD COLUMN lease_expires_at timestamptz;
ALTER TABLE task_queue ADD COLUMN claimed_by text;
ALTER TABLE task_queue ADD COLUMN max_attempts integer;
ALTER TABLE task_queue ADD COLUMN priority integer NOT NULL DEFAULT 0;
ALTER TABLE task_queue ADD COLUMN error_code text;
ALTER TABLE task_queue ADD COLUMN retryable boolean;
ALTER TABLE task_queue ADD COLUMN retry_after_s double precision;
ALTER TABLE task_queue ADD CONSTRAINT task_queue_lease_token_not_negative CHECK (lease_token >= 0);
ALTER TABLE task_queue ADD CONSTRAINT task_queue_max_attempts_positive CHECK (max_attempts IS NULL OR max_attempts >= 1);

-- Enqueueing is idempotent on (execution, stage, attempt): re-running the runbook's section 7
-- statement fails with this unique violation, naming the task (it has no ON CONFLICT clause).
-- (stage_log_id, attempt) said the same for tasks with a stage log; this one names the task in its
-- error and also covers tasks enqueued before their stage log exists.
ALTER TABLE task_queue DROP CONSTRAINT task_queue_one_per_attempt;
CREATE UNIQUE INDEX task_queue_one_per_stage_attempt
  ON task_queue (workflow_execution_id, task_type, attempt) WHERE workflow_execution_id IS NOT NULL;
CREATE INDEX task_queue_claimable_idx ON task_queue (capability, priority DESC, created_at) WHERE status = 'pending';
CREATE INDEX task_queue_leased_idx ON task_queue (lease_expires_at) WHERE status = 'in_progress';

-- A task inserted without its capability or stage log (the runbook's section 7 writes task_type =
-- the stage id) gets them from the execution's definition.
CREATE FUNCTION lifecycle_task_fill() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
  IF NEW.workflow_execution_id IS NOT NULL AND NEW.capability IS NULL THEN
    SELECT s ->> 'capability' INTO NEW.capability
    FROM workflow_executions e JOIN workflow_definitions d ON d.id = e.workflow_definition_id,
         jsonb_array_elements(d.dag_schema -> 'stages') s
    WHERE e.id = NEW.workflow_execution_id AND s ->> 'id' = NEW.task_type;
  END IF;
  IF NEW.workflow_execution_id IS NOT NULL AND NEW.stage_log_id IS NULL THEN
    SELECT l.id INTO NEW.stage_log_id FROM workflow_execution_logs l
    WHERE l.execution_id = NEW.workflow_execution_id AND l.stage_id = NEW.task_type;
  END IF;
  RETURN NEW;
END
$$;

CREATE TRIGGER task_queue_fill
  BEFORE INSERT ON task_queue
  FOR EACH ROW EXECUTE FUNCTION lifecycle_task_fill();

-- Wake-ups: ids only (NOTIFY payloads are limited to 8000 bytes).
CREATE FUNCTION lifecycle_task_notify() RETURNS trigger
LANGUAGE plpgsql
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

CREATE TRIGGER task_queue_notify
  AFTER INSERT OR UPDATE OF status ON task_queue
  FOR EACH ROW EXECUTE FUNCTION lifecycle_task_notify();

-- ---------------------------------------------------------------------------------------------
-- Routing candidates (replaces 0006's, same signature): active agents whose latest orchestration
-- ontology declares the capability ({"capability": c} as in the runbook, or {"capabilities": [...]}),
-- least loaded first (fewest claimed tasks), ties broken by name. Breakers are applied by
-- lifecycle_route_capability on top of this order.
CREATE OR REPLACE FUNCTION lifecycle_capability_agents(p_capability text)
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
  WHERE a.is_active
    AND (latest.knowledge ->> 'capability' = p_capability
         OR (jsonb_typeof(latest.knowledge -> 'capabilities') = 'array'
             AND latest.knowledge -> 'capabilities' ? p_capability))
  ORDER BY (SELECT count(*) FROM task_queue t WHERE t.agent_id = a.id AND t.status = 'in_progress'), a.name
$$;

-- The capabilities an agent serves (latest orchestration ontology).
CREATE FUNCTION lifecycle_agent_capabilities(p_agent_id uuid) RETURNS text[]
LANGUAGE sql STABLE
AS $$
  SELECT coalesce(array_agg(DISTINCT c), '{}')
  FROM (
    SELECT o.knowledge FROM agent_ontologies o
    WHERE o.agent_id = p_agent_id AND o.domain = 'orchestration'
    ORDER BY o.version DESC LIMIT 1
  ) latest,
  LATERAL (
    SELECT latest.knowledge ->> 'capability' AS c
    UNION ALL
    SELECT jsonb_array_elements_text(CASE WHEN jsonb_typeof(latest.knowledge -> 'capabilities') = 'array'
                                          THEN latest.knowledge -> 'capabilities' ELSE '[]'::jsonb END)
  ) caps
  WHERE c IS NOT NULL
$$;

-- ---------------------------------------------------------------------------------------------
DROP FUNCTION lifecycle_start_stage(uuid, text, text, jsonb, integer, timestamptz, double precision, boolean);

-- As in 0003, plus: the task records its capability and max_attempts; a queue agent's task is
-- left pending for an external worker; a retried stage's next attempt comes after every attempt
-- already dispatched.
CREATE FUNCTION lifecycle_start_stage(
  p_execution_id uuid,
  p_stage_id     text,
  p_capability   text,
  p_ancestors    jsonb DEFAULT '{}'::jsonb,
  p_attempt      integer DEFAULT 1,
  p_now          timestamptz DEFAULT now(),
  p_timeout_s    double precision DEFAULT NULL,
  p_resume       boolean DEFAULT false,
  p_max_attempts integer DEFAULT NULL
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
                              THEN greatest(l.attempt_number, EXCLUDED.attempt_number,
                                            (SELECT max(t.attempt) + 1 FROM task_queue t WHERE t.stage_log_id = l.id))
                              ELSE EXCLUDED.attempt_number END,
        started_at = EXCLUDED.started_at, completed_at = NULL, not_before = NULL,
        input_data = EXCLUDED.input_data, output_data = NULL, error_message = NULL
  RETURNING l.id, l.attempt_number INTO v_log_id, v_attempt;

  UPDATE workflow_executions e SET current_stage = p_stage_id, updated_at = p_now
   WHERE e.id = p_execution_id;

  SELECT r.agent_id, r.agent_name, r.agent_kind INTO v_agent
  FROM lifecycle_route_capability(p_capability) r;

  IF v_agent.agent_id IS NOT NULL THEN
    -- python and http agents: the op is the worker, the task is claimed at once; queue agents: the
    -- task waits, pending, for an external worker (lifecycle_task_claim)
    INSERT INTO task_queue (workflow_execution_id, task_type, capability, input_data, status, agent_id,
                            stage_log_id, attempt, max_attempts, created_at, updated_at, started_at,
                            deadline_at, claimed_by, lease_token)
    VALUES (p_execution_id, p_stage_id, p_capability, v_input,
            CASE WHEN v_agent.agent_kind = 'queue' THEN 'pending' ELSE 'in_progress' END,
            v_agent.agent_id, v_log_id, v_attempt, p_max_attempts, p_now, p_now,
            CASE WHEN v_agent.agent_kind = 'queue' THEN NULL ELSE p_now END,
            p_now + make_interval(secs => p_timeout_s),
            CASE WHEN v_agent.agent_kind = 'queue' THEN NULL ELSE 'op' END,
            CASE WHEN v_agent.agent_kind = 'queue' THEN 0 ELSE 1 END)
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

-- ---------------------------------------------------------------------------------------------
-- The worker protocol.

-- Claim up to p_limit pending tasks of the agent's capabilities for worker p_worker, with a lease
-- of p_lease_s seconds and a new fencing token each. The agent row is locked first, so its
-- concurrency limit (agents.config ->> 'concurrency') holds across workers; the claim itself is one
-- UPDATE over a FOR UPDATE SKIP LOCKED selection. A claimed task whose stage log is still pending
-- starts that stage (stage_started).
CREATE FUNCTION lifecycle_task_claim(
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
  -- GUARD: arguments
  IF p_limit IS NULL OR p_limit < 1 OR p_lease_s IS NULL OR NOT p_lease_s > 0 THEN
    RAISE EXCEPTION 'lifecycle_task_claim: p_limit must be >= 1 and p_lease_s > 0 (got %, %)', p_limit, p_lease_s
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

-- Extend a lease; false (nothing changed) when the token is stale or the task is not in progress.
CREATE FUNCTION lifecycle_task_heartbeat(
  p_task_id uuid,
  p_token   bigint,
  p_lease_s double precision DEFAULT 30,
  p_now     timestamptz DEFAULT now()
) RETURNS boolean
LANGUAGE sql
AS $$
  WITH hit AS (
    UPDATE task_queue t
       SET lease_expires_at = p_now + make_interval(secs => p_lease_s), updated_at = p_now
     WHERE t.id = p_task_id AND t.lease_token = p_token AND t.status = 'in_progress'
    RETURNING 1
  )
  SELECT EXISTS (SELECT 1 FROM hit)
$$;

-- Why a worker's result is refused, recorded as task_result_refused; NULL when it is accepted.
CREATE FUNCTION lifecycle_task_refusal(p_task task_queue, p_token bigint, p_outcome text, p_now timestamptz)
RETURNS text
LANGUAGE plpgsql
AS $$
DECLARE
  v_reason text;
BEGIN
  IF p_task.lease_token <> p_token THEN
    v_reason := format('lease token %s is stale (current %s): the lease was lost', p_token, p_task.lease_token);
  ELSIF p_task.status <> 'in_progress' THEN
    v_reason := format('task is %s', p_task.status);
  END IF;
  IF v_reason IS NOT NULL THEN
    INSERT INTO workflow_events (execution_id, event_type, stage_id, metadata, "timestamp")
    VALUES (p_task.workflow_execution_id, 'task_result_refused', p_task.task_type,
            jsonb_build_object('task_id', p_task.id, 'token', p_token, 'outcome', p_outcome, 'reason', v_reason),
            p_now);
  END IF;
  RETURN v_reason;
END
$$;

-- A worker's result. Accepted only with the current token of an in-progress task; the stage then
-- completes (lifecycle_complete_stage: stage log, events, execution, breakers) in this transaction.
-- Returns the execution's status, or 'refused: <reason>'.
CREATE FUNCTION lifecycle_task_complete(
  p_task_id uuid,
  p_token   bigint,
  p_output  jsonb,
  p_now     timestamptz DEFAULT now()
) RETURNS text
LANGUAGE plpgsql
AS $$
DECLARE
  v_task   task_queue;
  v_reason text;
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
  IF v_task.stage_log_id IS NULL THEN
    UPDATE task_queue t SET status = 'completed', output_data = p_output, completed_at = p_now, updated_at = p_now
     WHERE t.id = p_task_id;
    RETURN 'completed';
  END IF;
  RETURN lifecycle_complete_stage(v_task.stage_log_id, p_task_id, p_output, p_now, v_task.attempt);
END
$$;

-- A worker's failure: the task fails with its code and whether another attempt may succeed; the
-- stage op waiting for it decides on a retry (lifecycle_schedule_retry) or the stage's failure.
-- Returns 'failed' or 'refused: <reason>'.
CREATE FUNCTION lifecycle_task_fail(
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
         retry_after_s = p_retry_after_s, completed_at = p_now, updated_at = p_now
   WHERE t.id = p_task_id;
  RETURN 'failed';
END
$$;

-- Return expired leases to the queue, each counting an attempt (task_reaped); a task out of
-- attempts fails with lease_expired. Safe when several reapers run at once (SKIP LOCKED).
-- Returns the number of tasks reaped.
CREATE FUNCTION lifecycle_task_reap(p_now timestamptz DEFAULT now()) RETURNS integer
LANGUAGE plpgsql
AS $$
DECLARE
  v_task record;
  v_n    integer := 0;
BEGIN
  FOR v_task IN
    SELECT t.* FROM task_queue t
     WHERE t.status = 'in_progress' AND t.lease_expires_at < p_now AND t.claimed_by IS DISTINCT FROM 'op'
     ORDER BY t.lease_expires_at
     FOR UPDATE SKIP LOCKED
  LOOP
    IF v_task.max_attempts IS NOT NULL AND v_task.attempt >= v_task.max_attempts THEN
      UPDATE task_queue t
         SET status = 'failed', error_message = format('lease of worker %s expired; attempts exhausted', v_task.claimed_by),
             error_code = 'lease_expired', retryable = false, completed_at = p_now, updated_at = p_now
       WHERE t.id = v_task.id;
    ELSE
      UPDATE task_queue t
         SET status = 'pending', attempt = t.attempt + 1, lease_expires_at = NULL, claimed_by = NULL,
             started_at = NULL, updated_at = p_now
       WHERE t.id = v_task.id;
      UPDATE workflow_execution_logs l SET attempt_number = v_task.attempt + 1
       WHERE l.id = v_task.stage_log_id AND l.status = 'in_progress';
    END IF;
    INSERT INTO workflow_events (execution_id, event_type, stage_id, metadata, "timestamp")
    VALUES (v_task.workflow_execution_id, 'task_reaped', v_task.task_type,
            jsonb_build_object('task_id', v_task.id, 'worker', v_task.claimed_by, 'attempt', v_task.attempt,
                               'lease_expires_at', v_task.lease_expires_at,
                               'requeued', v_task.max_attempts IS NULL OR v_task.attempt < v_task.max_attempts),
            p_now);
    v_n := v_n + 1;
  END LOOP;
  RETURN v_n;
END
$$;

-- The stage op gives up waiting (its timeout, a cancel): the task is cancelled and its token moves
-- on, so a worker still holding it has its result refused. Returns the task's status before.
CREATE FUNCTION lifecycle_task_abandon(p_task_id uuid, p_reason text, p_now timestamptz DEFAULT now())
RETURNS text
LANGUAGE plpgsql
AS $$
DECLARE
  v_task task_queue;
BEGIN
  SELECT * INTO v_task FROM task_queue t WHERE t.id = p_task_id FOR UPDATE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'unknown task %', p_task_id USING ERRCODE = 'no_data_found';
  END IF;
  IF v_task.status IN ('pending', 'in_progress') THEN
    UPDATE task_queue t
       SET status = 'cancelled', lease_token = t.lease_token + 1, error_message = p_reason,
           completed_at = p_now, updated_at = p_now
     WHERE t.id = p_task_id;
  END IF;
  RETURN v_task.status;
END
$$;

-- A worker shutting down hands a claimed task back: pending again, its token moves on (same attempt).
CREATE FUNCTION lifecycle_task_release(p_task_id uuid, p_token bigint, p_now timestamptz DEFAULT now())
RETURNS boolean
LANGUAGE sql
AS $$
  WITH hit AS (
    UPDATE task_queue t
       SET status = 'pending', lease_token = t.lease_token + 1, lease_expires_at = NULL, claimed_by = NULL,
           started_at = NULL, updated_at = p_now
     WHERE t.id = p_task_id AND t.lease_token = p_token AND t.status = 'in_progress'
    RETURNING 1
  )
  SELECT EXISTS (SELECT 1 FROM hit)
$$;
