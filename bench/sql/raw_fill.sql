-- bench: n pending rows for the raw loop.
INSERT INTO bench_raw_queue (payload)
SELECT jsonb_build_object('context', '{}'::jsonb, 'batch', %(batch)s::text) FROM generate_series(1, %(n)s)
