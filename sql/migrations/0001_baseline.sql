-- 0001_baseline: the tables of the orchestration schema, their constraints and indexes, and the
-- state machine's rows. Functions, views, triggers, policies and privileges are NOT here: each is
-- written once under sql/schema/ and applied after the migrations (see sql/README.md).
--
-- The runbook's seven tables keep their names in schema public (users' SQL calls them); our own
-- tables live in schema lifecycle. Statuses are text + named CHECK constraints; legal status
-- changes are the rows of lifecycle.transitions (a trigger refuses every other change).
-- This file was squashed from the 15 migrations developed before the first release.

-- Supabase's roles; created NOLOGIN on plain Postgres (cluster-wide, so another database migrating
-- at the same moment may create them first).
DO $roles$
DECLARE
  v_role text;
BEGIN
  FOREACH v_role IN ARRAY ARRAY['anon', 'authenticated', 'service_role'] LOOP
    IF NOT EXISTS (SELECT FROM pg_roles r WHERE r.rolname = v_role) THEN
      BEGIN
        EXECUTE format('CREATE ROLE %I NOLOGIN', v_role);
      EXCEPTION
        WHEN duplicate_object OR unique_violation THEN
          NULL;  -- created concurrently by another migrating database: it exists, which is all we need
        WHEN insufficient_privilege THEN
          RAISE EXCEPTION '0001_baseline: role % does not exist and % may not create it', v_role, current_user
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'as an administrator: CREATE ROLE anon NOLOGIN; CREATE ROLE authenticated NOLOGIN; '
                         'CREATE ROLE service_role NOLOGIN; then run lifecycle-dagster db upgrade again';
      END;
    END IF;
  END LOOP;
END
$roles$;

-- auth.uid(): the runbook writes created_by = auth.uid(). On Supabase the real function exists
-- and is kept; on plain Postgres a shim returns the `sub` claim of the request.jwt.claims
-- setting (as PostgREST sets it), or NULL. It is Supabase's function, not ours: the one function
-- defined in a migration.
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

-- auth.uid() is called by the policies and by a column default, as the client's role: the roles
-- need USAGE on schema auth and EXECUTE on it (Supabase grants both already).
DO $auth$
DECLARE
  v_role text;
BEGIN
  FOREACH v_role IN ARRAY ARRAY['anon', 'authenticated', 'service_role'] LOOP
    BEGIN
      IF NOT has_schema_privilege(v_role, 'auth', 'USAGE') THEN
        EXECUTE format('GRANT USAGE ON SCHEMA auth TO %I', v_role);
      END IF;
      IF NOT has_function_privilege(v_role, 'auth.uid()', 'EXECUTE') THEN
        EXECUTE format('GRANT EXECUTE ON FUNCTION auth.uid() TO %I', v_role);
      END IF;
    EXCEPTION WHEN insufficient_privilege THEN
      RAISE EXCEPTION '0001_baseline: role % cannot call auth.uid() and % may not grant it', v_role, current_user
        USING ERRCODE = 'insufficient_privilege',
              HINT = format('as the owner of schema auth: GRANT USAGE ON SCHEMA auth TO %I; '
                            'GRANT EXECUTE ON FUNCTION auth.uid() TO %I', v_role, v_role);
    END;
  END LOOP;
END
$auth$;

CREATE SCHEMA IF NOT EXISTS lifecycle;
REVOKE ALL ON SCHEMA lifecycle FROM PUBLIC;
GRANT USAGE ON SCHEMA lifecycle TO service_role;

CREATE TYPE lifecycle.dag_problem AS (
	code text,
	stages text[],
	path text,
	message text
);

CREATE TABLE public.workflow_executions (
    id uuid DEFAULT gen_random_uuid() NOT NULL,
    workflow_definition_id uuid NOT NULL,
    status text DEFAULT 'pending'::text NOT NULL,
    current_stage text,
    context jsonb DEFAULT '{}'::jsonb NOT NULL,
    circuit_breaker_state jsonb,
    error_message text,
    created_by uuid DEFAULT auth.uid(),
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    updated_at timestamp with time zone DEFAULT now() NOT NULL,
    dagster_run_id text,
    heartbeat_at timestamp with time zone,
    compensation_run_id text,
    pending_reason text,
    CONSTRAINT workflow_executions_context_is_object CHECK ((jsonb_typeof(context) = 'object'::text)),
    CONSTRAINT workflow_executions_status_valid CHECK ((status = ANY (ARRAY['pending'::text, 'in_progress'::text, 'completed'::text, 'failed'::text, 'cancelled'::text, 'compensating'::text, 'rolled_back'::text, 'compensation_failed'::text])))
);

