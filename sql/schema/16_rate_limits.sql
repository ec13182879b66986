-- Rate limits (docs/rate-limits.md): a token bucket per limited agent and capability, kept in
-- lifecycle.rate_buckets. A bucket holds at most `burst` tokens and refills at `per_s` tokens a
-- second (the token bucket of RFC 2697 with one bucket: a call that finds a token is conforming);
-- the refill is computed when a token is taken, from the time since the last take, so nothing
-- runs in the background. Taking is one statement (INSERT ... ON CONFLICT DO UPDATE): the row lock
-- serialises takers across every worker and stage op, and the bucket's clock (`updated_at`) only
-- moves forward, so transactions whose now() arrive out of order never refill twice.
--
-- LOCK ORDER: bucket rows are taken last, after the execution, agent, stage log and task rows of
-- 05_task_protocol.sql, the agent's bucket before the capability's; a transaction never takes a
-- breaker row after a bucket row (no function does both).

-- lifecycle.agent_rate_limit
CREATE OR REPLACE FUNCTION lifecycle.agent_rate_limit(p_config jsonb) RETURNS TABLE(per_s double precision, burst double precision)
    LANGUAGE sql IMMUTABLE
    AS $$
  -- an agent's config.rate_limit as numbers (no row: no limit); burst defaults to max(1, per_s).
  -- The config was checked when written (lifecycle.rate_limit_problem)
  SELECT (p_config #>> '{rate_limit,per_s}')::float8,
         coalesce((p_config #>> '{rate_limit,burst}')::float8, greatest(1, (p_config #>> '{rate_limit,per_s}')::float8))
   WHERE jsonb_typeof(p_config -> 'rate_limit') = 'object'
$$;

REVOKE ALL ON FUNCTION lifecycle.agent_rate_limit(p_config jsonb) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.agent_rate_limit(p_config jsonb) TO service_role;


-- lifecycle.capability_limit_set
CREATE OR REPLACE FUNCTION lifecycle.capability_limit_set(p_capability text, p_per_s double precision, p_burst double precision DEFAULT NULL::double precision, p_now timestamp with time zone DEFAULT now()) RETURNS text
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_problem text;
BEGIN
  -- GUARD: a capability name; the limit checked by the rules of an agent's config.rate_limit
  IF p_capability IS NULL OR btrim(p_capability) = '' THEN
    RAISE EXCEPTION 'capability_limit_set: a capability name is required' USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF p_per_s IS NULL THEN
    -- TRANSITION: the capability's limit is removed (and its bucket with it)
    DELETE FROM lifecycle.capability_limits c WHERE c.capability = p_capability;
    IF NOT FOUND THEN
      RETURN 'unchanged';
    END IF;
    DELETE FROM lifecycle.rate_buckets b WHERE b.key = 'capability:' || p_capability;
    RETURN 'cleared';
  END IF;
  v_problem := lifecycle.rate_limit_problem(jsonb_strip_nulls(jsonb_build_object('per_s', p_per_s, 'burst', p_burst)));
  IF v_problem IS NOT NULL THEN
    RAISE EXCEPTION 'capability %: rate_limit %', p_capability, v_problem USING ERRCODE = 'check_violation';
  END IF;
  -- TRANSITION: the capability's limit is set (its bucket, if any, keeps its tokens up to the new burst)
  INSERT INTO lifecycle.capability_limits AS c (capability, per_s, burst, updated_at)
  VALUES (p_capability, p_per_s, coalesce(p_burst, greatest(1, p_per_s)), p_now)
  ON CONFLICT (capability) DO UPDATE SET per_s = EXCLUDED.per_s, burst = EXCLUDED.burst, updated_at = EXCLUDED.updated_at;
  RETURN 'set';
END
$$;

REVOKE ALL ON FUNCTION lifecycle.capability_limit_set(p_capability text, p_per_s double precision, p_burst double precision, p_now timestamp with time zone) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.capability_limit_set(p_capability text, p_per_s double precision, p_burst double precision, p_now timestamp with time zone) TO service_role;


-- lifecycle.rate_give
CREATE OR REPLACE FUNCTION lifecycle.rate_give(p_key text, p_n integer) RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
BEGIN
  -- TRANSITION: tokens taken earlier in this transaction go back (the row is locked already, its
  -- clock unchanged): a call refused by a second bucket uses none of the first's
  UPDATE lifecycle.rate_buckets b
     SET tokens = least(b.burst, b.tokens + p_n), taken = b.taken - p_n,
         last_granted = greatest(0, b.last_granted - p_n)
   WHERE b.key = p_key;
END
$$;

REVOKE ALL ON FUNCTION lifecycle.rate_give(p_key text, p_n integer) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.rate_give(p_key text, p_n integer) TO service_role;


-- lifecycle.rate_level
CREATE OR REPLACE FUNCTION lifecycle.rate_level(p_tokens double precision, p_updated_at timestamp with time zone, p_per_s double precision, p_burst double precision, p_now timestamp with time zone) RETURNS double precision
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$
  -- the tokens of a bucket at p_now: refilled at p_per_s a second since p_updated_at, at most
  -- p_burst (a clock that went back refills nothing)
  SELECT least(p_burst, p_tokens + p_per_s * greatest(0, extract(epoch FROM p_now - p_updated_at)::float8))
$$;

REVOKE ALL ON FUNCTION lifecycle.rate_level(p_tokens double precision, p_updated_at timestamp with time zone, p_per_s double precision, p_burst double precision, p_now timestamp with time zone) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.rate_level(p_tokens double precision, p_updated_at timestamp with time zone, p_per_s double precision, p_burst double precision, p_now timestamp with time zone) TO service_role;


-- lifecycle.rate_limit_problem
CREATE OR REPLACE FUNCTION lifecycle.rate_limit_problem(p_limit jsonb) RETURNS text
    LANGUAGE plpgsql IMMUTABLE
    AS $$
DECLARE
  v_unknown text;
  v_key     text;
  v_value   jsonb;
BEGIN
  -- what is wrong with a config.rate_limit (NULL: nothing). {"per_s": r, "burst": b}: r in
  -- (0, 1000000] calls a second, b in [1, 1000000000] (default max(1, r)); JSON null: no limit
  IF p_limit IS NULL OR jsonb_typeof(p_limit) = 'null' THEN
    RETURN NULL;
  END IF;
  IF jsonb_typeof(p_limit) <> 'object' THEN
    RETURN format('must be a JSON object {"per_s": r, "burst": b}, got %s', jsonb_typeof(p_limit));
  END IF;
  SELECT string_agg(k, ', ' ORDER BY k) INTO v_unknown FROM jsonb_object_keys(p_limit) k WHERE k NOT IN ('per_s', 'burst');
  IF v_unknown IS NOT NULL THEN
    RETURN format('unknown key(s) %s; known: per_s, burst', v_unknown);
  END IF;
  IF NOT p_limit ? 'per_s' THEN
    RETURN 'per_s is required (calls a second, > 0)';
  END IF;
  FOR v_key, v_value IN SELECT * FROM jsonb_each(p_limit) LOOP
    IF jsonb_typeof(v_value) <> 'number' THEN
      RETURN format('%s must be a number, got %s', v_key, left(v_value::text, 40));
    END IF;
    IF lifecycle.dag_float(v_value) IS NULL
       OR (v_key = 'per_s' AND NOT (v_value::numeric > 0 AND v_value::numeric <= 1000000))
       OR (v_key = 'burst' AND NOT (v_value::numeric >= 1 AND v_value::numeric <= 1000000000)) THEN
      RETURN format('%s: %s is out of range (per_s in (0, 1000000] calls a second; burst in [1, 1000000000] calls)',
                    v_key, left(v_value::text, 40));
    END IF;
  END LOOP;
  RETURN NULL;
END
$$;

REVOKE ALL ON FUNCTION lifecycle.rate_limit_problem(p_limit jsonb) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.rate_limit_problem(p_limit jsonb) TO service_role;


-- lifecycle.rate_take
CREATE OR REPLACE FUNCTION lifecycle.rate_take(p_key text, p_per_s double precision, p_burst double precision, p_n integer DEFAULT 1, p_now timestamp with time zone DEFAULT now()) RETURNS TABLE(granted integer, wait_s double precision, taken_at timestamp with time zone)
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
BEGIN
  -- GUARD: arguments (NaN is greater than every number: the upper bounds refuse it)
  IF p_key IS NULL OR NOT (p_per_s > 0 AND p_per_s <= 1000000) OR NOT (p_burst >= 1 AND p_burst <= 1000000000)
     OR p_n IS NULL OR p_n < 0 OR p_now IS NULL THEN
    RAISE EXCEPTION 'lifecycle.rate_take: a key, per_s in (0, 1000000], burst in [1, 1000000000] and n >= 0 '
                    '(got %, %, %, %)', p_key, p_per_s, p_burst, p_n
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  -- LOCK + TRANSITION, one statement: the bucket (created full), refilled to p_now, gives
  -- min(n, whole tokens); granted: how many it gave; wait_s: seconds until it holds one token;
  -- taken_at: the bucket's clock (never earlier than a previous take's)
  RETURN QUERY
  INSERT INTO lifecycle.rate_buckets AS b (key, per_s, burst, tokens, last_granted, taken, updated_at)
  VALUES (p_key, p_per_s, p_burst, p_burst - least(p_n, floor(p_burst)), least(p_n, floor(p_burst))::integer,
          least(p_n, floor(p_burst))::bigint, p_now)
  ON CONFLICT (key) DO UPDATE
     SET tokens = lifecycle.rate_level(b.tokens, b.updated_at, p_per_s, p_burst, p_now)
                  - least(p_n, floor(lifecycle.rate_level(b.tokens, b.updated_at, p_per_s, p_burst, p_now))),
         last_granted = least(p_n, floor(lifecycle.rate_level(b.tokens, b.updated_at, p_per_s, p_burst, p_now)))::integer,
         taken = b.taken + least(p_n, floor(lifecycle.rate_level(b.tokens, b.updated_at, p_per_s, p_burst, p_now)))::bigint,
         per_s = p_per_s, burst = p_burst, updated_at = greatest(b.updated_at, p_now)
  RETURNING b.last_granted, CASE WHEN b.tokens >= 1 THEN 0::float8 ELSE (1 - b.tokens) / b.per_s END, b.updated_at;
END
$$;

REVOKE ALL ON FUNCTION lifecycle.rate_take(p_key text, p_per_s double precision, p_burst double precision, p_n integer, p_now timestamp with time zone) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.rate_take(p_key text, p_per_s double precision, p_burst double precision, p_n integer, p_now timestamp with time zone) TO service_role;


-- lifecycle.rate_take_call
CREATE OR REPLACE FUNCTION lifecycle.rate_take_call(p_agent_id uuid, p_capability text, p_now timestamp with time zone DEFAULT now()) RETURNS TABLE(granted boolean, wait_s double precision, scope text)
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_agent record;
  v_cap   record;
  v_take  record;
BEGIN
  -- one call of an agent for a capability: a token of the agent's bucket, then of the
  -- capability's (each only when limited). granted: both gave one (an unlimited side always
  -- does); else wait_s: seconds until the refusing bucket (scope 'agent' or 'capability') holds a
  -- token, and a token the agent's bucket gave is given back
  SELECT l.per_s, l.burst INTO v_agent
    FROM public.agents a CROSS JOIN LATERAL lifecycle.agent_rate_limit(a.config) l WHERE a.id = p_agent_id;
  SELECT c.per_s, c.burst INTO v_cap FROM lifecycle.capability_limits c WHERE c.capability = p_capability;
  granted := true; wait_s := 0; scope := NULL;
  -- LOCK: the agent's bucket, then the capability's
  IF v_agent.per_s IS NOT NULL THEN
    SELECT * INTO v_take FROM lifecycle.rate_take('agent:' || p_agent_id, v_agent.per_s, v_agent.burst, 1, p_now) t;
    IF v_take.granted = 0 THEN
      granted := false; wait_s := v_take.wait_s; scope := 'agent';
      RETURN NEXT;
      RETURN;
    END IF;
  END IF;
  IF v_cap.per_s IS NOT NULL THEN
    SELECT * INTO v_take FROM lifecycle.rate_take('capability:' || p_capability, v_cap.per_s, v_cap.burst, 1, p_now) t;
    IF v_take.granted = 0 THEN
      IF v_agent.per_s IS NOT NULL THEN
        PERFORM lifecycle.rate_give('agent:' || p_agent_id, 1);
      END IF;
      granted := false; wait_s := v_take.wait_s; scope := 'capability';
    END IF;
  END IF;
  RETURN NEXT;
END
$$;

REVOKE ALL ON FUNCTION lifecycle.rate_take_call(p_agent_id uuid, p_capability text, p_now timestamp with time zone) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.rate_take_call(p_agent_id uuid, p_capability text, p_now timestamp with time zone) TO service_role;


-- lifecycle.rate_wait
CREATE OR REPLACE FUNCTION lifecycle.rate_wait(p_agent_name text, p_now timestamp with time zone DEFAULT now()) RETURNS double precision
    LANGUAGE sql STABLE
    AS $$
  -- seconds until the agent's bucket and the buckets of every limited capability it serves each
  -- hold a token (0: now, or no limit): how long a worker whose claim came back short waits
  SELECT coalesce(max(greatest(0, (1 - lifecycle.rate_level(b.tokens, b.updated_at, b.per_s, b.burst, p_now)) / b.per_s)), 0)
    FROM public.agents a
    JOIN lifecycle.rate_buckets b
      ON (b.key = 'agent:' || a.id AND EXISTS (SELECT 1 FROM lifecycle.agent_rate_limit(a.config)))
      OR (b.key LIKE 'capability:%' AND substr(b.key, 12) = ANY (lifecycle.agent_capabilities(a.id))
          AND EXISTS (SELECT 1 FROM lifecycle.capability_limits c WHERE c.capability = substr(b.key, 12)))
   WHERE a.name = p_agent_name
$$;

REVOKE ALL ON FUNCTION lifecycle.rate_wait(p_agent_name text, p_now timestamp with time zone) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.rate_wait(p_agent_name text, p_now timestamp with time zone) TO service_role;


-- lifecycle.stage_rate_take
CREATE OR REPLACE FUNCTION lifecycle.stage_rate_take(p_task_id uuid, p_note boolean DEFAULT false, p_now timestamp with time zone DEFAULT now()) RETURNS TABLE(status text, wait_s double precision, scope text)
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
  v_task    public.task_queue;
  v_exec    text;
  v_agent   public.agents;
  v_take    record;
BEGIN
  -- a stage op's token for one call of its (python or http) agent: 'granted' (the call may start:
  -- the task's started_at and deadline_at move to now, so the wait uses none of the stage's
  -- timeout), 'waiting' (no token: try again after wait_s; with p_note, a stage_rate_limited
  -- event, once per wait), or refused when the call may not happen at all
  SELECT * INTO v_task FROM public.task_queue t WHERE t.id = p_task_id;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'unknown task %', p_task_id USING ERRCODE = 'no_data_found';
  END IF;
  SELECT * INTO v_agent FROM public.agents a WHERE a.id = v_task.agent_id;
  IF NOT EXISTS (SELECT 1 FROM lifecycle.agent_rate_limit(v_agent.config))
     AND NOT EXISTS (SELECT 1 FROM lifecycle.capability_limits c WHERE c.capability = v_task.capability) THEN
    RETURN QUERY SELECT 'granted'::text, 0::float8, NULL::text;  -- no limit: nothing to take, nothing locked
    RETURN;
  END IF;

  -- LOCK: the execution, then the task (then, in rate_take_call, the buckets)
  SELECT e.status INTO v_exec FROM public.workflow_executions e WHERE e.id = v_task.workflow_execution_id FOR UPDATE;
  SELECT * INTO v_task FROM public.task_queue t WHERE t.id = p_task_id FOR UPDATE;
  IF v_exec IS DISTINCT FROM 'in_progress' THEN
    RETURN QUERY SELECT 'refused_execution_stopped'::text, NULL::float8, NULL::text;
    RETURN;
  END IF;
  IF v_task.status <> 'in_progress' OR v_task.claimed_by IS DISTINCT FROM 'op' THEN
    RETURN QUERY SELECT 'refused_task_finished'::text, NULL::float8, NULL::text;
    RETURN;
  END IF;

  SELECT * INTO v_take FROM lifecycle.rate_take_call(v_task.agent_id, v_task.capability, p_now) r;
  IF NOT v_take.granted THEN
    IF p_note THEN
      INSERT INTO public.workflow_events (execution_id, event_type, stage_id, metadata, "timestamp")
      VALUES (v_task.workflow_execution_id, 'stage_rate_limited', v_task.task_type,
              jsonb_build_object('attempt', v_task.attempt, 'agent', v_agent.name, 'capability', v_task.capability,
                                 'task_id', v_task.id, 'scope', v_take.scope, 'wait_s', round(v_take.wait_s::numeric, 3)),
              p_now);
    END IF;
    RETURN QUERY SELECT 'waiting'::text, v_take.wait_s, v_take.scope;
    RETURN;
  END IF;
  -- TRANSITION: the call starts now: its latency and its timeout count from here
  UPDATE public.task_queue t
     SET started_at = p_now, updated_at = p_now,
         deadline_at = CASE WHEN t.timeout_s IS NULL THEN t.deadline_at ELSE p_now + make_interval(secs => t.timeout_s) END
   WHERE t.id = p_task_id;
  RETURN QUERY SELECT 'granted'::text, v_take.wait_s, NULL::text;
