-- 0010_launch: executions launched by inserting a row. A row inserted as pending (by
-- `lifecycle-dagster start`, a Supabase client, or the runbook's section 8 statement with status
-- pending) is launched by the sensor lifecycle_launch_sensor with run key = execution id. A row
-- whose job is not loaded yet stays pending with a visible reason; rows inserted as in_progress with
-- no run (driven by hand) are never launched.

ALTER TABLE workflow_executions ADD COLUMN pending_reason text;

-- the reason goes once the execution leaves pending
CREATE FUNCTION lifecycle_clear_pending_reason() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
  IF NEW.status <> 'pending' THEN
    NEW.pending_reason := NULL;
  END IF;
  RETURN NEW;
END
$$;

CREATE TRIGGER workflow_executions_pending_reason
  BEFORE UPDATE OF status ON workflow_executions
  FOR EACH ROW EXECUTE FUNCTION lifecycle_clear_pending_reason();

CREATE INDEX workflow_executions_launchable_idx ON workflow_executions (created_at)
  WHERE status = 'pending' AND dagster_run_id IS NULL;

-- Pending executions no run has taken yet, oldest first.
CREATE FUNCTION lifecycle_launchable_executions(p_limit integer DEFAULT 100)
RETURNS TABLE (execution_id uuid, workflow_name text, version integer, created_at timestamptz, pending_reason text)
LANGUAGE sql STABLE
AS $$
  SELECT e.id, d.name, d.version, e.created_at, e.pending_reason
  FROM workflow_executions e JOIN workflow_definitions d ON d.id = e.workflow_definition_id
  WHERE e.status = 'pending' AND e.dagster_run_id IS NULL
  ORDER BY e.created_at, e.id
  LIMIT p_limit
$$;

-- Say why a pending execution waits (idempotent: an unchanged reason writes nothing). Returns
-- whether the reason changed.
CREATE FUNCTION lifecycle_set_pending_reason(p_execution_id uuid, p_reason text, p_now timestamptz DEFAULT now())
RETURNS boolean
LANGUAGE plpgsql
AS $$
DECLARE
  v_exec workflow_executions;
BEGIN
  SELECT * INTO v_exec FROM workflow_executions e WHERE e.id = p_execution_id FOR UPDATE;
  IF NOT FOUND OR v_exec.status <> 'pending' OR v_exec.pending_reason IS NOT DISTINCT FROM p_reason THEN
    RETURN false;
  END IF;
  UPDATE workflow_executions e SET pending_reason = p_reason, updated_at = p_now WHERE e.id = p_execution_id;
  INSERT INTO workflow_events (execution_id, event_type, metadata, "timestamp")
  VALUES (p_execution_id, 'launch_waiting', jsonb_build_object('reason', p_reason), p_now);
  RETURN true;
END
$$;
