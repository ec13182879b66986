-- Circuit breakers per agent and per capability (closed / open / half_open) and routing of a
-- capability to an admitted agent.

-- lifecycle.agent_capabilities
CREATE OR REPLACE FUNCTION lifecycle.agent_capabilities(p_agent_id uuid) RETURNS text[]
    LANGUAGE sql STABLE
    AS $$
  SELECT coalesce(array_agg(DISTINCT c), '{}')
  FROM (
    SELECT o.knowledge FROM public.agent_ontologies o
    WHERE o.agent_id = p_agent_id AND o.domain = 'orchestration'
    ORDER BY o.version DESC LIMIT 1
  ) latest,
  LATERAL (
    SELECT latest.knowledge ->> 'capability' AS c
    UNION ALL
    SELECT jsonb_array_elements_text(CASE WHEN jsonb_typeof(latest.knowledge -> 'capabilities') = 'array'
                                          THEN latest.knowledge -> 'capabilities' ELSE '[]'::jsonb END)
  ) caps
  WHERE c IS NOT NULL
$$;

REVOKE ALL ON FUNCTION lifecycle.agent_capabilities(p_agent_id uuid) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.agent_capabilities(p_agent_id uuid) TO service_role;


-- lifecycle.breaker_admit
CREATE OR REPLACE FUNCTION lifecycle.breaker_admit(p_scope text, p_key text, p_now timestamp with time zone, p_take_probe boolean) RETURNS boolean
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_b      lifecycle.breakers;
  v_cfg    jsonb;
  v_cool   interval;
  v_probes integer;
BEGIN
  SELECT * INTO v_b FROM lifecycle.breakers b WHERE b.scope = p_scope AND b.key = p_key;
  IF NOT FOUND OR v_b.state = 'closed' THEN
    RETURN true;  -- the common case takes no lock
  END IF;

  -- LOCK: the breaker row
  SELECT * INTO v_b FROM lifecycle.breakers b WHERE b.scope = p_scope AND b.key = p_key FOR UPDATE;
  IF v_b.state = 'closed' THEN
    RETURN true;
  END IF;
  v_cfg := lifecycle.breaker_config(p_scope, p_key);
  v_cool := make_interval(secs => (v_cfg ->> 'cooldown_s')::float8);
  v_probes := (v_cfg ->> 'half_open_probes')::integer;

  -- TRANSITION: open -> half_open after the cooldown
  IF v_b.state = 'open' THEN
    IF p_now < v_b.opened_at + v_cool THEN
      RETURN false;
    END IF;
    PERFORM lifecycle.breaker_set_state(p_scope, p_key, 'half_open', v_probes,
      jsonb_build_object('opened_at', v_b.opened_at, 'cooldown_s', v_cfg -> 'cooldown_s',
                         'half_open_probes', v_probes), p_now);
    v_b.probes_left := v_probes;
  ELSIF v_b.probes_left = 0 AND v_b.probe_at IS NOT NULL AND p_now >= v_b.probe_at + v_cool THEN
    UPDATE lifecycle.breakers b SET probes_left = v_probes, updated_at = p_now
     WHERE b.scope = p_scope AND b.key = p_key;
    v_b.probes_left := v_probes;
  END IF;

  -- half_open: a probe, if one is left
  IF v_b.probes_left = 0 THEN
    RETURN false;
  END IF;
  IF p_take_probe THEN
    UPDATE lifecycle.breakers b SET probes_left = b.probes_left - 1, probe_at = p_now, updated_at = p_now
     WHERE b.scope = p_scope AND b.key = p_key;
  END IF;
  RETURN true;
END
$$;

REVOKE ALL ON FUNCTION lifecycle.breaker_admit(p_scope text, p_key text, p_now timestamp with time zone, p_take_probe boolean) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.breaker_admit(p_scope text, p_key text, p_now timestamp with time zone, p_take_probe boolean) TO service_role;


-- lifecycle.breaker_caller_fault
CREATE OR REPLACE FUNCTION lifecycle.breaker_caller_fault(p_error_code text) RETURNS boolean
    LANGUAGE sql IMMUTABLE
    AS $$
  SELECT coalesce(p_error_code = ANY (ARRAY['bad_request', 'bad_input', 'integrity_failed',
                                            'missing_upstream', 'no_agent', 'agent_not_registered',
                                            'cancelled', 'breaker_open']), false)
$$;

REVOKE ALL ON FUNCTION lifecycle.breaker_caller_fault(p_error_code text) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.breaker_caller_fault(p_error_code text) TO service_role;


-- lifecycle.breaker_config
CREATE OR REPLACE FUNCTION lifecycle.breaker_config(p_scope text, p_key text) RETURNS jsonb
    LANGUAGE plpgsql STABLE
    AS $$
