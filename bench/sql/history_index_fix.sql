-- bench: the index this benchmark proposes (not in the migrations): stage log -> its tasks, used by
-- lifecycle.undo_start (the agent of a stage's completed task), lifecycle.stage_start
-- (retries) and the cascade from workflow_execution_logs; without it each is a scan of task_queue.
CREATE INDEX IF NOT EXISTS bench_task_queue_stage_log_idx ON task_queue (stage_log_id)
