-- 0001_schema: the orchestration schema of the user's runbook, with its state machine.
--
-- Names are the runbook's (workflow_definitions, workflow_executions, workflow_execution_logs,
-- workflow_events, agents, agent_ontologies, task_queue): users' SQL already calls them.
-- Objects of our own are prefixed lifecycle_. Statuses are text + named CHECK constraints
-- (easier to extend than enums); legal status changes are rows of lifecycle_transitions and
-- a BEFORE UPDATE trigger refuses every other change, whoever makes it.

-- auth.uid(): the runbook writes created_by = auth.uid(). On Supabase the real function exists
-- and is kept; on plain Postgres a shim returns the `sub` claim of the request.jwt.claims
-- setting (as PostgREST sets it), or NULL.
CREATE SCHEMA IF NOT EXISTS auth;
DO $guard$
BEGIN
  IF NOT EXISTS (
    SELECT 1 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
    WHERE n.nspname = 'auth' AND p.proname = 'uid' AND p.pronargs = 0
  ) THEN
    CREATE FUNCTION auth.uid() RETURNS uuid
    LANGUAGE sql STABLE
    AS $fn$
      SELECT nullif(
        coalesce(
          nullif(current_setting('request.jwt.claim.sub', true), ''),
          nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub'
        ), ''
      )::uuid
    $fn$;
    COMMENT ON FUNCTION auth.uid() IS
      'lifecycle-dagster shim: sub claim of request.jwt.claims, or NULL (Supabase keeps its own)';
  END IF;
END
$guard$;

-- ---------------------------------------------------------------------------------------------
-- The state machine: one row per legal (entity, from, to). Later migrations add rows here when
-- they add a transition; nothing else decides legality.
CREATE TABLE lifecycle_transitions (
  entity      text NOT NULL,
  from_status text NOT NULL,
  to_status   text NOT NULL,
  CONSTRAINT lifecycle_transitions_pkey PRIMARY KEY (entity, from_status, to_status),
  CONSTRAINT lifecycle_transitions_entity_valid CHECK (entity IN ('execution', 'stage', 'task'))
);

INSERT INTO lifecycle_transitions (entity, from_status, to_status) VALUES
  ('execution', 'pending',      'in_progress'),
  ('execution', 'pending',      'cancelled'),
  ('execution', 'in_progress',  'completed'),
  ('execution', 'in_progress',  'failed'),
  ('execution', 'in_progress',  'cancelled'),
  ('execution', 'failed',       'compensating'),
  ('execution', 'failed',       'in_progress'),
  ('execution', 'cancelled',    'compensating'),
  ('execution', 'compensating', 'rolled_back'),
  ('execution', 'compensating', 'compensation_failed'),
  ('stage', 'pending',     'in_progress'),
  ('stage', 'pending',     'skipped'),
  ('stage', 'in_progress', 'completed'),
  ('stage', 'in_progress', 'failed'),
  ('stage', 'in_progress', 'pending'),
  ('stage', 'in_progress', 'skipped'),
  ('stage', 'failed',      'pending'),
  ('stage', 'completed',   'compensated'),
  ('stage', 'completed',   'compensation_failed'),
  ('task', 'pending',     'in_progress'),
  ('task', 'pending',     'cancelled'),
  ('task', 'in_progress', 'completed'),
  ('task', 'in_progress', 'failed'),
  ('task', 'in_progress', 'pending'),
  ('task', 'in_progress', 'cancelled');

-- Trigger function shared by the three stateful tables; TG_ARGV[0] names the entity.
CREATE FUNCTION lifecycle_guard_transition() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
  IF NEW.status IS DISTINCT FROM OLD.status AND NOT EXISTS (
    SELECT 1 FROM lifecycle_transitions t
    WHERE t.entity = TG_ARGV[0] AND t.from_status = OLD.status AND t.to_status = NEW.status
  ) THEN
    RAISE EXCEPTION 'illegal % transition % -> % (% id %)',
      TG_ARGV[0], OLD.status, NEW.status, TG_TABLE_NAME, OLD.id
      USING ERRCODE = 'check_violation',
            HINT = 'legal transitions are listed in lifecycle_transitions';
  END IF;
  RETURN NEW;
