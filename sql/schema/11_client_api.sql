-- Client API: what a Supabase front-end calls through PostgREST as `authenticated` (plain argument
-- names: POST /rpc/start_workflow {"workflow": ..., "context": ...}). Each function acts for
-- auth.uid() only, checks its arguments itself and then calls into lifecycle.*, which the client
-- cannot reach. anon may call nothing; service_role may call all of it (with a user's claims).

-- public.start_workflow: a new pending execution of the ACTIVE version of `workflow`, owned by
-- the caller; returns its id (the launch sensor starts it). Errors name the workflow:
-- no_data_found (no such workflow), object_not_in_prerequisite_state (no active version),
-- invalid_parameter_value (name or context), insufficient_privilege (no user in the request).
CREATE OR REPLACE FUNCTION public.start_workflow(workflow text, context jsonb DEFAULT '{}'::jsonb) RETURNS uuid
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_uid        uuid := auth.uid();
  v_definition uuid;
  v_problem    text;
  v_id         uuid;
BEGIN
  -- GUARD: a signed-in caller, a name, a context that is a JSON object within the payload limits
  IF v_uid IS NULL THEN
    RAISE EXCEPTION 'start_workflow: the request has no user (auth.uid() is NULL)'
      USING ERRCODE = 'insufficient_privilege',
            HINT = 'call it with a signed-in user''s JWT: the execution belongs to that user';
  END IF;
  IF start_workflow.workflow IS NULL OR btrim(start_workflow.workflow) = '' THEN
    RAISE EXCEPTION 'start_workflow: the workflow name is %',
      CASE WHEN start_workflow.workflow IS NULL THEN 'NULL' ELSE 'empty' END
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF jsonb_typeof(start_workflow.context) IS DISTINCT FROM 'object' THEN
    RAISE EXCEPTION 'start_workflow(%): context must be a JSON object, got %',
      quote_literal(start_workflow.workflow), coalesce(jsonb_typeof(start_workflow.context), 'NULL')
      USING ERRCODE = 'invalid_parameter_value',
            HINT = 'pass {} for an empty context';
  END IF;
  v_problem := lifecycle.payload_problem(start_workflow.context, 'the context');
  IF v_problem IS NOT NULL THEN
    RAISE EXCEPTION 'start_workflow(%): %', quote_literal(start_workflow.workflow), v_problem
      USING ERRCODE = 'invalid_parameter_value',
            HINT = 'a context is at most 100 levels deep and lifecycle.max_payload_bytes bytes (default 8 MiB)';
  END IF;

  -- LOCK: the active version (shared), so that it stays active until this execution is committed
  SELECT d.id INTO v_definition
    FROM public.workflow_definitions d
   WHERE d.name = start_workflow.workflow AND d.is_active
     FOR SHARE;
  IF NOT FOUND THEN
    IF EXISTS (SELECT 1 FROM public.workflow_definitions d WHERE d.name = start_workflow.workflow) THEN
      RAISE EXCEPTION 'workflow % has no active version', quote_literal(start_workflow.workflow)
        USING ERRCODE = 'object_not_in_prerequisite_state',
              HINT = 'an operator activates one: lifecycle-dagster activate <name> <version>';
    END IF;
    RAISE EXCEPTION 'no workflow named %', quote_literal(start_workflow.workflow)
      USING ERRCODE = 'no_data_found';
  END IF;

  INSERT INTO public.workflow_executions (workflow_definition_id, status, context, created_by)
  VALUES (v_definition, 'pending', start_workflow.context, v_uid)
  RETURNING id INTO v_id;
  RETURN v_id;
END
$$;

REVOKE ALL ON FUNCTION public.start_workflow(workflow text, context jsonb) FROM PUBLIC, anon, authenticated, service_role;
GRANT EXECUTE ON FUNCTION public.start_workflow(workflow text, context jsonb) TO authenticated, service_role;


-- public.cancel_execution: cancel one of the caller's executions (see lifecycle.execution_cancel:
-- pending stages skipped, pending tasks cancelled, completed stages compensated). Returns
-- 'cancelled', or 'not_cancellable' when it had already gone past pending/in_progress. Someone
-- else's execution is reported exactly like an unknown one (no_data_found).
CREATE OR REPLACE FUNCTION public.cancel_execution(execution_id uuid, reason text DEFAULT 'cancelled by its owner'::text) RETURNS text
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  c_max_reason CONSTANT integer := 1000;
  v_uid       uuid := auth.uid();
  v_cancelled boolean;
