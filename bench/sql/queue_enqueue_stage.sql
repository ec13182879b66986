-- bench: enqueue one task per stage log in one transaction (completing a task completes its stage
-- and execution: lifecycle.task_complete -> lifecycle.stage_complete).
INSERT INTO task_queue (workflow_execution_id, task_type, input_data, status, capability, stage_log_id)
SELECT l.execution_id, 'work',
       jsonb_build_object('context', '{}'::jsonb, 'upstream', '{}'::jsonb, 'batch', %(batch)s::text),
       'pending', 'bench_queue', l.id
FROM workflow_execution_logs l
WHERE l.execution_id = ANY (%(ids)s::uuid[])