END
$$;

-- ---------------------------------------------------------------------------------------------
CREATE TABLE workflow_definitions (
  id          uuid        NOT NULL DEFAULT gen_random_uuid(),
  name        text        NOT NULL,
  description text,
  version     integer     NOT NULL DEFAULT 1,
  dag_schema  jsonb       NOT NULL,
  is_active   boolean     NOT NULL DEFAULT false,
  created_by  uuid,
  created_at  timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT workflow_definitions_pkey PRIMARY KEY (id),
  CONSTRAINT workflow_definitions_name_version_key UNIQUE (name, version),
  CONSTRAINT workflow_definitions_version_positive CHECK (version >= 1),
  -- names become Dagster job names <name>__v<version>: no double underscore, so op names
  -- <name>__v<version>__<stage> never collide across the code location
  CONSTRAINT workflow_definitions_name_valid
    CHECK (name ~ '^[a-z][a-z0-9_]{0,62}$' AND name !~ '__' AND name !~ '_$'),
  CONSTRAINT workflow_definitions_dag_is_object CHECK (jsonb_typeof(dag_schema) = 'object'),
  -- At most one active version per name, checked at commit so that the runbook's section 6
  -- statement (insert the new active row and deactivate the old one at once) succeeds.
  CONSTRAINT workflow_definitions_one_active_version
    EXCLUDE USING btree (name WITH =) WHERE (is_active) DEFERRABLE INITIALLY DEFERRED
);

