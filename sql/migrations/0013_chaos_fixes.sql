-- 0013_chaos_fixes: what the fault-injection suite (tests/chaos) found, fixed at the root.
--
-- 1. A queue worker's result was accepted after its lease had expired: the worker protocol
--    (lifecycle_task_complete, lifecycle_task_fail) checked the fencing token and the task's status,
--    not the lease. A worker that lost its lease without being reaped yet (its heartbeats missed:
--    connections killed, the process paused, the server restarted) could still complete a task the
--    reaper was about to hand to another worker. lifecycle_task_refusal, which both call first, now
--    also refuses a result that arrives after the lease expired (task_result_refused, reason 'the
--    lease of worker W expired at T'); the reaper puts the task back in the queue (counting an
--    attempt) and a live worker runs it. Stage ops' own tasks (claimed_by 'op') have no lease and
--    are fenced by their deadline as before. (The check lives in the helper so that every version of
--    the two protocol functions, later migrations' included, applies it.)

CREATE OR REPLACE FUNCTION lifecycle_task_refusal(p_task task_queue, p_token bigint, p_outcome text, p_now timestamptz)
RETURNS text
LANGUAGE plpgsql
AS $$
DECLARE
  v_reason text;
BEGIN
  IF p_task.lease_token <> p_token THEN
    v_reason := format('lease token %s is stale (current %s): the lease was lost', p_token, p_task.lease_token);
  ELSIF p_task.status <> 'in_progress' THEN
    v_reason := format('task is %s', p_task.status);
  ELSIF p_task.claimed_by IS DISTINCT FROM 'op' AND p_task.lease_expires_at IS NOT NULL
        AND p_now > p_task.lease_expires_at THEN
    v_reason := format('the lease of worker %s expired at %s', p_task.claimed_by, p_task.lease_expires_at);
  END IF;
  IF v_reason IS NOT NULL THEN
    INSERT INTO workflow_events (execution_id, event_type, stage_id, metadata, "timestamp")
    VALUES (p_task.workflow_execution_id, 'task_result_refused', p_task.task_type,
            jsonb_build_object('task_id', p_task.id, 'token', p_token, 'outcome', p_outcome, 'reason', v_reason),
            p_now);
  END IF;
  RETURN v_reason;
END
$$;

-- 2. A task of an attempt that a newer attempt of its stage replaced stayed open: a stage op that
--    ran its stage again (after its database connection was lost, or a resumed run) left the old
--    attempt's task pending or in progress. Its worker could still deliver (refused later, as stale)
--    and, worse, when its lease expired the reaper moved it to the next attempt, which the new task
--    already held: the unique index task_queue_one_per_stage_attempt refused the reaper's UPDATE
--    and the whole lifecycle_task_reap failed, every time. The reconciler's tick starts with it and
--    died at once (no compensation run was launched any more: executions stayed compensating), and
--    every queue worker, reaping before it claims, claimed nothing more. Now a new task of a stage
--    supersedes the open tasks of its earlier attempts (cancelled, their lease token moved on, so a
--    late result is refused), and the reaper cancels a task whose attempt was superseded instead of
--    requeueing it.
CREATE FUNCTION lifecycle_task_supersede() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
  IF NEW.workflow_execution_id IS NULL THEN
    RETURN NULL;
  END IF;
  UPDATE task_queue t
     SET status = 'cancelled', lease_token = t.lease_token + 1, lease_expires_at = NULL,
         error_message = format('superseded by attempt %s (task %s)', NEW.attempt, NEW.id),
         completed_at = NEW.created_at, updated_at = NEW.created_at
   WHERE t.workflow_execution_id = NEW.workflow_execution_id AND t.task_type = NEW.task_type
     AND t.attempt < NEW.attempt AND t.status IN ('pending', 'in_progress');
  RETURN NULL;
END
$$;

CREATE TRIGGER task_queue_supersede
  AFTER INSERT ON task_queue
  FOR EACH ROW EXECUTE FUNCTION lifecycle_task_supersede();

-- As in 0008, plus: a task whose stage moved on (a newer attempt's task exists, the stage log is not
-- in progress or is at a later attempt) is cancelled, not requeued; requeueing never collides.
CREATE OR REPLACE FUNCTION lifecycle_task_reap(p_now timestamptz DEFAULT now()) RETURNS integer
LANGUAGE plpgsql
AS $$
DECLARE
  v_task       record;
  v_n          integer := 0;
  v_superseded boolean;
BEGIN
  FOR v_task IN
    SELECT t.* FROM task_queue t
     WHERE t.status = 'in_progress' AND t.lease_expires_at < p_now AND t.claimed_by IS DISTINCT FROM 'op'
     ORDER BY t.lease_expires_at
     FOR UPDATE SKIP LOCKED
  LOOP
    v_superseded := v_task.workflow_execution_id IS NOT NULL AND (
      EXISTS (SELECT 1 FROM task_queue t2
               WHERE t2.workflow_execution_id = v_task.workflow_execution_id AND t2.task_type = v_task.task_type
                 AND t2.attempt > v_task.attempt)
      OR EXISTS (SELECT 1 FROM workflow_execution_logs l
                  WHERE l.id = v_task.stage_log_id
                    AND (l.status <> 'in_progress' OR l.attempt_number > v_task.attempt)));
    IF v_superseded THEN
      UPDATE task_queue t
         SET status = 'cancelled', lease_token = t.lease_token + 1,
             error_message = format('lease of worker %s expired; its attempt %s was superseded', v_task.claimed_by,
                                    v_task.attempt),
             completed_at = p_now, updated_at = p_now
       WHERE t.id = v_task.id;
    ELSIF v_task.max_attempts IS NOT NULL AND v_task.attempt >= v_task.max_attempts THEN
      UPDATE task_queue t
         SET status = 'failed', error_message = format('lease of worker %s expired; attempts exhausted', v_task.claimed_by),
             error_code = 'lease_expired', retryable = false, completed_at = p_now, updated_at = p_now
       WHERE t.id = v_task.id;
    ELSE
      UPDATE task_queue t
         SET status = 'pending', attempt = t.attempt + 1, lease_expires_at = NULL, claimed_by = NULL,
             started_at = NULL, updated_at = p_now
       WHERE t.id = v_task.id;
      UPDATE workflow_execution_logs l SET attempt_number = v_task.attempt + 1
       WHERE l.id = v_task.stage_log_id AND l.status = 'in_progress';
    END IF;
    INSERT INTO workflow_events (execution_id, event_type, stage_id, metadata, "timestamp")
    VALUES (v_task.workflow_execution_id, 'task_reaped', v_task.task_type,
            jsonb_build_object('task_id', v_task.id, 'worker', v_task.claimed_by, 'attempt', v_task.attempt,
                               'lease_expires_at', v_task.lease_expires_at,
                               'requeued', NOT v_superseded
                                           AND (v_task.max_attempts IS NULL OR v_task.attempt < v_task.max_attempts),
                               'superseded', v_superseded),
            p_now);
    v_n := v_n + 1;
  END LOOP;
  RETURN v_n;
END
$$;

-- ---------------------------------------------------------------------------------------------
-- State-changing functions replaced above: SECURITY DEFINER with a fixed search_path, executable by
-- service_role (and the owner) only, exactly as 0011_security.sql does.
ALTER FUNCTION public.lifecycle_task_refusal(task_queue, bigint, text, timestamptz)
  SECURITY DEFINER SET search_path = public, pg_temp;
REVOKE ALL ON FUNCTION public.lifecycle_task_refusal(task_queue, bigint, text, timestamptz)
  FROM PUBLIC, anon, authenticated;
GRANT EXECUTE ON FUNCTION public.lifecycle_task_refusal(task_queue, bigint, text, timestamptz) TO service_role;
ALTER FUNCTION public.lifecycle_task_supersede() SECURITY DEFINER SET search_path = public, pg_temp;
REVOKE ALL ON FUNCTION public.lifecycle_task_supersede() FROM PUBLIC, anon, authenticated;
GRANT EXECUTE ON FUNCTION public.lifecycle_task_supersede() TO service_role;
ALTER FUNCTION public.lifecycle_task_reap(timestamptz) SECURITY DEFINER SET search_path = public, pg_temp;
REVOKE ALL ON FUNCTION public.lifecycle_task_reap(timestamptz) FROM PUBLIC, anon, authenticated;
GRANT EXECUTE ON FUNCTION public.lifecycle_task_reap(timestamptz) TO service_role;

SELECT lifecycle_record_schema_fingerprints();
