-- Retention (docs/retention.md): finished executions older than a horizon are removed whole, in
-- bounded batches, each batch one short transaction. Nothing of an unfinished execution is touched.

-- lifecycle.execution_prunable
-- Whether a finished execution (completed, rolled_back, compensation_failed) may go at the horizon
-- p_before: its row last changed before p_before, every event of its stream is older than p_before
-- (lifecycle.audit_prune_stream removes whole streams only), and no breaker outcome of its tasks
-- still counts: inside its breaker's window (window_s before p_now), or recorded since a breaker that
-- is not closed changed state (the outcomes an open or half-open breaker judges). Such an execution
-- waits for a later run. Outcomes are found through the breakers' unique index (scope, key, task_id)
-- by the task's agent and capability, the keys lifecycle.breaker_record_task records them under.
CREATE OR REPLACE FUNCTION lifecycle.execution_prunable(p_execution_id uuid, p_before timestamp with time zone, p_now timestamp with time zone DEFAULT now()) RETURNS boolean
    LANGUAGE sql STABLE
    AS $$
  SELECT EXISTS (
           SELECT 1 FROM public.workflow_executions e
            WHERE e.id = p_execution_id AND e.status IN ('completed', 'rolled_back', 'compensation_failed')
              AND e.updated_at < p_before)
     AND NOT EXISTS (
           SELECT 1 FROM public.workflow_events ev
            WHERE ev.execution_id = p_execution_id AND ev."timestamp" >= p_before)
     AND NOT EXISTS (
           SELECT 1
             FROM public.task_queue t
             JOIN lifecycle.breaker_outcomes o
               ON o.task_id = t.id
              AND ((o.scope = 'agent' AND o.key = t.agent_id::text) OR (o.scope = 'capability' AND o.key = t.capability))
             LEFT JOIN lifecycle.breakers b ON b.scope = o.scope AND b.key = o.key
            WHERE t.workflow_execution_id = p_execution_id
              AND (o.at > p_now - make_interval(secs => (lifecycle.breaker_config(o.scope, o.key) ->> 'window_s')::float8)
                   OR (b.state IS DISTINCT FROM 'closed' AND b.state IS NOT NULL AND o.at >= coalesce(b.state_since, '-infinity'))))
$$;

REVOKE ALL ON FUNCTION lifecycle.execution_prunable(p_execution_id uuid, p_before timestamp with time zone, p_now timestamp with time zone) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.execution_prunable(p_execution_id uuid, p_before timestamp with time zone, p_now timestamp with time zone) TO service_role;


-- lifecycle.executions_prune
-- ONE batch: at most p_limit finished executions created before p_before, after the keyset cursor
-- (p_after_created, p_after_id), oldest first, locked SKIP LOCKED (a row another transaction holds
-- waits for the next run). Of those, the ones lifecycle.execution_prunable allows lose, in this
-- order: their audit streams (lifecycle.audit_prune_stream: checkpoints keep `audit verify`
-- whole), their tasks' breaker outcomes, artifacts, tasks, stage logs and the execution rows. The
-- others are counted as deferred. p_dry_run: the same selection and counts, nothing deleted.
-- Returns one row: the counts per kind, the cursor to pass to the next batch (NULL: nothing was
-- left to look at), and the ids and Dagster run ids (dagster_run_id, compensation_run_id) of the
-- executions removed, for the caller to delete their Dagster runs after commit. A batch that
-- removed something records one `executions_pruned` event in the global stream.
CREATE OR REPLACE FUNCTION lifecycle.executions_prune(p_before timestamp with time zone, p_limit integer DEFAULT 500, p_dry_run boolean DEFAULT false, p_after_created timestamp with time zone DEFAULT NULL::timestamp with time zone, p_after_id uuid DEFAULT NULL::uuid, p_now timestamp with time zone DEFAULT now()) RETURNS TABLE(executions integer, tasks bigint, stage_logs bigint, artifacts bigint, breaker_outcomes bigint, events bigint, deferred integer, last_created_at timestamp with time zone, last_id uuid, execution_ids uuid[], run_ids text[])
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_batches uuid[];
  v_exec record;
  v_ids  uuid[] := '{}';
  v_n    bigint;
