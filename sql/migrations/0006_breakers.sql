-- 0006_breakers: circuit breakers per agent and per capability, and the runbook's
-- trip_circuit_breaker (section 4), fixed.
--
-- A breaker is closed (calls go through), open (calls fail fast) or half_open (a few probe calls
-- go through). closed -> open when, in the window, failures reach failure_threshold AND the
-- failure rate exceeds error_budget, or when p95 latency exceeds latency_sla_ms (with at least
-- failure_threshold calls); open -> half_open on the first routing after cooldown_s;
-- half_open -> closed once half_open_probes probes succeeded; half_open -> open on a probe's
-- failure. Every transition writes breaker_opened / breaker_half_open / breaker_closed
-- (execution_id NULL). Transitions happen in the transaction that records an outcome or routes a
-- call: nothing runs in the background.
--
-- Outcomes are rows (lifecycle_breaker_outcomes), so concurrent recorders never lose a count; the
-- evaluation locks the breaker row. Lock order, after the execution / stage log / task locks of
-- 0002-0003: agent breakers (routing takes them in agent name order), then the capability's.
-- Functions that read the clock take p_now.

-- ---------------------------------------------------------------------------------------------
-- Settings: agents.config -> 'breaker' over these defaults (capability breakers use the defaults).
CREATE FUNCTION lifecycle_breaker_defaults() RETURNS jsonb
LANGUAGE sql IMMUTABLE
AS $$
  SELECT '{"window_s": 60, "failure_threshold": 5, "error_budget": 0.5, "latency_sla_ms": null,
           "cooldown_s": 30, "half_open_probes": 1}'::jsonb
$$;

-- What is wrong with a breaker setting (agents.config -> 'breaker'), or NULL when it is valid.
CREATE FUNCTION lifecycle_breaker_config_problem(p_config jsonb) RETURNS text
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
  FROM jsonb_object_keys(p_config) k WHERE NOT lifecycle_breaker_defaults() ? k;
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

CREATE FUNCTION lifecycle_guard_agent_config() RETURNS trigger
LANGUAGE plpgsql
AS $$
DECLARE
  v_problem text := lifecycle_breaker_config_problem(NEW.config -> 'breaker');
BEGIN
  IF v_problem IS NOT NULL THEN
    RAISE EXCEPTION 'agent %: config.breaker %', NEW.name, v_problem
      USING ERRCODE = 'check_violation',
            HINT = 'see lifecycle_breaker_defaults() for the keys and their defaults';
  END IF;
  RETURN NEW;
END
$$;

CREATE TRIGGER agents_breaker_config
  BEFORE INSERT OR UPDATE OF config ON agents
  FOR EACH ROW EXECUTE FUNCTION lifecycle_guard_agent_config();

-- The settings of one breaker: the defaults, overridden by the agent's config.breaker.
CREATE FUNCTION lifecycle_breaker_config(p_scope text, p_key text) RETURNS jsonb
LANGUAGE sql STABLE
AS $$
  SELECT lifecycle_breaker_defaults()
         || coalesce((SELECT nullif(a.config -> 'breaker', 'null'::jsonb) FROM agents a
                      WHERE p_scope = 'agent' AND a.id::text = p_key), '{}'::jsonb)
$$;

