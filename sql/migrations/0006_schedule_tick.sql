-- 0006_schedule_tick: the schedule tick an execution was inserted for (issue 15): a definition's
-- Dagster schedule inserts one pending execution per tick through lifecycle.execution_schedule,
-- keyed 'schedule:<definition id>:<tick instant, UTC>'; the unique index makes a tick evaluated
-- twice (a daemon restart, two daemons) insert one row. NULL for every other execution.
ALTER TABLE public.workflow_executions ADD COLUMN schedule_tick text;
CREATE UNIQUE INDEX workflow_executions_schedule_tick_key ON public.workflow_executions (schedule_tick);