-- A version is immutable: only is_active and description may change, and an UPDATE that leaves
-- dag_schema identical is allowed (so the runbook's section 1 upsert re-runs cleanly).
CREATE FUNCTION lifecycle_guard_definition_update() RETURNS trigger
LANGUAGE plpgsql
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

CREATE TRIGGER workflow_definitions_immutable
  BEFORE UPDATE ON workflow_definitions
  FOR EACH ROW EXECUTE FUNCTION lifecycle_guard_definition_update();

-- ---------------------------------------------------------------------------------------------
CREATE TABLE workflow_executions (
  id                     uuid        NOT NULL DEFAULT gen_random_uuid(),
  workflow_definition_id uuid        NOT NULL,
  status                 text        NOT NULL DEFAULT 'pending',
  current_stage          text,
  context                jsonb       NOT NULL DEFAULT '{}'::jsonb,
  circuit_breaker_state  jsonb,
  error_message          text,
  created_by             uuid,
  created_at             timestamptz NOT NULL DEFAULT now(),
  updated_at             timestamptz NOT NULL DEFAULT now(),
  dagster_run_id         text,
  CONSTRAINT workflow_executions_pkey PRIMARY KEY (id),
  CONSTRAINT workflow_executions_definition_fkey FOREIGN KEY (workflow_definition_id)
    REFERENCES workflow_definitions (id),
  CONSTRAINT workflow_executions_dagster_run_id_key UNIQUE (dagster_run_id),
  CONSTRAINT workflow_executions_status_valid CHECK (status IN (
    'pending', 'in_progress', 'completed', 'failed', 'cancelled',
    'compensating', 'rolled_back', 'compensation_failed')),
  CONSTRAINT workflow_executions_context_is_object CHECK (jsonb_typeof(context) = 'object')
);

CREATE INDEX workflow_executions_definition_idx ON workflow_executions (workflow_definition_id);
CREATE INDEX workflow_executions_unfinished_idx ON workflow_executions (status, created_at)
  WHERE status NOT IN ('completed', 'rolled_back', 'compensation_failed');

CREATE TRIGGER workflow_executions_transition
  BEFORE UPDATE OF status ON workflow_executions
  FOR EACH ROW EXECUTE FUNCTION lifecycle_guard_transition('execution');

-- An execution starts its life as pending (launched by the engine) or in_progress (the runbook's
-- section 8 drives stages by hand).
CREATE FUNCTION lifecycle_guard_execution_insert() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
  IF NEW.status NOT IN ('pending', 'in_progress') THEN
    RAISE EXCEPTION 'a workflow execution must be inserted as pending or in_progress, not %', NEW.status
      USING ERRCODE = 'check_violation';
  END IF;
  RETURN NEW;
END
$$;

CREATE TRIGGER workflow_executions_insert_status
  BEFORE INSERT ON workflow_executions
  FOR EACH ROW EXECUTE FUNCTION lifecycle_guard_execution_insert();

-- ---------------------------------------------------------------------------------------------
CREATE TABLE workflow_execution_logs (
  id             uuid        NOT NULL DEFAULT gen_random_uuid(),
  execution_id   uuid        NOT NULL,
  stage_id       text        NOT NULL,
  status         text        NOT NULL DEFAULT 'pending',
  attempt_number integer     NOT NULL DEFAULT 1,
  started_at     timestamptz,
  completed_at   timestamptz,
  input_data     jsonb,
  output_data    jsonb,
  error_message  text,
  CONSTRAINT workflow_execution_logs_pkey PRIMARY KEY (id),
  CONSTRAINT workflow_execution_logs_execution_fkey FOREIGN KEY (execution_id)
    REFERENCES workflow_executions (id) ON DELETE CASCADE,
  CONSTRAINT workflow_execution_logs_one_per_stage UNIQUE (execution_id, stage_id),
  CONSTRAINT workflow_execution_logs_status_valid CHECK (status IN (
    'pending', 'in_progress', 'completed', 'failed', 'skipped',
    'compensated', 'compensation_failed')),
  CONSTRAINT workflow_execution_logs_attempt_positive CHECK (attempt_number >= 1),
  CONSTRAINT workflow_execution_logs_completed_after_started
    CHECK (completed_at IS NULL OR started_at IS NULL OR completed_at >= started_at)
);

CREATE TRIGGER workflow_execution_logs_transition
  BEFORE UPDATE OF status ON workflow_execution_logs
  FOR EACH ROW EXECUTE FUNCTION lifecycle_guard_transition('stage');

CREATE FUNCTION lifecycle_guard_stage_insert() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
  -- the runbook's section 8 inserts a completed log directly; compensation states are only
  -- ever reached from completed.
  IF NEW.status NOT IN ('pending', 'in_progress', 'completed', 'failed', 'skipped') THEN
    RAISE EXCEPTION 'a stage log cannot be inserted as % (stage %)', NEW.status, NEW.stage_id
      USING ERRCODE = 'check_violation';
  END IF;
  RETURN NEW;
END
$$;

CREATE TRIGGER workflow_execution_logs_insert_status
  BEFORE INSERT ON workflow_execution_logs
  FOR EACH ROW EXECUTE FUNCTION lifecycle_guard_stage_insert();

-- ---------------------------------------------------------------------------------------------
-- Events. execution_id is NULL for events that belong to no execution (breaker transitions,
-- publishes). The append-only guard and hash chain come with the audit migration.
CREATE TABLE workflow_events (
  id           bigint      GENERATED ALWAYS AS IDENTITY,
  execution_id uuid,
  event_type   text        NOT NULL,
  stage_id     text,
  metadata     jsonb       NOT NULL DEFAULT '{}'::jsonb,
  "timestamp"  timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT workflow_events_pkey PRIMARY KEY (id),
  CONSTRAINT workflow_events_execution_fkey FOREIGN KEY (execution_id)
    REFERENCES workflow_executions (id),
  CONSTRAINT workflow_events_event_type_valid CHECK (event_type ~ '^[a-z][a-z0-9_]{0,62}$')
);

CREATE INDEX workflow_events_execution_idx ON workflow_events (execution_id, id);

-- ---------------------------------------------------------------------------------------------
CREATE TABLE agents (
  id          uuid        NOT NULL DEFAULT gen_random_uuid(),
  name        text        NOT NULL,
  description text,
  kind        text        NOT NULL DEFAULT 'python',
  config      jsonb       NOT NULL DEFAULT '{}'::jsonb,
  is_active   boolean     NOT NULL DEFAULT true,
  created_at  timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT agents_pkey PRIMARY KEY (id),
  CONSTRAINT agents_name_key UNIQUE (name),
  CONSTRAINT agents_name_not_blank CHECK (btrim(name) <> ''),
  CONSTRAINT agents_kind_valid CHECK (kind IN ('python', 'http', 'queue'))
);

CREATE TABLE agent_ontologies (
  id         uuid        NOT NULL DEFAULT gen_random_uuid(),
  agent_id   uuid        NOT NULL,
  domain     text        NOT NULL,
  knowledge  jsonb       NOT NULL DEFAULT '{}'::jsonb,
  version    integer     NOT NULL DEFAULT 1,
  created_at timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT agent_ontologies_pkey PRIMARY KEY (id),
  CONSTRAINT agent_ontologies_agent_fkey FOREIGN KEY (agent_id)
    REFERENCES agents (id) ON DELETE CASCADE,
  CONSTRAINT agent_ontologies_agent_id_domain_version_key UNIQUE (agent_id, domain, version),
  CONSTRAINT agent_ontologies_version_positive CHECK (version >= 1)
);

-- routing looks agents up by the capability they declare in the orchestration domain
CREATE INDEX agent_ontologies_capability_idx
  ON agent_ontologies ((knowledge ->> 'capability')) WHERE domain = 'orchestration';

-- ---------------------------------------------------------------------------------------------
CREATE TABLE task_queue (
  id                    uuid        NOT NULL DEFAULT gen_random_uuid(),
  workflow_execution_id uuid,
  task_type             text        NOT NULL,
  input_data            jsonb,
  status                text        NOT NULL DEFAULT 'pending',
  agent_id              uuid,
  stage_log_id          uuid,
  attempt               integer     NOT NULL DEFAULT 1,
  output_data           jsonb,
  error_message         text,
  created_at            timestamptz NOT NULL DEFAULT now(),
  updated_at            timestamptz NOT NULL DEFAULT now(),
  started_at            timestamptz,
  completed_at          timestamptz,
  CONSTRAINT task_queue_pkey PRIMARY KEY (id),
  CONSTRAINT task_queue_execution_fkey FOREIGN KEY (workflow_execution_id)
    REFERENCES workflow_executions (id) ON DELETE CASCADE,
  CONSTRAINT task_queue_agent_fkey FOREIGN KEY (agent_id) REFERENCES agents (id),
  CONSTRAINT task_queue_stage_log_fkey FOREIGN KEY (stage_log_id)
    REFERENCES workflow_execution_logs (id) ON DELETE CASCADE,
  CONSTRAINT task_queue_status_valid CHECK (status IN (
    'pending', 'in_progress', 'completed', 'failed', 'cancelled')),
  CONSTRAINT task_queue_attempt_positive CHECK (attempt >= 1),
  -- one dispatch per attempt of a stage
  CONSTRAINT task_queue_one_per_attempt UNIQUE (stage_log_id, attempt)
);

CREATE INDEX task_queue_execution_idx ON task_queue (workflow_execution_id);
CREATE INDEX task_queue_pending_idx ON task_queue (created_at) WHERE status = 'pending';

CREATE TRIGGER task_queue_transition
  BEFORE UPDATE OF status ON task_queue
  FOR EACH ROW EXECUTE FUNCTION lifecycle_guard_transition('task');
