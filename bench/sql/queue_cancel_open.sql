-- bench: cancel what a cell left open, so the next cell starts from an empty queue.
UPDATE task_queue SET status = 'cancelled', completed_at = now(), updated_at = now()
WHERE status IN ('pending', 'in_progress') AND capability = 'bench_queue'
