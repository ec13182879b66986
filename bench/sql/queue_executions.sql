-- bench: executions of the one-stage queue workflow, in progress (driven by hand, no Dagster run),
-- as the runbook's section 8 inserts them; returns their ids.
INSERT INTO workflow_executions (workflow_definition_id, status, context)
SELECT %(definition_id)s, 'in_progress', jsonb_build_object('batch', %(batch)s::text, 'i', g)
FROM generate_series(1, %(n)s) AS g
RETURNING id
