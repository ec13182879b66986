-- bench: random executions of the generated history.
SELECT id::text AS id FROM workflow_executions WHERE dagster_run_id LIKE 'hist-%%' ORDER BY random() LIMIT %(n)s
