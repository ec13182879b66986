-- 0004_integrity_guards: more bad states made unstorable, whoever writes them (raw SQL included).
--   * a stage log names a stage of its execution's DAG, and keeps its execution and stage;
--   * current_stage is NULL or a stage of the execution's DAG;
--   * a task is inserted as pending or in_progress;
--   * an execution becomes completed only when every stage of its DAG has a completed log.

CREATE FUNCTION lifecycle_dag_has_stage(p_definition_id uuid, p_stage_id text) RETURNS boolean
LANGUAGE sql STABLE
AS $$
  SELECT EXISTS (
    SELECT 1 FROM workflow_definitions d, jsonb_array_elements(
      CASE WHEN jsonb_typeof(d.dag_schema -> 'stages') = 'array' THEN d.dag_schema -> 'stages' ELSE '[]'::jsonb END
    ) s
    WHERE d.id = p_definition_id AND s ->> 'id' = p_stage_id)
$$;

CREATE OR REPLACE FUNCTION lifecycle_guard_stage_insert() RETURNS trigger
LANGUAGE plpgsql
AS $$
DECLARE
  v_definition uuid;
BEGIN
  -- the runbook's section 8 inserts a completed log directly; compensation states are only
  -- ever reached from completed.
  IF NEW.status NOT IN ('pending', 'in_progress', 'completed', 'failed', 'skipped') THEN
    RAISE EXCEPTION 'a stage log cannot be inserted as % (stage %)', NEW.status, NEW.stage_id
      USING ERRCODE = 'check_violation';
  END IF;
  SELECT e.workflow_definition_id INTO v_definition FROM workflow_executions e WHERE e.id = NEW.execution_id;
  IF v_definition IS NOT NULL AND NOT lifecycle_dag_has_stage(v_definition, NEW.stage_id) THEN
    RAISE EXCEPTION 'stage % is not a stage of the DAG that execution % runs', NEW.stage_id, NEW.execution_id
      USING ERRCODE = 'check_violation';
  END IF;
  RETURN NEW;
END
$$;

CREATE FUNCTION lifecycle_guard_stage_identity() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
  IF NEW.execution_id IS DISTINCT FROM OLD.execution_id OR NEW.stage_id IS DISTINCT FROM OLD.stage_id THEN
    RAISE EXCEPTION 'a stage log keeps its execution and stage (log %)', OLD.id
      USING ERRCODE = 'check_violation';
  END IF;
  RETURN NEW;
END
$$;

CREATE TRIGGER workflow_execution_logs_identity
  BEFORE UPDATE OF execution_id, stage_id ON workflow_execution_logs
  FOR EACH ROW EXECUTE FUNCTION lifecycle_guard_stage_identity();

CREATE FUNCTION lifecycle_guard_execution_row() RETURNS trigger
LANGUAGE plpgsql
AS $$
DECLARE
  v_missing text;
BEGIN
  IF NEW.current_stage IS NOT NULL
     AND (TG_OP = 'INSERT' OR NEW.current_stage IS DISTINCT FROM OLD.current_stage)
     AND NOT lifecycle_dag_has_stage(NEW.workflow_definition_id, NEW.current_stage) THEN
    RAISE EXCEPTION 'current_stage % is not a stage of the DAG that execution % runs', NEW.current_stage, NEW.id
      USING ERRCODE = 'check_violation';
  END IF;
  IF TG_OP = 'UPDATE' AND NEW.status = 'completed' AND OLD.status IS DISTINCT FROM 'completed' THEN
    SELECT string_agg(s ->> 'id', ', ' ORDER BY s ->> 'id') INTO v_missing
    FROM workflow_definitions d, jsonb_array_elements(d.dag_schema -> 'stages') s
    WHERE d.id = NEW.workflow_definition_id
      AND NOT EXISTS (SELECT 1 FROM workflow_execution_logs l
                      WHERE l.execution_id = NEW.id AND l.stage_id = s ->> 'id' AND l.status = 'completed');
    IF v_missing IS NOT NULL THEN
      RAISE EXCEPTION 'execution % cannot complete: stage(s) % not completed', NEW.id, v_missing
        USING ERRCODE = 'check_violation';
    END IF;
  END IF;
  RETURN NEW;
END
$$;

-- named to fire after workflow_executions_transition: triggers of one event fire in name order
CREATE TRIGGER workflow_executions_z_row_guard
  BEFORE INSERT OR UPDATE OF current_stage, status ON workflow_executions
  FOR EACH ROW EXECUTE FUNCTION lifecycle_guard_execution_row();

CREATE FUNCTION lifecycle_guard_task_insert() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
  IF NEW.status NOT IN ('pending', 'in_progress') THEN
    RAISE EXCEPTION 'a task must be inserted as pending or in_progress, not % (task type %)', NEW.status, NEW.task_type
      USING ERRCODE = 'check_violation';
  END IF;
  RETURN NEW;
END
$$;

CREATE TRIGGER task_queue_insert_status
  BEFORE INSERT ON task_queue
  FOR EACH ROW EXECUTE FUNCTION lifecycle_guard_task_insert();
