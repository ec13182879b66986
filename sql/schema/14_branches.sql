-- Branches, early ends and approval stages (docs/branches.md). An edge fires when its upstream
-- stage completed and its `when` pattern is contained in {"output": .., "context": ..} (jsonb @>)
-- and its `unless` pattern is not; a stage no fired edge reaches is skipped, cascading; an output
-- {"end": {"outcome", "reason"}} completes the execution early; an approval stage waits for a
-- decision, with the execution 'waiting' once nothing else of it can run.

-- lifecycle.dag_edges: the edges of a dag_schema, the union of every stage's `next` (a string, or
-- an object {"to", "when", "unless"}) and `edges`, one row per (source, target): the first
-- declared (`next` before `edges`; validated DAGs declare both alike).
CREATE OR REPLACE FUNCTION lifecycle.dag_edges(p_dag jsonb) RETURNS TABLE(source text, target text, when_pattern jsonb, unless_pattern jsonb)
    LANGUAGE sql IMMUTABLE
    AS $$
  SELECT DISTINCT ON (x.source, x.target) x.source, x.target, x.when_pattern, x.unless_pattern
  FROM (
    SELECT s.value ->> 'id' AS source,
           CASE jsonb_typeof(n.value) WHEN 'string' THEN n.value #>> '{}' ELSE n.value ->> 'to' END AS target,
           CASE jsonb_typeof(n.value) WHEN 'object' THEN n.value -> 'when' END AS when_pattern,
           CASE jsonb_typeof(n.value) WHEN 'object' THEN n.value -> 'unless' END AS unless_pattern,
           0 AS form, s.ordinality AS i, n.ordinality AS j
      FROM jsonb_array_elements(CASE WHEN jsonb_typeof(p_dag -> 'stages') = 'array' THEN p_dag -> 'stages' ELSE '[]' END)
             WITH ORDINALITY s
     CROSS JOIN LATERAL jsonb_array_elements(CASE WHEN jsonb_typeof(s.value -> 'next') = 'array'
                                                  THEN s.value -> 'next' ELSE '[]' END) WITH ORDINALITY n
    UNION ALL
    SELECT e.value ->> 'from', e.value ->> 'to', e.value -> 'when', e.value -> 'unless', 1, e.ordinality, 0
      FROM jsonb_array_elements(CASE WHEN jsonb_typeof(p_dag -> 'edges') = 'array' THEN p_dag -> 'edges' ELSE '[]' END)
             WITH ORDINALITY e
  ) x
  WHERE x.source IS NOT NULL AND x.target IS NOT NULL
  ORDER BY x.source, x.target, x.form, x.i, x.j
$$;

REVOKE ALL ON FUNCTION lifecycle.dag_edges(p_dag jsonb) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.dag_edges(p_dag jsonb) TO service_role;


-- lifecycle.edge_fires: whether an edge whose upstream stage completed with p_output fires
-- (lifecycle_dagster.core.conditions.edge_fires is the same rule; tests/condition_cases.json).
CREATE OR REPLACE FUNCTION lifecycle.edge_fires(p_when jsonb, p_unless jsonb, p_output jsonb, p_context jsonb) RETURNS boolean
    LANGUAGE plpgsql IMMUTABLE
    AS $$
DECLARE
  v_doc jsonb;
BEGIN
  -- plpgsql: its plan is kept for the session (see lifecycle.dag_has_stage)
  IF p_when IS NULL AND p_unless IS NULL THEN
    RETURN true;
  END IF;
  v_doc := jsonb_build_object('output', coalesce(p_output, '{}'::jsonb), 'context', coalesce(p_context, '{}'::jsonb));
  RETURN (p_when IS NULL OR v_doc @> p_when) AND (p_unless IS NULL OR NOT v_doc @> p_unless);
END
$$;

REVOKE ALL ON FUNCTION lifecycle.edge_fires(p_when jsonb, p_unless jsonb, p_output jsonb, p_context jsonb) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.edge_fires(p_when jsonb, p_unless jsonb, p_output jsonb, p_context jsonb) TO service_role;


-- lifecycle.dag_stage: the stage object of p_stage_id in a dag_schema (NULL: none).
CREATE OR REPLACE FUNCTION lifecycle.dag_stage(p_dag jsonb, p_stage_id text) RETURNS jsonb
    LANGUAGE sql IMMUTABLE
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
  SELECT s.value FROM jsonb_array_elements(CASE WHEN jsonb_typeof(p_dag -> 'stages') = 'array'
                                                THEN p_dag -> 'stages' ELSE '[]' END) s
   WHERE s.value ->> 'id' = p_stage_id
   LIMIT 1
$$;

REVOKE ALL ON FUNCTION lifecycle.dag_stage(p_dag jsonb, p_stage_id text) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.dag_stage(p_dag jsonb, p_stage_id text) TO service_role;


