-- bench: generate finished history with SQL (not through Dagster): p_executions executions of
-- lifecycle_v1 (9 in 10 completed, 1 in 10 rolled back), each with 5 stage logs, 10 tasks (two
-- attempts per stage) and 10 events. Triggers are skipped while generating (session_replication_role
-- = replica: no hash chain on these events, as for events stored before 0009); the benchmark's own
-- statements run with every trigger.
CREATE OR REPLACE FUNCTION bench_generate_history(p_definition_id uuid, p_executions integer)
RETURNS integer
LANGUAGE plpgsql
AS $$
BEGIN
  PERFORM set_config('session_replication_role', 'replica', true);
  CREATE TEMP TABLE bench_hist_new (id uuid, n integer, t timestamptz) ON COMMIT DROP;
  INSERT INTO bench_hist_new
  SELECT gen_random_uuid(), g, now() - make_interval(secs => 86400 + g * 3) FROM generate_series(1, p_executions) g;

  INSERT INTO workflow_executions (id, workflow_definition_id, status, current_stage, context, created_at,
                                   updated_at, dagster_run_id, heartbeat_at)
  SELECT h.id, p_definition_id, CASE WHEN h.n % 10 = 0 THEN 'rolled_back' ELSE 'completed' END, 'integrity',
         jsonb_build_object('customer', 'history', 'n', h.n), h.t, h.t + interval '6 seconds', 'hist-' || h.id, h.t
  FROM bench_hist_new h;

  INSERT INTO workflow_execution_logs (execution_id, stage_id, status, attempt_number, started_at, completed_at,
                                       input_data, output_data)
  SELECT h.id, s.stage, CASE WHEN h.n % 10 = 0 THEN 'compensated' ELSE 'completed' END, 2,
         h.t + make_interval(secs => s.k), h.t + make_interval(secs => s.k + 0.5),
         jsonb_build_object('context', jsonb_build_object('customer', 'history')),
         jsonb_build_object('summary', 'noop')
  FROM bench_hist_new h
  CROSS JOIN (VALUES (1, 'discover'), (2, 'qualify'), (3, 'target_design'), (4, 'value_realization'),
                     (5, 'integrity')) AS s(k, stage);

  INSERT INTO task_queue (workflow_execution_id, task_type, capability, input_data, status, agent_id, stage_log_id,
                          attempt, created_at, updated_at, started_at, completed_at, claimed_by, lease_token,
                          error_message, output_data)
  SELECT l.execution_id, l.stage_id, c.capability, l.input_data,
         CASE WHEN a.attempt = 1 THEN 'failed' ELSE 'completed' END, c.agent_id, l.id, a.attempt,
         l.started_at, l.completed_at, l.started_at, l.completed_at, 'op', 1,
         CASE WHEN a.attempt = 1 THEN 'history: the first attempt failed' END,
         CASE WHEN a.attempt = 2 THEN l.output_data END
  FROM workflow_execution_logs l
  JOIN bench_hist_new h ON h.id = l.execution_id
  JOIN (SELECT s.stage, s.capability, ag.id AS agent_id
        FROM (VALUES ('discover', 'opportunity', 'Opportunity Agent'), ('qualify', 'assessment', 'Assessment Agent'),
                     ('target_design', 'design', 'Design Agent'), ('value_realization', 'execution', 'Realization Agent'),
                     ('integrity', 'governance', 'Integrity Agent')) AS s(stage, capability, agent)
        LEFT JOIN agents ag ON ag.name = s.agent) c ON c.stage = l.stage_id
  CROSS JOIN (VALUES (1), (2)) AS a(attempt);

  INSERT INTO workflow_events (execution_id, event_type, stage_id, metadata, "timestamp")
  SELECT l.execution_id, e.event_type, l.stage_id,
         jsonb_build_object('attempt', 2, 'agent', 'history', 'duration_ms', 500), l.started_at + make_interval(secs => e.k)
  FROM workflow_execution_logs l
  JOIN bench_hist_new h ON h.id = l.execution_id
  CROSS JOIN (VALUES (0, 'stage_started'), (0.5, 'stage_completed')) AS e(k, event_type);

  RETURN p_executions;
END
$$;
