-- The runbook's public objects, with exactly the runbook's signatures: thin wrappers over
-- lifecycle.*. The engine never calls them, so re-running a runbook section replaces a wrapper
-- (doctor reports it, db upgrade --repair restores it) and breaks nothing.

-- perform_workflow_compensation (runbook section 2): start compensating a failed or cancelled
-- execution; idempotent. See lifecycle.compensation_start.
CREATE OR REPLACE FUNCTION public.perform_workflow_compensation(p_execution_id uuid, p_reason text) RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
BEGIN
  PERFORM lifecycle.compensation_start(p_execution_id, p_reason);
END
$$;
REVOKE ALL ON FUNCTION public.perform_workflow_compensation(p_execution_id uuid, p_reason text) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION public.perform_workflow_compensation(p_execution_id uuid, p_reason text) TO service_role;

-- retry_stage (runbook section 3): schedule the next attempt of a failed stage, capped at
-- p_max_attempts, with the jittered backoff. See lifecycle.stage_retry.
CREATE OR REPLACE FUNCTION public.retry_stage(p_log_id uuid, p_max_attempts integer DEFAULT 3) RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
BEGIN
  PERFORM lifecycle.stage_retry(p_log_id, p_max_attempts);
END
$$;
REVOKE ALL ON FUNCTION public.retry_stage(p_log_id uuid, p_max_attempts integer) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION public.retry_stage(p_log_id uuid, p_max_attempts integer) TO service_role;

-- trip_circuit_breaker (runbook section 4): fail an in-progress execution, recording why in
-- circuit_breaker_state. See lifecycle.execution_trip.
CREATE OR REPLACE FUNCTION public.trip_circuit_breaker(p_execution_id uuid, p_reason text) RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
BEGIN
  PERFORM lifecycle.execution_trip(p_execution_id, p_reason);
END
$$;
REVOKE ALL ON FUNCTION public.trip_circuit_breaker(p_execution_id uuid, p_reason text) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION public.trip_circuit_breaker(p_execution_id uuid, p_reason text) TO service_role;

-- audit_feed: the audit feed, one row per event, newest first, with its execution, definition and
-- stage log. security_invoker: a client sees the rows its policies allow (its own executions'); the
-- engine, as the tables' owner, sees all. The client reads this view, never the runbook's name
-- below: re-running the runbook's section 5 replaces workflow_audit_feed with a view that is not
-- security_invoker (replacing a view drops that option), which would read as its owner.
CREATE OR REPLACE VIEW public.audit_feed WITH (security_invoker='true') AS
 SELECT we.id AS execution_id,
    wd.name AS workflow_name,
    wd.version,
    e.stage_id,
    wel.status AS stage_status,
    wel.attempt_number,
    wel.started_at,
    wel.completed_at,
    wel.error_message,
    we.status AS workflow_status,
    we.circuit_breaker_state,
    we.context,
    e.event_type,
    e.metadata,
    e."timestamp" AS event_timestamp
   FROM (((public.workflow_events e
     JOIN public.workflow_executions we ON ((we.id = e.execution_id)))
     JOIN public.workflow_definitions wd ON ((wd.id = we.workflow_definition_id)))
     LEFT JOIN public.workflow_execution_logs wel ON (((wel.execution_id = e.execution_id) AND (wel.stage_id = e.stage_id))))
  ORDER BY e."timestamp" DESC, e.id DESC;

REVOKE ALL ON TABLE public.audit_feed FROM PUBLIC, anon, authenticated, service_role;
GRANT SELECT ON TABLE public.audit_feed TO service_role;
GRANT SELECT ON TABLE public.audit_feed TO authenticated;

-- workflow_audit_feed (runbook section 5): the same rows, under the runbook's name, for
-- service_role and the owner only (see audit_feed).
CREATE OR REPLACE VIEW public.workflow_audit_feed WITH (security_invoker='true') AS
 SELECT execution_id, workflow_name, version, stage_id, stage_status, attempt_number, started_at,
        completed_at, error_message, workflow_status, circuit_breaker_state, context, event_type,
        metadata, event_timestamp
   FROM public.audit_feed;
