-- 0012_schema_repair: keep, beside each fingerprint of the shipped schema (0011_security), the
-- statement that recreates the object as shipped, and restore them on demand.
--
--   lifecycle_schema_definitions   (kind, object) -> restore: the DDL that recreates the object,
--                                  or, for kind 'privileges', the shipped ACL (aclitem[] as text)
--   lifecycle_schema_drift()       what differs now from what was shipped: changed, missing, extra
--   lifecycle_repair_schema()      puts the shipped definitions back, in one transaction (the
--                                  caller's): `lifecycle-dagster db upgrade --repair`
--
-- What repair does, by kind:
--   function   CREATE OR REPLACE from pg_get_functiondef (SECURITY DEFINER and search_path come
--              with it); the runbook's own 2-argument overloads (sections 2-4) are DROPped: they
--              make 2-argument calls run the faulty body or fail as ambiguous
--   view       DROP VIEW + CREATE VIEW with the shipped options (the runbook's section 5 view has
--              other columns, so CREATE OR REPLACE cannot replace it)
--   trigger    DROP TRIGGER IF EXISTS + CREATE TRIGGER
--   policy     DROP POLICY IF EXISTS + CREATE POLICY; a policy on our tables that we did not ship
--              is dropped too (an extra permissive policy widens what a role can read)
--   table      ENABLE/DISABLE and FORCE/NO FORCE ROW LEVEL SECURITY as shipped; a missing table is
--              reported, never recreated (its rows are gone: restore from a backup)
--   privileges REVOKE ALL from PUBLIC and from every role holding a privilege now, then GRANT what
--              was shipped
-- Other objects that are not ours (a function or view of the user's whose name starts with
-- workflow_) are reported by doctor and left alone.
--
-- Identifiers and statements come from the catalog (regclass, regprocedure, %I, pg_get_*def),
-- never from input.

CREATE TABLE lifecycle_schema_definitions (
  kind        text        NOT NULL,
  object      text        NOT NULL,
  restore     text        NOT NULL,
  recorded_at timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT lifecycle_schema_definitions_pkey PRIMARY KEY (kind, object),
  CONSTRAINT lifecycle_schema_definitions_kind_valid
    CHECK (kind IN ('function', 'view', 'table', 'trigger', 'policy', 'privileges'))
);

ALTER TABLE lifecycle_schema_definitions ENABLE ROW LEVEL SECURITY;
REVOKE ALL ON TABLE lifecycle_schema_definitions FROM PUBLIC, anon, authenticated;
GRANT ALL ON TABLE lifecycle_schema_definitions TO service_role;
GRANT SELECT ON TABLE lifecycle_schema_definitions TO authenticated;
CREATE POLICY service_role_all ON lifecycle_schema_definitions AS PERMISSIVE FOR ALL TO service_role
  USING (true) WITH CHECK (true);

-- The objects of 0011's lifecycle_schema_catalog() (same selection, same object names) with what
-- recreates each as it is now.
CREATE FUNCTION lifecycle_schema_catalog_restore()
RETURNS TABLE (kind text, object text, restore text)
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
  SELECT 'function', f.object, pg_get_functiondef(f.oid) FROM fns f
  UNION ALL
  SELECT 'privileges', 'function ' || f.object, coalesce(f.proacl::text, '') FROM fns f
  UNION ALL
  SELECT 'view', r.relname,
         format('CREATE VIEW %s%s AS %s', r.oid::regclass,
                CASE WHEN r.reloptions IS NOT NULL
                     THEN format(' WITH (%s)', array_to_string(r.reloptions, ', ')) ELSE '' END,
                pg_get_viewdef(r.oid))
  FROM rels r WHERE r.relkind = 'v'
  UNION ALL
  SELECT 'table', r.relname,
         format('ALTER TABLE %s %s ROW LEVEL SECURITY; ALTER TABLE %s %s ROW LEVEL SECURITY',
                r.oid::regclass, CASE WHEN r.relrowsecurity THEN 'ENABLE' ELSE 'DISABLE' END,
                r.oid::regclass, CASE WHEN r.relforcerowsecurity THEN 'FORCE' ELSE 'NO FORCE' END)
  FROM rels r WHERE r.relkind IN ('r', 'p')
  UNION ALL
  SELECT 'privileges', CASE WHEN r.relkind IN ('v', 'm') THEN 'view ' ELSE 'table ' END || r.relname,
         coalesce(r.relacl::text, '')
  FROM rels r
  UNION ALL
  SELECT 'trigger', format('%s on %s', t.tgname, r.relname), pg_get_triggerdef(t.oid)
  FROM pg_trigger t JOIN rels r ON r.oid = t.tgrelid
  WHERE NOT t.tgisinternal
  UNION ALL
  SELECT 'policy', format('%s on %s', pol.polname, r.relname),
         format('CREATE POLICY %I ON %s AS %s FOR %s TO %s%s%s', pol.polname, r.oid::regclass,
                CASE WHEN pol.polpermissive THEN 'PERMISSIVE' ELSE 'RESTRICTIVE' END,
                CASE pol.polcmd WHEN 'r' THEN 'SELECT' WHEN 'a' THEN 'INSERT' WHEN 'w' THEN 'UPDATE'
                                WHEN 'd' THEN 'DELETE' ELSE 'ALL' END,
                (SELECT string_agg(CASE WHEN rl = 0 THEN 'PUBLIC' ELSE rl::regrole::text END, ', ')
                 FROM unnest(pol.polroles) rl),
                coalesce(' USING (' || pg_get_expr(pol.polqual, pol.polrelid) || ')', ''),
                coalesce(' WITH CHECK (' || pg_get_expr(pol.polwithcheck, pol.polrelid) || ')', ''))
  FROM pg_policy pol JOIN rels r ON r.oid = pol.polrelid
$$;

-- The fingerprint of an object is now the md5 of what recreates it: one description of each kind
-- of object (lifecycle_schema_catalog_restore) serves doctor and repair alike.
CREATE OR REPLACE FUNCTION lifecycle_schema_catalog()
RETURNS TABLE (kind text, object text, md5 text)
LANGUAGE sql STABLE
SET search_path = public, pg_temp
AS $$
  SELECT c.kind, c.object, md5(c.restore) FROM lifecycle_schema_catalog_restore() c
$$;

-- Record fingerprints and restore statements together (the last statement of every migration).
-- The runbook's own 2-argument functions (sections 2-4) are never shipped: when one is there
-- already it is left out, so that doctor reports it.
CREATE OR REPLACE FUNCTION lifecycle_record_schema_fingerprints() RETURNS integer
LANGUAGE plpgsql
AS $$
DECLARE
  v_n integer;
BEGIN
  DELETE FROM lifecycle_schema_fingerprints;
  DELETE FROM lifecycle_schema_definitions;
  INSERT INTO lifecycle_schema_definitions (kind, object, restore)
  SELECT c.kind, c.object, c.restore
  FROM lifecycle_schema_catalog_restore() c
  WHERE NOT lifecycle_is_runbook_overload(c.kind, c.object);
  INSERT INTO lifecycle_schema_fingerprints (kind, object, md5)
  SELECT d.kind, d.object, md5(d.restore) FROM lifecycle_schema_definitions d;
  GET DIAGNOSTICS v_n = ROW_COUNT;
  RETURN v_n;
END
$$;

-- The runbook's sections 2-4 create these 2-argument functions beside ours.
CREATE FUNCTION lifecycle_is_runbook_overload(p_kind text, p_object text) RETURNS boolean
LANGUAGE sql IMMUTABLE
AS $$
  SELECT p_kind IN ('function', 'privileges')
     AND regexp_replace(p_object, '^function ', '') IN (
       'perform_workflow_compensation(p_execution_id uuid, p_reason text)',
       'retry_stage(p_log_id uuid, p_max_attempts integer)',
       'trip_circuit_breaker(p_execution_id uuid, p_reason text)')
$$;

-- What differs from the shipped schema: one row per object, problem in ('changed', 'missing',
-- 'extra'). Privileges of an extra object are not listed separately.
CREATE FUNCTION lifecycle_schema_drift()
RETURNS TABLE (kind text, object text, problem text)
LANGUAGE sql STABLE
SET search_path = public, pg_temp
AS $$
  WITH now_ AS (SELECT c.kind, c.object, c.md5 FROM lifecycle_schema_catalog() c),
  diff AS (
    SELECT coalesce(s.kind, n.kind) AS kind, coalesce(s.object, n.object) AS object,
           CASE WHEN n.md5 IS NULL THEN 'missing' WHEN s.md5 IS NULL THEN 'extra' ELSE 'changed' END AS problem
    FROM lifecycle_schema_fingerprints s
    FULL JOIN now_ n ON n.kind = s.kind AND n.object = s.object
    WHERE s.md5 IS DISTINCT FROM n.md5
  )
  SELECT d.kind, d.object, d.problem FROM diff d
  WHERE NOT (d.kind = 'privileges' AND d.problem = 'extra'
             AND EXISTS (SELECT 1 FROM diff x
                         WHERE x.problem = 'extra' AND x.kind IN ('function', 'view', 'table')
                           AND x.object = substr(d.object, strpos(d.object, ' ') + 1)))
  ORDER BY 1, 2
$$;

-- Revoke everything on one object from PUBLIC and from every role holding a privilege now, then
-- grant the shipped ACL. p_kind is 'function', 'table' or 'view'; p_target the regprocedure or
-- regclass text (from the catalog).
CREATE FUNCTION lifecycle_restore_acl(p_kind text, p_target text, p_now_acl aclitem[], p_shipped aclitem[])
RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
  v_on text := CASE p_kind WHEN 'function' THEN 'FUNCTION' ELSE 'TABLE' END;
  v record;
BEGIN
  EXECUTE format('REVOKE ALL ON %s %s FROM PUBLIC', v_on, p_target);
  FOR v IN SELECT DISTINCT a.grantee FROM aclexplode(p_now_acl) a
           WHERE cardinality(p_now_acl) > 0 AND a.grantee <> 0 LOOP
    EXECUTE format('REVOKE ALL ON %s %s FROM %s', v_on, p_target, v.grantee::regrole);
  END LOOP;
  FOR v IN SELECT a.grantee, a.privilege_type, a.is_grantable FROM aclexplode(p_shipped) a
           WHERE cardinality(p_shipped) > 0 LOOP
    EXECUTE format('GRANT %s ON %s %s TO %s%s', v.privilege_type, v_on, p_target,
                   CASE WHEN v.grantee = 0 THEN 'PUBLIC' ELSE v.grantee::regrole::text END,
                   CASE WHEN v.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END);
  END LOOP;
END
$$;

-- Put the shipped definitions back; returns what was done, one row per action
-- (action in 'restored', 'dropped', 'not repairable'). Runs in the caller's transaction: all or
-- nothing. Order: functions (views and triggers use them), views, tables, triggers, policies,
-- privileges last (re-creating an object resets them).
CREATE FUNCTION lifecycle_repair_schema()
RETURNS TABLE (kind text, object text, action text)
LANGUAGE plpgsql
SET search_path = public, pg_temp
AS $$
DECLARE
  d record;
  v_restore text;
  v_oid oid;
  v_rel regclass;
  v_name text;
  v_acl aclitem[];
BEGIN
  -- the runbook's overloads: dropped
  FOR v_oid IN
    SELECT p.oid FROM pg_proc p
    WHERE p.pronamespace = 'public'::regnamespace
      AND lifecycle_is_runbook_overload('function',
            format('%s(%s)', p.proname, pg_get_function_identity_arguments(p.oid)))
  LOOP
    kind := 'function'; object := v_oid::regprocedure::text; action := 'dropped';
    EXECUTE format('DROP FUNCTION %s', v_oid::regprocedure);
    RETURN NEXT;
  END LOOP;

  FOR d IN
    SELECT x.kind, x.object, x.problem FROM lifecycle_schema_drift() x
    WHERE NOT lifecycle_is_runbook_overload(x.kind, x.object)
    ORDER BY array_position(ARRAY['function', 'view', 'table', 'trigger', 'policy', 'privileges'], x.kind),
             x.object
  LOOP
    kind := d.kind; object := d.object;
    SELECT s.restore INTO v_restore FROM lifecycle_schema_definitions s
    WHERE s.kind = d.kind AND s.object = d.object;

    IF d.problem = 'extra' THEN
      IF d.kind = 'policy' THEN
        SELECT pol.polname, pol.polrelid::regclass INTO v_name, v_rel
        FROM pg_policy pol JOIN pg_class c ON c.oid = pol.polrelid
        WHERE c.relnamespace = 'public'::regnamespace AND format('%s on %s', pol.polname, c.relname) = d.object;
        EXECUTE format('DROP POLICY %I ON %s', v_name, v_rel);
        action := 'dropped';
        RETURN NEXT;
      END IF;
      CONTINUE;  -- not ours: doctor reports it, repair leaves it
    END IF;

    IF v_restore IS NULL THEN
      action := 'not repairable: no shipped definition recorded';
      RETURN NEXT;
      CONTINUE;
    END IF;

    IF d.kind = 'function' THEN
      EXECUTE v_restore;
    ELSIF d.kind = 'view' THEN
      SELECT c.oid::regclass INTO v_rel FROM pg_class c
      WHERE c.relnamespace = 'public'::regnamespace AND c.relname = d.object AND c.relkind = 'v';
      IF v_rel IS NOT NULL THEN
        EXECUTE format('DROP VIEW %s', v_rel);
      END IF;
      EXECUTE v_restore;
    ELSIF d.kind = 'table' THEN
      IF d.problem = 'missing' THEN
        action := 'not repairable: the table is gone (restore it from a backup)';
        RETURN NEXT;
        CONTINUE;
      END IF;
      EXECUTE v_restore;
    ELSIF d.kind IN ('trigger', 'policy') THEN
      SELECT c.oid::regclass INTO v_rel FROM pg_class c
      WHERE c.relnamespace = 'public'::regnamespace AND c.relname = split_part(d.object, ' on ', 2);
      IF v_rel IS NULL THEN
        action := 'not repairable: its table is gone';
        RETURN NEXT;
        CONTINUE;
      END IF;
      IF d.kind = 'trigger' THEN
        EXECUTE format('DROP TRIGGER IF EXISTS %I ON %s', split_part(d.object, ' on ', 1), v_rel);
      ELSE
        EXECUTE format('DROP POLICY IF EXISTS %I ON %s', split_part(d.object, ' on ', 1), v_rel);
      END IF;
      EXECUTE v_restore;
    ELSIF d.kind = 'privileges' THEN
      NULL;  -- below, once every object exists again
    END IF;
    action := 'restored';
    IF d.kind <> 'privileges' THEN
      RETURN NEXT;
    END IF;
  END LOOP;

  -- privileges: compare again (objects re-created above lost theirs)
  FOR d IN
    SELECT x.object FROM lifecycle_schema_drift() x
    WHERE x.kind = 'privileges' AND x.problem = 'changed'
    ORDER BY x.object
  LOOP
    kind := 'privileges'; object := d.object; action := 'restored';
    SELECT s.restore INTO v_restore FROM lifecycle_schema_definitions s
    WHERE s.kind = 'privileges' AND s.object = d.object;
    IF split_part(d.object, ' ', 1) = 'function' THEN
      SELECT p.oid, p.proacl INTO v_oid, v_acl FROM pg_proc p
      WHERE p.pronamespace = 'public'::regnamespace
        AND format('%s(%s)', p.proname, pg_get_function_identity_arguments(p.oid))
            = substr(d.object, length('function ') + 1);
      PERFORM lifecycle_restore_acl('function', v_oid::regprocedure::text, v_acl,
                                    nullif(v_restore, '')::aclitem[]);
    ELSE
      SELECT c.oid::regclass, c.relacl INTO v_rel, v_acl FROM pg_class c
      WHERE c.relnamespace = 'public'::regnamespace AND c.relname = split_part(d.object, ' ', 2);
      PERFORM lifecycle_restore_acl('table', v_rel::text, v_acl, nullif(v_restore, '')::aclitem[]);
    END IF;
    RETURN NEXT;
  END LOOP;
END
$$;

-- ---------------------------------------------------------------------------------------------
-- Adopting an existing schema (`lifecycle-dagster db upgrade` on a database that already holds the
-- runbook's tables, made without our columns and constraints). The upgrade moves the user's tables,
-- views and same-named functions into the schema lifecycle_adopted (kept as they are: nothing is
-- lost), applies every migration, then copies the rows, table by table in foreign-key order, with
-- lifecycle_adopt_rows(). A row that breaks one of our rules is not copied: it is listed in
-- lifecycle_adoption_rejects with its table, id, the rule (constraint or guard function) and the
-- whole row, and stays in lifecycle_adopted.
CREATE TABLE lifecycle_adoption_rejects (
  id          bigint      GENERATED ALWAYS AS IDENTITY,
  table_name  text        NOT NULL,
  row_id      text        NOT NULL,
  rule        text        NOT NULL,
  message     text        NOT NULL,
  sqlstate    text        NOT NULL,
  row_data    jsonb       NOT NULL,
  recorded_at timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT lifecycle_adoption_rejects_pkey PRIMARY KEY (id)
);

ALTER TABLE lifecycle_adoption_rejects ENABLE ROW LEVEL SECURITY;
REVOKE ALL ON TABLE lifecycle_adoption_rejects FROM PUBLIC, anon, authenticated;
GRANT ALL ON TABLE lifecycle_adoption_rejects TO service_role;
GRANT SELECT ON TABLE lifecycle_adoption_rejects TO authenticated;
CREATE POLICY service_role_all ON lifecycle_adoption_rejects AS PERMISSIVE FOR ALL TO service_role
  USING (true) WITH CHECK (true);
DO $seq$
BEGIN
  EXECUTE format('REVOKE ALL ON SEQUENCE %s FROM PUBLIC, anon, authenticated',
                 pg_get_serial_sequence('lifecycle_adoption_rejects', 'id'));
  EXECUTE format('GRANT USAGE, SELECT, UPDATE ON SEQUENCE %s TO service_role',
                 pg_get_serial_sequence('lifecycle_adoption_rejects', 'id'));
END
$seq$;

-- Copy the rows of lifecycle_adopted.<p_table> into public.<p_table>: the columns both have, each
-- converted through its text form to our type, a NULL taking our default where we have one.
-- Rows go in their order of "timestamp" or created_at (so adopted events chain in time order);
-- identity values are kept when they were integers and the identity sequence moves past them.
-- The insert-status guards (an execution, stage log or task is inserted pending or in_progress)
-- are for new work, not for history, and are off during the copy; every other rule applies.
-- All rows in one statement when they all pass; otherwise row by row, each failure recorded.
-- Guards: p_table is one of the seven runbook tables; the target table is empty (adoption
-- copies into the tables the same upgrade just created).
CREATE FUNCTION lifecycle_adopt_rows(p_table text, OUT copied bigint, OUT rejected bigint)
LANGUAGE plpgsql
SET search_path = public, pg_temp
AS $$
DECLARE
  v_target regclass;
  v_source regclass;
  v_cols text;
  v_exprs text;
  v_order text;
  v_guards text[];
  v_guard text;
  v_nonempty boolean;
  v_ident record;
  r record;
  v_state text;
  v_constraint text;
  v_msg text;
  v_context text;
BEGIN
  copied := 0;
  rejected := 0;
  -- guard: the seven tables only
  IF p_table IS NULL OR p_table NOT IN ('workflow_definitions', 'agents', 'agent_ontologies',
      'workflow_executions', 'workflow_execution_logs', 'workflow_events', 'task_queue') THEN
    RAISE EXCEPTION 'lifecycle_adopt_rows: % is not one of the runbook''s tables', p_table
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  v_target := to_regclass(format('public.%I', p_table));
  v_source := to_regclass(format('lifecycle_adopted.%I', p_table));
  IF v_source IS NULL THEN
    RETURN;  -- the user had no such table
  END IF;
  -- guard: only into a table this upgrade has just created
  EXECUTE format('SELECT EXISTS (SELECT 1 FROM %s)', v_target) INTO v_nonempty;
  IF v_nonempty THEN
    RAISE EXCEPTION 'lifecycle_adopt_rows: % already holds rows; adoption copies into new tables only', v_target
      USING ERRCODE = 'object_not_in_prerequisite_state';
  END IF;

  SELECT string_agg(format('%I', t.attname), ', ' ORDER BY t.attnum),
         string_agg(CASE WHEN t.attnotnull AND d.adbin IS NOT NULL
                         THEN format('coalesce((src.%I)::text::%s, %s)', t.attname,
                                     format_type(t.atttypid, t.atttypmod), pg_get_expr(d.adbin, d.adrelid))
                         ELSE format('(src.%I)::text::%s', t.attname, format_type(t.atttypid, t.atttypmod))
                    END, ', ' ORDER BY t.attnum)
    INTO v_cols, v_exprs
  FROM pg_attribute t
  JOIN pg_attribute s ON s.attrelid = v_source AND s.attname = t.attname AND s.attnum > 0 AND NOT s.attisdropped
  LEFT JOIN pg_attrdef d ON d.adrelid = t.attrelid AND d.adnum = t.attnum
  WHERE t.attrelid = v_target AND t.attnum > 0 AND NOT t.attisdropped AND t.attgenerated = ''
    AND (t.attidentity = '' OR s.atttypid IN ('int2'::regtype, 'int4'::regtype, 'int8'::regtype));
  IF v_cols IS NULL THEN
    RAISE EXCEPTION 'lifecycle_adopt_rows: lifecycle_adopted.% has no column in common with %', p_table, v_target
      USING ERRCODE = 'invalid_table_definition';
  END IF;

  SELECT string_agg(format('src.%I', s.attname), ', ' ORDER BY array_position(ARRAY['timestamp', 'created_at'], s.attname::text))
    INTO v_order
  FROM pg_attribute s
  WHERE s.attrelid = v_source AND s.attname IN ('timestamp', 'created_at') AND NOT s.attisdropped;
  v_order := concat_ws(', ', v_order, 'src.ctid');

  v_guards := CASE p_table
    WHEN 'workflow_executions' THEN ARRAY['workflow_executions_insert_status']
    WHEN 'workflow_execution_logs' THEN ARRAY['workflow_execution_logs_insert_status']
    WHEN 'task_queue' THEN ARRAY['task_queue_insert_status']
    ELSE ARRAY[]::text[] END;
  FOREACH v_guard IN ARRAY v_guards LOOP
    EXECUTE format('ALTER TABLE %s DISABLE TRIGGER %I', v_target, v_guard);
  END LOOP;
  SET CONSTRAINTS ALL IMMEDIATE;

  BEGIN
    EXECUTE format('INSERT INTO %s (%s) OVERRIDING SYSTEM VALUE SELECT %s FROM %s src ORDER BY %s',
                   v_target, v_cols, v_exprs, v_source, v_order);
    GET DIAGNOSTICS copied = ROW_COUNT;
  EXCEPTION WHEN OTHERS THEN
    copied := 0;
    -- the failed statement drew identity values: start again from 1 (the table is still empty)
    FOR v_ident IN
      SELECT t.attname FROM pg_attribute t WHERE t.attrelid = v_target AND t.attidentity <> '' AND NOT t.attisdropped
    LOOP
      PERFORM setval(pg_get_serial_sequence(v_target::text, v_ident.attname), 1, false);
    END LOOP;
    FOR r IN EXECUTE format('SELECT src.ctid AS row_ctid, to_jsonb(src) AS row_json FROM %s src ORDER BY %s',
                            v_source, v_order) LOOP
      BEGIN
        EXECUTE format('INSERT INTO %s (%s) OVERRIDING SYSTEM VALUE SELECT %s FROM %s src WHERE src.ctid = $1',
                       v_target, v_cols, v_exprs, v_source) USING r.row_ctid;
        copied := copied + 1;
      EXCEPTION WHEN OTHERS THEN
        GET STACKED DIAGNOSTICS v_state = RETURNED_SQLSTATE, v_constraint = CONSTRAINT_NAME,
                                v_msg = MESSAGE_TEXT, v_context = PG_EXCEPTION_CONTEXT;
        INSERT INTO lifecycle_adoption_rejects (table_name, row_id, rule, message, sqlstate, row_data)
        VALUES (p_table, coalesce(r.row_json ->> 'id', r.row_ctid::text),
                coalesce(nullif(v_constraint, ''),
                         substring(v_context FROM 'function (lifecycle_(?!adopt_rows)[a-z0-9_]+)\('),
                         'sqlstate ' || v_state),
                v_msg, v_state, r.row_json);
        rejected := rejected + 1;
      END;
    END LOOP;
  END;

  FOREACH v_guard IN ARRAY v_guards LOOP
    EXECUTE format('ALTER TABLE %s ENABLE TRIGGER %I', v_target, v_guard);
  END LOOP;
  -- identity sequences past the copied values
  FOR v_ident IN
    SELECT t.attname FROM pg_attribute t WHERE t.attrelid = v_target AND t.attidentity <> '' AND NOT t.attisdropped
  LOOP
    EXECUTE format('SELECT setval(%L, coalesce((SELECT max(%I) FROM %s), 0) + 1, false)',
                   pg_get_serial_sequence(v_target::text, v_ident.attname), v_ident.attname, v_target);
  END LOOP;
END
$$;

-- As 0011_security: the state-changing (volatile) functions run as their owner with a fixed
-- search_path, for service_role only; the read-only ones stay SECURITY INVOKER.
ALTER FUNCTION lifecycle_record_schema_fingerprints() SECURITY DEFINER SET search_path = public, pg_temp;
ALTER FUNCTION lifecycle_repair_schema() SECURITY DEFINER SET search_path = public, pg_temp;
ALTER FUNCTION lifecycle_restore_acl(text, text, aclitem[], aclitem[])
  SECURITY DEFINER SET search_path = public, pg_temp;
ALTER FUNCTION lifecycle_adopt_rows(text) SECURITY DEFINER SET search_path = public, pg_temp;
REVOKE ALL ON FUNCTION lifecycle_adopt_rows(text) FROM PUBLIC, anon, authenticated;
GRANT EXECUTE ON FUNCTION lifecycle_adopt_rows(text) TO service_role;
REVOKE ALL ON FUNCTION lifecycle_record_schema_fingerprints() FROM PUBLIC, anon, authenticated;
REVOKE ALL ON FUNCTION lifecycle_repair_schema() FROM PUBLIC, anon, authenticated;
REVOKE ALL ON FUNCTION lifecycle_restore_acl(text, text, aclitem[], aclitem[]) FROM PUBLIC, anon, authenticated;
GRANT EXECUTE ON FUNCTION lifecycle_record_schema_fingerprints() TO service_role;
GRANT EXECUTE ON FUNCTION lifecycle_repair_schema() TO service_role;
GRANT EXECUTE ON FUNCTION lifecycle_restore_acl(text, text, aclitem[], aclitem[]) TO service_role;
-- the catalog is no one's business but the operators'
REVOKE ALL ON FUNCTION lifecycle_schema_catalog_restore() FROM PUBLIC, anon, authenticated;
REVOKE ALL ON FUNCTION lifecycle_schema_drift() FROM PUBLIC, anon, authenticated;
REVOKE ALL ON FUNCTION lifecycle_is_runbook_overload(text, text) FROM PUBLIC, anon, authenticated;
GRANT EXECUTE ON FUNCTION lifecycle_schema_catalog_restore() TO service_role;
GRANT EXECUTE ON FUNCTION lifecycle_schema_drift() TO service_role;
GRANT EXECUTE ON FUNCTION lifecycle_is_runbook_overload(text, text) TO service_role;

-- ---------------------------------------------------------------------------------------------
SELECT lifecycle_record_schema_fingerprints();
