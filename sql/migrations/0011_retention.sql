-- 0011_retention: finding the executions that retention may remove (issue 19, docs/retention.md).
-- lifecycle.executions_prune walks the finished executions oldest first, in bounded batches, with a
-- keyset cursor (created_at, id): this partial index serves that walk without reading unfinished
-- rows. created_at, not updated_at: created_at never changes, so the index costs no HOT update of
-- a running execution (updated_at changes on every transition); the function then checks
-- updated_at under the row lock.
CREATE INDEX workflow_executions_final_idx ON public.workflow_executions USING btree (created_at, id)
  WHERE status = ANY (ARRAY['completed'::text, 'rolled_back'::text, 'compensation_failed'::text]);