BEGIN
  -- plpgsql: its plan is kept for the session (see lifecycle.dag_has_stage)
  RETURN lifecycle.breaker_defaults()
         || coalesce((SELECT nullif(a.config -> 'breaker', 'null'::jsonb) FROM public.agents a
                      WHERE p_scope = 'agent' AND a.id::text = p_key), '{}'::jsonb);
END
$$;

REVOKE ALL ON FUNCTION lifecycle.breaker_config(p_scope text, p_key text) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.breaker_config(p_scope text, p_key text) TO service_role;


-- lifecycle.breaker_config_problem
CREATE OR REPLACE FUNCTION lifecycle.breaker_config_problem(p_config jsonb) RETURNS text
    LANGUAGE plpgsql IMMUTABLE
    AS $$
DECLARE
  v_unknown text;
  v_key     text;
  v_value   jsonb;
BEGIN
  IF p_config IS NULL OR jsonb_typeof(p_config) = 'null' THEN
    RETURN NULL;
  END IF;
  IF jsonb_typeof(p_config) <> 'object' THEN
    RETURN format('must be a JSON object, got %s', jsonb_typeof(p_config));
  END IF;
  SELECT string_agg(k, ', ' ORDER BY k) INTO v_unknown
  FROM jsonb_object_keys(p_config) k WHERE NOT lifecycle.breaker_defaults() ? k;
  IF v_unknown IS NOT NULL THEN
    RETURN format('unknown key(s) %s; known: cooldown_s, error_budget, failure_threshold, '
                  'half_open_probes, latency_sla_ms, window_s', v_unknown);
  END IF;
  FOR v_key, v_value IN SELECT * FROM jsonb_each(p_config) LOOP
    IF v_key = 'latency_sla_ms' AND jsonb_typeof(v_value) = 'null' THEN
      CONTINUE;
    END IF;
    IF jsonb_typeof(v_value) <> 'number' THEN
      RETURN format('%s must be a number, got %s', v_key, v_value);
    END IF;
    IF lifecycle.dag_float(v_value) IS NULL THEN  -- 1e400, 1e-400: every reader casts to double precision
      RETURN format('%s must be a number a double can hold (finite, and not so small that it rounds to 0), got %s',
                    v_key, CASE WHEN length(v_value::text) <= 24 THEN v_value::text
                                ELSE left(v_value::text, 20) || '...' END);
    END IF;
    IF (v_key IN ('window_s', 'latency_sla_ms') AND NOT (v_value::numeric > 0))
       OR (v_key = 'cooldown_s' AND NOT (v_value::numeric >= 0))
       -- bounded so that now() +/- the interval stays a timestamp: at most a year
       OR (v_key IN ('window_s', 'cooldown_s') AND v_value::numeric > 31536000)
       OR (v_key = 'error_budget' AND NOT (v_value::numeric BETWEEN 0 AND 1))
       OR (v_key IN ('failure_threshold', 'half_open_probes')
           AND NOT (v_value::numeric >= 1 AND v_value::numeric = trunc(v_value::numeric)
                    AND v_value::numeric <= 2147483647)) THEN
      RETURN format('%s: %s is out of range (window_s, latency_sla_ms > 0; cooldown_s >= 0; '
                    'window_s, cooldown_s at most 31536000 s; '
                    'error_budget in [0, 1]; failure_threshold, half_open_probes integers >= 1)',
                    v_key, v_value);
    END IF;
  END LOOP;
  RETURN NULL;
END
$$;

REVOKE ALL ON FUNCTION lifecycle.breaker_config_problem(p_config jsonb) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.breaker_config_problem(p_config jsonb) TO service_role;


-- lifecycle.breaker_defaults
CREATE OR REPLACE FUNCTION lifecycle.breaker_defaults() RETURNS jsonb
    LANGUAGE plpgsql IMMUTABLE
    AS $$
BEGIN
  RETURN '{"window_s": 60, "failure_threshold": 5, "error_budget": 0.5, "latency_sla_ms": null,
           "cooldown_s": 30, "half_open_probes": 1}'::jsonb;
END
$$;

REVOKE ALL ON FUNCTION lifecycle.breaker_defaults() FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.breaker_defaults() TO service_role;


-- lifecycle.breaker_numbers
CREATE OR REPLACE FUNCTION lifecycle.breaker_numbers(p_scope text, p_key text, p_config jsonb, p_from timestamp with time zone, p_now timestamp with time zone) RETURNS jsonb
    LANGUAGE sql STABLE
    AS $$
  SELECT jsonb_build_object('failures', w.failures, 'calls', w.calls, 'rate', round(w.rate::numeric, 4),
                            'p95_ms', w.p95_ms)
         || (p_config - 'half_open_probes')
  FROM lifecycle.breaker_window(p_scope, p_key, (p_config ->> 'window_s')::float8, p_from, p_now) w
$$;

REVOKE ALL ON FUNCTION lifecycle.breaker_numbers(p_scope text, p_key text, p_config jsonb, p_from timestamp with time zone, p_now timestamp with time zone) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.breaker_numbers(p_scope text, p_key text, p_config jsonb, p_from timestamp with time zone, p_now timestamp with time zone) TO service_role;


