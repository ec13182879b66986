-- bench: claim one row (one statement, FOR UPDATE SKIP LOCKED).
UPDATE bench_raw_queue q
   SET status = 'in_progress', claimed_by = %(worker)s, started_at = now()
 WHERE q.id = (SELECT r.id FROM bench_raw_queue r WHERE r.status = 'pending'
                ORDER BY r.id FOR UPDATE SKIP LOCKED LIMIT 1)
RETURNING q.id, q.payload