END
$$;

REVOKE ALL ON FUNCTION lifecycle.stage_rate_take(p_task_id uuid, p_note boolean, p_now timestamp with time zone) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.stage_rate_take(p_task_id uuid, p_note boolean, p_now timestamp with time zone) TO service_role;


-- view lifecycle_rate_limit_status
CREATE OR REPLACE VIEW lifecycle.rate_limit_status WITH (security_invoker='true') AS
 SELECT l.scope,
    l.key,
    l.name,
    l.per_s,
    l.burst,
    CASE
        WHEN (b.key IS NULL) THEN l.burst
        ELSE lifecycle.rate_level(b.tokens, b.updated_at, l.per_s, l.burst, now())
    END AS tokens,
    coalesce(b.taken, 0) AS taken,
    b.updated_at AS last_taken_at,
    ( SELECT count(*) AS count
           FROM public.task_queue t
          WHERE ((t.started_at >= (now() - '00:01:00'::interval)) AND (((l.scope = 'agent'::text) AND ((t.agent_id)::text = l.id)) OR ((l.scope = 'capability'::text) AND (t.capability = l.name))))) AS calls_60s
   FROM (( SELECT 'agent'::text AS scope,
            ('agent:'::text || (a.id)::text) AS key,
            (a.id)::text AS id,
            a.name,
            r.per_s,
            r.burst
           FROM (public.agents a
             CROSS JOIN LATERAL lifecycle.agent_rate_limit(a.config) r(per_s, burst))
        UNION ALL
         SELECT 'capability'::text AS scope,
            ('capability:'::text || c.capability) AS key,
            c.capability AS id,
            c.capability AS name,
            c.per_s,
            c.burst
           FROM lifecycle.capability_limits c) l
     LEFT JOIN lifecycle.rate_buckets b ON ((b.key = l.key)));

REVOKE ALL ON TABLE lifecycle.rate_limit_status FROM PUBLIC, anon, authenticated, service_role;
GRANT SELECT ON TABLE lifecycle.rate_limit_status TO service_role;
