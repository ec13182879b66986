-- bench: tasks of the bench queue not finished yet (partial indexes on pending and in_progress).
SELECT count(*) AS open FROM task_queue
WHERE status IN ('pending', 'in_progress') AND capability = 'bench_queue'
