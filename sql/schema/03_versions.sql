-- Versions: publish a definition as the next version, activate one version of a name.

-- lifecycle.definition_activate
CREATE OR REPLACE FUNCTION lifecycle.definition_activate(p_name text, p_version integer, p_now timestamp with time zone DEFAULT now()) RETURNS TABLE(definition_id uuid, version integer, activated boolean, previous_version integer)
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
#variable_conflict use_column
DECLARE
  v_row   public.workflow_definitions;
  v_prev  public.workflow_definitions;
  v_known text;
BEGIN
  -- LOCK: every publish and activation of this name
  PERFORM pg_advisory_xact_lock(hashtextextended(p_name, 0));

  SELECT d.* INTO v_row FROM public.workflow_definitions d WHERE d.name = p_name AND d.version = p_version FOR UPDATE;
  IF v_row.id IS NULL THEN
    SELECT string_agg(d.version::text, ', ' ORDER BY d.version) INTO v_known
      FROM public.workflow_definitions d WHERE d.name = p_name;
    IF v_known IS NULL THEN
      RAISE EXCEPTION 'no workflow named %', coalesce(quote_literal(p_name), 'NULL') USING ERRCODE = 'no_data_found';
    END IF;
    RAISE EXCEPTION 'workflow % has no version % (versions: %)', quote_literal(p_name),
      coalesce(p_version::text, 'NULL'), v_known
      USING ERRCODE = 'no_data_found';
  END IF;
  SELECT d.* INTO v_prev FROM public.workflow_definitions d WHERE d.name = p_name AND d.is_active FOR UPDATE;
  IF v_row.is_active THEN
    RETURN QUERY SELECT v_row.id, v_row.version, false, v_row.version;
    RETURN;
  END IF;

  -- TRANSITION: the previous active version off, this one on
  UPDATE public.workflow_definitions d SET is_active = false WHERE d.name = p_name AND d.is_active;
  UPDATE public.workflow_definitions d SET is_active = true WHERE d.id = v_row.id;
  INSERT INTO public.workflow_events (execution_id, event_type, metadata, "timestamp")
  VALUES (NULL, 'definition_activated',
          jsonb_build_object('name', p_name, 'version', v_row.version, 'definition_id', v_row.id,
                             'previous_version', v_prev.version, 'previous_definition_id', v_prev.id),
          p_now);
  RETURN QUERY SELECT v_row.id, v_row.version, true, v_prev.version;
END
$$;

REVOKE ALL ON FUNCTION lifecycle.definition_activate(p_name text, p_version integer, p_now timestamp with time zone) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.definition_activate(p_name text, p_version integer, p_now timestamp with time zone) TO service_role;


-- lifecycle.definition_publish
CREATE OR REPLACE FUNCTION lifecycle.definition_publish(p_name text, p_description text, p_dag jsonb, p_activate boolean DEFAULT false, p_created_by uuid DEFAULT NULL::uuid, p_now timestamp with time zone DEFAULT now()) RETURNS TABLE(version integer, created boolean, active boolean, activated boolean, definition_id uuid, previous_version integer)
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $_$
#variable_conflict use_column
DECLARE
  v_latest public.workflow_definitions;
  v_prev   public.workflow_definitions;
  v_id     uuid;
  v_ver    integer;
  v_by     uuid;
BEGIN
  -- GUARD: arguments
  IF p_name IS NULL OR NOT (p_name ~ '^[a-z][a-z0-9_]{0,62}$' AND p_name !~ '__' AND p_name !~ '_$') THEN
    RAISE EXCEPTION 'invalid workflow name %: it must match ^[a-z][a-z0-9_]{0,62}$, without __ and not ending in _',
      coalesce(quote_literal(p_name), 'NULL')
      USING ERRCODE = 'check_violation';
  END IF;
  IF p_activate IS NULL THEN
    RAISE EXCEPTION 'lifecycle.definition_publish: p_activate must be true or false, not NULL'
      USING ERRCODE = 'null_value_not_allowed';
  END IF;
  IF current_setting('transaction_isolation') <> 'read committed' THEN
    -- a snapshot taken before the lock was granted would not see the version just published
    RAISE EXCEPTION 'lifecycle.definition_publish must run in a READ COMMITTED transaction, not %',
      upper(current_setting('transaction_isolation'))
      USING ERRCODE = 'invalid_transaction_state';
  END IF;
  PERFORM lifecycle.dag_assert_valid(p_dag, format('workflow %s (new version)', p_name));

  -- LOCK: every publish and activation of this name
  PERFORM pg_advisory_xact_lock(hashtextextended(p_name, 0));

  SELECT d.* INTO v_latest FROM public.workflow_definitions d WHERE d.name = p_name ORDER BY d.version DESC LIMIT 1;
  SELECT d.* INTO v_prev FROM public.workflow_definitions d WHERE d.name = p_name AND d.is_active;

  IF v_latest.id IS NOT NULL AND v_latest.dag_schema = p_dag
     AND v_latest.description IS NOT DISTINCT FROM p_description THEN
    IF p_activate AND NOT v_latest.is_active THEN
      PERFORM lifecycle.definition_activate(p_name, v_latest.version, p_now);
      RETURN QUERY SELECT v_latest.version, false, true, true, v_latest.id, v_prev.version;
    ELSE
      RETURN QUERY SELECT v_latest.version, false, v_latest.is_active, false, v_latest.id, NULL::integer;
    END IF;
    RETURN;
  END IF;

  v_ver := coalesce(v_latest.version, 0) + 1;
  v_by := coalesce(p_created_by, auth.uid());
  -- TRANSITION: the previous active version (the one-active EXCLUDE is checked at commit anyway)
  IF p_activate AND v_prev.id IS NOT NULL THEN
    UPDATE public.workflow_definitions d SET is_active = false WHERE d.id = v_prev.id;
  END IF;
  INSERT INTO public.workflow_definitions (name, description, version, dag_schema, is_active, created_by, created_at)
  VALUES (p_name, p_description, v_ver, p_dag, p_activate, v_by, p_now)
  RETURNING id INTO v_id;
  INSERT INTO public.workflow_events (execution_id, event_type, metadata, "timestamp")
  VALUES (NULL, 'definition_published',
          jsonb_build_object('name', p_name, 'version', v_ver, 'definition_id', v_id,
                             'activate', p_activate, 'created_by', v_by,
                             'stage_count', jsonb_array_length(p_dag -> 'stages')),
          p_now);
  IF p_activate THEN
    INSERT INTO public.workflow_events (execution_id, event_type, metadata, "timestamp")
    VALUES (NULL, 'definition_activated',
            jsonb_build_object('name', p_name, 'version', v_ver, 'definition_id', v_id,
                               'previous_version', v_prev.version, 'previous_definition_id', v_prev.id),
            p_now);
  END IF;
  RETURN QUERY SELECT v_ver, true, p_activate, p_activate, v_id, CASE WHEN p_activate THEN v_prev.version END;
END
$_$;

REVOKE ALL ON FUNCTION lifecycle.definition_publish(p_name text, p_description text, p_dag jsonb, p_activate boolean, p_created_by uuid, p_now timestamp with time zone) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.definition_publish(p_name text, p_description text, p_dag jsonb, p_activate boolean, p_created_by uuid, p_now timestamp with time zone) TO service_role;
