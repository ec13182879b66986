-- bench: enqueue n tasks that belong to no execution (the queue protocol alone).
INSERT INTO task_queue (task_type, input_data, status, capability)
SELECT 'bare', jsonb_build_object('context', '{}'::jsonb, 'upstream', '{}'::jsonb, 'batch', %(batch)s::text),
       'pending', 'bench_queue'
FROM generate_series(1, %(n)s)
RETURNING id::text AS id, created_at
