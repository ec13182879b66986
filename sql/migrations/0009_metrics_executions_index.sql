-- 0009_metrics_executions_index: executions by definition and status, for the metrics scrape
-- (`lifecycle-dagster metrics serve`, query metrics_executions): an index-only scan instead of
-- reading every execution row on each scrape (22 -> 9 ms at 100k executions on a loaded 2-core
-- machine; bench/results/2026-12-07-metrics/).
CREATE INDEX workflow_executions_definition_status_idx ON public.workflow_executions USING btree
  (workflow_definition_id, status);