-- lifecycle.breaker_record
CREATE OR REPLACE FUNCTION lifecycle.breaker_record(p_scope text, p_key text, p_success boolean, p_latency_ms double precision DEFAULT NULL::double precision, p_now timestamp with time zone DEFAULT now(), p_task_id uuid DEFAULT NULL::uuid, p_error_code text DEFAULT NULL::text) RETURNS text
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_b         lifecycle.breakers;
  v_cfg       jsonb;
  v_n         integer;
  v_w         record;
  v_reason    text;
  v_no_sla    boolean;
  v_shared    boolean;
BEGIN
  -- GUARD: arguments
  IF p_scope IS NULL OR p_scope NOT IN ('agent', 'capability') THEN
    RAISE EXCEPTION 'breaker scope must be agent or capability, got %', coalesce(p_scope, 'NULL')
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF p_key IS NULL OR btrim(p_key) = '' OR p_success IS NULL THEN
    RAISE EXCEPTION 'a breaker outcome needs a key and a success flag (% %)', p_scope, coalesce(p_key, 'NULL')
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF p_latency_ms IS NOT NULL AND NOT (p_latency_ms >= 0 AND p_latency_ms < 'Infinity') THEN
    RAISE EXCEPTION 'latency must be a finite number of ms >= 0, got %', p_latency_ms
      USING ERRCODE = 'invalid_parameter_value';
  END IF;

  -- the breaker row (created closed on first use), read without a lock to choose the lock
  SELECT * INTO v_b FROM lifecycle.breakers b WHERE b.scope = p_scope AND b.key = p_key;
  IF NOT FOUND THEN
    INSERT INTO lifecycle.breakers (scope, key, updated_at) VALUES (p_scope, p_key, p_now)
    ON CONFLICT ON CONSTRAINT lifecycle_breakers_pkey DO NOTHING;
    v_b.state := 'closed';
  END IF;
  v_cfg := lifecycle.breaker_config(p_scope, p_key);
  v_no_sla := jsonb_typeof(v_cfg -> 'latency_sla_ms') IS DISTINCT FROM 'number';
  v_shared := v_b.state = 'open' OR (v_b.state = 'closed' AND p_success AND v_no_sla);

  -- LOCK + RECORD: shared when this outcome leaves the state as it is (see above)
  IF v_shared THEN
    BEGIN
      SELECT * INTO v_b FROM lifecycle.breakers b WHERE b.scope = p_scope AND b.key = p_key FOR SHARE;
      IF NOT FOUND OR NOT (v_b.state = 'open' OR (v_b.state = 'closed' AND p_success AND v_no_sla)) THEN
        RAISE EXCEPTION 'breaker % % moved', p_scope, p_key USING ERRCODE = 'LCB01';
      END IF;
      INSERT INTO lifecycle.breaker_outcomes (scope, key, at, success, latency_ms, task_id, error_code)
      VALUES (p_scope, p_key, p_now, p_success, p_latency_ms, p_task_id, p_error_code)
      ON CONFLICT ON CONSTRAINT lifecycle_breaker_outcomes_one_per_task DO NOTHING;
      GET DIAGNOSTICS v_n = ROW_COUNT;
      IF v_n > 0 AND v_b.state = 'closed' THEN
        -- the window's failures first (the failures index: no scan of the window's successes);
        -- under the threshold nothing can open, whatever the rate
        SELECT count(*) INTO v_n FROM lifecycle.breaker_outcomes o
         WHERE o.scope = p_scope AND o.key = p_key AND NOT o.success
           AND o.at > p_now - make_interval(secs => (v_cfg ->> 'window_s')::float8)
           AND o.at >= coalesce(v_b.state_since, '-infinity'::timestamptz);
        IF v_n >= (v_cfg ->> 'failure_threshold')::integer THEN
          SELECT * INTO v_w
          FROM lifecycle.breaker_window(p_scope, p_key, (v_cfg ->> 'window_s')::float8, v_b.state_since, p_now);
          IF v_w.failures >= (v_cfg ->> 'failure_threshold')::integer
             AND v_w.rate > (v_cfg ->> 'error_budget')::float8 THEN
            RAISE EXCEPTION 'breaker % % over budget', p_scope, p_key USING ERRCODE = 'LCB01';
          END IF;
        END IF;
      END IF;
      RETURN v_b.state;  -- unchanged (or this task's outcome was recorded already)
    EXCEPTION WHEN SQLSTATE 'LCB01' THEN
      NULL;  -- the subtransaction rolled back: share lock and outcome given back, judged below
    END;
  END IF;

  -- LOCK: the breaker row, exclusively
  SELECT * INTO v_b FROM lifecycle.breakers b WHERE b.scope = p_scope AND b.key = p_key FOR UPDATE;

  INSERT INTO lifecycle.breaker_outcomes (scope, key, at, success, latency_ms, task_id, error_code)
  VALUES (p_scope, p_key, p_now, p_success, p_latency_ms, p_task_id, p_error_code)
  ON CONFLICT ON CONSTRAINT lifecycle_breaker_outcomes_one_per_task DO NOTHING;
  GET DIAGNOSTICS v_n = ROW_COUNT;
  IF v_n = 0 THEN
    RETURN v_b.state;  -- this task's outcome was recorded already
  END IF;

  -- TRANSITION: half_open -> open on a failure, -> closed once enough probes succeeded
  IF v_b.state = 'half_open' THEN
    IF NOT p_success THEN
      PERFORM lifecycle.breaker_set_state(p_scope, p_key, 'open', 0,
        jsonb_build_object('reason', 'probe_failed', 'error_code', p_error_code, 'task_id', p_task_id)
          || lifecycle.breaker_numbers(p_scope, p_key, v_cfg, v_b.state_since, p_now), p_now);
      RETURN 'open';
    END IF;
    SELECT count(*) INTO v_n FROM lifecycle.breaker_outcomes o
     WHERE o.scope = p_scope AND o.key = p_key AND o.success AND o.at >= v_b.state_since;
    IF v_n >= (v_cfg ->> 'half_open_probes')::integer THEN
      PERFORM lifecycle.breaker_set_state(p_scope, p_key, 'closed', 0,
        jsonb_build_object('reason', 'probes_succeeded', 'successes', v_n,
                           'half_open_probes', v_cfg -> 'half_open_probes', 'opened_at', v_b.opened_at)
          || lifecycle.breaker_numbers(p_scope, p_key, v_cfg, v_b.state_since, p_now), p_now);
      RETURN 'closed';
    END IF;
    RETURN 'half_open';
  END IF;

  -- TRANSITION: closed -> open on the window's numbers (counted since it last closed)
  IF v_b.state = 'closed' THEN
    SELECT * INTO v_w
    FROM lifecycle.breaker_window(p_scope, p_key, (v_cfg ->> 'window_s')::float8, v_b.state_since, p_now);
    IF v_w.failures >= (v_cfg ->> 'failure_threshold')::integer
       AND v_w.rate > (v_cfg ->> 'error_budget')::float8 THEN
      v_reason := 'error_budget';
    ELSIF jsonb_typeof(v_cfg -> 'latency_sla_ms') = 'number'
          AND v_w.calls >= (v_cfg ->> 'failure_threshold')::integer
          AND v_w.p95_ms > (v_cfg ->> 'latency_sla_ms')::float8 THEN
      v_reason := 'latency_sla';
    END IF;
    IF v_reason IS NOT NULL AND p_scope = 'capability' AND EXISTS (
         SELECT 1 FROM lifecycle.capability_breakers(p_key) c WHERE c.scope = 'agent' AND c.state = 'closed') THEN
      v_reason := NULL;
    END IF;
    IF v_reason IS NOT NULL THEN
      PERFORM lifecycle.breaker_set_state(p_scope, p_key, 'open', 0,
        jsonb_build_object('reason', v_reason)
          || lifecycle.breaker_numbers(p_scope, p_key, v_cfg, v_b.state_since, p_now), p_now);
      RETURN 'open';
    END IF;
  END IF;
  -- open: outcomes of calls still in flight are kept; the state waits for its cooldown
  RETURN v_b.state;
END
$$;

REVOKE ALL ON FUNCTION lifecycle.breaker_record(p_scope text, p_key text, p_success boolean, p_latency_ms double precision, p_now timestamp with time zone, p_task_id uuid, p_error_code text) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.breaker_record(p_scope text, p_key text, p_success boolean, p_latency_ms double precision, p_now timestamp with time zone, p_task_id uuid, p_error_code text) TO service_role;


-- lifecycle.breaker_record_task
CREATE OR REPLACE FUNCTION lifecycle.breaker_record_task(p_task_id uuid, p_success boolean, p_error_code text, p_now timestamp with time zone) RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_task    record;
  v_latency double precision;
  v_fast    boolean;
BEGIN
  -- GUARD: nothing to count
  IF p_task_id IS NULL OR (NOT p_success AND lifecycle.breaker_caller_fault(p_error_code)) THEN
    RETURN;
  END IF;
  SELECT t.agent_id, t.started_at, st.s ->> 'capability' AS capability INTO v_task
  FROM public.task_queue t
  JOIN public.workflow_execution_logs l ON l.id = t.stage_log_id
  JOIN public.workflow_executions e ON e.id = l.execution_id
  JOIN public.workflow_definitions d ON d.id = e.workflow_definition_id
  LEFT JOIN LATERAL (
    SELECT s FROM jsonb_array_elements(d.dag_schema -> 'stages') s WHERE s ->> 'id' = l.stage_id LIMIT 1
  ) st ON true
  WHERE t.id = p_task_id;
  IF v_task.agent_id IS NULL THEN
    RETURN;
  END IF;
  v_latency := greatest(0, extract(epoch FROM (p_now - coalesce(v_task.started_at, p_now))) * 1000);

  -- FAST PATH: a success cannot change a closed breaker that judges no latency SLA (a success only
  -- lowers the error rate). When both breakers exist and are so, share-lock them (agent, then
  -- capability: the order of the path below; a transition elsewhere waits for this commit) and
  -- record both outcomes in one statement: no second pass, no window count.
  IF p_success THEN
    SELECT count(*) = CASE WHEN v_task.capability IS NULL THEN 1 ELSE 2 END
           AND bool_and(l.state = 'closed')
           AND jsonb_typeof(lifecycle.breaker_config('agent', v_task.agent_id::text) -> 'latency_sla_ms')
               IS DISTINCT FROM 'number'
           AND jsonb_typeof(lifecycle.breaker_defaults() -> 'latency_sla_ms') IS DISTINCT FROM 'number'
      INTO v_fast
      FROM (SELECT b.state FROM lifecycle.breakers b
             WHERE (b.scope = 'agent' AND b.key = v_task.agent_id::text)
                OR (b.scope = 'capability' AND b.key = v_task.capability)
             ORDER BY b.scope
             FOR SHARE) l;
    IF v_fast THEN
      INSERT INTO lifecycle.breaker_outcomes (scope, key, at, success, latency_ms, task_id, error_code)
      SELECT k.scope, k.key, p_now, true, v_latency, p_task_id, NULL
      FROM (VALUES ('agent', v_task.agent_id::text), ('capability', v_task.capability)) k(scope, key)
      WHERE k.key IS NOT NULL
      ON CONFLICT ON CONSTRAINT lifecycle_breaker_outcomes_one_per_task DO NOTHING;
      RETURN;
    END IF;
  END IF;

  -- LOCK + TRANSITION: the agent's breaker, then the capability's
  PERFORM lifecycle.breaker_record('agent', v_task.agent_id::text, p_success, v_latency, p_now,
                                   p_task_id, p_error_code);
  IF v_task.capability IS NOT NULL THEN
    PERFORM lifecycle.breaker_record('capability', v_task.capability, p_success, v_latency, p_now,
                                     p_task_id, p_error_code);
  END IF;
END
$$;

REVOKE ALL ON FUNCTION lifecycle.breaker_record_task(p_task_id uuid, p_success boolean, p_error_code text, p_now timestamp with time zone) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.breaker_record_task(p_task_id uuid, p_success boolean, p_error_code text, p_now timestamp with time zone) TO service_role;


-- lifecycle.breaker_reset
CREATE OR REPLACE FUNCTION lifecycle.breaker_reset(p_agent_name text, p_now timestamp with time zone DEFAULT now()) RETURNS text
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_agent      public.agents;
  v_b          lifecycle.breakers;
  v_capability text;
BEGIN
  -- GUARD: the agent
  SELECT * INTO v_agent FROM public.agents a WHERE a.name = p_agent_name;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'lifecycle.breaker_reset: unknown agent %', coalesce(quote_literal(p_agent_name), 'NULL')
      USING ERRCODE = 'no_data_found',
            HINT = 'agent names are agents.name (lifecycle-dagster breakers lists them)';
  END IF;

  -- LOCK: the breaker row
  SELECT * INTO v_b FROM lifecycle.breakers b
   WHERE b.scope = 'agent' AND b.key = v_agent.id::text FOR UPDATE;
  IF NOT FOUND OR v_b.state = 'closed' THEN
    RETURN 'closed';
  END IF;

  -- TRANSITION: -> closed, counting afresh from now
  UPDATE lifecycle.breakers b
     SET state = 'closed', state_since = p_now, probes_left = 0, probe_at = NULL, updated_at = p_now
   WHERE b.scope = 'agent' AND b.key = v_agent.id::text;
  SELECT latest.knowledge ->> 'capability' INTO v_capability
  FROM (SELECT o.knowledge FROM public.agent_ontologies o
        WHERE o.agent_id = v_agent.id AND o.domain = 'orchestration'
        ORDER BY o.version DESC LIMIT 1) latest;
  INSERT INTO public.workflow_events (execution_id, event_type, metadata, "timestamp")
  VALUES (NULL, 'breaker_closed',
          jsonb_build_object('scope', 'agent', 'key', v_agent.id::text, 'agent', v_agent.name,
                             'capability', v_capability, 'from', v_b.state, 'reason', 'reset',
                             'opened_at', v_b.opened_at),
          p_now);
  RETURN v_b.state;
END
$$;

REVOKE ALL ON FUNCTION lifecycle.breaker_reset(p_agent_name text, p_now timestamp with time zone) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.breaker_reset(p_agent_name text, p_now timestamp with time zone) TO service_role;


-- lifecycle.breaker_set_state
CREATE OR REPLACE FUNCTION lifecycle.breaker_set_state(p_scope text, p_key text, p_state text, p_probes integer, p_metadata jsonb, p_now timestamp with time zone) RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_from       text;
  v_agent      text;
  v_capability text;
BEGIN
  SELECT b.state INTO v_from FROM lifecycle.breakers b WHERE b.scope = p_scope AND b.key = p_key;
  -- GUARD: the breaker's state machine
  IF (v_from, p_state) NOT IN (('closed', 'open'), ('open', 'half_open'), ('half_open', 'open'),
                               ('half_open', 'closed')) THEN
    RAISE EXCEPTION 'illegal breaker transition % -> % (% %)', v_from, p_state, p_scope, p_key
      USING ERRCODE = 'check_violation';
  END IF;

  -- TRANSITION
  UPDATE lifecycle.breakers b
     SET state = p_state, state_since = p_now, probes_left = p_probes, updated_at = p_now,
         opened_at = CASE WHEN p_state = 'open' THEN p_now ELSE b.opened_at END
   WHERE b.scope = p_scope AND b.key = p_key;
  IF p_scope = 'agent' THEN
    SELECT a.name, latest.knowledge ->> 'capability' INTO v_agent, v_capability
    FROM public.agents a
    LEFT JOIN LATERAL (
      SELECT o.knowledge FROM public.agent_ontologies o
      WHERE o.agent_id = a.id AND o.domain = 'orchestration' ORDER BY o.version DESC LIMIT 1
    ) latest ON true
    WHERE a.id::text = p_key;
  ELSE
    v_capability := p_key;
  END IF;
  INSERT INTO public.workflow_events (execution_id, event_type, metadata, "timestamp")
  VALUES (NULL,
          CASE p_state WHEN 'open' THEN 'breaker_opened' WHEN 'half_open' THEN 'breaker_half_open'
                       ELSE 'breaker_closed' END,
          jsonb_build_object('scope', p_scope, 'key', p_key, 'agent', v_agent,
                             'capability', v_capability, 'from', v_from)
            || coalesce(p_metadata, '{}'::jsonb),
          p_now);
END
$$;

REVOKE ALL ON FUNCTION lifecycle.breaker_set_state(p_scope text, p_key text, p_state text, p_probes integer, p_metadata jsonb, p_now timestamp with time zone) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.breaker_set_state(p_scope text, p_key text, p_state text, p_probes integer, p_metadata jsonb, p_now timestamp with time zone) TO service_role;


-- lifecycle.breaker_trip
CREATE OR REPLACE FUNCTION lifecycle.breaker_trip(p_scope text, p_key text, p_metadata jsonb, p_now timestamp with time zone) RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_b   lifecycle.breakers;
  v_cfg jsonb;
BEGIN
  -- LOCK: the breaker row (created closed on first use)
  INSERT INTO lifecycle.breakers (scope, key, updated_at) VALUES (p_scope, p_key, p_now)
  ON CONFLICT ON CONSTRAINT lifecycle_breakers_pkey DO NOTHING;
  SELECT * INTO v_b FROM lifecycle.breakers b WHERE b.scope = p_scope AND b.key = p_key FOR UPDATE;
  v_cfg := lifecycle.breaker_config(p_scope, p_key);

  -- TRANSITION
  IF v_b.state = 'open' THEN
    UPDATE lifecycle.breakers b SET opened_at = p_now, state_since = p_now, updated_at = p_now
     WHERE b.scope = p_scope AND b.key = p_key;
    RETURN;
  END IF;
  PERFORM lifecycle.breaker_set_state(p_scope, p_key, 'open', 0,
    jsonb_build_object('reason', 'tripped')
      || lifecycle.breaker_numbers(p_scope, p_key, v_cfg,
                                   CASE WHEN v_b.state = 'closed' THEN v_b.state_since END, p_now)
      || coalesce(p_metadata, '{}'::jsonb), p_now);
END
$$;

REVOKE ALL ON FUNCTION lifecycle.breaker_trip(p_scope text, p_key text, p_metadata jsonb, p_now timestamp with time zone) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.breaker_trip(p_scope text, p_key text, p_metadata jsonb, p_now timestamp with time zone) TO service_role;


-- lifecycle.breaker_window
CREATE OR REPLACE FUNCTION lifecycle.breaker_window(p_scope text, p_key text, p_window_s double precision, p_from timestamp with time zone, p_now timestamp with time zone DEFAULT now()) RETURNS TABLE(calls integer, failures integer, rate double precision, p95_ms double precision)
    LANGUAGE sql STABLE
    AS $$
  SELECT count(*)::integer,
         count(*) FILTER (WHERE NOT o.success)::integer,
         CASE WHEN count(*) = 0 THEN 0
              ELSE (count(*) FILTER (WHERE NOT o.success))::double precision / count(*) END,
         percentile_disc(0.95) WITHIN GROUP (ORDER BY o.latency_ms)
  FROM lifecycle.breaker_outcomes o
  WHERE o.scope = p_scope AND o.key = p_key
    AND o.at > p_now - make_interval(secs => p_window_s)
    AND o.at >= coalesce(p_from, '-infinity'::timestamptz)
$$;

REVOKE ALL ON FUNCTION lifecycle.breaker_window(p_scope text, p_key text, p_window_s double precision, p_from timestamp with time zone, p_now timestamp with time zone) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.breaker_window(p_scope text, p_key text, p_window_s double precision, p_from timestamp with time zone, p_now timestamp with time zone) TO service_role;


-- lifecycle.capability_agents
CREATE OR REPLACE FUNCTION lifecycle.capability_agents(p_capability text) RETURNS TABLE(agent_id uuid, agent_name text, agent_kind text)
    LANGUAGE sql STABLE
    AS $$
  SELECT a.id, a.name, a.kind
  FROM public.agents a
  JOIN LATERAL (
    SELECT o.knowledge
    FROM public.agent_ontologies o
    WHERE o.agent_id = a.id AND o.domain = 'orchestration'
    ORDER BY o.version DESC
    LIMIT 1
  ) latest ON true
  WHERE a.is_active
    AND (latest.knowledge ->> 'capability' = p_capability
         OR (jsonb_typeof(latest.knowledge -> 'capabilities') = 'array'
             AND latest.knowledge -> 'capabilities' ? p_capability))
  ORDER BY (SELECT count(*) FROM public.task_queue t WHERE t.agent_id = a.id AND t.status = 'in_progress'), a.name
$$;

REVOKE ALL ON FUNCTION lifecycle.capability_agents(p_capability text) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.capability_agents(p_capability text) TO service_role;


-- lifecycle.capability_breakers
CREATE OR REPLACE FUNCTION lifecycle.capability_breakers(p_capability text) RETURNS TABLE(scope text, key text, name text, state text, opened_at timestamp with time zone, probes_left integer)
    LANGUAGE sql STABLE
    AS $$
  SELECT b.scope, b.key, b.key, b.state, b.opened_at, b.probes_left
  FROM lifecycle.breakers b
  WHERE b.scope = 'capability' AND b.key = p_capability
  UNION ALL
  SELECT 'agent', c.agent_id::text, c.agent_name, coalesce(b.state, 'closed'), b.opened_at,
         coalesce(b.probes_left, 0)
  FROM lifecycle.capability_agents(p_capability) c
  LEFT JOIN lifecycle.breakers b ON b.scope = 'agent' AND b.key = c.agent_id::text
$$;

REVOKE ALL ON FUNCTION lifecycle.capability_breakers(p_capability text) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.capability_breakers(p_capability text) TO service_role;


-- lifecycle.capability_route
CREATE OR REPLACE FUNCTION lifecycle.capability_route(p_capability text, p_now timestamp with time zone DEFAULT now()) RETURNS TABLE(agent_id uuid, agent_name text, agent_kind text)
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_candidate record;
  v_pick      record;
  v_found     boolean := false;
BEGIN
  -- FAST PATH: the first candidate, when its breaker and the capability's are closed (or not made
  -- yet), is admitted with no lock and no probe: what the loop below decides in that case
  SELECT c.agent_id, c.agent_name, c.agent_kind,
         coalesce(ba.state, 'closed') = 'closed'
         AND NOT EXISTS (SELECT 1 FROM lifecycle.breakers bc
                          WHERE bc.scope = 'capability' AND bc.key = p_capability AND bc.state <> 'closed') AS clear
    INTO v_pick
    FROM (SELECT * FROM lifecycle.capability_agents(p_capability) LIMIT 1) c  -- its order: least loaded
    LEFT JOIN lifecycle.breakers ba ON ba.scope = 'agent' AND ba.key = c.agent_id::text;
  IF NOT FOUND THEN
    RETURN;
  END IF;
  IF v_pick.clear THEN
    agent_id := v_pick.agent_id; agent_name := v_pick.agent_name; agent_kind := v_pick.agent_kind;
    RETURN NEXT;
    RETURN;
  END IF;

  -- LOCK + TRANSITION: agent breakers in name order, then the capability's
  FOR v_candidate IN SELECT * FROM lifecycle.capability_agents(p_capability) LOOP
    IF lifecycle.breaker_admit('agent', v_candidate.agent_id::text, p_now, false) THEN
      v_pick := v_candidate;
      v_found := true;
      EXIT;
    END IF;
  END LOOP;
  IF NOT v_found THEN
    RETURN;
  END IF;
  IF NOT lifecycle.breaker_admit('capability', p_capability, p_now, true) THEN
    RETURN;
  END IF;
  PERFORM lifecycle.breaker_admit('agent', v_pick.agent_id::text, p_now, true);
  RETURN QUERY SELECT v_pick.agent_id, v_pick.agent_name, v_pick.agent_kind;
