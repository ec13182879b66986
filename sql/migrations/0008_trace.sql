-- 0008_trace: one OpenTelemetry trace per execution (issue 16). The W3C traceparent of the
-- execution's root span, set once by the first run that traces it (lifecycle.execution_set_trace_parent)
-- so a resume, retry or compensation run continues the same trace; and the traceparent a task
-- carries to the worker that claims it (lifecycle.task_fill copies the execution's at insert).
ALTER TABLE public.workflow_executions ADD COLUMN trace_parent text;
ALTER TABLE public.workflow_executions ADD CONSTRAINT workflow_executions_trace_parent_valid
  CHECK (trace_parent IS NULL OR trace_parent ~ '^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$');
ALTER TABLE public.task_queue ADD COLUMN trace_parent text;
ALTER TABLE public.task_queue ADD CONSTRAINT task_queue_trace_parent_valid
  CHECK (trace_parent IS NULL OR trace_parent ~ '^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$');
