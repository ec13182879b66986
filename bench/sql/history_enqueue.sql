-- bench: enqueue one task as the runbook's section 7 does (capability and stage log filled by trigger).
INSERT INTO task_queue (workflow_execution_id, task_type, input_data, status)
VALUES (%(execution_id)s, 'work', '{"context": {}, "upstream": {}}'::jsonb, 'pending')
RETURNING id::text AS id