END
$$;

REVOKE ALL ON FUNCTION lifecycle.capability_route(p_capability text, p_now timestamp with time zone) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.capability_route(p_capability text, p_now timestamp with time zone) TO service_role;


-- lifecycle.execution_trip
CREATE OR REPLACE FUNCTION lifecycle.execution_trip(p_execution_id uuid, p_reason text, p_now timestamp with time zone DEFAULT now()) RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_exec   public.workflow_executions;
  v_task   record;
  v_reason text := coalesce(nullif(p_reason, ''), 'circuit breaker tripped');
  v_state  jsonb;
BEGIN
  -- LOCK: execution
  SELECT * INTO v_exec FROM public.workflow_executions e WHERE e.id = p_execution_id FOR UPDATE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'trip_circuit_breaker: unknown workflow execution %', p_execution_id
      USING ERRCODE = 'no_data_found';
  END IF;

  -- the agent of the most recently failed task
  SELECT t.id, t.agent_id, t.task_type AS stage_id, a.name AS agent_name INTO v_task
  FROM public.task_queue t JOIN public.agents a ON a.id = t.agent_id
  WHERE t.workflow_execution_id = p_execution_id AND t.status = 'failed'
  ORDER BY coalesce(t.completed_at, t.updated_at) DESC, t.created_at DESC
  LIMIT 1;
  v_state := jsonb_build_object('tripped_at', p_now, 'reason', v_reason, 'agent', v_task.agent_name,
                                'agent_id', v_task.agent_id, 'stage', v_task.stage_id,
                                'task_id', v_task.id, 'previous_status', v_exec.status);

  -- TRANSITION: execution
  IF v_exec.status = 'pending' THEN
    UPDATE public.workflow_executions e SET status = 'in_progress', updated_at = p_now WHERE e.id = p_execution_id;
  END IF;
  IF v_exec.status IN ('pending', 'in_progress') THEN
    UPDATE public.workflow_executions e
       SET status = 'failed', circuit_breaker_state = v_state, updated_at = p_now,
           error_message = format('circuit breaker tripped: %s', v_reason)
     WHERE e.id = p_execution_id;
    INSERT INTO public.workflow_events (execution_id, event_type, stage_id, metadata, "timestamp")
    VALUES (p_execution_id, 'workflow_failed', v_task.stage_id,
            jsonb_build_object('reason', v_reason, 'error_code', 'circuit_breaker_tripped',
                               'agent', v_task.agent_name, 'previous_status', v_exec.status),
            p_now);
  ELSE
    UPDATE public.workflow_executions e SET circuit_breaker_state = v_state, updated_at = p_now
     WHERE e.id = p_execution_id;
    INSERT INTO public.workflow_events (execution_id, event_type, stage_id, metadata, "timestamp")
    VALUES (p_execution_id, 'circuit_breaker_tripped', v_task.stage_id,
            jsonb_build_object('reason', v_reason, 'agent', v_task.agent_name, 'status', v_exec.status),
            p_now);
  END IF;

  -- TRANSITION: the agent's breaker
  IF v_task.agent_id IS NOT NULL THEN
    PERFORM lifecycle.breaker_trip('agent', v_task.agent_id::text,
      jsonb_build_object('execution_id', p_execution_id, 'trip_reason', v_reason, 'task_id', v_task.id),
      p_now);
  END IF;
