-- Guards: the state machine's trigger, row guards on every runbook table, payload limits.
-- Every write to the runbook's tables passes these triggers, whoever makes it.

-- lifecycle.execution_clear_pending_reason
CREATE OR REPLACE FUNCTION lifecycle.execution_clear_pending_reason() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
BEGIN
  IF NEW.status <> 'pending' THEN
    NEW.pending_reason := NULL;
  END IF;
  RETURN NEW;
END
$$;

REVOKE ALL ON FUNCTION lifecycle.execution_clear_pending_reason() FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.execution_clear_pending_reason() TO service_role;


-- lifecycle.execution_is_final
CREATE OR REPLACE FUNCTION lifecycle.execution_is_final(p_status text) RETURNS boolean
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$
  SELECT p_status IN ('completed', 'rolled_back', 'compensation_failed')
$$;

REVOKE ALL ON FUNCTION lifecycle.execution_is_final(p_status text) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.execution_is_final(p_status text) TO service_role;


-- lifecycle.guard_agent_config
CREATE OR REPLACE FUNCTION lifecycle.guard_agent_config() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_problem text := lifecycle.breaker_config_problem(NEW.config -> 'breaker');
BEGIN
  IF v_problem IS NOT NULL THEN
    RAISE EXCEPTION 'agent %: config.breaker %', NEW.name, v_problem
      USING ERRCODE = 'check_violation',
            HINT = 'see lifecycle.breaker_defaults() for the keys and their defaults';
  END IF;
  v_problem := lifecycle.rate_limit_problem(NEW.config -> 'rate_limit');
  IF v_problem IS NOT NULL THEN
    RAISE EXCEPTION 'agent %: config.rate_limit %', NEW.name, v_problem
      USING ERRCODE = 'check_violation',
            HINT = 'config.rate_limit is {"per_s": calls a second, "burst": calls at once (default max(1, per_s))}: docs/rate-limits.md';
  END IF;
  RETURN NEW;
END
$$;

REVOKE ALL ON FUNCTION lifecycle.guard_agent_config() FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.guard_agent_config() TO service_role;


-- lifecycle.guard_definition_insert
CREATE OR REPLACE FUNCTION lifecycle.guard_definition_insert() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_problem text;
BEGIN
  IF jsonb_typeof(NEW.dag_schema) = 'object' THEN
    PERFORM lifecycle.dag_assert_valid(NEW.dag_schema, format('workflow %s v%s', NEW.name, NEW.version));
    v_problem := lifecycle.payload_problem(NEW.dag_schema, 'dag_schema');
    IF v_problem IS NOT NULL THEN
      RAISE EXCEPTION 'invalid workflow DAG: workflow % v%: %', NEW.name, NEW.version, v_problem
        USING ERRCODE = 'check_violation',
              CONSTRAINT = 'workflow_definitions_dag_valid',
              TABLE = 'workflow_definitions',
              HINT = 'a definition is at most lifecycle.max_payload_bytes bytes (default 8 MiB) as jsonb text';
    END IF;
  END IF;
  RETURN NEW;
END
$$;

REVOKE ALL ON FUNCTION lifecycle.guard_definition_insert() FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.guard_definition_insert() TO service_role;


-- lifecycle.guard_definition_update
CREATE OR REPLACE FUNCTION lifecycle.guard_definition_update() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
BEGIN
  IF NEW.dag_schema IS DISTINCT FROM OLD.dag_schema THEN
    RAISE EXCEPTION 'workflow_definitions %.v% is immutable: dag_schema cannot change after insert',
      OLD.name, OLD.version
      USING ERRCODE = 'check_violation',
            HINT = 'publish a new version instead';
  END IF;
  IF NEW.name IS DISTINCT FROM OLD.name OR NEW.version IS DISTINCT FROM OLD.version
     OR NEW.id IS DISTINCT FROM OLD.id THEN
    RAISE EXCEPTION 'workflow_definitions %.v%: id, name and version cannot change',
      OLD.name, OLD.version
      USING ERRCODE = 'check_violation';
  END IF;
  RETURN NEW;
END
$$;

REVOKE ALL ON FUNCTION lifecycle.guard_definition_update() FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.guard_definition_update() TO service_role;