-- lifecycle.end_problem: what is wrong with a stage output's `end` (NULL: no `end`, or a good one).
-- {"end": {"outcome": "<name>", "reason": "<at most 1000 characters>"}}
CREATE OR REPLACE FUNCTION lifecycle.end_problem(p_output jsonb) RETURNS text
    LANGUAGE plpgsql IMMUTABLE
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
BEGIN
  -- plpgsql: its plan is kept for the session (see lifecycle.dag_has_stage)
  RETURN CASE
    WHEN NOT (p_output ? 'end') THEN NULL
    WHEN jsonb_typeof(p_output -> 'end') <> 'object' THEN 'output.end must be an object {"outcome", "reason"}'
    WHEN EXISTS (SELECT 1 FROM jsonb_object_keys(p_output -> 'end') k WHERE k NOT IN ('outcome', 'reason'))
      THEN 'output.end takes only "outcome" and "reason"'
    WHEN jsonb_typeof(p_output #> '{end,outcome}') IS DISTINCT FROM 'string'
         OR NOT (p_output #>> '{end,outcome}') ~ '^[a-z][a-z0-9_]{0,62}$'
      THEN 'output.end.outcome must be a name matching ^[a-z][a-z0-9_]{0,62}$'
    WHEN p_output #> '{end}' ? 'reason' AND (jsonb_typeof(p_output #> '{end,reason}') <> 'string'
                                             OR length(p_output #>> '{end,reason}') > 1000)
      THEN 'output.end.reason must be a string of at most 1000 characters'
  END;
END
$$;

REVOKE ALL ON FUNCTION lifecycle.end_problem(p_output jsonb) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.end_problem(p_output jsonb) TO service_role;


-- lifecycle.execution_frontier: the stages of an execution not started yet (no log, or a pending
-- one) whose parents are all resolved (completed or skipped): 'runnable' when an incoming edge
-- fired, else 'unreachable'; `edges` says, per incoming edge, the parent's status and whether it
-- fired. Root stages are not listed.
CREATE OR REPLACE FUNCTION lifecycle.execution_frontier(p_execution_id uuid, p_dag jsonb, p_context jsonb) RETURNS TABLE(stage_id text, state text, edges jsonb)
    LANGUAGE sql STABLE
    AS $$
  WITH lg AS (
    SELECT l.stage_id, l.status, l.output_data FROM public.workflow_execution_logs l
     WHERE l.execution_id = p_execution_id
  ), ed AS (
    SELECT e.source, e.target, p.status AS parent_status,
           coalesce(p.status = 'completed'
                    AND lifecycle.edge_fires(e.when_pattern, e.unless_pattern, p.output_data, p_context), false) AS fired
      FROM lifecycle.dag_edges(p_dag) e LEFT JOIN lg p ON p.stage_id = e.source
  )
  SELECT ed.target,
         CASE WHEN bool_or(ed.fired) THEN 'runnable' ELSE 'unreachable' END,
         jsonb_agg(jsonb_build_object('from', ed.source, 'parent', coalesce(ed.parent_status, 'not_started'),
                                      'fired', ed.fired) ORDER BY ed.source)
    FROM ed LEFT JOIN lg ON lg.stage_id = ed.target
   WHERE lg.status IS NULL OR lg.status = 'pending'
   GROUP BY ed.target
  HAVING bool_and(coalesce(ed.parent_status IN ('completed', 'skipped'), false))
$$;

REVOKE ALL ON FUNCTION lifecycle.execution_frontier(p_execution_id uuid, p_dag jsonb, p_context jsonb) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.execution_frontier(p_execution_id uuid, p_dag jsonb, p_context jsonb) TO service_role;


-- lifecycle.stage_skip: one stage of an execution skipped (its log upserted 'skipped', its open
-- tasks cancelled, a stage_skipped event with p_metadata). The caller holds the execution's lock.
CREATE OR REPLACE FUNCTION lifecycle.stage_skip(p_execution_id uuid, p_stage_id text, p_message text, p_metadata jsonb, p_now timestamp with time zone DEFAULT now()) RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
BEGIN
  -- TRANSITION: its tasks, then its log
  UPDATE public.task_queue t
     SET status = 'cancelled', completed_at = p_now, updated_at = p_now, error_message = p_message
   WHERE t.stage_log_id IN (SELECT l.id FROM public.workflow_execution_logs l
                             WHERE l.execution_id = p_execution_id AND l.stage_id = p_stage_id)
     AND t.status IN ('pending', 'in_progress');
  INSERT INTO public.workflow_execution_logs AS l (execution_id, stage_id, status, completed_at, error_message)
  VALUES (p_execution_id, p_stage_id, 'skipped', p_now, p_message)
  ON CONFLICT ON CONSTRAINT workflow_execution_logs_one_per_stage DO UPDATE
    SET status = 'skipped', completed_at = greatest(p_now, l.started_at), error_message = EXCLUDED.error_message,
        not_before = NULL;
  INSERT INTO public.workflow_events (execution_id, event_type, stage_id, metadata, "timestamp")
  VALUES (p_execution_id, 'stage_skipped', p_stage_id, p_metadata, p_now);
END
$$;

REVOKE ALL ON FUNCTION lifecycle.stage_skip(p_execution_id uuid, p_stage_id text, p_message text, p_metadata jsonb, p_now timestamp with time zone) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.stage_skip(p_execution_id uuid, p_stage_id text, p_message text, p_metadata jsonb, p_now timestamp with time zone) TO service_role;


-- lifecycle.execution_advance: after a stage of an in-progress or waiting execution was resolved
-- (completed, skipped, decided, reached and waiting): skips, until none is left, every stage no
-- fired edge reaches; then completes the execution when every stage is completed or skipped
-- (outcome 'completed' unless set), or makes it 'waiting' when an approval waits and nothing
-- else of it can run. The caller holds the execution's lock. Returns the execution's status.
CREATE OR REPLACE FUNCTION lifecycle.execution_advance(p_execution_id uuid, p_now timestamp with time zone DEFAULT now()) RETURNS text
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_exec    public.workflow_executions;
  v_dag     jsonb;
  v_targets text[];
  v_skip    record;
  v_n       integer;
  v_state   record;
BEGIN
  -- LOCK: execution (the caller's lock, taken again)
  SELECT * INTO v_exec FROM public.workflow_executions e WHERE e.id = p_execution_id FOR UPDATE;
  IF v_exec.status NOT IN ('in_progress', 'waiting') THEN
    RETURN v_exec.status;
  END IF;
  SELECT d.dag_schema INTO v_dag FROM public.workflow_definitions d WHERE d.id = v_exec.workflow_definition_id;
  -- the stages some edge leads to (the others are roots), read once
  SELECT coalesce(array_agg(DISTINCT e.target), '{}') INTO v_targets FROM lifecycle.dag_edges(v_dag) e;

  -- TRANSITION: skip the unreachable stages, cascading (each pass resolves at least one stage)
  LOOP
    v_n := 0;
    FOR v_skip IN SELECT f.stage_id, f.edges FROM lifecycle.execution_frontier(p_execution_id, v_dag, v_exec.context) f
                   WHERE f.state = 'unreachable' ORDER BY f.stage_id LOOP
      PERFORM lifecycle.stage_skip(p_execution_id, v_skip.stage_id, 'no incoming edge fired',
                                   jsonb_build_object('reason', 'no_edge_fired', 'edges', v_skip.edges), p_now);
      v_n := v_n + 1;
    END LOOP;
    EXIT WHEN v_n = 0;
  END LOOP;

  SELECT count(*) AS total,
         count(*) FILTER (WHERE l.status = 'completed') AS completed,
         count(*) FILTER (WHERE l.status = 'skipped') AS skipped,
         count(*) FILTER (WHERE l.status = 'waiting') AS waiting,
         count(*) FILTER (WHERE l.status IN ('in_progress', 'pending')
                             OR (l.status IS NULL AND NOT (s.value ->> 'id' = ANY (v_targets)))) AS live,
         jsonb_agg(s.value ->> 'id' ORDER BY s.value ->> 'id') FILTER (WHERE l.status = 'waiting') AS waiting_ids
    INTO v_state
    FROM jsonb_array_elements(v_dag -> 'stages') s
    LEFT JOIN public.workflow_execution_logs l ON l.execution_id = p_execution_id AND l.stage_id = s.value ->> 'id';

  -- TRANSITION: execution -> completed, every stage completed or skipped
  IF v_state.completed + v_state.skipped = v_state.total THEN
    UPDATE public.workflow_executions e
       SET status = 'completed', updated_at = p_now, error_message = NULL,
           outcome = coalesce(e.outcome, 'completed')
     WHERE e.id = p_execution_id;
    INSERT INTO public.workflow_events (execution_id, event_type, metadata, "timestamp")
    VALUES (p_execution_id, 'workflow_completed',
            jsonb_build_object('stages', v_state.completed, 'skipped', v_state.skipped, 'outcome', 'completed'),
            p_now);
    RETURN 'completed';
  END IF;

  -- TRANSITION: execution -> waiting, nothing but an approval left to do
  IF v_exec.status = 'in_progress' AND v_state.waiting > 0 AND v_state.live = 0
     AND NOT EXISTS (SELECT 1 FROM lifecycle.execution_frontier(p_execution_id, v_dag, v_exec.context) f
                      WHERE f.state = 'runnable') THEN
    UPDATE public.workflow_executions e SET status = 'waiting', updated_at = p_now WHERE e.id = p_execution_id;
    INSERT INTO public.workflow_events (execution_id, event_type, metadata, "timestamp")
    VALUES (p_execution_id, 'workflow_waiting',
            jsonb_build_object('stages', v_state.waiting_ids, 'dagster_run_id', v_exec.dagster_run_id), p_now);
    RETURN 'waiting';
  END IF;
  RETURN v_exec.status;
END
$$;

REVOKE ALL ON FUNCTION lifecycle.execution_advance(p_execution_id uuid, p_now timestamp with time zone) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.execution_advance(p_execution_id uuid, p_now timestamp with time zone) TO service_role;


-- lifecycle.execution_end: a stage's output ended the execution (docs/branches.md, "A clean early
-- end"): every stage not completed is skipped (its open tasks cancelled), the execution is
-- completed with p_outcome and p_reason. The caller holds the execution's lock.
CREATE OR REPLACE FUNCTION lifecycle.execution_end(p_execution_id uuid, p_stage_id text, p_outcome text, p_reason text, p_now timestamp with time zone DEFAULT now()) RETURNS text
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_exec  public.workflow_executions;
  v_open  record;
  v_done  integer;
  v_n     integer := 0;
BEGIN
  -- LOCK: execution (the caller's lock, taken again)
  SELECT * INTO v_exec FROM public.workflow_executions e WHERE e.id = p_execution_id FOR UPDATE;
  IF v_exec.status NOT IN ('in_progress', 'waiting') THEN
    RETURN v_exec.status;
  END IF;

  -- TRANSITION: every stage not completed -> skipped
  FOR v_open IN
    SELECT s.value ->> 'id' AS stage_id FROM public.workflow_definitions d
     CROSS JOIN LATERAL jsonb_array_elements(d.dag_schema -> 'stages') s
      LEFT JOIN public.workflow_execution_logs l ON l.execution_id = p_execution_id AND l.stage_id = s.value ->> 'id'
     WHERE d.id = v_exec.workflow_definition_id AND (l.status IS NULL OR l.status IN ('pending', 'in_progress', 'waiting'))
     ORDER BY 1
  LOOP
    PERFORM lifecycle.stage_skip(p_execution_id, v_open.stage_id,
                                 format('execution ended by stage %s (%s)', p_stage_id, p_outcome),
                                 jsonb_build_object('reason', 'ended', 'by', p_stage_id, 'outcome', p_outcome), p_now);
    v_n := v_n + 1;
  END LOOP;

  -- TRANSITION: execution -> completed, with its outcome
  SELECT count(*) INTO v_done FROM public.workflow_execution_logs l
   WHERE l.execution_id = p_execution_id AND l.status = 'completed';
  UPDATE public.workflow_executions e
     SET status = 'completed', updated_at = p_now, error_message = NULL, outcome = p_outcome, outcome_reason = p_reason
   WHERE e.id = p_execution_id;
  INSERT INTO public.workflow_events (execution_id, event_type, stage_id, metadata, "timestamp")
  VALUES (p_execution_id, 'workflow_completed', p_stage_id,
          jsonb_build_object('stages', v_done, 'skipped', v_n, 'outcome', p_outcome, 'reason', p_reason,
                             'ended_by', p_stage_id),
          p_now);
  RETURN 'completed';
END
$$;

REVOKE ALL ON FUNCTION lifecycle.execution_end(p_execution_id uuid, p_stage_id text, p_outcome text, p_reason text, p_now timestamp with time zone) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.execution_end(p_execution_id uuid, p_stage_id text, p_outcome text, p_reason text, p_now timestamp with time zone) TO service_role;


-- lifecycle.stage_readiness: what a stage's op is to do in its execution now, as a code:
-- 'completed', 'skipped' or 'waiting' (its log says so), 'ended' (the execution completed without
-- it), 'blocked' (a parent is not resolved: it waits for an approval), 'ready' (start it; the
-- start itself refuses a stage of a stopped execution), 'unknown' (no such execution).
CREATE OR REPLACE FUNCTION lifecycle.stage_readiness(p_execution_id uuid, p_stage_id text) RETURNS text
    LANGUAGE plpgsql STABLE
    AS $$
DECLARE
  v_exec   public.workflow_executions;
  v_status text;
  v_edges  record;
BEGIN
  SELECT * INTO v_exec FROM public.workflow_executions e WHERE e.id = p_execution_id;
  IF NOT FOUND THEN
    RETURN 'unknown';
  END IF;
  SELECT l.status INTO v_status FROM public.workflow_execution_logs l
   WHERE l.execution_id = p_execution_id AND l.stage_id = p_stage_id;
  IF v_status IN ('completed', 'skipped', 'waiting') THEN
    RETURN v_status;
  ELSIF v_exec.status = 'completed' THEN
    RETURN 'ended';
  ELSIF v_exec.status = 'waiting' THEN
    RETURN 'blocked';
  ELSIF v_exec.status <> 'in_progress' THEN
    RETURN 'ready';
  END IF;
  SELECT count(*) AS n,
         count(*) FILTER (WHERE p.status IS NULL OR p.status NOT IN ('completed', 'skipped')) AS open,
         count(*) FILTER (WHERE p.status = 'completed'
                            AND lifecycle.edge_fires(e.when_pattern, e.unless_pattern, p.output_data, v_exec.context)) AS fired
    INTO v_edges
    FROM public.workflow_definitions d
   CROSS JOIN LATERAL lifecycle.dag_edges(d.dag_schema) e
    LEFT JOIN public.workflow_execution_logs p ON p.execution_id = p_execution_id AND p.stage_id = e.source
   WHERE d.id = v_exec.workflow_definition_id AND e.target = p_stage_id;
  IF v_edges.n = 0 THEN
    RETURN 'ready';
  ELSIF v_edges.open > 0 THEN
    RETURN 'blocked';
  ELSIF v_edges.fired = 0 THEN
    RETURN 'skipped';
  END IF;
  RETURN 'ready';
END
$$;

REVOKE ALL ON FUNCTION lifecycle.stage_readiness(p_execution_id uuid, p_stage_id text) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.stage_readiness(p_execution_id uuid, p_stage_id text) TO service_role;


-- lifecycle.stage_edges: the edges out of a stage of an execution, and whether each fired: the
-- stage completed, the edge's patterns hold and its target was not skipped (an early end skips
-- it). The execution's status is not asked: the next op finds out from lifecycle.stage_readiness
-- and lifecycle.stage_start that it may not run. The op yields the outputs of the fired ones.
CREATE OR REPLACE FUNCTION lifecycle.stage_edges(p_execution_id uuid, p_stage_id text) RETURNS TABLE(target text, fired boolean)
    LANGUAGE sql STABLE
    AS $$
  SELECT e.target,
         coalesce(l.status = 'completed' AND t.status IS DISTINCT FROM 'skipped'
                  AND lifecycle.edge_fires(e.when_pattern, e.unless_pattern, l.output_data, ex.context), false)
    FROM public.workflow_executions ex
    JOIN public.workflow_definitions d ON d.id = ex.workflow_definition_id
   CROSS JOIN LATERAL lifecycle.dag_edges(d.dag_schema) e
    LEFT JOIN public.workflow_execution_logs l ON l.execution_id = ex.id AND l.stage_id = p_stage_id
    LEFT JOIN public.workflow_execution_logs t ON t.execution_id = ex.id AND t.stage_id = e.target
   WHERE ex.id = p_execution_id AND e.source = p_stage_id
   ORDER BY e.target
$$;

REVOKE ALL ON FUNCTION lifecycle.stage_edges(p_execution_id uuid, p_stage_id text) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.stage_edges(p_execution_id uuid, p_stage_id text) TO service_role;


-- lifecycle.approval_wait: an approval stage reached (docs/branches.md, "Approval stages"): its
-- log 'waiting' until its deadline (`timeout_s`), an approval_requested event, and the execution
-- 'waiting' when nothing else of it can run. Idempotent: a stage waiting, decided or skipped
-- already is returned as it is. Returns (status: waiting | completed | skipped, wait_until,
-- output: the decision of a completed stage). Raises like lifecycle.stage_start (a stopped
-- execution, another run's, a parent not completed) and invalid_parameter_value (not an
-- approval stage).
CREATE OR REPLACE FUNCTION lifecycle.approval_wait(p_execution_id uuid, p_stage_id text, p_ancestors jsonb DEFAULT '{}'::jsonb, p_run_id text DEFAULT NULL::text, p_now timestamp with time zone DEFAULT now()) RETURNS TABLE(status text, wait_until timestamp with time zone, output jsonb)
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_exec     public.workflow_executions;
  v_stage    jsonb;
  v_log      public.workflow_execution_logs;
  v_missing  text;
  v_upstream jsonb;
  v_until    timestamptz;
BEGIN
  -- LOCK: execution
  SELECT * INTO v_exec FROM public.workflow_executions e WHERE e.id = p_execution_id FOR UPDATE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'unknown workflow execution %', p_execution_id USING ERRCODE = 'no_data_found';
  END IF;
  SELECT lifecycle.dag_stage(d.dag_schema, p_stage_id) INTO v_stage
    FROM public.workflow_definitions d WHERE d.id = v_exec.workflow_definition_id;
  IF v_stage IS NULL OR v_stage ->> 'kind' IS DISTINCT FROM 'approval' THEN
    RAISE EXCEPTION 'stage % of execution % is not an approval stage', p_stage_id, p_execution_id
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  -- LOCK: its stage log
  SELECT * INTO v_log FROM public.workflow_execution_logs l
   WHERE l.execution_id = p_execution_id AND l.stage_id = p_stage_id FOR UPDATE;
  IF v_log.status IN ('waiting', 'completed', 'skipped') THEN
    RETURN QUERY SELECT v_log.status, v_log.wait_until,
                        CASE WHEN v_log.status = 'completed' THEN v_log.output_data END;
    RETURN;
  END IF;

  -- GUARD: as lifecycle.stage_start
  IF v_exec.status <> 'in_progress' THEN
    RAISE EXCEPTION 'execution % is %: stage % cannot wait', p_execution_id, v_exec.status, p_stage_id
      USING ERRCODE = 'object_not_in_prerequisite_state';
  END IF;
  IF p_run_id IS NOT NULL AND v_exec.dagster_run_id IS DISTINCT FROM p_run_id THEN
    RAISE EXCEPTION 'execution % is bound to Dagster run %, not %: stage % cannot wait',
      p_execution_id, v_exec.dagster_run_id, p_run_id, p_stage_id USING ERRCODE = 'unique_violation';
  END IF;
  SELECT string_agg(a.key, ', ' ORDER BY a.key) FILTER (WHERE l.status IS NULL OR l.status NOT IN ('completed', 'skipped')),
         coalesce(jsonb_object_agg(a.key, jsonb_build_object('capability', a.value, 'output', l.output_data))
                    FILTER (WHERE l.status = 'completed'), '{}'::jsonb)
    INTO v_missing, v_upstream
    FROM jsonb_each_text(coalesce(p_ancestors, '{}'::jsonb)) a
    LEFT JOIN public.workflow_execution_logs l ON l.execution_id = p_execution_id AND l.stage_id = a.key;
  IF v_missing IS NOT NULL THEN
    RAISE EXCEPTION 'stage % of execution % cannot wait: upstream stage(s) % not completed',
      p_stage_id, p_execution_id, v_missing USING ERRCODE = 'object_not_in_prerequisite_state';
  END IF;

  -- TRANSITION: stage log -> waiting (a failed one, rejected or timed out before, through pending:
  -- a retry of the execution asks again)
  IF v_log.status = 'failed' THEN
    UPDATE public.workflow_execution_logs l SET status = 'pending' WHERE l.id = v_log.id;
  END IF;
  IF jsonb_typeof(v_stage -> 'timeout_s') = 'number' THEN
    v_until := p_now + make_interval(secs => (v_stage ->> 'timeout_s')::double precision);
  END IF;
  INSERT INTO public.workflow_execution_logs AS l (execution_id, stage_id, status, attempt_number, started_at,
                                                   input_data, wait_until)
  VALUES (p_execution_id, p_stage_id, 'waiting', 1, p_now,
          jsonb_build_object('context', v_exec.context, 'upstream', v_upstream), v_until)
  ON CONFLICT ON CONSTRAINT workflow_execution_logs_one_per_stage DO UPDATE
    SET status = 'waiting', started_at = EXCLUDED.started_at, completed_at = NULL, not_before = NULL,
        input_data = EXCLUDED.input_data, output_data = NULL, error_message = NULL, wait_until = EXCLUDED.wait_until;
  UPDATE public.workflow_executions e SET current_stage = p_stage_id, updated_at = p_now WHERE e.id = p_execution_id;
  INSERT INTO public.workflow_events (execution_id, event_type, stage_id, metadata, "timestamp")
  VALUES (p_execution_id, 'approval_requested', p_stage_id,
          jsonb_build_object('approvers', v_stage -> 'approvers', 'timeout_s', v_stage -> 'timeout_s',
                             'wait_until', v_until, 'on_timeout', coalesce(v_stage ->> 'on_timeout', 'reject'),
                             'on_reject', coalesce(v_stage ->> 'on_reject', 'end'),
                             'dagster_run_id', v_exec.dagster_run_id),
          p_now);
  PERFORM lifecycle.execution_advance(p_execution_id, p_now);
  RETURN QUERY SELECT 'waiting'::text, v_until, NULL::jsonb;
END
$$;

REVOKE ALL ON FUNCTION lifecycle.approval_wait(p_execution_id uuid, p_stage_id text, p_ancestors jsonb, p_run_id text, p_now timestamp with time zone) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.approval_wait(p_execution_id uuid, p_stage_id text, p_ancestors jsonb, p_run_id text, p_now timestamp with time zone) TO service_role;


-- lifecycle.approver_matches: whether an approval stage's `approvers` name the actor (a user id,
-- compared as a uuid) or one of its roles ('role:<name>').
CREATE OR REPLACE FUNCTION lifecycle.approver_matches(p_approvers jsonb, p_actor text, p_roles text[]) RETURNS boolean
    LANGUAGE sql IMMUTABLE
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
  SELECT EXISTS (
    SELECT 1 FROM jsonb_array_elements_text(CASE WHEN jsonb_typeof(p_approvers) = 'array' THEN p_approvers ELSE '[]' END) a(v)
     WHERE (a.v !~ '^role:' AND lower(a.v) = lower(coalesce(p_actor, '')))
        OR (a.v ~ '^role:' AND substr(a.v, 6) = ANY (coalesce(p_roles, '{}'::text[]))))
$$;

REVOKE ALL ON FUNCTION lifecycle.approver_matches(p_approvers jsonb, p_actor text, p_roles text[]) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.approver_matches(p_approvers jsonb, p_actor text, p_roles text[]) TO service_role;


-- lifecycle.approval_settle: a waiting approval stage decided (p_decision approve | reject, or
-- fail: its timeout with on_timeout 'fail'). The caller holds the execution's and the log's locks
-- and checked the stage waits. Returns the execution's next step: completed, failed, continuing
-- (stages became pending: the resume sensor starts their run), waiting, in_progress.
CREATE OR REPLACE FUNCTION lifecycle.approval_settle(p_exec public.workflow_executions, p_log public.workflow_execution_logs, p_stage jsonb, p_decision text, p_comment text, p_actor text, p_now timestamp with time zone) RETURNS text
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_output  jsonb;
  v_error   text;
  v_dag     jsonb;
  v_status  text;
  v_pending integer;
BEGIN
  v_output := jsonb_build_object('decision', p_decision, 'comment', p_comment, 'decided_by', p_actor,
                                 'decided_at', p_now);
  INSERT INTO public.workflow_events (execution_id, event_type, stage_id, metadata, "timestamp")
  VALUES (p_exec.id, 'approval_decided', p_log.stage_id,
          jsonb_build_object('decision', p_decision, 'comment', p_comment, 'decided_by', p_actor,
                             'wait_until', p_log.wait_until),
          p_now);

  -- TRANSITION: stage and execution -> failed (a rejection that fails, a timeout that fails)
  IF p_decision = 'fail' OR (p_decision = 'reject' AND coalesce(p_stage ->> 'on_reject', 'end') = 'fail') THEN
    v_error := CASE WHEN p_decision = 'fail' THEN format('no decision before %s', p_log.wait_until)
                    ELSE format('rejected by %s', p_actor) || coalesce(': ' || p_comment, '') END;
    UPDATE public.workflow_execution_logs l
       SET status = 'failed', completed_at = p_now, output_data = v_output, error_message = v_error
     WHERE l.id = p_log.id;
    INSERT INTO public.workflow_events (execution_id, event_type, stage_id, metadata, "timestamp")
    VALUES (p_exec.id, 'stage_failed', p_log.stage_id,
            jsonb_build_object('attempt', p_log.attempt_number, 'error', v_error,
                               'error_code', CASE WHEN p_decision = 'fail' THEN 'approval_timeout' ELSE 'rejected' END),
            p_now);
    UPDATE public.task_queue t
       SET status = 'failed', completed_at = p_now, updated_at = p_now, error_message = v_error
     WHERE t.workflow_execution_id = p_exec.id AND t.status = 'in_progress';
    UPDATE public.workflow_execution_logs l
       SET status = 'failed', completed_at = p_now, error_message = v_error
     WHERE l.execution_id = p_exec.id AND l.status = 'in_progress';
    UPDATE public.workflow_executions e SET status = 'failed', error_message = v_error, updated_at = p_now
     WHERE e.id = p_exec.id;
    INSERT INTO public.workflow_events (execution_id, event_type, stage_id, metadata, "timestamp")
    VALUES (p_exec.id, 'workflow_failed', p_log.stage_id,
            jsonb_build_object('error', v_error, 'error_code',
                               CASE WHEN p_decision = 'fail' THEN 'approval_timeout' ELSE 'rejected' END),
            p_now);
    RETURN 'failed';
  END IF;

  -- TRANSITION: stage -> completed, its decision its output
  IF p_decision = 'reject' AND coalesce(p_stage ->> 'on_reject', 'end') = 'end' THEN
    v_output := v_output || jsonb_build_object('end', jsonb_build_object(
      'outcome', 'rejected', 'reason', left(coalesce(p_comment, format('rejected by %s', p_actor)), 1000)));
  END IF;
  UPDATE public.workflow_execution_logs l
     SET status = 'completed', completed_at = p_now, output_data = v_output, error_message = NULL
   WHERE l.id = p_log.id;
  INSERT INTO public.workflow_events (execution_id, event_type, stage_id, metadata, "timestamp")
  VALUES (p_exec.id, 'stage_completed', p_log.stage_id,
          jsonb_build_object('attempt', p_log.attempt_number, 'decision', p_decision,
                             'duration_ms', round(extract(epoch FROM (p_now - p_log.started_at)) * 1000)),
          p_now);
  IF v_output ? 'end' THEN
    RETURN lifecycle.execution_end(p_exec.id, p_log.stage_id, v_output #>> '{end,outcome}',
                                   v_output #>> '{end,reason}', p_now);
  END IF;

  v_status := lifecycle.execution_advance(p_exec.id, p_now);
  IF v_status <> 'waiting' AND v_status <> 'in_progress' THEN
    RETURN v_status;
  END IF;

  -- TRANSITION: the stages the decision made runnable -> pending, the execution in progress again
  SELECT d.dag_schema INTO v_dag FROM public.workflow_definitions d WHERE d.id = p_exec.workflow_definition_id;
  INSERT INTO public.workflow_execution_logs (execution_id, stage_id, status)
  SELECT p_exec.id, f.stage_id, 'pending'
    FROM lifecycle.execution_frontier(p_exec.id, v_dag, p_exec.context) f
   WHERE f.state = 'runnable'
  ON CONFLICT ON CONSTRAINT workflow_execution_logs_one_per_stage DO NOTHING;
  GET DIAGNOSTICS v_pending = ROW_COUNT;
  IF v_pending = 0 THEN
    RETURN v_status;  -- another approval still waits, or the run in progress goes on
  END IF;
  IF v_status = 'waiting' THEN
    UPDATE public.workflow_executions e SET status = 'in_progress', updated_at = p_now WHERE e.id = p_exec.id;
  ELSE
    UPDATE public.workflow_executions e SET updated_at = p_now WHERE e.id = p_exec.id;
  END IF;
  INSERT INTO public.workflow_events (execution_id, event_type, stage_id, metadata, "timestamp")
  VALUES (p_exec.id, 'workflow_continued', p_log.stage_id,
          jsonb_build_object('stages', (SELECT jsonb_agg(l.stage_id ORDER BY l.stage_id) FROM public.workflow_execution_logs l
                                         WHERE l.execution_id = p_exec.id AND l.status = 'pending'),
                             'after_run', p_exec.dagster_run_id),
          p_now);
  RETURN 'continuing';
END
$$;

REVOKE ALL ON FUNCTION lifecycle.approval_settle(p_exec public.workflow_executions, p_log public.workflow_execution_logs, p_stage jsonb, p_decision text, p_comment text, p_actor text, p_now timestamp with time zone) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.approval_settle(p_exec public.workflow_executions, p_log public.workflow_execution_logs, p_stage jsonb, p_decision text, p_comment text, p_actor text, p_now timestamp with time zone) TO service_role;


-- lifecycle.approval_decide: a decision on a waiting approval stage, in one transaction. p_actor
-- decides (p_roles: its roles); p_operator: an operator (the CLI), who may decide for any approver.
-- Returns completed | failed | continuing | waiting | in_progress (lifecycle.approval_settle), or
-- refused_unknown_stage, refused_not_approval, refused_not_waiting (not waiting, or decided
-- already: of two concurrent decisions one gets this), refused_not_approver.
-- Raises no_data_found (no such execution), invalid_parameter_value (a decision other than
-- approve | reject, a comment over 4000 characters).
CREATE OR REPLACE FUNCTION lifecycle.approval_decide(p_execution_id uuid, p_stage_id text, p_decision text, p_comment text DEFAULT NULL::text, p_actor text DEFAULT NULL::text, p_roles text[] DEFAULT '{}'::text[], p_operator boolean DEFAULT false, p_now timestamp with time zone DEFAULT now()) RETURNS text
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_exec  public.workflow_executions;
  v_stage jsonb;
  v_log   public.workflow_execution_logs;
BEGIN
  -- GUARD: arguments
  IF p_decision IS NULL OR p_decision NOT IN ('approve', 'reject') THEN
    RAISE EXCEPTION 'decision must be approve or reject, got %', coalesce(quote_literal(p_decision), 'NULL')
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF length(p_comment) > 4000 THEN
    RAISE EXCEPTION 'comment must be at most 4000 characters, got %', length(p_comment)
      USING ERRCODE = 'invalid_parameter_value';
  END IF;

  -- LOCK: execution, then the stage log
  SELECT * INTO v_exec FROM public.workflow_executions e WHERE e.id = p_execution_id FOR UPDATE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'unknown workflow execution %', p_execution_id USING ERRCODE = 'no_data_found';
  END IF;
  SELECT lifecycle.dag_stage(d.dag_schema, p_stage_id) INTO v_stage
    FROM public.workflow_definitions d WHERE d.id = v_exec.workflow_definition_id;
  IF v_stage IS NULL THEN
    RETURN 'refused_unknown_stage';
  ELSIF v_stage ->> 'kind' IS DISTINCT FROM 'approval' THEN
    RETURN 'refused_not_approval';
  END IF;
  SELECT * INTO v_log FROM public.workflow_execution_logs l
   WHERE l.execution_id = p_execution_id AND l.stage_id = p_stage_id FOR UPDATE;
  IF v_log.status IS DISTINCT FROM 'waiting' OR v_exec.status NOT IN ('in_progress', 'waiting') THEN
    RETURN 'refused_not_waiting';
  END IF;
  IF NOT p_operator AND NOT lifecycle.approver_matches(v_stage -> 'approvers', p_actor, p_roles) THEN
    RETURN 'refused_not_approver';
  END IF;
  RETURN lifecycle.approval_settle(v_exec, v_log, v_stage, p_decision, nullif(p_comment, ''),
                                   coalesce(nullif(p_actor, ''), 'operator'), p_now);
END
$$;

REVOKE ALL ON FUNCTION lifecycle.approval_decide(p_execution_id uuid, p_stage_id text, p_decision text, p_comment text, p_actor text, p_roles text[], p_operator boolean, p_now timestamp with time zone) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.approval_decide(p_execution_id uuid, p_stage_id text, p_decision text, p_comment text, p_actor text, p_roles text[], p_operator boolean, p_now timestamp with time zone) TO service_role;


-- lifecycle.approvals_expire: the waiting approval stages past their deadline decided by their
-- `on_timeout` (reject, approve or fail; decided_by 'timeout'), at most p_limit, oldest deadline
-- first; one row per stage decided, with lifecycle.approval_settle's code. The reconciler calls it
-- every tick.
CREATE OR REPLACE FUNCTION lifecycle.approvals_expire(p_limit integer DEFAULT 100, p_now timestamp with time zone DEFAULT now()) RETURNS TABLE(execution_id uuid, stage_id text, status text)
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_due   record;
  v_exec  public.workflow_executions;
  v_log   public.workflow_execution_logs;
  v_stage jsonb;
  v_mode  text;
BEGIN
  FOR v_due IN SELECT l.execution_id, l.stage_id FROM public.workflow_execution_logs l
                WHERE l.status = 'waiting' AND l.wait_until <= p_now
                ORDER BY l.wait_until, l.execution_id LIMIT p_limit LOOP
    -- LOCK: execution, then the stage log (checked again under the locks)
    SELECT * INTO v_exec FROM public.workflow_executions e WHERE e.id = v_due.execution_id FOR UPDATE;
    SELECT * INTO v_log FROM public.workflow_execution_logs l
     WHERE l.execution_id = v_due.execution_id AND l.stage_id = v_due.stage_id FOR UPDATE;
    CONTINUE WHEN v_log.status IS DISTINCT FROM 'waiting' OR v_log.wait_until > p_now
               OR v_exec.status NOT IN ('in_progress', 'waiting');
    SELECT lifecycle.dag_stage(d.dag_schema, v_due.stage_id) INTO v_stage
      FROM public.workflow_definitions d WHERE d.id = v_exec.workflow_definition_id;
    v_mode := coalesce(v_stage ->> 'on_timeout', 'reject');
    execution_id := v_due.execution_id;
    stage_id := v_due.stage_id;
    status := lifecycle.approval_settle(v_exec, v_log, v_stage, v_mode,
                                        format('no decision before %s', v_log.wait_until), 'timeout', p_now);
    RETURN NEXT;
  END LOOP;
END
$$;

REVOKE ALL ON FUNCTION lifecycle.approvals_expire(p_limit integer, p_now timestamp with time zone) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.approvals_expire(p_limit integer, p_now timestamp with time zone) TO service_role;


-- lifecycle.jwt_roles: the roles of the request's JWT (request.jwt.claims, as Supabase sets it):
-- its `role` claim and the elements of its `app_metadata.roles` array; '{}' without a request.
CREATE OR REPLACE FUNCTION lifecycle.jwt_roles() RETURNS text[]
    LANGUAGE sql STABLE
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
  SELECT coalesce(array_agg(DISTINCT r) FILTER (WHERE r IS NOT NULL AND r <> ''), '{}'::text[])
    FROM (SELECT nullif(current_setting('request.jwt.claims', true), '')::jsonb AS c) j
    LEFT JOIN LATERAL (
      SELECT j.c ->> 'role' AS r
      UNION ALL
      SELECT x FROM jsonb_array_elements_text(CASE WHEN jsonb_typeof(j.c #> '{app_metadata,roles}') = 'array'
                                                   THEN j.c #> '{app_metadata,roles}' ELSE '[]' END) x
    ) roles ON true
$$;

REVOKE ALL ON FUNCTION lifecycle.jwt_roles() FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.jwt_roles() TO service_role;


-- lifecycle.execution_continued_after: whether a decision continued the execution after Dagster
-- run p_run_id's part of it (a workflow_continued event naming that run) and no stage of it is in
-- progress: that run has nothing of it left to do, whether its worker lives or not. The reconciler
-- does not fail such an execution for that run's silence or failure; it reports the run failed
-- once silent (released_runs), and the resume sensor then starts the continuation run.
CREATE OR REPLACE FUNCTION lifecycle.execution_continued_after(p_execution_id uuid, p_run_id text) RETURNS boolean
    LANGUAGE sql STABLE
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
  SELECT EXISTS (SELECT 1 FROM public.workflow_events ev
                  WHERE ev.execution_id = p_execution_id AND ev.event_type = 'workflow_continued'
                    AND ev.metadata ->> 'after_run' = p_run_id)
     AND NOT EXISTS (SELECT 1 FROM public.workflow_execution_logs l
                      WHERE l.execution_id = p_execution_id AND l.status = 'in_progress')
$$;

REVOKE ALL ON FUNCTION lifecycle.execution_continued_after(p_execution_id uuid, p_run_id text) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.execution_continued_after(p_execution_id uuid, p_run_id text) TO service_role;
