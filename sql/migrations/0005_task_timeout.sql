-- 0005_task_timeout: a task's time limit per attempt (the stage's timeout_s), so the reaper gives a
-- requeued attempt its whole limit again instead of the rest of the dead worker's (issue 14).
ALTER TABLE public.task_queue ADD COLUMN timeout_s double precision;
ALTER TABLE public.task_queue ADD CONSTRAINT task_queue_timeout_s_positive CHECK (timeout_s IS NULL OR timeout_s > 0);