-- lifecycle.guard_execution_context
CREATE OR REPLACE FUNCTION lifecycle.guard_execution_context() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_problem text := lifecycle.payload_problem(NEW.context, 'the context');
BEGIN
  IF v_problem IS NOT NULL THEN
    RAISE EXCEPTION 'workflow_executions: %', v_problem
      USING ERRCODE = 'check_violation',
            CONSTRAINT = 'workflow_executions_context_valid',
            TABLE = 'workflow_executions',
            COLUMN = 'context',
            HINT = 'a context is at most 100 levels deep and lifecycle.max_payload_bytes bytes (default 8 MiB)';
  END IF;
  RETURN NEW;
END
$$;

REVOKE ALL ON FUNCTION lifecycle.guard_execution_context() FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.guard_execution_context() TO service_role;


-- lifecycle.guard_execution_insert
CREATE OR REPLACE FUNCTION lifecycle.guard_execution_insert() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
BEGIN
  IF NEW.status NOT IN ('pending', 'in_progress') THEN
    RAISE EXCEPTION 'a workflow execution must be inserted as pending or in_progress, not %', NEW.status
      USING ERRCODE = 'check_violation';
  END IF;
  RETURN NEW;
END
$$;

REVOKE ALL ON FUNCTION lifecycle.guard_execution_insert() FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.guard_execution_insert() TO service_role;


-- lifecycle.guard_execution_row
CREATE OR REPLACE FUNCTION lifecycle.guard_execution_row() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_missing text;
BEGIN
  IF NEW.current_stage IS NOT NULL
     AND (TG_OP = 'INSERT' OR NEW.current_stage IS DISTINCT FROM OLD.current_stage)
     AND NOT lifecycle.dag_has_stage(NEW.workflow_definition_id, NEW.current_stage) THEN
    RAISE EXCEPTION 'current_stage % is not a stage of the DAG that execution % runs', NEW.current_stage, NEW.id
      USING ERRCODE = 'check_violation';
  END IF;
  IF TG_OP = 'UPDATE' AND NEW.status = 'completed' AND OLD.status IS DISTINCT FROM 'completed' THEN
    SELECT string_agg(s ->> 'id', ', ' ORDER BY s ->> 'id') INTO v_missing
    FROM public.workflow_definitions d, jsonb_array_elements(d.dag_schema -> 'stages') s
    WHERE d.id = NEW.workflow_definition_id
      AND NOT EXISTS (SELECT 1 FROM public.workflow_execution_logs l
                      WHERE l.execution_id = NEW.id AND l.stage_id = s ->> 'id' AND l.status IN ('completed', 'skipped'));
    IF v_missing IS NOT NULL THEN
      RAISE EXCEPTION 'execution % cannot complete: stage(s) % neither completed nor skipped', NEW.id, v_missing
        USING ERRCODE = 'check_violation';
    END IF;
  END IF;
  RETURN NEW;
END
$$;

REVOKE ALL ON FUNCTION lifecycle.guard_execution_row() FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.guard_execution_row() TO service_role;


-- lifecycle.guard_stage_identity
CREATE OR REPLACE FUNCTION lifecycle.guard_stage_identity() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
BEGIN
  IF NEW.execution_id IS DISTINCT FROM OLD.execution_id OR NEW.stage_id IS DISTINCT FROM OLD.stage_id THEN
    RAISE EXCEPTION 'a stage log keeps its execution and stage (log %)', OLD.id
      USING ERRCODE = 'check_violation';
  END IF;
  RETURN NEW;
END
$$;

REVOKE ALL ON FUNCTION lifecycle.guard_stage_identity() FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.guard_stage_identity() TO service_role;


