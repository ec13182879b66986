-- 0010_branches: conditional edges, clean early ends and approval stages (issue 17,
-- docs/branches.md). An execution may wait for a decision (status 'waiting': no Dagster run is
-- bound to its progress) and may end early with an outcome; an approval stage's log waits
-- ('waiting') until its deadline.
ALTER TABLE public.workflow_executions ADD COLUMN outcome text;
ALTER TABLE public.workflow_executions ADD COLUMN outcome_reason text;
ALTER TABLE public.workflow_executions DROP CONSTRAINT workflow_executions_status_valid;
ALTER TABLE public.workflow_executions ADD CONSTRAINT workflow_executions_status_valid CHECK (status = ANY (ARRAY[
  'pending', 'in_progress', 'waiting', 'completed', 'failed', 'cancelled', 'compensating', 'rolled_back',
  'compensation_failed']));
ALTER TABLE public.workflow_executions ADD CONSTRAINT workflow_executions_outcome_valid CHECK (
  outcome IS NULL OR (status = 'completed' AND outcome ~ '^[a-z][a-z0-9_]{0,62}$'));

ALTER TABLE public.workflow_execution_logs ADD COLUMN wait_until timestamp with time zone;
ALTER TABLE public.workflow_execution_logs DROP CONSTRAINT workflow_execution_logs_status_valid;
ALTER TABLE public.workflow_execution_logs ADD CONSTRAINT workflow_execution_logs_status_valid CHECK (status = ANY (ARRAY[
  'pending', 'in_progress', 'waiting', 'completed', 'failed', 'skipped', 'compensated', 'compensation_failed']));
-- the approval deadlines the reconciler looks for
CREATE INDEX workflow_execution_logs_waiting_idx ON public.workflow_execution_logs (wait_until)
  WHERE status = 'waiting';

INSERT INTO lifecycle.transitions VALUES
  ('execution', 'in_progress', 'waiting'),
  ('execution', 'waiting', 'in_progress'),
  ('execution', 'waiting', 'completed'),
  ('execution', 'waiting', 'failed'),
  ('execution', 'waiting', 'cancelled'),
  ('stage', 'pending', 'waiting'),
  ('stage', 'waiting', 'completed'),
  ('stage', 'waiting', 'failed'),
  ('stage', 'waiting', 'skipped');