END
$$;

REVOKE ALL ON FUNCTION lifecycle.execution_trip(p_execution_id uuid, p_reason text, p_now timestamp with time zone) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.execution_trip(p_execution_id uuid, p_reason text, p_now timestamp with time zone) TO service_role;


-- view lifecycle_breaker_status
CREATE OR REPLACE VIEW lifecycle.breaker_status WITH (security_invoker='true') AS
 SELECT b.scope,
    b.key,
        CASE
            WHEN (b.scope = 'agent'::text) THEN a.name
            ELSE b.key
        END AS name,
    b.state,
    b.state_since,
    b.opened_at,
        CASE
            WHEN (b.state = 'open'::text) THEN (b.opened_at + make_interval(secs => ((c.cfg ->> 'cooldown_s'::text))::double precision))
            ELSE NULL::timestamp with time zone
        END AS half_open_at,
    b.probes_left,
    w.calls,
    w.failures,
    w.rate,
    w.p95_ms,
    c.cfg AS config,
    b.updated_at
   FROM (((lifecycle.breakers b
     LEFT JOIN public.agents a ON (((b.scope = 'agent'::text) AND ((a.id)::text = b.key))))
     CROSS JOIN LATERAL ( SELECT lifecycle.breaker_config(b.scope, b.key) AS cfg) c)
     CROSS JOIN LATERAL lifecycle.breaker_window(b.scope, b.key, ((c.cfg ->> 'window_s'::text))::double precision,
        CASE
            WHEN (b.state = 'closed'::text) THEN b.state_since
            ELSE NULL::timestamp with time zone
        END, now()) w(calls, failures, rate, p95_ms));
