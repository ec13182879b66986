-- bench: the statements of one database with the most execution time (pg_stat_statements, nested
-- statements of our SQL functions and triggers included: track = all).
SELECT s.toplevel, s.calls, s.total_exec_time AS ms, left(regexp_replace(s.query, '\s+', ' ', 'g'), 110) AS q
FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid
WHERE d.datname = %(db)s
ORDER BY s.total_exec_time DESC
LIMIT %(limit)s
