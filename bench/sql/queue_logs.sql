-- bench: the pending stage log of each execution (the claim starts the stage).
INSERT INTO workflow_execution_logs (execution_id, stage_id, status)
SELECT e, 'work', 'pending' FROM unnest(%(ids)s::uuid[]) AS e
