-- Named queries run by the Python side. Each starts with a `-- name: <name>` line; parameters
-- are psycopg placeholders (%(name)s). Nothing here is assembled from user input.

-- name: active_definitions
-- The snapshot the code location builds its jobs from: every active version, in a stable order.
-- dag_schema comes as text and is decoded row by row, so one pathological row (nested thousands of
-- levels deep, say) is skipped instead of failing the whole snapshot.
SELECT id::text AS id, name, description, version, dag_schema::text AS dag_schema_json
FROM workflow_definitions
WHERE is_active
ORDER BY name, version;

-- name: active_definition_by_name
SELECT id::text AS id, name, description, version, dag_schema::text AS dag_schema_json
FROM workflow_definitions
WHERE name = %(name)s AND is_active;

-- name: create_execution
-- A pending execution of a definition, as the runbook's section 8 would insert it.
INSERT INTO workflow_executions (workflow_definition_id, status, context, created_by)
VALUES (%(definition_id)s, 'pending', %(context)s, %(created_by)s)
RETURNING id::text AS id;

-- name: execution
SELECT e.id::text AS id, e.status, e.current_stage, e.error_message, e.dagster_run_id,
       e.context, d.name AS workflow_name, d.version
FROM workflow_executions e
JOIN workflow_definitions d ON d.id = e.workflow_definition_id
WHERE e.id = %(execution_id)s;

-- name: execution_by_run
SELECT e.id::text AS id, e.status
FROM workflow_executions e
WHERE e.dagster_run_id = %(run_id)s;

-- name: stage_logs
SELECT l.stage_id, l.status, l.attempt_number, l.started_at, l.completed_at,
       l.output_data, l.error_message
FROM workflow_execution_logs l
WHERE l.execution_id = %(execution_id)s
ORDER BY l.started_at NULLS LAST, l.stage_id;

-- name: ensure_execution
SELECT id::text AS id, status, context
FROM lifecycle_ensure_execution(%(definition_id)s, %(run_id)s, %(execution_id)s, %(context)s,
                                p_resume => %(resume)s);

-- name: start_stage
SELECT log_id::text AS log_id, task_id::text AS task_id, agent_id::text AS agent_id,
       agent_name, agent_kind, input_data, attempt_number, already_completed, output_data
FROM lifecycle_start_stage(%(execution_id)s, %(stage_id)s, %(capability)s, %(ancestors)s,
                           %(attempt)s, p_timeout_s => %(timeout_s)s, p_resume => %(resume)s);

-- name: resumable_executions
-- In-progress executions with a stage set back to pending (retry_stage) whose not-before time has
-- passed: the resume sensor launches a run for each whose Dagster run is over.
SELECT e.id::text AS execution_id, e.dagster_run_id, d.name, d.version, l.id::text AS log_id,
       l.stage_id, l.attempt_number
FROM workflow_executions e
JOIN workflow_definitions d ON d.id = e.workflow_definition_id
JOIN workflow_execution_logs l ON l.execution_id = e.id
WHERE e.status = 'in_progress' AND e.dagster_run_id IS NOT NULL AND l.status = 'pending'
  AND (l.not_before IS NULL OR l.not_before <= %(now)s)
ORDER BY l.not_before NULLS FIRST, e.id, l.stage_id
LIMIT %(limit)s;

-- name: complete_stage
SELECT lifecycle_complete_stage(%(log_id)s, %(task_id)s, %(output)s, p_attempt => %(attempt)s) AS status;

-- name: fail_stage
SELECT lifecycle_fail_stage(%(log_id)s, %(task_id)s, %(error)s, %(error_code)s, p_attempt => %(attempt)s) AS status;

-- name: schedule_retry
SELECT lifecycle_schedule_retry(%(log_id)s, %(task_id)s, %(attempt)s, %(error)s, %(error_code)s,
                                %(error_class)s, %(delay_s)s) AS status;

-- name: execution_status
SELECT status FROM workflow_executions WHERE id = %(execution_id)s;

