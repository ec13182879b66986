-- 0011_security: Supabase row-level security, SECURITY DEFINER state changes, an operator's
-- breaker reset, and fingerprints of the shipped schema (lifecycle-dagster doctor).
--
-- This is the LAST migration: it covers every table, view and function of ours that exists after
-- 0001-0010, enumerated from the catalog. A later migration that adds or replaces objects must
-- repeat the grants it needs and end with SELECT lifecycle_record_schema_fingerprints().
--
-- "Ours": in schema public, tables and views named workflow_*, lifecycle_*, agents,
-- agent_ontologies, task_queue; functions named lifecycle_*, workflow_* and the runbook's
-- perform_workflow_compensation, retry_stage, trip_circuit_breaker. Other objects in public (a
-- Supabase project's own tables) are left alone.
--
-- Who sees what (Supabase's roles; created NOLOGIN on plain Postgres):
--   * the engine's own role owns the tables and bypasses RLS as their owner (RLS is not FORCEd);
--   * service_role: everything (policies TO service_role USING (true) WITH CHECK (true), ALL);
--   * authenticated: reads its own executions (created_by = auth.uid()), their stage logs, events
--     and tasks, and the active definitions; inserts an execution of an active definition, as
--     pending, for itself (created_by defaults to auth.uid()); nothing else: no updates, no
--     deletes, no agents, ontologies or breakers;
--   * anon: nothing (no privileges at all);
--   * state changes go through SECURITY DEFINER functions (fixed search_path) that only
--     service_role and the owner may execute: Supabase exposes public functions as RPC.

-- ---------------------------------------------------------------------------------------------
-- Roles: Supabase has them; on plain Postgres they are created (cluster-wide, so another database
-- migrating at the same moment may create them first).
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
          RAISE EXCEPTION '0011_security: role % does not exist and % may not create it', v_role, current_user
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'as an administrator: CREATE ROLE anon NOLOGIN; CREATE ROLE authenticated NOLOGIN; '
                         'CREATE ROLE service_role NOLOGIN; then run lifecycle-dagster db upgrade again';
      END;
    END IF;
  END LOOP;
END
$roles$;

-- auth.uid() (Supabase's, or 0001's shim) is called by the policies and by a column default, as
-- the client's role: the roles need USAGE on schema auth and EXECUTE on it. Supabase grants both
-- already (and its auth schema is not ours to grant on): only what is missing is granted.
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
      RAISE EXCEPTION '0011_security: role % cannot call auth.uid() and % may not grant it', v_role, current_user
        USING ERRCODE = 'insufficient_privilege',
              HINT = format('as the owner of schema auth: GRANT USAGE ON SCHEMA auth TO %I; '
                            'GRANT EXECUTE ON FUNCTION auth.uid() TO %I', v_role, v_role);
    END;
  END LOOP;
END
$auth$;

-- A client's insert without created_by records its user (NULL for the engine, which has no JWT).
ALTER TABLE workflow_executions ALTER COLUMN created_by SET DEFAULT auth.uid();

-- ---------------------------------------------------------------------------------------------
-- Operators: close an agent's breaker by hand (lifecycle-dagster breakers --reset AGENT). An open
-- or half-open breaker closes now, its count starting afresh, with a breaker_closed event whose
-- reason is 'reset'. Returns the state it had: 'closed' means there was nothing to reset (no
-- event). An unknown agent is an error.
CREATE FUNCTION lifecycle_breaker_reset(p_agent_name text, p_now timestamptz DEFAULT now())
RETURNS text
LANGUAGE plpgsql
AS $$
DECLARE
  v_agent      agents;
  v_b          lifecycle_breakers;
  v_capability text;
BEGIN
  -- GUARD: the agent
  SELECT * INTO v_agent FROM agents a WHERE a.name = p_agent_name;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'lifecycle_breaker_reset: unknown agent %', coalesce(quote_literal(p_agent_name), 'NULL')
      USING ERRCODE = 'no_data_found',
            HINT = 'agent names are agents.name (lifecycle-dagster breakers lists them)';
  END IF;

  -- LOCK: the breaker row
  SELECT * INTO v_b FROM lifecycle_breakers b
   WHERE b.scope = 'agent' AND b.key = v_agent.id::text FOR UPDATE;
  IF NOT FOUND OR v_b.state = 'closed' THEN
    RETURN 'closed';
  END IF;

  -- TRANSITION: -> closed, counting afresh from now
  UPDATE lifecycle_breakers b
     SET state = 'closed', state_since = p_now, probes_left = 0, probe_at = NULL, updated_at = p_now
   WHERE b.scope = 'agent' AND b.key = v_agent.id::text;
  SELECT latest.knowledge ->> 'capability' INTO v_capability
  FROM (SELECT o.knowledge FROM agent_ontologies o
        WHERE o.agent_id = v_agent.id AND o.domain = 'orchestration'
        ORDER BY o.version DESC LIMIT 1) latest;
  INSERT INTO workflow_events (execution_id, event_type, metadata, "timestamp")
  VALUES (NULL, 'breaker_closed',
          jsonb_build_object('scope', 'agent', 'key', v_agent.id::text, 'agent', v_agent.name,
                             'capability', v_capability, 'from', v_b.state, 'reason', 'reset',
                             'opened_at', v_b.opened_at),
          p_now);
  RETURN v_b.state;
END
$$;

-- ---------------------------------------------------------------------------------------------
-- Fingerprints of the schema as shipped, recorded at the end of this migration: doctor recomputes
-- lifecycle_schema_catalog() and lists every difference (a function body or signature replaced,
-- an extra overload, a view redefined, RLS turned off, privileges changed). search_path is fixed
-- so that names print the same whoever asks.
CREATE TABLE lifecycle_schema_fingerprints (
  kind        text        NOT NULL,
  object      text        NOT NULL,
  md5         text        NOT NULL,
  recorded_at timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT lifecycle_schema_fingerprints_pkey PRIMARY KEY (kind, object),
  CONSTRAINT lifecycle_schema_fingerprints_kind_valid
    CHECK (kind IN ('function', 'view', 'table', 'trigger', 'policy', 'privileges'))
);

CREATE FUNCTION lifecycle_schema_catalog()
RETURNS TABLE (kind text, object text, md5 text)
LANGUAGE sql STABLE
SET search_path = public, pg_temp
AS $$
  WITH fns AS (
    SELECT p.oid, p.proacl,
           format('%s(%s)', p.proname, pg_get_function_identity_arguments(p.oid)) AS object
    FROM pg_proc p
    WHERE p.pronamespace = 'public'::regnamespace AND p.prokind IN ('f', 'p')
      AND (p.proname LIKE 'lifecycle\_%' OR p.proname LIKE 'workflow\_%'
           OR p.proname IN ('perform_workflow_compensation', 'retry_stage', 'trip_circuit_breaker'))
  ), rels AS (
    SELECT c.oid, c.relname, c.relkind, c.relacl, c.reloptions, c.relrowsecurity, c.relforcerowsecurity
    FROM pg_class c
    WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p', 'v', 'm')
      AND (c.relname LIKE 'lifecycle\_%' OR c.relname LIKE 'workflow\_%'
           OR c.relname IN ('agents', 'agent_ontologies', 'task_queue'))
  )
  SELECT 'function', f.object, md5(pg_get_functiondef(f.oid)) FROM fns f
  UNION ALL
  SELECT 'privileges', 'function ' || f.object, md5(coalesce(f.proacl::text, '')) FROM fns f
  UNION ALL
  SELECT 'view', r.relname, md5(pg_get_viewdef(r.oid) || coalesce(r.reloptions::text, ''))
  FROM rels r WHERE r.relkind IN ('v', 'm')
  UNION ALL
  SELECT 'table', r.relname, md5(format('rls=%s force=%s', r.relrowsecurity, r.relforcerowsecurity))
  FROM rels r WHERE r.relkind IN ('r', 'p')
  UNION ALL
  SELECT 'privileges', CASE WHEN r.relkind IN ('v', 'm') THEN 'view ' ELSE 'table ' END || r.relname,
         md5(coalesce(r.relacl::text, ''))
  FROM rels r
  UNION ALL
  SELECT 'trigger', format('%s on %s', t.tgname, r.relname), md5(pg_get_triggerdef(t.oid))
  FROM pg_trigger t JOIN rels r ON r.oid = t.tgrelid
  WHERE NOT t.tgisinternal
  UNION ALL
  SELECT 'policy', format('%s on %s', pol.polname, r.relname),
         md5(concat_ws(' | ', pol.polcmd, pol.polpermissive, pol.polroles::regrole[]::text,
                       pg_get_expr(pol.polqual, pol.polrelid), pg_get_expr(pol.polwithcheck, pol.polrelid)))
  FROM pg_policy pol JOIN rels r ON r.oid = pol.polrelid
$$;

-- Record the catalog as the shipped schema (the last statement of this migration, and of any later
-- one). The runbook's own 2-argument functions (sections 2-4) are never shipped: when one is there
-- already it is left out, so that doctor reports it.
CREATE FUNCTION lifecycle_record_schema_fingerprints() RETURNS integer
LANGUAGE plpgsql
AS $$
DECLARE
  v_n integer;
BEGIN
  DELETE FROM lifecycle_schema_fingerprints;
  INSERT INTO lifecycle_schema_fingerprints (kind, object, md5)
  SELECT c.kind, c.object, c.md5
  FROM lifecycle_schema_catalog() c
  WHERE NOT (c.kind IN ('function', 'privileges')
             AND regexp_replace(c.object, '^function ', '') IN (
               'perform_workflow_compensation(p_execution_id uuid, p_reason text)',
               'retry_stage(p_log_id uuid, p_max_attempts integer)',
               'trip_circuit_breaker(p_execution_id uuid, p_reason text)'));
  GET DIAGNOSTICS v_n = ROW_COUNT;
  RETURN v_n;
END
$$;

-- ---------------------------------------------------------------------------------------------
-- Tables: RLS on, no privileges for anon, SELECT for authenticated (the policies below decide
-- which rows), everything for service_role. Not FORCEd: the owner (the engine) bypasses RLS.
DO $tables$
DECLARE
  v_table regclass;
BEGIN
  FOR v_table IN
    SELECT c.oid::regclass FROM pg_class c
    WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p')
      AND (c.relname LIKE 'lifecycle\_%' OR c.relname LIKE 'workflow\_%'
           OR c.relname IN ('agents', 'agent_ontologies', 'task_queue'))
    ORDER BY c.relname
  LOOP
    EXECUTE format('ALTER TABLE %s ENABLE ROW LEVEL SECURITY', v_table);
    EXECUTE format('REVOKE ALL ON TABLE %s FROM PUBLIC, anon, authenticated', v_table);
    EXECUTE format('GRANT ALL ON TABLE %s TO service_role', v_table);
    EXECUTE format('GRANT SELECT ON TABLE %s TO authenticated', v_table);
    EXECUTE format('CREATE POLICY service_role_all ON %s AS PERMISSIVE FOR ALL TO service_role '
                   'USING (true) WITH CHECK (true)', v_table);
  END LOOP;
END
$tables$;

-- Sequences (identities): service_role only.
DO $sequences$
DECLARE
  v_seq regclass;
BEGIN
  FOR v_seq IN
    SELECT c.oid::regclass FROM pg_class c
    WHERE c.relnamespace = 'public'::regnamespace AND c.relkind = 'S'
      AND (c.relname LIKE 'lifecycle\_%' OR c.relname LIKE 'workflow\_%'
           OR c.relname LIKE 'agent\_%' OR c.relname LIKE 'agents\_%' OR c.relname LIKE 'task\_queue\_%')
  LOOP
    EXECUTE format('REVOKE ALL ON SEQUENCE %s FROM PUBLIC, anon, authenticated', v_seq);
    EXECUTE format('GRANT USAGE, SELECT, UPDATE ON SEQUENCE %s TO service_role', v_seq);
  END LOOP;
END
$sequences$;

-- Views run with the privileges and RLS of whoever queries them (security_invoker), so a view is
-- never a way around the policies. Materialized views have no RLS: service_role only.
DO $views$
DECLARE
  v record;
BEGIN
  FOR v IN
    SELECT c.oid::regclass AS view, c.relkind FROM pg_class c
    WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('v', 'm')
      AND (c.relname LIKE 'lifecycle\_%' OR c.relname LIKE 'workflow\_%')
  LOOP
    EXECUTE format('REVOKE ALL ON TABLE %s FROM PUBLIC, anon, authenticated', v.view);
    EXECUTE format('GRANT SELECT ON TABLE %s TO service_role', v.view);
    IF v.relkind = 'v' THEN
      EXECUTE format('ALTER VIEW %s SET (security_invoker = true)', v.view);
      EXECUTE format('GRANT SELECT ON TABLE %s TO authenticated', v.view);
    END IF;
  END LOOP;
END
$views$;

-- ---------------------------------------------------------------------------------------------
-- Policies for authenticated users. (SELECT auth.uid()) is evaluated once per statement.
CREATE POLICY authenticated_read_own ON workflow_executions
  AS PERMISSIVE FOR SELECT TO authenticated
  USING (created_by = (SELECT auth.uid()));

-- A user starts an execution of an active definition, for itself, as pending (the launch sensor
-- takes it from there). Only these columns may be given; the rest keep their defaults.
CREATE POLICY authenticated_insert_own ON workflow_executions
  AS PERMISSIVE FOR INSERT TO authenticated
  WITH CHECK (created_by = (SELECT auth.uid())
              AND status = 'pending'
              AND EXISTS (SELECT 1 FROM workflow_definitions d
                          WHERE d.id = workflow_definition_id AND d.is_active));
GRANT INSERT (id, workflow_definition_id, context, created_by) ON TABLE workflow_executions TO authenticated;

CREATE POLICY authenticated_read_own ON workflow_execution_logs
  AS PERMISSIVE FOR SELECT TO authenticated
  USING (EXISTS (SELECT 1 FROM workflow_executions e
                 WHERE e.id = execution_id AND e.created_by = (SELECT auth.uid())));

-- events with no execution (breakers, publishes) are service_role's
CREATE POLICY authenticated_read_own ON workflow_events
  AS PERMISSIVE FOR SELECT TO authenticated
  USING (EXISTS (SELECT 1 FROM workflow_executions e
                 WHERE e.id = execution_id AND e.created_by = (SELECT auth.uid())));

CREATE POLICY authenticated_read_own ON task_queue
  AS PERMISSIVE FOR SELECT TO authenticated
  USING (EXISTS (SELECT 1 FROM workflow_executions e
                 WHERE e.id = workflow_execution_id AND e.created_by = (SELECT auth.uid())));

-- the active definitions (to start one). Not the inactive versions an execution still runs on: a
-- policy on definitions that looked at executions would recurse into this table's insert policy.
CREATE POLICY authenticated_read_active ON workflow_definitions
  AS PERMISSIVE FOR SELECT TO authenticated
  USING (is_active);

-- ---------------------------------------------------------------------------------------------
-- State-changing functions: SECURITY DEFINER with a fixed search_path, executable by service_role
-- (and the owner) only. "State-changing": the volatile ones among lifecycle_* (trigger functions
-- included: they then check and write with the owner's rights, whoever fires them) and the
-- runbook's three. Identifiers come from the catalog (%I), never from input.
DO $definer$
DECLARE
  v_fn text;
BEGIN
  FOR v_fn IN
    SELECT format('%I(%s)', p.proname, pg_get_function_identity_arguments(p.oid))
    FROM pg_proc p
    WHERE p.pronamespace = 'public'::regnamespace AND p.prokind = 'f' AND p.provolatile = 'v'
      AND (p.proname LIKE 'lifecycle\_%'
           OR p.proname IN ('perform_workflow_compensation', 'retry_stage', 'trip_circuit_breaker'))
    ORDER BY 1
  LOOP
    EXECUTE format('ALTER FUNCTION public.%s SECURITY DEFINER SET search_path = public, pg_temp', v_fn);
    EXECUTE format('REVOKE ALL ON FUNCTION public.%s FROM PUBLIC, anon, authenticated', v_fn);
    EXECUTE format('GRANT EXECUTE ON FUNCTION public.%s TO service_role', v_fn);
  END LOOP;
END
$definer$;

-- the catalog is no one's business but the operators'
REVOKE ALL ON FUNCTION lifecycle_schema_catalog() FROM PUBLIC, anon, authenticated;
GRANT EXECUTE ON FUNCTION lifecycle_schema_catalog() TO service_role;

-- ---------------------------------------------------------------------------------------------
SELECT lifecycle_record_schema_fingerprints();