CREATE TABLE public.workflow_execution_logs (
    id uuid DEFAULT gen_random_uuid() NOT NULL,
    execution_id uuid NOT NULL,
    stage_id text NOT NULL,
    status text DEFAULT 'pending'::text NOT NULL,
    attempt_number integer DEFAULT 1 NOT NULL,
    started_at timestamp with time zone,
    completed_at timestamp with time zone,
    input_data jsonb,
    output_data jsonb,
    error_message text,
    not_before timestamp with time zone,
    CONSTRAINT workflow_execution_logs_attempt_positive CHECK ((attempt_number >= 1)),
    CONSTRAINT workflow_execution_logs_completed_after_started CHECK (((completed_at IS NULL) OR (started_at IS NULL) OR (completed_at >= started_at))),
    CONSTRAINT workflow_execution_logs_status_valid CHECK ((status = ANY (ARRAY['pending'::text, 'in_progress'::text, 'completed'::text, 'failed'::text, 'skipped'::text, 'compensated'::text, 'compensation_failed'::text])))
);

CREATE TABLE public.task_queue (
    id uuid DEFAULT gen_random_uuid() NOT NULL,
    workflow_execution_id uuid,
    task_type text NOT NULL,
    input_data jsonb,
    status text DEFAULT 'pending'::text NOT NULL,
    agent_id uuid,
    stage_log_id uuid,
    attempt integer DEFAULT 1 NOT NULL,
    output_data jsonb,
    error_message text,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    updated_at timestamp with time zone DEFAULT now() NOT NULL,
    started_at timestamp with time zone,
    completed_at timestamp with time zone,
    not_before timestamp with time zone,
    deadline_at timestamp with time zone,
    capability text,
    lease_token bigint DEFAULT 0 NOT NULL,
    lease_expires_at timestamp with time zone,
    claimed_by text,
    max_attempts integer,
    priority integer DEFAULT 0 NOT NULL,
    error_code text,
    retryable boolean,
    retry_after_s double precision,
    CONSTRAINT task_queue_attempt_positive CHECK ((attempt >= 1)),
    CONSTRAINT task_queue_lease_token_not_negative CHECK ((lease_token >= 0)),
    CONSTRAINT task_queue_max_attempts_positive CHECK (((max_attempts IS NULL) OR (max_attempts >= 1))),
    CONSTRAINT task_queue_status_valid CHECK ((status = ANY (ARRAY['pending'::text, 'in_progress'::text, 'completed'::text, 'failed'::text, 'cancelled'::text])))
);

CREATE TABLE public.agent_ontologies (
    id uuid DEFAULT gen_random_uuid() NOT NULL,
    agent_id uuid NOT NULL,
    domain text NOT NULL,
    knowledge jsonb DEFAULT '{}'::jsonb NOT NULL,
    version integer DEFAULT 1 NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT agent_ontologies_version_positive CHECK ((version >= 1))
);

CREATE TABLE public.agents (
    id uuid DEFAULT gen_random_uuid() NOT NULL,
    name text NOT NULL,
    description text,
    kind text DEFAULT 'python'::text NOT NULL,
    config jsonb DEFAULT '{}'::jsonb NOT NULL,
    is_active boolean DEFAULT true NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT agents_kind_valid CHECK ((kind = ANY (ARRAY['python'::text, 'http'::text, 'queue'::text]))),
    CONSTRAINT agents_name_not_blank CHECK ((btrim(name) <> ''::text))
);

CREATE TABLE lifecycle.adoption_rejects (
    id bigint NOT NULL,
    table_name text NOT NULL,
    row_id text NOT NULL,
    rule text NOT NULL,
    message text NOT NULL,
    sqlstate text NOT NULL,
    row_data jsonb NOT NULL,
    recorded_at timestamp with time zone DEFAULT now() NOT NULL
);

ALTER TABLE lifecycle.adoption_rejects ALTER COLUMN id ADD GENERATED ALWAYS AS IDENTITY (
    SEQUENCE NAME lifecycle.adoption_rejects_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);

CREATE TABLE lifecycle.artifacts (
    id bigint NOT NULL,
    execution_id uuid NOT NULL,
    stage_id text NOT NULL,
    kind text NOT NULL,
    key text NOT NULL,
    data jsonb DEFAULT '{}'::jsonb NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    voided_at timestamp with time zone,
    voided_reason text,
    CONSTRAINT lifecycle_artifacts_void_has_reason CHECK (((voided_at IS NULL) = (voided_reason IS NULL)))
);

