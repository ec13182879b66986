-- bench: rows of the history tables (exact counts).
SELECT (SELECT count(*) FROM workflow_events) AS events, (SELECT count(*) FROM task_queue) AS tasks,
       (SELECT count(*) FROM workflow_executions) AS executions,
       (SELECT count(*) FROM workflow_execution_logs) AS stage_logs
