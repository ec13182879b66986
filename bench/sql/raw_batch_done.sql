-- bench: how many raw rows of a batch completed, and when the last one did.
SELECT count(*) AS done, max(completed_at) AS last
FROM bench_raw_queue WHERE status = 'completed' AND payload ->> 'batch' = %(batch)s::text