ALTER TABLE lifecycle.artifacts ALTER COLUMN id ADD GENERATED ALWAYS AS IDENTITY (
    SEQUENCE NAME lifecycle.artifacts_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);

CREATE TABLE lifecycle.audit_checkpoints (
    id bigint NOT NULL,
    execution_id uuid,
    last_event_id bigint NOT NULL,
    last_hash text,
    events_pruned bigint NOT NULL,
    cutoff timestamp with time zone NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL
);

ALTER TABLE lifecycle.audit_checkpoints ALTER COLUMN id ADD GENERATED ALWAYS AS IDENTITY (
    SEQUENCE NAME lifecycle.audit_checkpoints_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);

CREATE TABLE lifecycle.breaker_outcomes (
    id bigint NOT NULL,
    scope text NOT NULL,
    key text NOT NULL,
    at timestamp with time zone NOT NULL,
    success boolean NOT NULL,
    latency_ms double precision,
    task_id uuid,
    error_code text,
    CONSTRAINT lifecycle_breaker_outcomes_latency_valid CHECK (((latency_ms IS NULL) OR ((latency_ms >= (0)::double precision) AND (latency_ms < 'Infinity'::double precision))))
);

ALTER TABLE lifecycle.breaker_outcomes ALTER COLUMN id ADD GENERATED ALWAYS AS IDENTITY (
    SEQUENCE NAME lifecycle.breaker_outcomes_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);

CREATE TABLE lifecycle.breakers (
    scope text NOT NULL,
    key text NOT NULL,
    state text DEFAULT 'closed'::text NOT NULL,
    state_since timestamp with time zone,
    opened_at timestamp with time zone,
    probes_left integer DEFAULT 0 NOT NULL,
    probe_at timestamp with time zone,
    updated_at timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT lifecycle_breakers_open_has_opened_at CHECK (((state = 'closed'::text) OR (opened_at IS NOT NULL))),
    CONSTRAINT lifecycle_breakers_probes_not_negative CHECK ((probes_left >= 0)),
    CONSTRAINT lifecycle_breakers_scope_valid CHECK ((scope = ANY (ARRAY['agent'::text, 'capability'::text]))),
    CONSTRAINT lifecycle_breakers_state_valid CHECK ((state = ANY (ARRAY['closed'::text, 'open'::text, 'half_open'::text])))
);

CREATE TABLE lifecycle.schema_fingerprints (
    kind text NOT NULL,
    object text NOT NULL,
    md5 text NOT NULL,
    recorded_at timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT lifecycle_schema_fingerprints_kind_valid CHECK ((kind = ANY (ARRAY['function'::text, 'view'::text, 'table'::text, 'trigger'::text, 'policy'::text, 'privileges'::text])))
);

CREATE TABLE lifecycle.transitions (
    entity text NOT NULL,
    from_status text NOT NULL,
    to_status text NOT NULL,
    CONSTRAINT lifecycle_transitions_entity_valid CHECK ((entity = ANY (ARRAY['execution'::text, 'stage'::text, 'task'::text])))
);

CREATE TABLE public.workflow_definitions (
    id uuid DEFAULT gen_random_uuid() NOT NULL,
    name text NOT NULL,
    description text,
    version integer DEFAULT 1 NOT NULL,
    dag_schema jsonb NOT NULL,
    is_active boolean DEFAULT false NOT NULL,
    created_by uuid,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT workflow_definitions_dag_is_object CHECK ((jsonb_typeof(dag_schema) = 'object'::text)),
    CONSTRAINT workflow_definitions_name_valid CHECK (((name ~ '^[a-z][a-z0-9_]{0,62}$'::text) AND (name !~ '__'::text) AND (name !~ '_$'::text))),
    CONSTRAINT workflow_definitions_version_positive CHECK ((version >= 1))
);

CREATE TABLE public.workflow_events (
    id bigint NOT NULL,
    execution_id uuid,
    event_type text NOT NULL,
    stage_id text,
    metadata jsonb DEFAULT '{}'::jsonb NOT NULL,
    "timestamp" timestamp with time zone DEFAULT now() NOT NULL,
    prev_hash text,
    hash text,
    CONSTRAINT workflow_events_event_type_valid CHECK ((event_type ~ '^[a-z][a-z0-9_]{0,62}$'::text))
);

ALTER TABLE public.workflow_events ALTER COLUMN id ADD GENERATED ALWAYS AS IDENTITY (
    SEQUENCE NAME public.workflow_events_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);

ALTER TABLE ONLY public.agent_ontologies
    ADD CONSTRAINT agent_ontologies_agent_id_domain_version_key UNIQUE (agent_id, domain, version);

