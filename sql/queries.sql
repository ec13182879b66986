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
