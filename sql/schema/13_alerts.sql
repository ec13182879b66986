-- Alerts: the outbox lifecycle_alert_sensor POSTs from (table lifecycle.alerts, migration 0007).
-- An alert is written in the transaction of the event that causes it (the trigger below, on the
-- event types that need a person), or by lifecycle.alerts_scan (a queue backing up: no event
-- marks it). Its key makes each event one alert however often it is seen.

-- lifecycle.alert_record
-- One alert: its payload is p_fields with text, kind, key, dedup_key and at added; nothing when an
-- alert with this key exists. Returns whether it was recorded.
CREATE OR REPLACE FUNCTION lifecycle.alert_record(p_kind text, p_key text, p_text text, p_fields jsonb, p_at timestamp with time zone, p_now timestamp with time zone DEFAULT now()) RETURNS boolean
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_id bigint;
BEGIN
  INSERT INTO lifecycle.alerts (kind, key, payload, created_at, next_attempt_at)
  VALUES (p_kind, p_key,
          jsonb_strip_nulls(coalesce(p_fields, '{}'::jsonb))
            || jsonb_build_object('text', left(p_text, 3000), 'kind', p_kind, 'key', p_key, 'dedup_key', p_key,
                                  'at', to_char(p_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')),
          p_now, p_now)
  ON CONFLICT ON CONSTRAINT lifecycle_alerts_key_key DO NOTHING
  RETURNING id INTO v_id;
  RETURN v_id IS NOT NULL;
END
$$;

REVOKE ALL ON FUNCTION lifecycle.alert_record(p_kind text, p_key text, p_text text, p_fields jsonb, p_at timestamp with time zone, p_now timestamp with time zone) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.alert_record(p_kind text, p_key text, p_text text, p_fields jsonb, p_at timestamp with time zone, p_now timestamp with time zone) TO service_role;


-- lifecycle.alert_from_event
-- The trigger workflow_events_alert: an event a person must hear about becomes an alert in the
-- event's transaction, whoever wrote it.
--   breaker_opened                 -> breaker_opened:<agent>:<capability>:<opened at> (a re-opening
--                                     after a failed probe is a new alert)
--   workflow_compensation_failed   -> compensation_failed:<execution>
--   workflow_failed                -> execution_failed:<execution>: the engine gave up on it (attempts
--                                     exhausted, a non-retryable error, a timeout, an open or tripped
--                                     breaker, a lost or failed run); its first failure only, and not
--                                     when an operator asked for the compensation
--                                     (error_code compensation_requested)
CREATE OR REPLACE FUNCTION lifecycle.alert_from_event() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_md       jsonb := coalesce(NEW.metadata, '{}'::jsonb);
  v_workflow text;
  v_version  integer;
  v_dag      jsonb;
  v_agent    text;
  v_cap      text;
  v_error    text;
  v_kind     text;
BEGIN
  IF NEW.event_type = 'breaker_opened' THEN
    v_agent := v_md ->> 'agent';
    v_cap := v_md ->> 'capability';
    PERFORM lifecycle.alert_record(
      'breaker_opened',
      format('breaker_opened:%s:%s:%s', coalesce(v_agent, ''), coalesce(v_cap, ''),
             to_char(NEW."timestamp" AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')),
      format('Circuit breaker opened: %s %s (%s; %s failures in %s calls)',
             v_md ->> 'scope', coalesce(v_agent, v_cap, v_md ->> 'key'), coalesce(v_md ->> 'reason', 'unknown reason'),
             coalesce(v_md ->> 'failures', '?'), coalesce(v_md ->> 'calls', '?')),
      jsonb_build_object('agent', v_agent, 'capability', v_cap, 'scope', v_md ->> 'scope',
                         'reason', v_md ->> 'reason', 'breaker', v_md),
      NEW."timestamp");
    RETURN NULL;
  END IF;
  IF NEW.execution_id IS NULL
     OR (NEW.event_type = 'workflow_failed' AND v_md ->> 'error_code' IS NOT DISTINCT FROM 'compensation_requested') THEN
    RETURN NULL;
  END IF;

  SELECT d.name, d.version, d.dag_schema INTO v_workflow, v_version, v_dag
  FROM public.workflow_executions e JOIN public.workflow_definitions d ON d.id = e.workflow_definition_id
  WHERE e.id = NEW.execution_id;
  SELECT s ->> 'capability' INTO v_cap
  FROM jsonb_array_elements(CASE WHEN jsonb_typeof(v_dag -> 'stages') = 'array' THEN v_dag -> 'stages' ELSE '[]' END) s
  WHERE s ->> 'id' = NEW.stage_id LIMIT 1;
  SELECT a.name INTO v_agent
  FROM public.task_queue t JOIN public.agents a ON a.id = t.agent_id
  WHERE t.workflow_execution_id = NEW.execution_id AND t.task_type = NEW.stage_id
  ORDER BY t.created_at DESC LIMIT 1;
  v_agent := coalesce(v_md ->> 'agent', v_agent);
  v_error := coalesce(v_md ->> 'error', v_md ->> 'reason', 'no reason recorded');
  v_kind := CASE NEW.event_type WHEN 'workflow_failed' THEN 'execution_failed' ELSE 'compensation_failed' END;

  PERFORM lifecycle.alert_record(
    v_kind,
    format('%s:%s', v_kind, NEW.execution_id),
    CASE v_kind
      WHEN 'execution_failed' THEN
        format('Execution %s of %s v%s failed%s: %s%s', NEW.execution_id, coalesce(v_workflow, '?'),
               coalesce(v_version::text, '?'), CASE WHEN NEW.stage_id IS NULL THEN '' ELSE ' at stage ' || NEW.stage_id END,
               v_error,
               CASE WHEN v_dag ->> 'on_failure' = 'hold' THEN ' (on_failure hold: waiting for a person)'
                    ELSE ' (its completed stages are being undone)' END)
      ELSE
        format('Compensation of execution %s of %s v%s failed at stage %s: %s (needs a person)',
               NEW.execution_id, coalesce(v_workflow, '?'), coalesce(v_version::text, '?'),
               coalesce(NEW.stage_id, '?'), v_error)
    END,
    jsonb_build_object('workflow', v_workflow, 'version', v_version, 'execution_id', NEW.execution_id,
                       'stage', NEW.stage_id, 'agent', v_agent, 'capability', v_cap, 'error', v_error,
                       'error_code', v_md ->> 'error_code',
                       'on_failure', coalesce(v_dag ->> 'on_failure', 'compensate')),
    NEW."timestamp");
  RETURN NULL;
END
$$;

REVOKE ALL ON FUNCTION lifecycle.alert_from_event() FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.alert_from_event() TO service_role;

CREATE OR REPLACE TRIGGER workflow_events_alert AFTER INSERT ON public.workflow_events FOR EACH ROW WHEN ((new.event_type = ANY (ARRAY['breaker_opened'::text, 'workflow_compensation_failed'::text, 'workflow_failed'::text]))) EXECUTE FUNCTION lifecycle.alert_from_event();


-- lifecycle.alerts_scan
-- A queue backing up: per capability, when its oldest pending task has waited (since it was due:
-- not_before, else created) p_threshold_s seconds or more, an alert
-- queue_stale:<capability>:<oldest task id>, at most one per capability per p_threshold_s seconds
-- (a draining backlog is one alert, not one per task). Returns how many were recorded.
CREATE OR REPLACE FUNCTION lifecycle.alerts_scan(p_threshold_s double precision, p_now timestamp with time zone DEFAULT now()) RETURNS integer
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_r     record;
  v_count integer := 0;
BEGIN
  -- GUARD: a usable threshold
  IF p_threshold_s IS NULL OR NOT p_threshold_s > 0 OR p_threshold_s = 'Infinity'::float8 THEN
    RAISE EXCEPTION 'alerts_scan: p_threshold_s must be a finite number > 0, got %', p_threshold_s
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  FOR v_r IN
    SELECT DISTINCT ON (q.capability) q.capability, q.id, q.since, q.execution_id, q.stage_id, q.agent, q.waiting
    FROM (
      SELECT t.capability, t.id, greatest(t.created_at, coalesce(t.not_before, t.created_at)) AS since,
             t.workflow_execution_id AS execution_id, t.task_type AS stage_id, a.name AS agent,
             count(*) OVER (PARTITION BY t.capability) AS waiting
      FROM public.task_queue t LEFT JOIN public.agents a ON a.id = t.agent_id
      WHERE t.status = 'pending' AND t.capability IS NOT NULL
    ) q
    WHERE q.since <= p_now - make_interval(secs => p_threshold_s)
    ORDER BY q.capability, q.since, q.id
  LOOP
    CONTINUE WHEN EXISTS (
      SELECT 1 FROM lifecycle.alerts al
      WHERE al.kind = 'queue_stale' AND al.payload ->> 'capability' = v_r.capability
        AND al.created_at > p_now - make_interval(secs => p_threshold_s));
    IF lifecycle.alert_record(
         'queue_stale',
         format('queue_stale:%s:%s', v_r.capability, v_r.id),
         format('Queue %s is backing up: its oldest pending task has waited %s s (%s pending)',
                v_r.capability, round(extract(epoch FROM p_now - v_r.since)), v_r.waiting),
         jsonb_build_object('capability', v_r.capability, 'task_id', v_r.id, 'execution_id', v_r.execution_id,
                            'stage', v_r.stage_id, 'agent', v_r.agent, 'pending', v_r.waiting,
                            'waited_s', extract(epoch FROM p_now - v_r.since)::float8,
                            'threshold_s', p_threshold_s),
         p_now, p_now) THEN
      v_count := v_count + 1;
    END IF;
  END LOOP;
  RETURN v_count;
END
$$;

REVOKE ALL ON FUNCTION lifecycle.alerts_scan(p_threshold_s double precision, p_now timestamp with time zone) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.alerts_scan(p_threshold_s double precision, p_now timestamp with time zone) TO service_role;


-- lifecycle.alerts_claim
-- Up to p_limit unsent alerts due at p_now, oldest due first, each leased for p_lease_s seconds
-- (next_attempt_at moves on, attempts + 1): a second sender skips them, and one whose sender died
-- is due again when the lease ends.
CREATE OR REPLACE FUNCTION lifecycle.alerts_claim(p_limit integer, p_lease_s double precision, p_now timestamp with time zone DEFAULT now()) RETURNS SETOF lifecycle.alerts
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
BEGIN
  -- LOCK: the due alerts, skipping those another sender holds
  RETURN QUERY
  UPDATE lifecycle.alerts a
     SET attempts = CASE WHEN a.attempts < 2147483647 THEN a.attempts + 1 ELSE a.attempts END,
         next_attempt_at = p_now + make_interval(secs => greatest(p_lease_s, 0))
   WHERE a.id IN (SELECT d.id FROM lifecycle.alerts d
                  WHERE d.sent_at IS NULL AND d.next_attempt_at <= p_now
                  ORDER BY d.next_attempt_at, d.id
                  LIMIT greatest(p_limit, 0)
                  FOR UPDATE SKIP LOCKED)
  RETURNING a.*;
END
$$;

REVOKE ALL ON FUNCTION lifecycle.alerts_claim(p_limit integer, p_lease_s double precision, p_now timestamp with time zone) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.alerts_claim(p_limit integer, p_lease_s double precision, p_now timestamp with time zone) TO service_role;


-- lifecycle.alert_sent
-- The receiver accepted alert p_id: true, or false when it was already recorded as sent.
CREATE OR REPLACE FUNCTION lifecycle.alert_sent(p_id bigint, p_now timestamp with time zone DEFAULT now()) RETURNS boolean
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
BEGIN
  UPDATE lifecycle.alerts a SET sent_at = p_now, last_error = NULL WHERE a.id = p_id AND a.sent_at IS NULL;
  RETURN FOUND;
END
$$;

REVOKE ALL ON FUNCTION lifecycle.alert_sent(p_id bigint, p_now timestamp with time zone) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.alert_sent(p_id bigint, p_now timestamp with time zone) TO service_role;


-- lifecycle.alert_failed
-- Sending alert p_id failed: the error is kept and it is due again p_delay_s seconds after p_now.
-- False when it was sent meanwhile (nothing changes).
CREATE OR REPLACE FUNCTION lifecycle.alert_failed(p_id bigint, p_error text, p_delay_s double precision, p_now timestamp with time zone DEFAULT now()) RETURNS boolean
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
BEGIN
  UPDATE lifecycle.alerts a
     SET last_error = left(coalesce(p_error, 'unknown error'), 2000),
         next_attempt_at = p_now + make_interval(secs => least(greatest(coalesce(p_delay_s, 0), 0), 31536000))
   WHERE a.id = p_id AND a.sent_at IS NULL;
  RETURN FOUND;
END
$$;

REVOKE ALL ON FUNCTION lifecycle.alert_failed(p_id bigint, p_error text, p_delay_s double precision, p_now timestamp with time zone) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.alert_failed(p_id bigint, p_error text, p_delay_s double precision, p_now timestamp with time zone) TO service_role;