ALTER TABLE ONLY public.agent_ontologies
    ADD CONSTRAINT agent_ontologies_pkey PRIMARY KEY (id);

ALTER TABLE ONLY public.agents
    ADD CONSTRAINT agents_name_key UNIQUE (name);

ALTER TABLE ONLY public.agents
    ADD CONSTRAINT agents_pkey PRIMARY KEY (id);

ALTER TABLE ONLY lifecycle.adoption_rejects
    ADD CONSTRAINT lifecycle_adoption_rejects_pkey PRIMARY KEY (id);

ALTER TABLE ONLY lifecycle.artifacts
    ADD CONSTRAINT lifecycle_artifacts_one_per_key UNIQUE (execution_id, stage_id, kind, key);

ALTER TABLE ONLY lifecycle.artifacts
    ADD CONSTRAINT lifecycle_artifacts_pkey PRIMARY KEY (id);

ALTER TABLE ONLY lifecycle.audit_checkpoints
    ADD CONSTRAINT lifecycle_audit_checkpoints_pkey PRIMARY KEY (id);

ALTER TABLE ONLY lifecycle.breaker_outcomes
    ADD CONSTRAINT lifecycle_breaker_outcomes_one_per_task UNIQUE (scope, key, task_id);

ALTER TABLE ONLY lifecycle.breaker_outcomes
    ADD CONSTRAINT lifecycle_breaker_outcomes_pkey PRIMARY KEY (id);

ALTER TABLE ONLY lifecycle.breakers
    ADD CONSTRAINT lifecycle_breakers_pkey PRIMARY KEY (scope, key);

ALTER TABLE ONLY lifecycle.schema_fingerprints
    ADD CONSTRAINT lifecycle_schema_fingerprints_pkey PRIMARY KEY (kind, object);

ALTER TABLE ONLY lifecycle.transitions
    ADD CONSTRAINT lifecycle_transitions_pkey PRIMARY KEY (entity, from_status, to_status);

ALTER TABLE ONLY public.task_queue
    ADD CONSTRAINT task_queue_pkey PRIMARY KEY (id);

ALTER TABLE ONLY public.workflow_definitions
    ADD CONSTRAINT workflow_definitions_name_version_key UNIQUE (name, version);

ALTER TABLE ONLY public.workflow_definitions
    ADD CONSTRAINT workflow_definitions_one_active_version EXCLUDE USING btree (name WITH =) WHERE (is_active) DEFERRABLE INITIALLY DEFERRED;

ALTER TABLE ONLY public.workflow_definitions
    ADD CONSTRAINT workflow_definitions_pkey PRIMARY KEY (id);

ALTER TABLE ONLY public.workflow_events
    ADD CONSTRAINT workflow_events_pkey PRIMARY KEY (id);

ALTER TABLE ONLY public.workflow_execution_logs
    ADD CONSTRAINT workflow_execution_logs_one_per_stage UNIQUE (execution_id, stage_id);

ALTER TABLE ONLY public.workflow_execution_logs
    ADD CONSTRAINT workflow_execution_logs_pkey PRIMARY KEY (id);

ALTER TABLE ONLY public.workflow_executions
    ADD CONSTRAINT workflow_executions_dagster_run_id_key UNIQUE (dagster_run_id);

ALTER TABLE ONLY public.workflow_executions
    ADD CONSTRAINT workflow_executions_pkey PRIMARY KEY (id);

CREATE INDEX agent_ontologies_capability_idx ON public.agent_ontologies USING btree (((knowledge ->> 'capability'::text))) WHERE (domain = 'orchestration'::text);

CREATE INDEX lifecycle_artifacts_live_idx ON lifecycle.artifacts USING btree (execution_id, stage_id) WHERE (voided_at IS NULL);

CREATE INDEX lifecycle_audit_checkpoints_stream_idx ON lifecycle.audit_checkpoints USING btree (execution_id, id);

CREATE INDEX lifecycle_breaker_outcomes_failures_idx ON lifecycle.breaker_outcomes USING btree (scope, key, at) WHERE (NOT success);

CREATE INDEX lifecycle_breaker_outcomes_window_idx ON lifecycle.breaker_outcomes USING btree (scope, key, at);

CREATE INDEX task_queue_agent_in_flight_idx ON public.task_queue USING btree (agent_id) WHERE (status = 'in_progress'::text);

CREATE INDEX task_queue_claimable_idx ON public.task_queue USING btree (capability, priority DESC, created_at) WHERE (status = 'pending'::text);

CREATE INDEX task_queue_execution_idx ON public.task_queue USING btree (workflow_execution_id);