-- Errors that are the caller's fault, not the agent's: they never count against a breaker.
-- Every other error code (timeout, overloaded, rate_limited, agent_crashed, bad_output, any code
-- of the agent's own) is a failure of the agent.
CREATE FUNCTION lifecycle_breaker_caller_fault(p_error_code text) RETURNS boolean
LANGUAGE sql IMMUTABLE
AS $$
  SELECT coalesce(p_error_code = ANY (ARRAY['bad_request', 'bad_input', 'integrity_failed',
                                            'missing_upstream', 'no_agent', 'agent_not_registered',
                                            'cancelled', 'breaker_open']), false)
$$;

-- ---------------------------------------------------------------------------------------------
-- key: the agent's id (scope 'agent') or the capability (scope 'capability'). A missing row is a
-- closed breaker with no history.
CREATE TABLE lifecycle_breakers (
  scope       text        NOT NULL,
  key         text        NOT NULL,
  state       text        NOT NULL DEFAULT 'closed',
  state_since timestamptz,               -- when it entered its state; NULL: closed since created
  opened_at   timestamptz,               -- when it last opened
  probes_left integer     NOT NULL DEFAULT 0,
  probe_at    timestamptz,               -- when the last probe was let through
  updated_at  timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT lifecycle_breakers_pkey PRIMARY KEY (scope, key),
  CONSTRAINT lifecycle_breakers_scope_valid CHECK (scope IN ('agent', 'capability')),
  CONSTRAINT lifecycle_breakers_state_valid CHECK (state IN ('closed', 'open', 'half_open')),
  CONSTRAINT lifecycle_breakers_probes_not_negative CHECK (probes_left >= 0),
  CONSTRAINT lifecycle_breakers_open_has_opened_at CHECK (state = 'closed' OR opened_at IS NOT NULL)
);

-- One row per counted call. task_id makes recording a task's outcome idempotent (a timed-out
-- result is refused, then the same task's retry is recorded: it counts once).
CREATE TABLE lifecycle_breaker_outcomes (
  id         bigint      GENERATED ALWAYS AS IDENTITY,
  scope      text        NOT NULL,
  key        text        NOT NULL,
  at         timestamptz NOT NULL,
  success    boolean     NOT NULL,
  latency_ms double precision,
  task_id    uuid,
  error_code text,
  CONSTRAINT lifecycle_breaker_outcomes_pkey PRIMARY KEY (id),
  CONSTRAINT lifecycle_breaker_outcomes_breaker_fkey FOREIGN KEY (scope, key)
    REFERENCES lifecycle_breakers (scope, key) ON DELETE CASCADE,
  CONSTRAINT lifecycle_breaker_outcomes_one_per_task UNIQUE (scope, key, task_id),
  CONSTRAINT lifecycle_breaker_outcomes_latency_valid
    CHECK (latency_ms IS NULL OR (latency_ms >= 0 AND latency_ms < 'Infinity'))
);

CREATE INDEX lifecycle_breaker_outcomes_window_idx ON lifecycle_breaker_outcomes (scope, key, at);

-- The numbers of a breaker's window: outcomes at (p_now - p_window_s, ...] and not before p_from.
-- p95_ms is nearest-rank (percentile_disc: an observed latency); NULL without latencies.
CREATE FUNCTION lifecycle_breaker_window(
  p_scope    text,
  p_key      text,
  p_window_s double precision,
  p_from     timestamptz,
  p_now      timestamptz DEFAULT now()
) RETURNS TABLE (calls integer, failures integer, rate double precision, p95_ms double precision)
LANGUAGE sql STABLE
AS $$
  SELECT count(*)::integer,
         count(*) FILTER (WHERE NOT o.success)::integer,
         CASE WHEN count(*) = 0 THEN 0
              ELSE (count(*) FILTER (WHERE NOT o.success))::double precision / count(*) END,
         percentile_disc(0.95) WITHIN GROUP (ORDER BY o.latency_ms)
  FROM lifecycle_breaker_outcomes o
  WHERE o.scope = p_scope AND o.key = p_key
    AND o.at > p_now - make_interval(secs => p_window_s)
    AND o.at >= coalesce(p_from, '-infinity'::timestamptz)
$$;

-- Routing candidates: the active agents whose latest 'orchestration' ontology declares the
-- capability (the runbook's section 7 shape), by name.
CREATE FUNCTION lifecycle_capability_agents(p_capability text)
RETURNS TABLE (agent_id uuid, agent_name text, agent_kind text)
LANGUAGE sql STABLE
AS $$
  SELECT a.id, a.name, a.kind
  FROM agents a
  JOIN LATERAL (
    SELECT o.knowledge
    FROM agent_ontologies o
    WHERE o.agent_id = a.id AND o.domain = 'orchestration'
    ORDER BY o.version DESC
    LIMIT 1
  ) latest ON true
  WHERE a.is_active AND latest.knowledge ->> 'capability' = p_capability
  ORDER BY a.name
$$;

-- The breakers that decide routing for a capability: its own (when it has a row) and one per
-- agent serving it (closed when the agent has no row). No agent rows: no agent serves it.
CREATE FUNCTION lifecycle_capability_breakers(p_capability text)
RETURNS TABLE (scope text, key text, name text, state text, opened_at timestamptz, probes_left integer)
LANGUAGE sql STABLE
AS $$
  SELECT b.scope, b.key, b.key, b.state, b.opened_at, b.probes_left
  FROM lifecycle_breakers b
  WHERE b.scope = 'capability' AND b.key = p_capability
  UNION ALL
  SELECT 'agent', c.agent_id::text, c.agent_name, coalesce(b.state, 'closed'), b.opened_at,
         coalesce(b.probes_left, 0)
  FROM lifecycle_capability_agents(p_capability) c
  LEFT JOIN lifecycle_breakers b ON b.scope = 'agent' AND b.key = c.agent_id::text
$$;

-- Move a breaker (row locked by the caller) to p_state and write its event; p_metadata carries the
-- numbers that caused it.
CREATE FUNCTION lifecycle_breaker_set_state(
  p_scope    text,
  p_key      text,
  p_state    text,
  p_probes   integer,
  p_metadata jsonb,
  p_now      timestamptz
) RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
  v_from       text;
  v_agent      text;
  v_capability text;
BEGIN
  SELECT b.state INTO v_from FROM lifecycle_breakers b WHERE b.scope = p_scope AND b.key = p_key;
  -- GUARD: the breaker's state machine
  IF (v_from, p_state) NOT IN (('closed', 'open'), ('open', 'half_open'), ('half_open', 'open'),
                               ('half_open', 'closed')) THEN
    RAISE EXCEPTION 'illegal breaker transition % -> % (% %)', v_from, p_state, p_scope, p_key
      USING ERRCODE = 'check_violation';
  END IF;

  -- TRANSITION
  UPDATE lifecycle_breakers b
     SET state = p_state, state_since = p_now, probes_left = p_probes, updated_at = p_now,
         opened_at = CASE WHEN p_state = 'open' THEN p_now ELSE b.opened_at END
   WHERE b.scope = p_scope AND b.key = p_key;
  IF p_scope = 'agent' THEN
    SELECT a.name, latest.knowledge ->> 'capability' INTO v_agent, v_capability
    FROM agents a
    LEFT JOIN LATERAL (
      SELECT o.knowledge FROM agent_ontologies o
      WHERE o.agent_id = a.id AND o.domain = 'orchestration' ORDER BY o.version DESC LIMIT 1
    ) latest ON true
    WHERE a.id::text = p_key;
  ELSE
    v_capability := p_key;
  END IF;
  INSERT INTO workflow_events (execution_id, event_type, metadata, "timestamp")
  VALUES (NULL,
          CASE p_state WHEN 'open' THEN 'breaker_opened' WHEN 'half_open' THEN 'breaker_half_open'
                       ELSE 'breaker_closed' END,
          jsonb_build_object('scope', p_scope, 'key', p_key, 'agent', v_agent,
                             'capability', v_capability, 'from', v_from)
            || coalesce(p_metadata, '{}'::jsonb),
          p_now);
END
$$;

-- The numbers an opening reports: the window's counts and the settings that judged them.
CREATE FUNCTION lifecycle_breaker_numbers(
  p_scope  text,
  p_key    text,
  p_config jsonb,
  p_from   timestamptz,
  p_now    timestamptz
) RETURNS jsonb
LANGUAGE sql STABLE
AS $$
  SELECT jsonb_build_object('failures', w.failures, 'calls', w.calls, 'rate', round(w.rate::numeric, 4),
                            'p95_ms', w.p95_ms)
         || (p_config - 'half_open_probes')
  FROM lifecycle_breaker_window(p_scope, p_key, (p_config ->> 'window_s')::float8, p_from, p_now) w
$$;

-- ---------------------------------------------------------------------------------------------
-- Record one call's outcome against a breaker and judge it. Returns the breaker's state
-- afterwards. A capability breaker opens only when none of the capability's agents is closed:
-- while one is healthy, routing goes around the open ones instead.
CREATE FUNCTION lifecycle_breaker_record(
  p_scope      text,
  p_key        text,
  p_success    boolean,
  p_latency_ms double precision DEFAULT NULL,
  p_now        timestamptz DEFAULT now(),
  p_task_id    uuid DEFAULT NULL,
  p_error_code text DEFAULT NULL
) RETURNS text
LANGUAGE plpgsql
AS $$
DECLARE
  v_b         lifecycle_breakers;
  v_cfg       jsonb;
  v_n         integer;
  v_w         record;
  v_reason    text;
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

  -- LOCK: the breaker row (created closed on first use)
  INSERT INTO lifecycle_breakers (scope, key, updated_at) VALUES (p_scope, p_key, p_now)
  ON CONFLICT ON CONSTRAINT lifecycle_breakers_pkey DO NOTHING;
  SELECT * INTO v_b FROM lifecycle_breakers b WHERE b.scope = p_scope AND b.key = p_key FOR UPDATE;

  INSERT INTO lifecycle_breaker_outcomes (scope, key, at, success, latency_ms, task_id, error_code)
  VALUES (p_scope, p_key, p_now, p_success, p_latency_ms, p_task_id, p_error_code)
  ON CONFLICT ON CONSTRAINT lifecycle_breaker_outcomes_one_per_task DO NOTHING;
  GET DIAGNOSTICS v_n = ROW_COUNT;
  IF v_n = 0 THEN
    RETURN v_b.state;  -- this task's outcome was recorded already
  END IF;
  v_cfg := lifecycle_breaker_config(p_scope, p_key);

  -- TRANSITION: half_open -> open on a failure, -> closed once enough probes succeeded
  IF v_b.state = 'half_open' THEN
    IF NOT p_success THEN
      PERFORM lifecycle_breaker_set_state(p_scope, p_key, 'open', 0,
        jsonb_build_object('reason', 'probe_failed', 'error_code', p_error_code, 'task_id', p_task_id)
          || lifecycle_breaker_numbers(p_scope, p_key, v_cfg, v_b.state_since, p_now), p_now);
      RETURN 'open';
    END IF;
    SELECT count(*) INTO v_n FROM lifecycle_breaker_outcomes o
     WHERE o.scope = p_scope AND o.key = p_key AND o.success AND o.at >= v_b.state_since;
    IF v_n >= (v_cfg ->> 'half_open_probes')::integer THEN
      PERFORM lifecycle_breaker_set_state(p_scope, p_key, 'closed', 0,
        jsonb_build_object('reason', 'probes_succeeded', 'successes', v_n,
                           'half_open_probes', v_cfg -> 'half_open_probes', 'opened_at', v_b.opened_at)
          || lifecycle_breaker_numbers(p_scope, p_key, v_cfg, v_b.state_since, p_now), p_now);
      RETURN 'closed';
    END IF;
    RETURN 'half_open';
  END IF;

  -- TRANSITION: closed -> open on the window's numbers (counted since it last closed)
  IF v_b.state = 'closed' THEN
    SELECT * INTO v_w
    FROM lifecycle_breaker_window(p_scope, p_key, (v_cfg ->> 'window_s')::float8, v_b.state_since, p_now);
    IF v_w.failures >= (v_cfg ->> 'failure_threshold')::integer
       AND v_w.rate > (v_cfg ->> 'error_budget')::float8 THEN
      v_reason := 'error_budget';
    ELSIF jsonb_typeof(v_cfg -> 'latency_sla_ms') = 'number'
          AND v_w.calls >= (v_cfg ->> 'failure_threshold')::integer
          AND v_w.p95_ms > (v_cfg ->> 'latency_sla_ms')::float8 THEN
      v_reason := 'latency_sla';
    END IF;
    IF v_reason IS NOT NULL AND p_scope = 'capability' AND EXISTS (
         SELECT 1 FROM lifecycle_capability_breakers(p_key) c WHERE c.scope = 'agent' AND c.state = 'closed') THEN
      v_reason := NULL;
    END IF;
    IF v_reason IS NOT NULL THEN
      PERFORM lifecycle_breaker_set_state(p_scope, p_key, 'open', 0,
        jsonb_build_object('reason', v_reason)
          || lifecycle_breaker_numbers(p_scope, p_key, v_cfg, v_b.state_since, p_now), p_now);
      RETURN 'open';
    END IF;
  END IF;
  -- open: outcomes of calls still in flight are kept; the state waits for its cooldown
  RETURN v_b.state;
END
$$;

-- Record the outcome of an agent call (a task) against its agent and its stage's capability;
-- called by the stage transitions in their own transaction. Caller-fault errors and tasks without
-- an agent record nothing. Latency: p_now - the task's started_at.
CREATE FUNCTION lifecycle_breaker_record_task(
  p_task_id    uuid,
  p_success    boolean,
  p_error_code text,
  p_now        timestamptz
) RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
  v_task    record;
  v_latency double precision;
BEGIN
  -- GUARD: nothing to count
  IF p_task_id IS NULL OR (NOT p_success AND lifecycle_breaker_caller_fault(p_error_code)) THEN
    RETURN;
  END IF;
  SELECT t.agent_id, t.started_at, st.s ->> 'capability' AS capability INTO v_task
  FROM task_queue t
  JOIN workflow_execution_logs l ON l.id = t.stage_log_id
  JOIN workflow_executions e ON e.id = l.execution_id
  JOIN workflow_definitions d ON d.id = e.workflow_definition_id
  LEFT JOIN LATERAL (
    SELECT s FROM jsonb_array_elements(d.dag_schema -> 'stages') s WHERE s ->> 'id' = l.stage_id LIMIT 1
  ) st ON true
  WHERE t.id = p_task_id;
  IF v_task.agent_id IS NULL THEN
    RETURN;
  END IF;
  v_latency := greatest(0, extract(epoch FROM (p_now - coalesce(v_task.started_at, p_now))) * 1000);

  -- LOCK + TRANSITION: the agent's breaker, then the capability's
  PERFORM lifecycle_breaker_record('agent', v_task.agent_id::text, p_success, v_latency, p_now,
                                   p_task_id, p_error_code);
  IF v_task.capability IS NOT NULL THEN
    PERFORM lifecycle_breaker_record('capability', v_task.capability, p_success, v_latency, p_now,
                                     p_task_id, p_error_code);
  END IF;
END
$$;

-- May a call go through this breaker now? open -> half_open once the cooldown passed; half_open
-- lets half_open_probes calls through (p_take_probe: this call is one). A probe whose outcome
-- never counts (a caller-fault error, a lost worker) is given back after another cooldown.
CREATE FUNCTION lifecycle_breaker_admit(
  p_scope      text,
  p_key        text,
  p_now        timestamptz,
  p_take_probe boolean
) RETURNS boolean
LANGUAGE plpgsql
AS $$
DECLARE
  v_b      lifecycle_breakers;
  v_cfg    jsonb;
  v_cool   interval;
  v_probes integer;
BEGIN
  SELECT * INTO v_b FROM lifecycle_breakers b WHERE b.scope = p_scope AND b.key = p_key;
  IF NOT FOUND OR v_b.state = 'closed' THEN
    RETURN true;  -- the common case takes no lock
  END IF;

  -- LOCK: the breaker row
  SELECT * INTO v_b FROM lifecycle_breakers b WHERE b.scope = p_scope AND b.key = p_key FOR UPDATE;
  IF v_b.state = 'closed' THEN
    RETURN true;
  END IF;
  v_cfg := lifecycle_breaker_config(p_scope, p_key);
  v_cool := make_interval(secs => (v_cfg ->> 'cooldown_s')::float8);
  v_probes := (v_cfg ->> 'half_open_probes')::integer;

  -- TRANSITION: open -> half_open after the cooldown
  IF v_b.state = 'open' THEN
    IF p_now < v_b.opened_at + v_cool THEN
      RETURN false;
    END IF;
    PERFORM lifecycle_breaker_set_state(p_scope, p_key, 'half_open', v_probes,
      jsonb_build_object('opened_at', v_b.opened_at, 'cooldown_s', v_cfg -> 'cooldown_s',
                         'half_open_probes', v_probes), p_now);
    v_b.probes_left := v_probes;
  ELSIF v_b.probes_left = 0 AND v_b.probe_at IS NOT NULL AND p_now >= v_b.probe_at + v_cool THEN
    UPDATE lifecycle_breakers b SET probes_left = v_probes, updated_at = p_now
     WHERE b.scope = p_scope AND b.key = p_key;
    v_b.probes_left := v_probes;
  END IF;

  -- half_open: a probe, if one is left
  IF v_b.probes_left = 0 THEN
    RETURN false;
  END IF;
  IF p_take_probe THEN
    UPDATE lifecycle_breakers b SET probes_left = b.probes_left - 1, probe_at = p_now, updated_at = p_now
     WHERE b.scope = p_scope AND b.key = p_key;
  END IF;
  RETURN true;
END
$$;

-- Open a breaker now (trip_circuit_breaker); an open one stays open, its cooldown restarting.
CREATE FUNCTION lifecycle_breaker_trip(
  p_scope    text,
  p_key      text,
  p_metadata jsonb,
  p_now      timestamptz
) RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
  v_b   lifecycle_breakers;
  v_cfg jsonb;
BEGIN
  -- LOCK: the breaker row (created closed on first use)
  INSERT INTO lifecycle_breakers (scope, key, updated_at) VALUES (p_scope, p_key, p_now)
  ON CONFLICT ON CONSTRAINT lifecycle_breakers_pkey DO NOTHING;
  SELECT * INTO v_b FROM lifecycle_breakers b WHERE b.scope = p_scope AND b.key = p_key FOR UPDATE;
  v_cfg := lifecycle_breaker_config(p_scope, p_key);

  -- TRANSITION
  IF v_b.state = 'open' THEN
    UPDATE lifecycle_breakers b SET opened_at = p_now, state_since = p_now, updated_at = p_now
     WHERE b.scope = p_scope AND b.key = p_key;
    RETURN;
  END IF;
  PERFORM lifecycle_breaker_set_state(p_scope, p_key, 'open', 0,
    jsonb_build_object('reason', 'tripped')
      || lifecycle_breaker_numbers(p_scope, p_key, v_cfg,
                                   CASE WHEN v_b.state = 'closed' THEN v_b.state_since END, p_now)
      || coalesce(p_metadata, '{}'::jsonb), p_now);
END
$$;

-- ---------------------------------------------------------------------------------------------
-- Routing, breaker-aware: the first agent by name whose breaker lets a call through, provided the
-- capability's breaker does too (a half-open probe is taken from each). No row: no agent serves
-- the capability, or every breaker in the way is open (lifecycle_capability_breakers tells which).
-- Callable as before with one argument; lifecycle_start_stage calls it so, routing at now().
DROP FUNCTION lifecycle_route_capability(text);

CREATE FUNCTION lifecycle_route_capability(p_capability text, p_now timestamptz DEFAULT now())
RETURNS TABLE (agent_id uuid, agent_name text, agent_kind text)
LANGUAGE plpgsql
AS $$
DECLARE
  v_candidate record;
  v_pick      record;
  v_found     boolean := false;
BEGIN
  -- LOCK + TRANSITION: agent breakers in name order, then the capability's
  FOR v_candidate IN SELECT * FROM lifecycle_capability_agents(p_capability) LOOP
    IF lifecycle_breaker_admit('agent', v_candidate.agent_id::text, p_now, false) THEN
      v_pick := v_candidate;
      v_found := true;
      EXIT;
    END IF;
  END LOOP;
  IF NOT v_found THEN
    RETURN;
  END IF;
  IF NOT lifecycle_breaker_admit('capability', p_capability, p_now, true) THEN
    RETURN;
  END IF;
  PERFORM lifecycle_breaker_admit('agent', v_pick.agent_id::text, p_now, true);
  RETURN QUERY SELECT v_pick.agent_id, v_pick.agent_name, v_pick.agent_kind;
END
$$;

-- ---------------------------------------------------------------------------------------------
-- The stage transitions of 0003, same signatures and bodies, plus the outcome of the agent call
-- recorded against its breakers in the same transaction.

-- As in 0003; a success counts for the agent; a result refused because its attempt timed out
-- counts as a failure (code timeout); other refusals (stale attempt, execution over) do not count.
CREATE OR REPLACE FUNCTION lifecycle_complete_stage(
  p_log_id  uuid,
  p_task_id uuid  DEFAULT NULL,
  p_output  jsonb DEFAULT '{}'::jsonb,
  p_now     timestamptz DEFAULT now(),
  p_attempt integer DEFAULT NULL
) RETURNS text
LANGUAGE plpgsql
AS $$
DECLARE
  v_exec   workflow_executions;
  v_log    workflow_execution_logs;
  v_stages jsonb;
  v_done   integer;
  v_reason text;
BEGIN
  -- GUARD: output is a JSON object
  IF jsonb_typeof(p_output) IS DISTINCT FROM 'object' THEN
    RAISE EXCEPTION 'stage output must be a JSON object, got %', coalesce(jsonb_typeof(p_output), 'NULL')
      USING ERRCODE = 'invalid_parameter_value';
  END IF;

  -- LOCK: execution, then stage log
  SELECT e.* INTO v_exec FROM workflow_executions e
   WHERE e.id = (SELECT l.execution_id FROM workflow_execution_logs l WHERE l.id = p_log_id)
   FOR UPDATE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'unknown stage log %', p_log_id USING ERRCODE = 'no_data_found';
  END IF;
  SELECT * INTO v_log FROM workflow_execution_logs l WHERE l.id = p_log_id FOR UPDATE;

  -- GUARD: fencing
  v_reason := lifecycle_refuse_late_result(v_exec, v_log, p_task_id, p_attempt, 'completed', p_now);
  IF v_reason IS NOT NULL THEN
    -- the current attempt of a running stage is refused only when it timed out
    IF v_exec.status = 'in_progress' AND v_log.status = 'in_progress'
       AND (p_attempt IS NULL OR p_attempt = v_log.attempt_number) THEN
      PERFORM lifecycle_breaker_record_task(p_task_id, false, 'timeout', p_now);
    END IF;
    RETURN 'refused: ' || v_reason;
  END IF;

  -- TRANSITION: log, task
  UPDATE workflow_execution_logs l
     SET status = 'completed', output_data = p_output, completed_at = p_now, error_message = NULL
   WHERE l.id = p_log_id;
  IF p_task_id IS NOT NULL THEN
    UPDATE task_queue t
       SET status = 'completed', output_data = p_output, completed_at = p_now, updated_at = p_now
     WHERE t.id = p_task_id AND t.stage_log_id = p_log_id;
    IF NOT FOUND THEN
      RAISE EXCEPTION 'task % does not belong to stage log %', p_task_id, p_log_id
        USING ERRCODE = 'invalid_parameter_value';
    END IF;
  END IF;
  INSERT INTO workflow_events (execution_id, event_type, stage_id, metadata, "timestamp")
  VALUES (v_log.execution_id, 'stage_completed', v_log.stage_id,
          jsonb_build_object('attempt', v_log.attempt_number, 'task_id', p_task_id,
                             'duration_ms', round(extract(epoch FROM (p_now - v_log.started_at)) * 1000)),
          p_now);

  -- TRANSITION: breakers
  PERFORM lifecycle_breaker_record_task(p_task_id, true, NULL, p_now);

  -- TRANSITION: execution completes when all its definition's stages have
  SELECT d.dag_schema -> 'stages' INTO v_stages
    FROM workflow_definitions d WHERE d.id = v_exec.workflow_definition_id;
  SELECT count(*) INTO v_done
    FROM workflow_execution_logs l
   WHERE l.execution_id = v_exec.id AND l.status = 'completed'
     AND l.stage_id IN (SELECT s ->> 'id' FROM jsonb_array_elements(v_stages) s);
  IF v_done = jsonb_array_length(v_stages) THEN
    UPDATE workflow_executions e
       SET status = 'completed', updated_at = p_now, error_message = NULL
     WHERE e.id = v_exec.id;
    INSERT INTO workflow_events (execution_id, event_type, metadata, "timestamp")
    VALUES (v_exec.id, 'workflow_completed', jsonb_build_object('stages', v_done), p_now);
    RETURN 'completed';
  END IF;
  RETURN v_exec.status;
END
$$;

-- As in 0003; the failure counts for the agent unless its code is a caller fault. A refused
-- failure (stale attempt, execution over) does not count.
CREATE OR REPLACE FUNCTION lifecycle_fail_stage(
  p_log_id     uuid,
  p_task_id    uuid DEFAULT NULL,
  p_error      text DEFAULT NULL,
  p_error_code text DEFAULT NULL,
  p_now        timestamptz DEFAULT now(),
  p_attempt    integer DEFAULT NULL
) RETURNS text
LANGUAGE plpgsql
AS $$
DECLARE
  v_exec   workflow_executions;
  v_log    workflow_execution_logs;
  v_msg    text := coalesce(nullif(p_error, ''), 'stage failed');
  v_reason text;
BEGIN
  -- LOCK: execution, then stage log
  SELECT e.* INTO v_exec FROM workflow_executions e
   WHERE e.id = (SELECT l.execution_id FROM workflow_execution_logs l WHERE l.id = p_log_id)
   FOR UPDATE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'unknown stage log %', p_log_id USING ERRCODE = 'no_data_found';
  END IF;
  SELECT * INTO v_log FROM workflow_execution_logs l WHERE l.id = p_log_id FOR UPDATE;

  -- GUARD: fencing (a deadline that passed does not stop a failure from being recorded)
  IF (p_attempt IS NOT NULL AND p_attempt <> v_log.attempt_number)
     OR v_log.status <> 'in_progress' OR v_exec.status <> 'in_progress' THEN
    v_reason := lifecycle_refuse_late_result(v_exec, v_log, p_task_id, p_attempt, 'failed', p_now);
    RETURN 'refused: ' || v_reason;
  END IF;

  -- TRANSITION: log, task
  UPDATE workflow_execution_logs l
     SET status = 'failed', error_message = v_msg, completed_at = p_now
   WHERE l.id = p_log_id;
  IF p_task_id IS NOT NULL THEN
    UPDATE task_queue t
       SET status = 'failed', error_message = v_msg, completed_at = p_now, updated_at = p_now
     WHERE t.id = p_task_id AND t.stage_log_id = p_log_id AND t.status = 'in_progress';
  END IF;
  INSERT INTO workflow_events (execution_id, event_type, stage_id, metadata, "timestamp")
  VALUES (v_log.execution_id, 'stage_failed', v_log.stage_id,
          jsonb_build_object('attempt', v_log.attempt_number, 'task_id', p_task_id,
                             'error', v_msg, 'error_code', p_error_code),
          p_now);

  -- TRANSITION: breakers
  PERFORM lifecycle_breaker_record_task(p_task_id, false, p_error_code, p_now);

  -- TRANSITION: execution
  UPDATE workflow_executions e
     SET status = 'failed', updated_at = p_now,
         error_message = format('stage %s failed: %s', v_log.stage_id, v_msg)
   WHERE e.id = v_exec.id;
  INSERT INTO workflow_events (execution_id, event_type, stage_id, metadata, "timestamp")
  VALUES (v_exec.id, 'workflow_failed', v_log.stage_id,
          jsonb_build_object('stage', v_log.stage_id, 'error', v_msg, 'error_code', p_error_code),
          p_now);
  RETURN 'failed';
END
$$;

-- As in 0003; the failed attempt counts for the agent unless its code is a caller fault.
CREATE OR REPLACE FUNCTION lifecycle_schedule_retry(
  p_log_id      uuid,
  p_task_id     uuid,
  p_attempt     integer,
  p_error       text,
  p_error_code  text,
  p_error_class text,
  p_delay_s     double precision,
  p_now         timestamptz DEFAULT now()
) RETURNS text
LANGUAGE plpgsql
AS $$
DECLARE
  v_exec   workflow_executions;
  v_log    workflow_execution_logs;
  v_reason text;
BEGIN
  -- GUARD: arguments
  IF p_delay_s IS NULL OR NOT p_delay_s >= 0 OR p_delay_s = 'Infinity' THEN
    RAISE EXCEPTION 'retry delay must be a finite number of seconds >= 0, got %', p_delay_s
      USING ERRCODE = 'invalid_parameter_value';
  END IF;

  -- LOCK: execution, then stage log
  SELECT e.* INTO v_exec FROM workflow_executions e
   WHERE e.id = (SELECT l.execution_id FROM workflow_execution_logs l WHERE l.id = p_log_id)
   FOR UPDATE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'unknown stage log %', p_log_id USING ERRCODE = 'no_data_found';
  END IF;
  SELECT * INTO v_log FROM workflow_execution_logs l WHERE l.id = p_log_id FOR UPDATE;

  -- GUARD: fencing
  IF p_attempt <> v_log.attempt_number OR v_log.status <> 'in_progress' OR v_exec.status <> 'in_progress' THEN
    v_reason := lifecycle_refuse_late_result(v_exec, v_log, p_task_id, p_attempt, 'retrying', p_now);
    RETURN 'refused: ' || v_reason;
  END IF;

  -- TRANSITION: log -> pending, task -> failed
  UPDATE workflow_execution_logs l
     SET status = 'pending', error_message = p_error,
         not_before = p_now + make_interval(secs => p_delay_s)
   WHERE l.id = p_log_id;
  IF p_task_id IS NOT NULL THEN
    UPDATE task_queue t
       SET status = 'failed', error_message = p_error, completed_at = p_now, updated_at = p_now
     WHERE t.id = p_task_id AND t.stage_log_id = p_log_id AND t.status = 'in_progress';
  END IF;
  INSERT INTO workflow_events (execution_id, event_type, stage_id, metadata, "timestamp")
  VALUES (v_log.execution_id, 'stage_retrying', v_log.stage_id,
          jsonb_build_object('attempt', p_attempt + 1, 'failed_attempt', p_attempt,
                             'delay_s', p_delay_s, 'not_before', p_now + make_interval(secs => p_delay_s),
                             'error_code', p_error_code, 'error_class', p_error_class,
                             'error', p_error, 'task_id', p_task_id),
          p_now);

  -- TRANSITION: breakers
  PERFORM lifecycle_breaker_record_task(p_task_id, false, p_error_code, p_now);
  RETURN 'retrying';
END
$$;

-- ---------------------------------------------------------------------------------------------
-- The runbook's trip_circuit_breaker (section 4), callable exactly as before and fixed. It follows
-- the state machine: in_progress -> failed, pending -> in_progress -> failed (both with
-- workflow_failed). Any other status is left as it is: circuit_breaker_state is still recorded and
-- the event is circuit_breaker_tripped (the workflow did not fail now). In every case the breaker
-- of the agent of the execution's most recently failed task opens. Unknown id: a clear error.
DROP FUNCTION IF EXISTS trip_circuit_breaker(uuid, text);  -- the runbook's own, if it was run

CREATE FUNCTION trip_circuit_breaker(
  p_execution_id uuid,
  p_reason       text,
  p_now          timestamptz DEFAULT now()
) RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
  v_exec   workflow_executions;
  v_task   record;
  v_reason text := coalesce(nullif(p_reason, ''), 'circuit breaker tripped');
  v_state  jsonb;
BEGIN
  -- LOCK: execution
  SELECT * INTO v_exec FROM workflow_executions e WHERE e.id = p_execution_id FOR UPDATE;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'trip_circuit_breaker: unknown workflow execution %', p_execution_id
      USING ERRCODE = 'no_data_found';
  END IF;

  -- the agent of the most recently failed task
  SELECT t.id, t.agent_id, t.task_type AS stage_id, a.name AS agent_name INTO v_task
  FROM task_queue t JOIN agents a ON a.id = t.agent_id
  WHERE t.workflow_execution_id = p_execution_id AND t.status = 'failed'
  ORDER BY coalesce(t.completed_at, t.updated_at) DESC, t.created_at DESC
  LIMIT 1;
  v_state := jsonb_build_object('tripped_at', p_now, 'reason', v_reason, 'agent', v_task.agent_name,
                                'agent_id', v_task.agent_id, 'stage', v_task.stage_id,
                                'task_id', v_task.id, 'previous_status', v_exec.status);

  -- TRANSITION: execution
  IF v_exec.status = 'pending' THEN
    UPDATE workflow_executions e SET status = 'in_progress', updated_at = p_now WHERE e.id = p_execution_id;
  END IF;
  IF v_exec.status IN ('pending', 'in_progress') THEN
    UPDATE workflow_executions e
       SET status = 'failed', circuit_breaker_state = v_state, updated_at = p_now,
           error_message = format('circuit breaker tripped: %s', v_reason)
     WHERE e.id = p_execution_id;
    INSERT INTO workflow_events (execution_id, event_type, stage_id, metadata, "timestamp")
    VALUES (p_execution_id, 'workflow_failed', v_task.stage_id,
            jsonb_build_object('reason', v_reason, 'error_code', 'circuit_breaker_tripped',
                               'agent', v_task.agent_name, 'previous_status', v_exec.status),
            p_now);
  ELSE
    UPDATE workflow_executions e SET circuit_breaker_state = v_state, updated_at = p_now
     WHERE e.id = p_execution_id;
    INSERT INTO workflow_events (execution_id, event_type, stage_id, metadata, "timestamp")
    VALUES (p_execution_id, 'circuit_breaker_tripped', v_task.stage_id,
            jsonb_build_object('reason', v_reason, 'agent', v_task.agent_name, 'status', v_exec.status),
            p_now);
  END IF;

  -- TRANSITION: the agent's breaker
  IF v_task.agent_id IS NOT NULL THEN
    PERFORM lifecycle_breaker_trip('agent', v_task.agent_id::text,
      jsonb_build_object('execution_id', p_execution_id, 'trip_reason', v_reason, 'task_id', v_task.id),
      p_now);
  END IF;
END
$$;

-- ---------------------------------------------------------------------------------------------
-- For operators: every breaker with its name, state, settings and current window (at now()).
CREATE VIEW lifecycle_breaker_status AS
SELECT b.scope, b.key,
       CASE WHEN b.scope = 'agent' THEN a.name ELSE b.key END AS name,
       b.state, b.state_since, b.opened_at,
       CASE WHEN b.state = 'open'
            THEN b.opened_at + make_interval(secs => (c.cfg ->> 'cooldown_s')::float8) END AS half_open_at,
       b.probes_left, w.calls, w.failures, w.rate, w.p95_ms, c.cfg AS config, b.updated_at
FROM lifecycle_breakers b
LEFT JOIN agents a ON b.scope = 'agent' AND a.id::text = b.key
CROSS JOIN LATERAL (SELECT lifecycle_breaker_config(b.scope, b.key) AS cfg) c
CROSS JOIN LATERAL lifecycle_breaker_window(b.scope, b.key, (c.cfg ->> 'window_s')::float8,
                                            CASE WHEN b.state = 'closed' THEN b.state_since END, now()) w;