-- name: cancel_execution
SELECT cancelled, status, previous_status, dagster_run_id
FROM lifecycle_cancel_execution(%(execution_id)s, %(reason)s, %(compensate)s);

-- name: heartbeat
SELECT lifecycle_heartbeat(%(run_id)s) AS alive;

-- name: start_compensation
SELECT action, log_id::text AS log_id, output_data, context, agent_name
FROM lifecycle_start_compensation(%(execution_id)s, %(stage_id)s, %(run_id)s, %(dependents)s,
                                  %(attempt)s, %(takeover)s);

-- name: complete_compensation
SELECT lifecycle_complete_compensation(%(log_id)s, %(void)s, %(result)s, %(attempt)s) AS status;

-- name: fail_compensation
SELECT lifecycle_fail_compensation(%(log_id)s, %(error)s, %(final)s, %(attempt)s, %(delay_s)s) AS status;

-- name: route_capability
-- The agent that undoes a stage through its `compensate` capability. Undo calls do not consult the
-- circuit breakers (an undo must be attempted; its own retries apply): the active agent whose
-- latest orchestration ontology declares the capability, by name.
SELECT a.name AS agent_name
FROM agents a
JOIN LATERAL (
  SELECT o.knowledge FROM agent_ontologies o
  WHERE o.agent_id = a.id AND o.domain = 'orchestration'
  ORDER BY o.version DESC LIMIT 1
) latest ON true
WHERE a.is_active AND latest.knowledge ->> 'capability' = %(capability)s
ORDER BY a.name
LIMIT 1;

-- name: perform_compensation
SELECT perform_workflow_compensation(%(execution_id)s, %(reason)s);

-- name: fail_execution
SELECT lifecycle_fail_execution(%(execution_id)s, %(reason)s, %(run_id)s) AS failed;

-- name: stale_executions
SELECT execution_id::text AS execution_id, dagster_run_id, last_seen
FROM lifecycle_stale_executions(%(timeout_s)s);

-- name: compensation_due
SELECT execution_id::text AS execution_id, reason FROM lifecycle_compensation_due();

-- name: running_executions
-- Executions in progress under a Dagster run: the reconciler checks each run's status.
SELECT e.id::text AS execution_id, e.dagster_run_id
FROM workflow_executions e
WHERE e.status = 'in_progress' AND e.dagster_run_id IS NOT NULL
ORDER BY e.updated_at
LIMIT %(limit)s;

-- name: compensating_executions
SELECT e.id::text AS execution_id, e.compensation_run_id, d.name, d.version
FROM workflow_executions e JOIN workflow_definitions d ON d.id = e.workflow_definition_id
WHERE e.status = 'compensating'
ORDER BY e.updated_at
LIMIT %(limit)s;

-- name: execution_on_failure
SELECT e.id::text AS execution_id, e.status, coalesce(d.dag_schema ->> 'on_failure', 'compensate') AS on_failure
FROM workflow_executions e JOIN workflow_definitions d ON d.id = e.workflow_definition_id
WHERE e.id = %(execution_id)s OR e.dagster_run_id = %(run_id)s
LIMIT 1;

-- name: compensation_due_for
SELECT execution_id::text AS execution_id, reason FROM lifecycle_compensation_due()
WHERE execution_id = %(execution_id)s;

-- name: definition_of_execution
SELECT d.id::text AS id, d.name, d.description, d.version, d.dag_schema::text AS dag_schema_json
FROM workflow_executions e JOIN workflow_definitions d ON d.id = e.workflow_definition_id
WHERE e.id = %(execution_id)s;

-- name: capability_breakers
-- Why routing gave no agent: the capability's breaker and one row per agent serving it (none: no
-- agent serves the capability).
SELECT scope, key, name, state, opened_at, probes_left
FROM lifecycle_capability_breakers(%(capability)s)
ORDER BY scope DESC, name;

-- name: breakers
-- For operators: every circuit breaker, its state and its current window.
SELECT scope, key, name, state, state_since, opened_at, half_open_at, probes_left, calls, failures,
       rate, p95_ms, config
FROM lifecycle_breaker_status
ORDER BY scope, name;