CREATE INDEX task_queue_leased_idx ON public.task_queue USING btree (lease_expires_at) WHERE (status = 'in_progress'::text);

CREATE UNIQUE INDEX task_queue_one_per_stage_attempt ON public.task_queue USING btree (workflow_execution_id, task_type, attempt) WHERE (workflow_execution_id IS NOT NULL);

CREATE INDEX task_queue_pending_idx ON public.task_queue USING btree (created_at) WHERE (status = 'pending'::text);

CREATE INDEX task_queue_stage_log_idx ON public.task_queue USING btree (stage_log_id);

CREATE INDEX workflow_events_execution_idx ON public.workflow_events USING btree (execution_id, id);

CREATE INDEX workflow_events_timestamp_idx ON public.workflow_events USING btree ("timestamp" DESC, id DESC);

CREATE INDEX workflow_executions_definition_idx ON public.workflow_executions USING btree (workflow_definition_id);

CREATE INDEX workflow_executions_launchable_idx ON public.workflow_executions USING btree (created_at) WHERE ((status = 'pending'::text) AND (dagster_run_id IS NULL));

CREATE INDEX workflow_executions_unfinished_idx ON public.workflow_executions USING btree (status, created_at) WHERE (status <> ALL (ARRAY['completed'::text, 'rolled_back'::text, 'compensation_failed'::text]));

ALTER TABLE ONLY public.agent_ontologies
    ADD CONSTRAINT agent_ontologies_agent_fkey FOREIGN KEY (agent_id) REFERENCES public.agents(id) ON DELETE CASCADE;

ALTER TABLE ONLY lifecycle.artifacts
    ADD CONSTRAINT lifecycle_artifacts_execution_fkey FOREIGN KEY (execution_id) REFERENCES public.workflow_executions(id) ON DELETE CASCADE;

ALTER TABLE ONLY lifecycle.breaker_outcomes
    ADD CONSTRAINT lifecycle_breaker_outcomes_breaker_fkey FOREIGN KEY (scope, key) REFERENCES lifecycle.breakers(scope, key) ON DELETE CASCADE;

ALTER TABLE ONLY public.task_queue
    ADD CONSTRAINT task_queue_agent_fkey FOREIGN KEY (agent_id) REFERENCES public.agents(id);

ALTER TABLE ONLY public.task_queue
    ADD CONSTRAINT task_queue_execution_fkey FOREIGN KEY (workflow_execution_id) REFERENCES public.workflow_executions(id) ON DELETE CASCADE;

ALTER TABLE ONLY public.task_queue
    ADD CONSTRAINT task_queue_stage_log_fkey FOREIGN KEY (stage_log_id) REFERENCES public.workflow_execution_logs(id) ON DELETE CASCADE;

ALTER TABLE ONLY public.workflow_events
    ADD CONSTRAINT workflow_events_execution_fkey FOREIGN KEY (execution_id) REFERENCES public.workflow_executions(id);

ALTER TABLE ONLY public.workflow_execution_logs
    ADD CONSTRAINT workflow_execution_logs_execution_fkey FOREIGN KEY (execution_id) REFERENCES public.workflow_executions(id) ON DELETE CASCADE;

ALTER TABLE ONLY public.workflow_executions
    ADD CONSTRAINT workflow_executions_definition_fkey FOREIGN KEY (workflow_definition_id) REFERENCES public.workflow_definitions(id);

INSERT INTO lifecycle.transitions VALUES
	('execution', 'pending', 'in_progress'),
	('execution', 'pending', 'cancelled'),
	('execution', 'in_progress', 'completed'),
	('execution', 'in_progress', 'failed'),
	('execution', 'in_progress', 'cancelled'),
	('execution', 'failed', 'compensating'),
	('execution', 'failed', 'in_progress'),
	('execution', 'cancelled', 'compensating'),
	('execution', 'compensating', 'rolled_back'),
	('execution', 'compensating', 'compensation_failed'),
	('stage', 'pending', 'in_progress'),
	('stage', 'pending', 'skipped'),
	('stage', 'in_progress', 'completed'),
	('stage', 'in_progress', 'failed'),
	('stage', 'in_progress', 'pending'),
	('stage', 'in_progress', 'skipped'),
	('stage', 'failed', 'pending'),
	('stage', 'completed', 'compensated'),
	('stage', 'completed', 'compensation_failed'),
	('task', 'pending', 'in_progress'),
	('task', 'pending', 'cancelled'),
	('task', 'in_progress', 'completed'),
	('task', 'in_progress', 'failed'),
	('task', 'in_progress', 'pending'),
	('task', 'in_progress', 'cancelled');