BEGIN
  -- GUARD: a signed-in caller, an id, a reason of sane length
  IF v_uid IS NULL THEN
    RAISE EXCEPTION 'cancel_execution: the request has no user (auth.uid() is NULL)'
      USING ERRCODE = 'insufficient_privilege',
            HINT = 'call it with the JWT of the user who started the execution';
  END IF;
  IF cancel_execution.execution_id IS NULL THEN
    RAISE EXCEPTION 'cancel_execution: execution_id is NULL' USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF length(cancel_execution.reason) > c_max_reason THEN
    RAISE EXCEPTION 'cancel_execution: the reason is % characters, over the limit of %',
      length(cancel_execution.reason), c_max_reason
      USING ERRCODE = 'invalid_parameter_value';
  END IF;

  -- LOCK: the execution, and only when it is the caller's
  PERFORM 1 FROM public.workflow_executions e
   WHERE e.id = cancel_execution.execution_id AND e.created_by = v_uid
     FOR UPDATE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'unknown workflow execution %', cancel_execution.execution_id
      USING ERRCODE = 'no_data_found';
  END IF;

  -- TRANSITION
  SELECT c.cancelled INTO v_cancelled
    FROM lifecycle.execution_cancel(cancel_execution.execution_id,
                                    coalesce(nullif(btrim(cancel_execution.reason), ''), 'cancelled by its owner')) c;
  RETURN CASE WHEN v_cancelled THEN 'cancelled' ELSE 'not_cancellable' END;
END
$$;

REVOKE ALL ON FUNCTION public.cancel_execution(execution_id uuid, reason text) FROM PUBLIC, anon, authenticated, service_role;
GRANT EXECUTE ON FUNCTION public.cancel_execution(execution_id uuid, reason text) TO authenticated, service_role;