BEGIN
  -- GUARD: arguments
  IF p_before IS NULL OR NOT isfinite(p_before) OR p_now IS NULL OR p_before > p_now - interval '1 hour' THEN
    RAISE EXCEPTION 'lifecycle.executions_prune: p_before must be a finite time at least 1 hour before p_now, got % (now %)',
      coalesce(p_before::text, 'NULL'), coalesce(p_now::text, 'NULL')
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF p_limit IS NULL OR p_limit < 1 OR p_limit > 10000 THEN
    RAISE EXCEPTION 'lifecycle.executions_prune: p_limit must be between 1 and 10000, got %', coalesce(p_limit::text, 'NULL')
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  executions := 0; tasks := 0; stage_logs := 0; artifacts := 0; breaker_outcomes := 0; events := 0; deferred := 0;
  run_ids := '{}';

  -- LOCK: the batch's execution rows (the final index, keyset order), SKIP LOCKED
  FOR v_exec IN
    SELECT e.id, e.created_at, e.dagster_run_id, e.compensation_run_id
      FROM public.workflow_executions e
     WHERE e.status IN ('completed', 'rolled_back', 'compensation_failed')
       AND e.created_at < p_before
       AND (p_after_created IS NULL OR (e.created_at, e.id) > (p_after_created, p_after_id))
     ORDER BY e.created_at, e.id
     LIMIT p_limit
     FOR UPDATE OF e SKIP LOCKED
  LOOP
    last_created_at := v_exec.created_at;
    last_id := v_exec.id;
    IF NOT lifecycle.execution_prunable(v_exec.id, p_before, p_now) THEN
      deferred := deferred + 1;
      CONTINUE;
    END IF;
    v_ids := v_ids || v_exec.id;
    run_ids := run_ids || array_remove(ARRAY[v_exec.dagster_run_id, v_exec.compensation_run_id], NULL);
  END LOOP;
  executions := cardinality(v_ids);
  execution_ids := v_ids;
  IF executions = 0 THEN
    RETURN NEXT;
    RETURN;
  END IF;

  IF p_dry_run THEN
    SELECT count(*) INTO events FROM public.workflow_events ev WHERE ev.execution_id = ANY (v_ids);
    SELECT count(*) INTO breaker_outcomes
      FROM public.task_queue t
      JOIN lifecycle.breaker_outcomes o
        ON o.task_id = t.id
       AND ((o.scope = 'agent' AND o.key = t.agent_id::text) OR (o.scope = 'capability' AND o.key = t.capability))
     WHERE t.workflow_execution_id = ANY (v_ids);
    SELECT count(*) INTO artifacts FROM lifecycle.artifacts a WHERE a.execution_id = ANY (v_ids);
    SELECT count(*) INTO tasks FROM public.task_queue t WHERE t.workflow_execution_id = ANY (v_ids);
    SELECT count(*) INTO stage_logs FROM public.workflow_execution_logs l WHERE l.execution_id = ANY (v_ids);
    RETURN NEXT;
    RETURN;
  END IF;

  -- the audit streams (the events' foreign key holds the execution rows until they are gone)
  FOR i IN 1 .. cardinality(v_ids) LOOP
    events := events + coalesce(lifecycle.audit_prune_stream(v_ids[i], p_before), 0);
  END LOOP;
  DELETE FROM lifecycle.breaker_outcomes o
   USING public.task_queue t
   WHERE t.workflow_execution_id = ANY (v_ids) AND o.task_id = t.id
     AND ((o.scope = 'agent' AND o.key = t.agent_id::text) OR (o.scope = 'capability' AND o.key = t.capability));
  GET DIAGNOSTICS v_n = ROW_COUNT; breaker_outcomes := v_n;
  DELETE FROM lifecycle.artifacts a WHERE a.execution_id = ANY (v_ids);
  GET DIAGNOSTICS v_n = ROW_COUNT; artifacts := v_n;
  DELETE FROM public.task_queue t WHERE t.workflow_execution_id = ANY (v_ids);
  GET DIAGNOSTICS v_n = ROW_COUNT; tasks := v_n;
  DELETE FROM public.workflow_execution_logs l WHERE l.execution_id = ANY (v_ids);
  GET DIAGNOSTICS v_n = ROW_COUNT; stage_logs := v_n;
  SELECT coalesce(array_agg(DISTINCT e.batch_id), '{}') INTO v_batches
    FROM public.workflow_executions e WHERE e.id = ANY (v_ids) AND e.batch_id IS NOT NULL;
  DELETE FROM public.workflow_executions e WHERE e.id = ANY (v_ids);
  -- the batches whose last members these were (their lifecycle.batch_members rows went with them),
  -- and their runs: a batch run is every member's, its Dagster run goes only with the last of them
  -- (a member a resume took over points at its own run by then)
  WITH gone AS (
    DELETE FROM lifecycle.batches b
     WHERE b.id = ANY (v_batches)
       AND NOT EXISTS (SELECT 1 FROM lifecycle.batch_members m WHERE m.batch_id = b.id)
    RETURNING b.run_id
  )
  SELECT run_ids || coalesce(array_agg(g.run_id) FILTER (WHERE g.run_id IS NOT NULL), '{}') INTO run_ids FROM gone g;
  run_ids := ARRAY(SELECT DISTINCT r FROM unnest(run_ids) r
                    WHERE NOT EXISTS (SELECT 1 FROM public.workflow_executions e WHERE e.dagster_run_id = r));

  INSERT INTO public.workflow_events (execution_id, event_type, metadata, "timestamp")
  VALUES (NULL, 'executions_pruned', jsonb_build_object(
    'before', to_char(p_before AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'), 'executions', executions,
    'tasks', tasks, 'stage_logs', stage_logs, 'artifacts', artifacts, 'breaker_outcomes', breaker_outcomes,
    'events', events), p_now);
  RETURN NEXT;
END
$$;

COMMENT ON FUNCTION lifecycle.executions_prune(p_before timestamp with time zone, p_limit integer, p_dry_run boolean, p_after_created timestamp with time zone, p_after_id uuid, p_now timestamp with time zone) IS 'Retention: one bounded batch of finished executions older than p_before removed whole (audit stream through lifecycle.audit_prune_stream, breaker outcomes outside every open window, artifacts, tasks, stage logs, the row). Returns counts per kind, the keyset cursor of the next batch and the removed executions'' ids and Dagster run ids.';

REVOKE ALL ON FUNCTION lifecycle.executions_prune(p_before timestamp with time zone, p_limit integer, p_dry_run boolean, p_after_created timestamp with time zone, p_after_id uuid, p_now timestamp with time zone) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.executions_prune(p_before timestamp with time zone, p_limit integer, p_dry_run boolean, p_after_created timestamp with time zone, p_after_id uuid, p_now timestamp with time zone) TO service_role;