-- lifecycle.guard_stage_insert
CREATE OR REPLACE FUNCTION lifecycle.guard_stage_insert() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_definition uuid;
BEGIN
  -- the runbook's section 8 inserts a completed log directly; compensation states are only
  -- ever reached from completed; only an approval stage waits.
  IF NEW.status NOT IN ('pending', 'in_progress', 'waiting', 'completed', 'failed', 'skipped') THEN
    RAISE EXCEPTION 'a stage log cannot be inserted as % (stage %)', NEW.status, NEW.stage_id
      USING ERRCODE = 'check_violation';
  END IF;
  SELECT e.workflow_definition_id INTO v_definition FROM public.workflow_executions e WHERE e.id = NEW.execution_id;
  IF v_definition IS NOT NULL AND NOT lifecycle.dag_has_stage(v_definition, NEW.stage_id) THEN
    RAISE EXCEPTION 'stage % is not a stage of the DAG that execution % runs', NEW.stage_id, NEW.execution_id
      USING ERRCODE = 'check_violation';
  END IF;
  IF NEW.status = 'waiting' AND NOT EXISTS (
       SELECT 1 FROM public.workflow_definitions d
        WHERE d.id = v_definition AND lifecycle.dag_stage(d.dag_schema, NEW.stage_id) ->> 'kind' = 'approval') THEN
    RAISE EXCEPTION 'stage % is not an approval stage: only an approval stage waits', NEW.stage_id
      USING ERRCODE = 'check_violation';
  END IF;
  RETURN NEW;
END
$$;

REVOKE ALL ON FUNCTION lifecycle.guard_stage_insert() FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.guard_stage_insert() TO service_role;


-- lifecycle.guard_stage_output
CREATE OR REPLACE FUNCTION lifecycle.guard_stage_output() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_problem text := lifecycle.payload_problem(NEW.output_data, 'stage output');
BEGIN
  IF v_problem IS NOT NULL THEN
    RAISE EXCEPTION 'stage %: %', NEW.stage_id, v_problem
      USING ERRCODE = 'invalid_parameter_value',
            TABLE = 'workflow_execution_logs',
            COLUMN = 'output_data',
            HINT = 'an output is at most 100 levels deep and lifecycle.max_payload_bytes bytes (default 8 MiB)';
  END IF;
  RETURN NEW;
END
$$;

REVOKE ALL ON FUNCTION lifecycle.guard_stage_output() FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.guard_stage_output() TO service_role;


-- lifecycle.guard_task_insert
CREATE OR REPLACE FUNCTION lifecycle.guard_task_insert() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
BEGIN
  IF NEW.status NOT IN ('pending', 'in_progress') THEN
    RAISE EXCEPTION 'a task must be inserted as pending or in_progress, not % (task type %)', NEW.status, NEW.task_type
      USING ERRCODE = 'check_violation';
  END IF;
  RETURN NEW;
END
$$;

REVOKE ALL ON FUNCTION lifecycle.guard_task_insert() FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.guard_task_insert() TO service_role;


-- lifecycle.guard_transition
CREATE OR REPLACE FUNCTION lifecycle.guard_transition() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
BEGIN
  IF NEW.status IS DISTINCT FROM OLD.status AND NOT EXISTS (
    SELECT 1 FROM lifecycle.transitions t
    WHERE t.entity = TG_ARGV[0] AND t.from_status = OLD.status AND t.to_status = NEW.status
  ) THEN
    RAISE EXCEPTION 'illegal % transition % -> % (% id %)',
      TG_ARGV[0], OLD.status, NEW.status, TG_TABLE_NAME, OLD.id
      USING ERRCODE = 'check_violation',
            HINT = 'legal transitions are listed in lifecycle.transitions';
  END IF;
  RETURN NEW;
END
$$;

REVOKE ALL ON FUNCTION lifecycle.guard_transition() FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.guard_transition() TO service_role;


-- lifecycle.payload_deep_path
CREATE OR REPLACE FUNCTION lifecycle.payload_deep_path(p_value jsonb, p_depth integer) RETURNS text
    LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $_$
