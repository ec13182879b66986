-- Schema management: the catalog of our objects and its fingerprints (doctor), adoption of an
-- existing runbook schema.

-- lifecycle.adopt_rows
CREATE OR REPLACE FUNCTION lifecycle.adopt_rows(p_table text, OUT copied bigint, OUT rejected bigint) RETURNS record
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $_$
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
    RAISE EXCEPTION 'lifecycle.adopt_rows: % is not one of the runbook''s tables', p_table
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
    RAISE EXCEPTION 'lifecycle.adopt_rows: % already holds rows; adoption copies into new tables only', v_target
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
    RAISE EXCEPTION 'lifecycle.adopt_rows: lifecycle_adopted.% has no column in common with %', p_table, v_target
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
    -- history is not news: copied events record no alert (13_alerts.sql)
    WHEN 'workflow_events' THEN ARRAY['workflow_events_alert']
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
        INSERT INTO lifecycle.adoption_rejects (table_name, row_id, rule, message, sqlstate, row_data)
        VALUES (p_table, coalesce(r.row_json ->> 'id', r.row_ctid::text),
                coalesce(nullif(v_constraint, ''),
                         substring(v_context FROM 'function (lifecycle\.(?!adopt_rows)[a-z0-9_]+)\('),
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
$_$;

REVOKE ALL ON FUNCTION lifecycle.adopt_rows(p_table text, OUT copied bigint, OUT rejected bigint) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.adopt_rows(p_table text, OUT copied bigint, OUT rejected bigint) TO service_role;


-- lifecycle.schema_catalog: every object of ours as (kind, object, md5 of its definition).
-- Ours: schema lifecycle whole; in public, the runbook's seven tables, its view and its three
-- functions (any overload, so that an extra one shows) and the client API. Triggers and policies
-- on those tables; privileges of every function, table and view; RLS flags of every table.
-- search_path is fixed so that names print the same whoever asks.
CREATE OR REPLACE FUNCTION lifecycle.schema_catalog() RETURNS TABLE(kind text, object text, md5 text)
    LANGUAGE sql STABLE
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
  WITH fns AS (
    SELECT p.oid, p.proacl, p.proowner,
           format('%s.%s(%s)', n.nspname, p.proname, pg_get_function_identity_arguments(p.oid)) AS object
    FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
    WHERE p.prokind IN ('f', 'p')
      AND (n.nspname = 'lifecycle'
           OR (n.nspname = 'public' AND p.proname IN ('perform_workflow_compensation', 'retry_stage',
                                                      'trip_circuit_breaker', 'start_workflow', 'cancel_execution')))
  ), rels AS (
    SELECT c.oid, format('%s.%s', n.nspname, c.relname) AS object, c.relkind, c.relacl, c.relowner, c.reloptions,
           c.relrowsecurity, c.relforcerowsecurity
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.relkind IN ('r', 'p', 'v', 'm')
      AND (n.nspname = 'lifecycle'
           OR (n.nspname = 'public' AND c.relname IN (
                 'workflow_definitions', 'workflow_executions', 'workflow_execution_logs', 'workflow_events',
                 'agents', 'agent_ontologies', 'task_queue', 'workflow_audit_feed', 'audit_feed',
                 'execution_artifacts')))
  )
  SELECT 'function', f.object, md5(pg_get_functiondef(f.oid)) FROM fns f
  UNION ALL
  -- privileges and owner: a function owned by another role runs with that role's rights
  SELECT 'privileges', 'function ' || f.object, md5(coalesce(f.proacl::text, '') || ' owner=' || f.proowner::regrole)
  FROM fns f
  UNION ALL
  SELECT 'view', r.object, md5(pg_get_viewdef(r.oid) || coalesce(r.reloptions::text, ''))
  FROM rels r WHERE r.relkind IN ('v', 'm')
  UNION ALL
  SELECT 'table', r.object, md5(format('rls=%s force=%s', r.relrowsecurity, r.relforcerowsecurity))
  FROM rels r WHERE r.relkind IN ('r', 'p')
  UNION ALL
  -- a table's column privileges and its identity sequences' privileges are part of its own
  SELECT 'privileges', CASE WHEN r.relkind IN ('v', 'm') THEN 'view ' ELSE 'table ' END || r.object,
         md5(coalesce(r.relacl::text, '') || ' owner=' || r.relowner::regrole
             || coalesce((SELECT string_agg(a.attname || '=' || a.attacl::text, ',' ORDER BY a.attnum)
                            FROM pg_attribute a WHERE a.attrelid = r.oid AND a.attacl IS NOT NULL), '')
             || coalesce((SELECT string_agg(s.relname || '=' || coalesce(s.relacl::text, ''), ',' ORDER BY s.relname)
                            FROM pg_depend d JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S'
                           WHERE d.refobjid = r.oid AND d.classid = 'pg_class'::regclass
                             AND d.deptype IN ('a', 'i')), ''))
  FROM rels r
  UNION ALL
  -- a disabled trigger is drift too (pg_get_triggerdef does not show it)
  SELECT 'trigger', format('%s on %s', t.tgname, r.object), md5(pg_get_triggerdef(t.oid) || ' enabled=' || t.tgenabled::text)
  FROM pg_trigger t JOIN rels r ON r.oid = t.tgrelid
  WHERE NOT t.tgisinternal
  UNION ALL
  SELECT 'policy', format('%s on %s', pol.polname, r.object),
         md5(concat_ws(' | ', pol.polcmd, pol.polpermissive, pol.polroles::regrole[]::text,
                       pg_get_expr(pol.polqual, pol.polrelid), pg_get_expr(pol.polwithcheck, pol.polrelid)))
  FROM pg_policy pol JOIN rels r ON r.oid = pol.polrelid
  UNION ALL
  -- we ship no rule: any rule on our tables (DO INSTEAD NOTHING on the events, say) is extra
  SELECT 'rule', format('%s on %s', ru.rulename, r.object), md5(pg_get_ruledef(ru.oid))
  FROM pg_rewrite ru JOIN rels r ON r.oid = ru.ev_class
  WHERE ru.rulename <> '_RETURN'
  UNION ALL
  -- constraints and the state machine's rows come from migrations: doctor sees them change;
  -- db upgrade --repair cannot restore them and refuses to record them as shipped
  SELECT 'constraint', format('%s on %s', con.conname, r.object), md5(pg_get_constraintdef(con.oid))
  FROM pg_constraint con JOIN rels r ON r.oid = con.conrelid
  UNION ALL
  SELECT 'data', 'lifecycle.transitions',
         md5(coalesce(string_agg(format('%s:%s>%s', tr.entity, tr.from_status, tr.to_status), ','
                                 ORDER BY tr.entity, tr.from_status, tr.to_status), ''))
  FROM lifecycle.transitions tr
  UNION ALL
  SELECT 'schema', 'schema ' || n.nspname, md5(coalesce(n.nspacl::text, '') || ' owner=' || n.nspowner::regrole)
  FROM pg_namespace n WHERE n.nspname = 'lifecycle'
$$;

REVOKE ALL ON FUNCTION lifecycle.schema_catalog() FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.schema_catalog() TO service_role;


-- lifecycle.schema_fingerprints_record: record the catalog as shipped. The upgrader calls it
-- right after applying sql/schema/ (and after --repair), in the same transaction.
CREATE OR REPLACE FUNCTION lifecycle.schema_fingerprints_record() RETURNS integer
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_n integer;
BEGIN
  DELETE FROM lifecycle.schema_fingerprints;
  INSERT INTO lifecycle.schema_fingerprints (kind, object, md5)
  SELECT c.kind, c.object, c.md5 FROM lifecycle.schema_catalog() c;
  GET DIAGNOSTICS v_n = ROW_COUNT;
  RETURN v_n;
END
$$;

REVOKE ALL ON FUNCTION lifecycle.schema_fingerprints_record() FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.schema_fingerprints_record() TO service_role;


-- lifecycle.schema_drift
CREATE OR REPLACE FUNCTION lifecycle.schema_drift() RETURNS TABLE(kind text, object text, problem text)
    LANGUAGE sql STABLE
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
  WITH now_ AS (SELECT c.kind, c.object, c.md5 FROM lifecycle.schema_catalog() c),
  diff AS (
    SELECT coalesce(s.kind, n.kind) AS kind, coalesce(s.object, n.object) AS object,
           CASE WHEN n.md5 IS NULL THEN 'missing' WHEN s.md5 IS NULL THEN 'extra' ELSE 'changed' END AS problem
    FROM lifecycle.schema_fingerprints s
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

REVOKE ALL ON FUNCTION lifecycle.schema_drift() FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.schema_drift() TO service_role;
