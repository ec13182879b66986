-- bench (metrics): give the generated history's stage_completed events the task_id of their
-- attempt, as lifecycle.stage_complete writes it (history_functions.sql leaves it out), so the
-- metrics scrape joins each event to its task. Triggers off (events are append-only), as the
-- generator runs.
SELECT set_config('session_replication_role', 'replica', true);
UPDATE workflow_events ev
   SET metadata = ev.metadata || jsonb_build_object('task_id', t.id)
  FROM task_queue t
 WHERE ev.event_type = 'stage_completed' AND NOT ev.metadata ? 'task_id'
   AND t.workflow_execution_id = ev.execution_id AND t.task_type = ev.stage_id AND t.attempt = 2;