-- public.is_approver_of: whether the caller (auth.uid(), the JWT's roles) may decide an approval
-- stage the execution waits on. Client API (row-level security uses it: an approver reads the
-- execution, its stage logs and events). SECURITY DEFINER: it reads what the caller may not yet.
CREATE OR REPLACE FUNCTION public.is_approver_of(execution_id uuid) RETURNS boolean
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
  SELECT EXISTS (
    SELECT 1 FROM public.workflow_execution_logs l
      JOIN public.workflow_executions e ON e.id = l.execution_id
      JOIN public.workflow_definitions d ON d.id = e.workflow_definition_id
     WHERE l.execution_id = is_approver_of.execution_id AND l.status = 'waiting'
       AND lifecycle.approver_matches(lifecycle.dag_stage(d.dag_schema, l.stage_id) -> 'approvers',
                                      auth.uid()::text, lifecycle.jwt_roles()))
$$;

REVOKE ALL ON FUNCTION public.is_approver_of(execution_id uuid) FROM PUBLIC, anon, authenticated, service_role;
GRANT EXECUTE ON FUNCTION public.is_approver_of(execution_id uuid) TO authenticated, service_role;


-- public.decide: the caller's decision on an approval stage an execution waits on (docs/branches.md):
-- decision 'approve' or 'reject', an optional comment (at most 4000 characters). Only an approver
-- may decide (auth.uid() or a role of the JWT among the stage's approvers), once. Returns
-- lifecycle.approval_decide's code: completed | failed | continuing | waiting | in_progress, or
-- refused_not_waiting (decided already, or not waiting), refused_not_approver (to the owner, or an
-- approver of another stage), refused_unknown_stage, refused_not_approval. Raises
-- insufficient_privilege (no user), no_data_found (no such execution, or one the caller neither
-- owns nor approves a stage of), invalid_parameter_value (decision, comment).
CREATE OR REPLACE FUNCTION public.decide(execution_id uuid, stage text, decision text, comment text DEFAULT NULL::text) RETURNS text
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_uid uuid := auth.uid();
BEGIN
  -- GUARD: a signed-in caller
  IF v_uid IS NULL THEN
    RAISE EXCEPTION 'decide: the request has no user (auth.uid() is NULL)'
      USING ERRCODE = 'insufficient_privilege', HINT = 'call it with the approver''s JWT';
  END IF;
  IF decide.execution_id IS NULL THEN
    RAISE EXCEPTION 'decide: execution_id is NULL' USING ERRCODE = 'invalid_parameter_value';
  END IF;
  -- GUARD: an execution the caller has no business with (neither its owner nor an approver of one
  -- of its approval stages) is reported exactly like an unknown one (as public.cancel_execution
  -- does): no refusal code tells a stranger it exists, its stage names or whether one waits
  IF NOT EXISTS (
    SELECT 1 FROM public.workflow_executions e
      JOIN public.workflow_definitions d ON d.id = e.workflow_definition_id
     WHERE e.id = decide.execution_id
       AND (e.created_by = v_uid
            OR EXISTS (SELECT 1 FROM jsonb_array_elements(CASE WHEN jsonb_typeof(d.dag_schema -> 'stages') = 'array'
                                                              THEN d.dag_schema -> 'stages' ELSE '[]' END) s
                        WHERE s.value ->> 'kind' = 'approval'
                          AND lifecycle.approver_matches(s.value -> 'approvers', v_uid::text, lifecycle.jwt_roles())))) THEN
    RAISE EXCEPTION 'unknown workflow execution %', decide.execution_id USING ERRCODE = 'no_data_found';
  END IF;
  -- TRANSITION: lifecycle.approval_decide (locks the execution first)
  RETURN lifecycle.approval_decide(decide.execution_id, decide.stage, decide.decision, decide.comment,
                                   v_uid::text, lifecycle.jwt_roles(), false);
END
$$;

REVOKE ALL ON FUNCTION public.decide(execution_id uuid, stage text, decision text, comment text) FROM PUBLIC, anon, authenticated, service_role;
GRANT EXECUTE ON FUNCTION public.decide(execution_id uuid, stage text, decision text, comment text) TO authenticated, service_role;


-- public.execution_artifacts: the artifacts of the caller's own executions, voided ones included.
-- Not security_invoker: the client has no usage on schema lifecycle, so the view reads it as its
-- owner and filters the rows itself (security_barrier: no caller's function sees the others).
-- service_role sees every execution's artifacts.
CREATE OR REPLACE VIEW public.execution_artifacts WITH (security_invoker='false', security_barrier='true') AS
 SELECT a.id,
    a.execution_id,
    a.stage_id,
    a.kind,
    a.key,
    a.data,
    a.created_at,
    a.voided_at,
    a.voided_reason
   FROM (lifecycle.artifacts a
     JOIN public.workflow_executions e ON ((e.id = a.execution_id)))
  WHERE ((e.created_by = auth.uid()) OR (CURRENT_USER = 'service_role'::name));

REVOKE ALL ON TABLE public.execution_artifacts FROM PUBLIC, anon, authenticated, service_role;
GRANT SELECT ON TABLE public.execution_artifacts TO authenticated, service_role;


-- Supabase Realtime: where the publication supabase_realtime exists, it carries the executions,
-- their stage logs and their events (clients subscribe; RLS decides what each one receives).
-- Idempotent: a table already published (by name, by schema or FOR ALL TABLES) is left alone.
DO $realtime$
DECLARE
  v_table text;
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_publication p WHERE p.pubname = 'supabase_realtime') THEN
    RETURN;
  END IF;
  FOREACH v_table IN ARRAY ARRAY['workflow_executions', 'workflow_execution_logs', 'workflow_events'] LOOP
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_publication_tables t
                   WHERE t.pubname = 'supabase_realtime' AND t.schemaname = 'public' AND t.tablename = v_table) THEN
      BEGIN
        EXECUTE format('ALTER PUBLICATION supabase_realtime ADD TABLE public.%I', v_table);
      EXCEPTION WHEN insufficient_privilege THEN
        RAISE WARNING 'realtime: % may not add public.% to the publication supabase_realtime', current_user, v_table
          USING HINT = format('as its owner: ALTER PUBLICATION supabase_realtime ADD TABLE public.%I', v_table);
      END;
    END IF;
  END LOOP;
END
$realtime$;