-- The JSON path of the first object or array (depth first, in jsonb's order) p_depth levels below
-- the document, written as lifecycle_dagster/core/payload.py json_path writes it: $.a[0]["b c"]
-- (keys that are not identifiers as JSON strings, non-ASCII escaped; over 120 characters, the
-- middle cut). NULL when there is none. Only called for a document known to be too deep.
DECLARE
  v_node  jsonb := p_value;
  v_path  text := '$';
  v_key   text;
  v_child jsonb;
  v_step  text;
  v_left  integer;
BEGIN
  FOR v_level IN 1..p_depth LOOP
    v_step := NULL;
    v_left := p_depth - v_level;  -- the child must hold a container this many levels below it
    FOR v_key, v_child IN
      SELECT e.key, e.value FROM jsonb_each(CASE WHEN jsonb_typeof(v_node) = 'object' THEN v_node END) AS e
      UNION ALL
      SELECT format('[%s]', a.i - 1), a.value
        FROM jsonb_array_elements(CASE WHEN jsonb_typeof(v_node) = 'array' THEN v_node END) WITH ORDINALITY AS a(value, i)
    LOOP
      CONTINUE WHEN jsonb_typeof(v_child) NOT IN ('object', 'array')
        OR NOT jsonb_path_exists(v_child,
                 format('strict $.**{%s} ? (@.type() == "object" || @.type() == "array")', v_left)::jsonpath);
      v_step := CASE
        WHEN jsonb_typeof(v_node) = 'array' THEN v_key
        WHEN v_key ~ '^[A-Za-z_][A-Za-z0-9_]*$' THEN '.' || v_key
        ELSE '[' || (SELECT string_agg(CASE
                       WHEN ascii(c) < 128 THEN c
                       WHEN ascii(c) < 65536 THEN '\u' || lpad(to_hex(ascii(c)), 4, '0')
                       ELSE '\u' || to_hex(55296 + ((ascii(c) - 65536) >> 10))
                            || '\u' || to_hex(56320 + ((ascii(c) - 65536) & 1023)) END, '' ORDER BY i)
                     FROM regexp_split_to_table(to_jsonb(v_key)::text, '') WITH ORDINALITY AS t(c, i)) || ']'
      END;
      v_node := v_child;
      EXIT;
    END LOOP;
    IF v_step IS NULL THEN
      RETURN NULL;
    END IF;
    v_path := v_path || v_step;
  END LOOP;
  IF char_length(v_path) > 120 THEN
    v_path := left(v_path, 60) || '…' || right(v_path, 60);
  END IF;
  RETURN v_path;
END
$_$;

REVOKE ALL ON FUNCTION lifecycle.payload_deep_path(p_value jsonb, p_depth integer) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.payload_deep_path(p_value jsonb, p_depth integer) TO service_role;

COMMENT ON FUNCTION lifecycle.payload_deep_path(p_value jsonb, p_depth integer) IS 'the JSON path of the first container p_depth levels deep, as lifecycle_dagster/core/payload.py json_path writes it';


-- lifecycle.payload_max_bytes
CREATE OR REPLACE FUNCTION lifecycle.payload_max_bytes() RETURNS bigint
    LANGUAGE sql STABLE PARALLEL SAFE
    AS $$
  SELECT coalesce(nullif(current_setting('lifecycle.max_payload_bytes', true), '')::bigint, 8388608)
$$;

REVOKE ALL ON FUNCTION lifecycle.payload_max_bytes() FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.payload_max_bytes() TO service_role;


-- lifecycle.payload_problem
-- its own search_path: it runs inside SECURITY DEFINER guards whose path holds public, where a
-- function named like a built-in (jsonb_path_exists(jsonb, text)) would be the better match
CREATE OR REPLACE FUNCTION lifecycle.payload_problem(p_value jsonb, p_what text) RETURNS text
    LANGUAGE plpgsql STABLE PARALLEL SAFE
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $_$
DECLARE
  c_max_depth CONSTANT integer := 100;
  v_size  bigint;
  v_limit bigint := lifecycle.payload_max_bytes();
BEGIN
  IF p_value IS NULL OR jsonb_typeof(p_value) NOT IN ('object', 'array') THEN
    RETURN NULL;
  END IF;
  v_size := octet_length(p_value::text);
  IF v_size > v_limit THEN
    RETURN format('%s is %s bytes, over the %s-byte limit (lifecycle.max_payload_bytes)', p_what, v_size, v_limit);
  END IF;
  -- a container at level 100 (the document itself is level 0) is the 101st enclosing level
  IF jsonb_path_exists(p_value, 'strict $.**{100} ? (@.type() == "object" || @.type() == "array")') THEN
    RETURN format('%s is nested more than %s levels deep (objects and arrays) at %s', p_what, c_max_depth,
                  lifecycle.payload_deep_path(p_value, c_max_depth));
  END IF;
  RETURN NULL;
END
$_$;

REVOKE ALL ON FUNCTION lifecycle.payload_problem(p_value jsonb, p_what text) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.payload_problem(p_value jsonb, p_what text) TO service_role;

COMMENT ON FUNCTION lifecycle.payload_problem(p_value jsonb, p_what text) IS 'why a context or stage output cannot be stored (size, nesting), or NULL; lifecycle_dagster/payload.py says the same';


-- trigger agents agents_breaker_config
CREATE OR REPLACE TRIGGER agents_breaker_config BEFORE INSERT OR UPDATE OF config ON public.agents FOR EACH ROW EXECUTE FUNCTION lifecycle.guard_agent_config();

-- trigger task_queue task_queue_insert_status
CREATE OR REPLACE TRIGGER task_queue_insert_status BEFORE INSERT ON public.task_queue FOR EACH ROW EXECUTE FUNCTION lifecycle.guard_task_insert();

-- trigger task_queue task_queue_transition
CREATE OR REPLACE TRIGGER task_queue_transition BEFORE UPDATE OF status ON public.task_queue FOR EACH ROW EXECUTE FUNCTION lifecycle.guard_transition('task');

-- trigger workflow_definitions workflow_definitions_immutable
CREATE OR REPLACE TRIGGER workflow_definitions_immutable BEFORE UPDATE ON public.workflow_definitions FOR EACH ROW EXECUTE FUNCTION lifecycle.guard_definition_update();

-- trigger workflow_definitions workflow_definitions_valid_dag
CREATE OR REPLACE TRIGGER workflow_definitions_valid_dag BEFORE INSERT ON public.workflow_definitions FOR EACH ROW EXECUTE FUNCTION lifecycle.guard_definition_insert();

-- trigger workflow_execution_logs workflow_execution_logs_identity
CREATE OR REPLACE TRIGGER workflow_execution_logs_identity BEFORE UPDATE OF execution_id, stage_id ON public.workflow_execution_logs FOR EACH ROW EXECUTE FUNCTION lifecycle.guard_stage_identity();

-- trigger workflow_execution_logs workflow_execution_logs_insert_status
CREATE OR REPLACE TRIGGER workflow_execution_logs_insert_status BEFORE INSERT ON public.workflow_execution_logs FOR EACH ROW EXECUTE FUNCTION lifecycle.guard_stage_insert();

-- trigger workflow_execution_logs workflow_execution_logs_output_valid
CREATE OR REPLACE TRIGGER workflow_execution_logs_output_valid BEFORE INSERT OR UPDATE OF output_data ON public.workflow_execution_logs FOR EACH ROW WHEN ((new.output_data IS NOT NULL)) EXECUTE FUNCTION lifecycle.guard_stage_output();

-- trigger workflow_execution_logs workflow_execution_logs_transition
CREATE OR REPLACE TRIGGER workflow_execution_logs_transition BEFORE UPDATE OF status ON public.workflow_execution_logs FOR EACH ROW EXECUTE FUNCTION lifecycle.guard_transition('stage');

-- trigger workflow_executions workflow_executions_context_valid
CREATE OR REPLACE TRIGGER workflow_executions_context_valid BEFORE INSERT OR UPDATE OF context ON public.workflow_executions FOR EACH ROW EXECUTE FUNCTION lifecycle.guard_execution_context();

-- trigger workflow_executions workflow_executions_insert_status
CREATE OR REPLACE TRIGGER workflow_executions_insert_status BEFORE INSERT ON public.workflow_executions FOR EACH ROW EXECUTE FUNCTION lifecycle.guard_execution_insert();

-- trigger workflow_executions workflow_executions_pending_reason
CREATE OR REPLACE TRIGGER workflow_executions_pending_reason BEFORE UPDATE OF status ON public.workflow_executions FOR EACH ROW EXECUTE FUNCTION lifecycle.execution_clear_pending_reason();

-- trigger workflow_executions workflow_executions_transition
CREATE OR REPLACE TRIGGER workflow_executions_transition BEFORE UPDATE OF status ON public.workflow_executions FOR EACH ROW EXECUTE FUNCTION lifecycle.guard_transition('execution');

-- trigger workflow_executions workflow_executions_z_row_guard
CREATE OR REPLACE TRIGGER workflow_executions_z_row_guard BEFORE INSERT OR UPDATE OF current_stage, status ON public.workflow_executions FOR EACH ROW EXECUTE FUNCTION lifecycle.guard_execution_row();
