-- bench: how many tasks of a batch completed, and when the last one did.
SELECT count(*) AS done, max(completed_at) AS last
FROM task_queue
WHERE capability = 'bench_queue' AND status = 'completed' AND input_data ->> 'batch' = %(batch)s::text
