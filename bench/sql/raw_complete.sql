-- bench: complete a claimed row with its result.
UPDATE bench_raw_queue SET status = 'completed', result = %(result)s, completed_at = now() WHERE id = %(id)s
