-- bench: live and dead tuples and sizes of the queue tables (bytes).
SELECT s.relname AS table, s.n_live_tup AS live, s.n_dead_tup AS dead,
       pg_relation_size(s.relid) AS heap_bytes, pg_total_relation_size(s.relid) AS total_bytes,
       s.autovacuum_count, s.last_autovacuum
FROM pg_stat_user_tables s
WHERE s.relname IN ('task_queue', 'bench_raw_queue', 'workflow_executions', 'workflow_execution_logs',
                    'workflow_events')
ORDER BY s.relname
