-- 0007_versions: versioned publishing.
--
-- * lifecycle_validate_dag(jsonb): the rules of lifecycle_dagster/dag.py, in plpgsql (the two agree
--   on every case of tests/dag_cases.json); a BEFORE INSERT trigger refuses an invalid dag_schema
--   from any client. Rows that exist already are not re-validated (UPDATEs cannot change a DAG).
-- * lifecycle_publish_definition: validate, store version = highest + 1 (or nothing when the
--   content equals the latest version's), optionally make it the active one; one transaction under
--   a per-name advisory lock, so concurrent publishers never duplicate a version nor leave zero or
--   two active versions.
-- * lifecycle_activate_definition: make one version the active one.
-- Publishing and activation write definition_published / definition_activated events (no
-- execution id).

-- ---------------------------------------------------------------------------------------------
-- The DAG validator. Problems are rows (code, stages, path, message) exactly as dag.Problem:
-- stages are the ids concerned (never ''), path is where ("stages[2].retry.max_attempts"), the
-- message quotes each stage. Helpers are prefixed lifecycle_dag_.
CREATE TYPE lifecycle_dag_problem AS (code text, stages text[], path text, message text);

-- text in single quotes, control characters escaped as Python's repr does (a message stays one line)
CREATE FUNCTION lifecycle_dag_quote(p_text text) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$
  SELECT '''' || CASE WHEN p_text !~ '[\x01-\x1f\x7f]' THEN p_text ELSE (
    SELECT string_agg(CASE
                        WHEN c = E'\n' THEN '\n'
                        WHEN c = E'\t' THEN '\t'
                        WHEN c = E'\r' THEN '\r'
                        WHEN ascii(c) < 32 OR ascii(c) = 127 THEN '\x' || lpad(to_hex(ascii(c)), 2, '0')
                        ELSE c END, '' ORDER BY i)
    FROM regexp_split_to_table(p_text, '') WITH ORDINALITY AS t(c, i)
  ) END || ''''
$$;

-- how messages name a JSON value's type; NULL (absent) is 'nothing'
CREATE FUNCTION lifecycle_dag_kind(p_value jsonb) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
  SELECT CASE jsonb_typeof(p_value)
           WHEN 'null' THEN 'null' WHEN 'boolean' THEN 'a boolean' WHEN 'number' THEN 'a number'
           WHEN 'string' THEN 'a string' WHEN 'array' THEN 'an array' WHEN 'object' THEN 'an object'
           ELSE 'nothing' END
$$;

-- one problem: the path joins the object's path and the key as dag.py does; stages lose '' and
-- repeats (first occurrence kept)
CREATE FUNCTION lifecycle_dag_report(
  p_code text, p_where text, p_rel text, p_label text, p_stages text[], p_text text
) RETURNS lifecycle_dag_problem
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
  SELECT ROW(
    p_code,
    coalesce((SELECT array_agg(s ORDER BY first_at)
              FROM (SELECT s, min(i) AS first_at FROM unnest(p_stages) WITH ORDINALITY AS u(s, i)
                    WHERE s IS NOT NULL AND s <> '' GROUP BY s) d), '{}'::text[]),
    p_where || CASE WHEN p_where <> '' AND left(p_rel, 1) NOT IN ('', '[') THEN '.' ELSE '' END || p_rel,
    p_label || ': ' || p_text
  )::lifecycle_dag_problem
$$;

-- a JSON number as a double: NULL when not a number, 0 when it underflows, Infinity when it
-- overflows (Python's json.loads gives 0.0 and inf; an int too large for a double is not finite)
CREATE FUNCTION lifecycle_dag_float(p_value jsonb) RETURNS double precision
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
AS $$
BEGIN
  IF jsonb_typeof(p_value) IS DISTINCT FROM 'number' THEN
    RETURN NULL;
  END IF;
  RETURN (p_value #>> '{}')::double precision;
EXCEPTION WHEN numeric_value_out_of_range THEN
  RETURN CASE WHEN abs((p_value #>> '{}')::numeric) < 1 THEN 0 ELSE 'Infinity'::double precision END;
END
$$;

-- the value of an optional number when present and valid, else NULL (dag._Validator.number)
CREATE FUNCTION lifecycle_dag_number_value(
  p_value jsonb, p_minimum double precision, p_positive boolean, p_integral boolean
) RETURNS double precision
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
  SELECT v FROM (SELECT lifecycle_dag_float(p_value) AS v) x
  WHERE v IS NOT NULL AND v NOT IN ('Infinity', '-Infinity')
    AND CASE WHEN p_positive THEN v > p_minimum ELSE v >= p_minimum END
    AND (NOT p_integral OR (v = trunc(v) AND v <= 1000))
$$;

CREATE FUNCTION lifecycle_dag_check_number(
  p_obj jsonb, p_key text, p_where text, p_label text, p_stages text[], p_field text,
  p_minimum double precision, p_positive boolean DEFAULT false, p_integral boolean DEFAULT false
) RETURNS SETOF lifecycle_dag_problem
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
AS $$
DECLARE
  v_value jsonb := p_obj -> p_key;
  v_name  text := p_field || p_key;
  v_rule  text;
BEGIN
  IF v_value IS NULL THEN
    RETURN;
  END IF;
  IF jsonb_typeof(v_value) <> 'number' THEN
    RETURN NEXT lifecycle_dag_report('wrong_type', p_where, p_key, p_label, p_stages,
      format('%s must be a number, got %s', v_name, lifecycle_dag_kind(v_value)));
    RETURN;
  END IF;
  IF lifecycle_dag_number_value(v_value, p_minimum, p_positive, p_integral) IS NULL THEN
    v_rule := CASE WHEN p_integral THEN 'an integer from 1 to 1000'
                   ELSE format('%s %s', CASE WHEN p_positive THEN '>' ELSE '>=' END, p_minimum) END;
    RETURN NEXT lifecycle_dag_report('bad_value', p_where, p_key, p_label, p_stages,
      format('%s must be %s, got %s', v_name, v_rule,
             CASE WHEN length(v_value::text) <= 24 THEN v_value::text ELSE left(v_value::text, 20) || '...' END));
  END IF;
END
$$;

-- an optional string (NULL: absent), one of p_choices when given. (dag.py also refuses a NUL
-- character; jsonb cannot hold one.)
CREATE FUNCTION lifecycle_dag_check_string(
  p_value jsonb, p_rel text, p_where text, p_label text, p_stages text[], p_field text,
  p_choices text[] DEFAULT '{}'
) RETURNS SETOF lifecycle_dag_problem
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
AS $$
BEGIN
  IF p_value IS NULL THEN
    RETURN;
  END IF;
  IF jsonb_typeof(p_value) <> 'string' THEN
    RETURN NEXT lifecycle_dag_report('wrong_type', p_where, p_rel, p_label, p_stages,
      format('%s must be a string, got %s', p_field || p_rel, lifecycle_dag_kind(p_value)));
  ELSIF cardinality(p_choices) > 0 AND NOT (p_value #>> '{}') = ANY (p_choices) THEN
    RETURN NEXT lifecycle_dag_report('bad_value', p_where, p_rel, p_label, p_stages,
      format('%s must be one of %s, got %s', p_field || p_rel, array_to_string(p_choices, ', '),
             lifecycle_dag_quote(p_value #>> '{}')));
  END IF;
END
$$;

CREATE FUNCTION lifecycle_dag_check_keys(
  p_obj jsonb, p_allowed text[], p_where text, p_label text, p_stages text[], p_field text
) RETURNS SETOF lifecycle_dag_problem
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
  SELECT lifecycle_dag_report('unknown_key', p_where, k, p_label, p_stages,
                               'unknown key ' || lifecycle_dag_quote(p_field || k))
  FROM jsonb_object_keys(p_obj) AS k
  WHERE NOT k = ANY (p_allowed)
$$;

-- a retry object (dag._Validator.retry); p_where is its own path
CREATE FUNCTION lifecycle_dag_check_retry(p_value jsonb, p_where text, p_label text, p_stages text[])
RETURNS SETOF lifecycle_dag_problem
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
AS $$
DECLARE
  v_base  double precision;
  v_most  double precision;
  v_names jsonb;
  v_name  jsonb;
  v_k     integer;
BEGIN
  IF jsonb_typeof(p_value) <> 'object' THEN
    RETURN NEXT lifecycle_dag_report('wrong_type', p_where, '', p_label, p_stages,
      'retry must be an object, got ' || lifecycle_dag_kind(p_value));
    RETURN;
  END IF;
  RETURN QUERY SELECT * FROM lifecycle_dag_check_keys(p_value,
    ARRAY['max_attempts', 'base_delay_s', 'max_delay_s', 'multiplier', 'jitter', 'non_retryable'],
    p_where, p_label, p_stages, 'retry.');
  RETURN QUERY SELECT * FROM lifecycle_dag_check_number(p_value, 'max_attempts', p_where, p_label, p_stages,
                                                        'retry.', 1, p_integral => true);
  RETURN QUERY SELECT * FROM lifecycle_dag_check_number(p_value, 'base_delay_s', p_where, p_label, p_stages,
                                                        'retry.', 0);
  RETURN QUERY SELECT * FROM lifecycle_dag_check_number(p_value, 'max_delay_s', p_where, p_label, p_stages,
                                                        'retry.', 0);
  v_base := lifecycle_dag_number_value(p_value -> 'base_delay_s', 0, false, false);
  v_most := lifecycle_dag_number_value(p_value -> 'max_delay_s', 0, false, false);
  IF v_base IS NOT NULL AND v_most IS NOT NULL AND v_most < v_base THEN
    RETURN NEXT lifecycle_dag_report('bad_value', p_where, 'max_delay_s', p_label, p_stages,
      format('retry.max_delay_s (%s) must be >= retry.base_delay_s (%s)', v_most, v_base));
  END IF;
  RETURN QUERY SELECT * FROM lifecycle_dag_check_number(p_value, 'multiplier', p_where, p_label, p_stages,
                                                        'retry.', 1);
  RETURN QUERY SELECT * FROM lifecycle_dag_check_string(p_value -> 'jitter', 'jitter', p_where, p_label,
                                                        p_stages, 'retry.', ARRAY['none', 'full', 'equal']);
  v_names := coalesce(p_value -> 'non_retryable', '[]'::jsonb);
  IF jsonb_typeof(v_names) <> 'array' THEN
    RETURN NEXT lifecycle_dag_report('wrong_type', p_where, 'non_retryable', p_label, p_stages,
      'retry.non_retryable must be an array, got ' || lifecycle_dag_kind(v_names));
    RETURN;
  END IF;
  v_k := 0;
  FOR v_name IN SELECT e FROM jsonb_array_elements(v_names) AS e LOOP
    IF v_name = '""'::jsonb THEN
      RETURN NEXT lifecycle_dag_report('bad_value', p_where, format('non_retryable[%s]', v_k), p_label,
        p_stages, format('retry.non_retryable[%s] is empty', v_k));
    END IF;
    RETURN QUERY SELECT * FROM lifecycle_dag_check_string(v_name, format('non_retryable[%s]', v_k), p_where,
                                                          p_label, p_stages, 'retry.');
    v_k := v_k + 1;
  END LOOP;
END
$$;

-- Every problem of p_dag as a dag_schema; no rows when it is valid. Never raises.
CREATE FUNCTION lifecycle_validate_dag(p_dag jsonb)
RETURNS TABLE (code text, stages text[], path text, message text)
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
AS $$
#variable_conflict use_column
DECLARE
  c_id_re    CONSTANT text := '^[a-z][a-z0-9_]{0,62}$';
  v_defaults jsonb;
  v_stages   jsonb;
  v_edges    jsonb;
  v_raw      jsonb;
  v_sid      jsonb;
  v_label    text;
  v_where    text;
  v_wlabel   text;
  v_i        integer;
  v_k        integer;
  v_target   jsonb;
  v_local    text[];
  v_ids      text[] := '{}';     -- per stage: its id when a string, else NULL
  v_declared text[];             -- non-empty string ids
  v_nodes    text[];             -- valid ids declared once, in declaration order
  v_gfrom    text[] := '{}';     -- the graph: next edges and well-formed listed edges
  v_gto      text[] := '{}';
  v_seen     text[] := '{}';     -- listed edges seen, as jsonb text of [from, to]
  v_ends     jsonb[];
  v_known    text[];
  v_shown    text[];
  v_dup      record;
  v_listed   text[];
  v_linked   text[];
  -- cycles
  v_n        integer;
  v_ef       integer[];
  v_et       integer[];
  v_start    integer[];
  v_indeg    integer[];
  v_queue    integer[];
  v_head     integer;
  v_u        integer;
  v_rem      integer[];
  v_done     integer[];
  v_comp     integer[];
  v_prev     integer[];
  v_path     integer[];
  v_node     integer;
  v_child    integer;
  v_found    boolean;
BEGIN
  IF p_dag IS NULL OR jsonb_typeof(p_dag) <> 'object' THEN
    RETURN QUERY SELECT * FROM lifecycle_dag_report('not_an_object', '', '', 'workflow DAG', '{}',
      'must be a JSON object, got ' || lifecycle_dag_kind(p_dag));
    RETURN;
  END IF;

  -- top level
  RETURN QUERY SELECT * FROM lifecycle_dag_check_keys(p_dag, ARRAY['stages', 'edges', 'defaults', 'on_failure'],
                                                      '', 'workflow DAG', '{}', '');
  RETURN QUERY SELECT * FROM lifecycle_dag_check_string(p_dag -> 'on_failure', 'on_failure', '', 'workflow DAG',
                                                        '{}', '', ARRAY['compensate', 'hold']);
  v_defaults := coalesce(p_dag -> 'defaults', '{}'::jsonb);
  IF jsonb_typeof(v_defaults) <> 'object' THEN
    RETURN QUERY SELECT * FROM lifecycle_dag_report('wrong_type', '', 'defaults', 'workflow DAG', '{}',
      'defaults must be an object, got ' || lifecycle_dag_kind(v_defaults));
  ELSE
    RETURN QUERY SELECT * FROM lifecycle_dag_check_keys(v_defaults, ARRAY['retry', 'timeout_s'], 'defaults',
                                                        'defaults', '{}', '');
    IF v_defaults ? 'retry' THEN
      RETURN QUERY SELECT * FROM lifecycle_dag_check_retry(v_defaults -> 'retry', 'defaults.retry', 'defaults', '{}');
    END IF;
    RETURN QUERY SELECT * FROM lifecycle_dag_check_number(v_defaults, 'timeout_s', 'defaults', 'defaults', '{}',
                                                          '', 0, p_positive => true);
  END IF;

  v_stages := coalesce(p_dag -> 'stages', '[]'::jsonb);
  IF jsonb_typeof(v_stages) <> 'array' THEN
    RETURN QUERY SELECT * FROM lifecycle_dag_report('wrong_type', '', 'stages', 'workflow DAG', '{}',
      'stages must be an array, got ' || lifecycle_dag_kind(v_stages));
    v_stages := '[]'::jsonb;
  ELSIF jsonb_array_length(v_stages) = 0 THEN
    RETURN QUERY SELECT * FROM lifecycle_dag_report('empty_dag', '', 'stages', 'workflow DAG', '{}',
      'stages is missing or empty');
  END IF;

  -- declared ids, duplicates, the nodes of the graph
  SELECT coalesce(array_agg(CASE WHEN jsonb_typeof(s -> 'id') = 'string' THEN s ->> 'id' END ORDER BY i), '{}')
    INTO v_ids
    FROM jsonb_array_elements(v_stages) WITH ORDINALITY AS t(s, i);
  SELECT coalesce(array_agg(DISTINCT s), '{}') INTO v_declared FROM unnest(v_ids) AS s WHERE s <> '';
  FOR v_dup IN
    SELECT s AS sid, count(*) AS n, array_agg(format('stages[%s]', i - 1) ORDER BY i) AS at, min(i) AS first_at
    FROM unnest(v_ids) WITH ORDINALITY AS u(s, i)
    WHERE s COLLATE "C" ~ c_id_re
    GROUP BY s HAVING count(*) > 1
    ORDER BY min(i)
  LOOP
    RETURN QUERY SELECT * FROM lifecycle_dag_report('duplicate_stage', v_dup.at[2], '', 'stage ' || lifecycle_dag_quote(v_dup.sid),
      ARRAY[v_dup.sid], format('declared %s times (%s)', v_dup.n, array_to_string(v_dup.at, ', ')));
  END LOOP;
  SELECT coalesce(array_agg(s ORDER BY first_at), '{}') INTO v_nodes
    FROM (SELECT s, min(i) AS first_at FROM unnest(v_ids) WITH ORDINALITY AS u(s, i)
          WHERE s COLLATE "C" ~ c_id_re GROUP BY s HAVING count(*) = 1) d;

  -- each stage
  v_i := 0;
  FOR v_raw IN SELECT s FROM jsonb_array_elements(v_stages) AS s LOOP
    v_sid := CASE WHEN jsonb_typeof(v_raw) = 'object' THEN v_raw -> 'id' END;
    v_label := CASE WHEN jsonb_typeof(v_sid) = 'string' THEN v_sid #>> '{}' ELSE '' END;
    v_where := format('stages[%s]', v_i);
    v_wlabel := CASE WHEN v_label <> '' THEN 'stage ' || lifecycle_dag_quote(v_label) ELSE v_where END;
    v_i := v_i + 1;
    IF jsonb_typeof(v_raw) <> 'object' THEN
      RETURN QUERY SELECT * FROM lifecycle_dag_report('wrong_type', v_where, '', v_wlabel, ARRAY[v_label],
        'a stage must be an object, got ' || lifecycle_dag_kind(v_raw));
      CONTINUE;
    END IF;
    IF NOT v_label COLLATE "C" ~ c_id_re THEN
      RETURN QUERY SELECT * FROM lifecycle_dag_report('bad_stage_id', v_where, 'id', v_wlabel, ARRAY[v_label],
        format('id must match %s, got %s', c_id_re,
               CASE WHEN jsonb_typeof(v_sid) = 'string' THEN lifecycle_dag_quote(v_label)
                    ELSE lifecycle_dag_kind(v_sid) END));
    END IF;
    RETURN QUERY SELECT * FROM lifecycle_dag_check_keys(v_raw,
      ARRAY['id', 'capability', 'next', 'description', 'retry', 'timeout_s', 'compensate'],
      v_where, v_wlabel, ARRAY[v_label], '');
    IF v_raw -> 'capability' IS NULL OR v_raw -> 'capability' = '""'::jsonb THEN
      RETURN QUERY SELECT * FROM lifecycle_dag_report('missing_capability', v_where, 'capability', v_wlabel,
        ARRAY[v_label], 'capability is missing or empty');
    END IF;
    RETURN QUERY SELECT * FROM lifecycle_dag_check_string(v_raw -> 'capability', 'capability', v_where, v_wlabel,
                                                          ARRAY[v_label], '');
    RETURN QUERY SELECT * FROM lifecycle_dag_check_string(v_raw -> 'description', 'description', v_where,
                                                          v_wlabel, ARRAY[v_label], '');
    IF v_raw ? 'retry' THEN
      RETURN QUERY SELECT * FROM lifecycle_dag_check_retry(v_raw -> 'retry', v_where || '.retry', v_wlabel,
                                                           ARRAY[v_label]);
    END IF;
    RETURN QUERY SELECT * FROM lifecycle_dag_check_number(v_raw, 'timeout_s', v_where, v_wlabel, ARRAY[v_label],
                                                          '', 0, p_positive => true);
    IF v_raw -> 'compensate' IN ('true'::jsonb, '""'::jsonb) THEN
      RETURN QUERY SELECT * FROM lifecycle_dag_report('bad_value', v_where, 'compensate', v_wlabel, ARRAY[v_label],
        'compensate must be a capability name or false');
    ELSIF v_raw -> 'compensate' IS DISTINCT FROM 'false'::jsonb THEN
      RETURN QUERY SELECT * FROM lifecycle_dag_check_string(v_raw -> 'compensate', 'compensate', v_where,
                                                            v_wlabel, ARRAY[v_label], '');
    END IF;
    -- next: each entry yields at most one problem (wrong_type, unknown_stage, self_loop, duplicate_edge)
    v_target := coalesce(v_raw -> 'next', '[]'::jsonb);
    IF jsonb_typeof(v_target) <> 'array' THEN
      RETURN QUERY SELECT * FROM lifecycle_dag_report('wrong_type', v_where, 'next', v_wlabel, ARRAY[v_label],
        'next must be an array, got ' || lifecycle_dag_kind(v_target));
      CONTINUE;
    END IF;
    v_local := '{}';
    v_k := 0;
    FOR v_target IN SELECT e FROM jsonb_array_elements(v_raw -> 'next') AS e LOOP
      IF jsonb_typeof(v_target) <> 'string' THEN
        RETURN QUERY SELECT * FROM lifecycle_dag_report('wrong_type', v_where, format('next[%s]', v_k), v_wlabel,
          ARRAY[v_label], format('next[%s] must be a stage id, got %s', v_k, lifecycle_dag_kind(v_target)));
      ELSIF NOT (v_target #>> '{}') = ANY (v_declared) THEN
        RETURN QUERY SELECT * FROM lifecycle_dag_report('unknown_stage', v_where, format('next[%s]', v_k), v_wlabel,
          ARRAY[v_label], 'edge to unknown stage ' || lifecycle_dag_quote(v_target #>> '{}'));
      ELSIF (v_target #>> '{}') = v_label THEN
        RETURN QUERY SELECT * FROM lifecycle_dag_report('self_loop', v_where, format('next[%s]', v_k), v_wlabel,
          ARRAY[v_label], format('edge to itself (next[%s])', v_k));
      ELSIF (v_target #>> '{}') = ANY (v_local) THEN
        RETURN QUERY SELECT * FROM lifecycle_dag_report('duplicate_edge', v_where, format('next[%s]', v_k), v_wlabel,
          ARRAY[v_label, v_target #>> '{}'],
          format('edge to %s is listed twice', lifecycle_dag_quote(v_target #>> '{}')));
      ELSE
        v_local := v_local || (v_target #>> '{}');
        v_gfrom := v_gfrom || v_label;
        v_gto := v_gto || (v_target #>> '{}');
      END IF;
      v_k := v_k + 1;
    END LOOP;
  END LOOP;

  -- edges
  v_edges := coalesce(p_dag -> 'edges', '[]'::jsonb);
  IF jsonb_typeof(v_edges) <> 'array' THEN
    RETURN QUERY SELECT * FROM lifecycle_dag_report('wrong_type', '', 'edges', 'workflow DAG', '{}',
      'edges must be an array, got ' || lifecycle_dag_kind(v_edges));
  ELSIF p_dag ? 'edges' THEN
    v_k := 0;
    FOR v_raw IN SELECT e FROM jsonb_array_elements(v_edges) AS e LOOP
      v_where := format('edges[%s]', v_k);
      v_k := v_k + 1;
      IF jsonb_typeof(v_raw) <> 'object' THEN
        RETURN QUERY SELECT * FROM lifecycle_dag_report('wrong_type', v_where, '', v_where, '{}',
          'an edge must be an object, got ' || lifecycle_dag_kind(v_raw));
        CONTINUE;
      END IF;
      v_ends := ARRAY[v_raw -> 'from', v_raw -> 'to'];
      v_known := ARRAY(SELECT e #>> '{}' FROM unnest(v_ends) WITH ORDINALITY AS u(e, i)
                       WHERE jsonb_typeof(e) = 'string' AND (e #>> '{}') = ANY (v_declared) ORDER BY i);
      v_shown := ARRAY(SELECT CASE WHEN jsonb_typeof(e) = 'string' THEN lifecycle_dag_quote(e #>> '{}')
                                   ELSE lifecycle_dag_kind(e) END
                       FROM unnest(v_ends) WITH ORDINALITY AS u(e, i) ORDER BY i);
      v_wlabel := format('%s (from %s to %s)', v_where, v_shown[1], v_shown[2]);
      RETURN QUERY SELECT * FROM lifecycle_dag_check_keys(v_raw, ARRAY['from', 'to'], v_where, v_wlabel, v_known, '');
      FOR v_i IN 1..2 LOOP
        IF jsonb_typeof(v_ends[v_i]) IS DISTINCT FROM 'string' THEN
          RETURN QUERY SELECT * FROM lifecycle_dag_report('wrong_type', v_where, (ARRAY['from', 'to'])[v_i], v_wlabel,
            v_known, format('%s must be a stage id, got %s', (ARRAY['from', 'to'])[v_i],
                            lifecycle_dag_kind(v_ends[v_i])));
        ELSIF NOT (v_ends[v_i] #>> '{}') = ANY (v_declared) THEN
          RETURN QUERY SELECT * FROM lifecycle_dag_report('unknown_stage', v_where, (ARRAY['from', 'to'])[v_i], v_wlabel,
            v_known, 'unknown stage ' || lifecycle_dag_quote(v_ends[v_i] #>> '{}'));
        END IF;
      END LOOP;
      IF cardinality(v_known) = 2 THEN
        IF v_known[1] = v_known[2] THEN
          RETURN QUERY SELECT * FROM lifecycle_dag_report('self_loop', v_where, '', v_wlabel, v_known,
            format('edge from stage %s to itself', lifecycle_dag_quote(v_known[1])));
        ELSIF jsonb_build_array(v_known[1], v_known[2])::text = ANY (v_seen) THEN
          RETURN QUERY SELECT * FROM lifecycle_dag_report('duplicate_edge', v_where, '', v_wlabel, v_known,
            'edge is listed twice');
        ELSE
          v_seen := v_seen || jsonb_build_array(v_known[1], v_known[2])::text;
          v_gfrom := v_gfrom || v_known[1];
          v_gto := v_gto || v_known[2];
        END IF;
      END IF;
    END LOOP;

    -- next_edges_mismatch: a stage's string next entries against the string targets of its edges
    v_i := 0;
    FOR v_raw IN SELECT s FROM jsonb_array_elements(v_stages) AS s LOOP
      v_i := v_i + 1;
      CONTINUE WHEN NOT coalesce(jsonb_typeof(v_raw) = 'object' AND jsonb_typeof(v_raw -> 'id') = 'string'
                                 AND (v_raw ->> 'id') = ANY (v_nodes) AND jsonb_typeof(v_raw -> 'next') = 'array',
                                 false);
      v_listed := ARRAY(SELECT DISTINCT t COLLATE "C" FROM jsonb_array_elements(v_raw -> 'next') AS n,
                                                     LATERAL (SELECT n #>> '{}' AS t) x
                        WHERE jsonb_typeof(n) = 'string' ORDER BY 1);
      v_linked := ARRAY(SELECT DISTINCT (e ->> 'to') COLLATE "C" FROM jsonb_array_elements(v_edges) AS e
                        WHERE jsonb_typeof(e) = 'object' AND e -> 'from' = to_jsonb(v_raw ->> 'id')
                          AND jsonb_typeof(e -> 'to') = 'string' ORDER BY 1);
      IF v_listed <> v_linked THEN
        RETURN QUERY SELECT * FROM lifecycle_dag_report('next_edges_mismatch', format('stages[%s]', v_i - 1), 'next',
          'stage ' || lifecycle_dag_quote(v_raw ->> 'id'), ARRAY[v_raw ->> 'id'],
          format('next [%s] disagrees with the edges from %s to [%s]',
                 (SELECT string_agg(lifecycle_dag_quote(x), ', ' ORDER BY o) FROM unnest(v_listed) WITH ORDINALITY AS u(x, o)),
                 lifecycle_dag_quote(v_raw ->> 'id'),
                 (SELECT string_agg(lifecycle_dag_quote(x), ', ' ORDER BY o) FROM unnest(v_linked) WITH ORDINALITY AS u(x, o))
          ));
      END IF;
    END LOOP;
  END IF;

  -- cycles, among the nodes and the graph's edges between them: Kahn's algorithm removes every
  -- stage on no cycle's way; what remains is grouped into strongly connected components (the
  -- stages reachable both from and to a stage); one problem per component of 2+ stages.
  v_n := cardinality(v_nodes);
  IF v_n < 2 THEN
    RETURN;
  END IF;
  SELECT coalesce(array_agg(f ORDER BY f, t), '{}'), coalesce(array_agg(t ORDER BY f, t), '{}')
    INTO v_ef, v_et
    FROM (SELECT DISTINCT array_position(v_nodes, a) AS f, array_position(v_nodes, b) AS t
          FROM unnest(v_gfrom, v_gto) AS g(a, b)
          WHERE a = ANY (v_nodes) AND b = ANY (v_nodes)) d;
  -- adjacency: edges k of node u are v_start[u] .. v_start[u + 1] - 1 (edges sorted by from, to)
  v_start := array_fill(1, ARRAY[v_n + 1]);
  v_indeg := array_fill(0, ARRAY[v_n]);
  FOR v_k IN 1..cardinality(v_ef) LOOP
    v_start[v_ef[v_k] + 1] := v_k + 1;
    v_indeg[v_et[v_k]] := v_indeg[v_et[v_k]] + 1;
  END LOOP;
  FOR v_u IN 2..v_n + 1 LOOP  -- nodes without edges start where the previous one ends
    v_start[v_u] := greatest(v_start[v_u], v_start[v_u - 1]);
  END LOOP;
  v_queue := ARRAY(SELECT u FROM generate_series(1, v_n) AS u WHERE v_indeg[u] = 0 ORDER BY u);
  v_head := 1;
  WHILE v_head <= coalesce(cardinality(v_queue), 0) LOOP
    v_u := v_queue[v_head];
    v_head := v_head + 1;
    FOR v_k IN v_start[v_u]..v_start[v_u + 1] - 1 LOOP
      v_indeg[v_et[v_k]] := v_indeg[v_et[v_k]] - 1;
      IF v_indeg[v_et[v_k]] = 0 THEN
        v_queue := array_append(v_queue, v_et[v_k]);
      END IF;
    END LOOP;
  END LOOP;
  IF cardinality(v_queue) = v_n THEN
    RETURN;  -- acyclic
  END IF;
  v_rem := ARRAY(SELECT u FROM generate_series(1, v_n) AS u WHERE v_indeg[u] > 0 ORDER BY u);
  v_done := '{}';
  FOREACH v_u IN ARRAY v_rem LOOP
    CONTINUE WHEN v_u = ANY (v_done);
    WITH RECURSIVE
      e AS (SELECT f, t FROM unnest(v_ef, v_et) AS x(f, t) WHERE f = ANY (v_rem) AND t = ANY (v_rem)),
      fwd(n) AS (SELECT v_u UNION SELECT e.t FROM fwd JOIN e ON e.f = fwd.n),
      bwd(n) AS (SELECT v_u UNION SELECT e.f FROM bwd JOIN e ON e.t = bwd.n)
    SELECT array_agg(n ORDER BY n) INTO v_comp FROM (SELECT n FROM fwd INTERSECT SELECT n FROM bwd) c;
    v_done := v_done || v_comp;
    CONTINUE WHEN cardinality(v_comp) < 2;
    -- the message shows a shortest cycle through the component's first stage (breadth first,
    -- children in declaration order), as dag.py prints it
    v_prev := array_fill(0, ARRAY[v_n]);
    v_queue := ARRAY[v_comp[1]];
    v_head := 1;
    v_found := false;
    WHILE NOT v_found AND v_head <= cardinality(v_queue) LOOP
      v_node := v_queue[v_head];
      v_head := v_head + 1;
      FOR v_k IN v_start[v_node]..v_start[v_node + 1] - 1 LOOP
        v_child := v_et[v_k];
        IF v_child = v_comp[1] THEN
          v_path := ARRAY[v_node];
          WHILE v_path[1] <> v_comp[1] LOOP
            v_path := v_prev[v_path[1]] || v_path;
          END LOOP;
          v_path := v_path || v_comp[1];
          v_found := true;
          EXIT;
        END IF;
        IF v_child = ANY (v_comp) AND v_prev[v_child] = 0 THEN
          v_prev[v_child] := v_node;
          v_queue := array_append(v_queue, v_child);
        END IF;
      END LOOP;
    END LOOP;
    RETURN QUERY SELECT * FROM lifecycle_dag_report('cycle',
      format('stages[%s]', array_position(v_ids, v_nodes[v_comp[1]]) - 1), '', 'cycle',
      ARRAY(SELECT v_nodes[x] FROM unnest(v_comp) AS x ORDER BY x),
      format('%s (stages %s)',
             (SELECT string_agg(v_nodes[x], ' -> ' ORDER BY o) FROM unnest(v_path) WITH ORDINALITY AS p(x, o)),
             (SELECT string_agg(lifecycle_dag_quote(v_nodes[x]), ', ' ORDER BY x) FROM unnest(v_comp) AS x)));
  END LOOP;
END
$$;

COMMENT ON FUNCTION lifecycle_validate_dag(jsonb) IS
  'every problem of a workflow dag_schema (the rules of lifecycle_dagster/dag.py); no rows when valid';

-- Raise one check_violation listing every problem of p_dag (p_what names the row), or return.
CREATE FUNCTION lifecycle_assert_valid_dag(p_dag jsonb, p_what text) RETURNS void
LANGUAGE plpgsql STABLE
AS $$
DECLARE
  v_n      integer;
  v_text   text;
  v_detail text;
BEGIN
  SELECT count(*), string_agg(p.message, '; '), string_agg(format('  - [%s at %s] %s', p.code, p.path, p.message), E'\n')
    INTO v_n, v_text, v_detail
    FROM lifecycle_validate_dag(p_dag) AS p;
  IF v_n > 0 THEN
    RAISE EXCEPTION 'invalid workflow DAG: % has % problem%: %', p_what, v_n,
      CASE WHEN v_n = 1 THEN '' ELSE 's' END, v_text
      USING ERRCODE = 'check_violation',
            CONSTRAINT = 'workflow_definitions_dag_valid',
            TABLE = 'workflow_definitions',
            DETAIL = v_detail,
            HINT = 'lifecycle-dagster validate FILE lists the same problems';
  END IF;
END
$$;

-- The database refuses an invalid DAG on insert, whoever inserts it. A document that is not an
-- object is left to the workflow_definitions_dag_is_object CHECK (which names it).
CREATE FUNCTION lifecycle_guard_definition_insert() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
  IF jsonb_typeof(NEW.dag_schema) = 'object' THEN
    PERFORM lifecycle_assert_valid_dag(NEW.dag_schema, format('workflow %s v%s', NEW.name, NEW.version));
  END IF;
  RETURN NEW;
END
$$;

CREATE TRIGGER workflow_definitions_valid_dag
  BEFORE INSERT ON workflow_definitions
  FOR EACH ROW EXECUTE FUNCTION lifecycle_guard_definition_insert();

-- ---------------------------------------------------------------------------------------------
-- Executions whose status is not final pin their version: the code location keeps building its
-- jobs (forward and compensation) until they end. Final: completed, rolled_back,
-- compensation_failed (lifecycle_transitions has no way out of them).
CREATE FUNCTION lifecycle_execution_is_final(p_status text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
  SELECT p_status IN ('completed', 'rolled_back', 'compensation_failed')
$$;

-- ---------------------------------------------------------------------------------------------
-- Publish a version of workflow p_name. Under a per-name advisory lock, in the caller's (READ
-- COMMITTED) transaction: the DAG is validated; when it equals the latest version's (jsonb
-- equality) and so does the description, nothing is stored (created = false; with p_activate that
-- version becomes the active one if it was not). Otherwise version = highest + 1 is inserted, and
-- with p_activate it becomes the active version and the previous one is deactivated.
-- created_by: p_created_by, else auth.uid().
-- Returns: version, created, active (whether the returned version is active now), activated
-- (whether this call made it the active one), definition_id, previous_version (the version that
-- was active before when this call activated another, or NULL).
CREATE FUNCTION lifecycle_publish_definition(
  p_name        text,
  p_description text,
  p_dag         jsonb,
  p_activate    boolean DEFAULT false,
  p_created_by  uuid DEFAULT NULL,
  p_now         timestamptz DEFAULT now()
) RETURNS TABLE (version integer, created boolean, active boolean, activated boolean, definition_id uuid,
                  previous_version integer)
LANGUAGE plpgsql
AS $$
#variable_conflict use_column
DECLARE
  v_latest workflow_definitions;
  v_prev   workflow_definitions;
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
    RAISE EXCEPTION 'lifecycle_publish_definition: p_activate must be true or false, not NULL'
      USING ERRCODE = 'null_value_not_allowed';
  END IF;
  IF current_setting('transaction_isolation') <> 'read committed' THEN
    -- a snapshot taken before the lock was granted would not see the version just published
    RAISE EXCEPTION 'lifecycle_publish_definition must run in a READ COMMITTED transaction, not %',
      upper(current_setting('transaction_isolation'))
      USING ERRCODE = 'invalid_transaction_state';
  END IF;
  PERFORM lifecycle_assert_valid_dag(p_dag, format('workflow %s (new version)', p_name));

  -- LOCK: every publish and activation of this name
  PERFORM pg_advisory_xact_lock(hashtextextended(p_name, 0));

  SELECT d.* INTO v_latest FROM workflow_definitions d WHERE d.name = p_name ORDER BY d.version DESC LIMIT 1;
  SELECT d.* INTO v_prev FROM workflow_definitions d WHERE d.name = p_name AND d.is_active;

  IF v_latest.id IS NOT NULL AND v_latest.dag_schema = p_dag
     AND v_latest.description IS NOT DISTINCT FROM p_description THEN
    IF p_activate AND NOT v_latest.is_active THEN
      PERFORM lifecycle_activate_definition(p_name, v_latest.version, p_now);
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
    UPDATE workflow_definitions d SET is_active = false WHERE d.id = v_prev.id;
  END IF;
  INSERT INTO workflow_definitions (name, description, version, dag_schema, is_active, created_by, created_at)
  VALUES (p_name, p_description, v_ver, p_dag, p_activate, v_by, p_now)
  RETURNING id INTO v_id;
  INSERT INTO workflow_events (execution_id, event_type, metadata, "timestamp")
  VALUES (NULL, 'definition_published',
          jsonb_build_object('name', p_name, 'version', v_ver, 'definition_id', v_id,
                             'activate', p_activate, 'created_by', v_by,
                             'stage_count', jsonb_array_length(p_dag -> 'stages')),
          p_now);
  IF p_activate THEN
    INSERT INTO workflow_events (execution_id, event_type, metadata, "timestamp")
    VALUES (NULL, 'definition_activated',
            jsonb_build_object('name', p_name, 'version', v_ver, 'definition_id', v_id,
                               'previous_version', v_prev.version, 'previous_definition_id', v_prev.id),
            p_now);
  END IF;
  RETURN QUERY SELECT v_ver, true, p_activate, p_activate, v_id, CASE WHEN p_activate THEN v_prev.version END;
END
$$;

-- Make version p_version of p_name the active one (the others are deactivated), under the same
-- per-name lock as publishing. Already active: nothing changes (activated = false). Unknown name
-- or version: no_data_found naming them.
-- Returns: definition_id, version, activated (whether this call changed anything),
-- previous_version (the version that was active before, or NULL).
CREATE FUNCTION lifecycle_activate_definition(
  p_name    text,
  p_version integer,
  p_now     timestamptz DEFAULT now()
) RETURNS TABLE (definition_id uuid, version integer, activated boolean, previous_version integer)
LANGUAGE plpgsql
AS $$
#variable_conflict use_column
DECLARE
  v_row   workflow_definitions;
  v_prev  workflow_definitions;
  v_known text;
BEGIN
  -- LOCK: every publish and activation of this name
  PERFORM pg_advisory_xact_lock(hashtextextended(p_name, 0));

  SELECT d.* INTO v_row FROM workflow_definitions d WHERE d.name = p_name AND d.version = p_version FOR UPDATE;
  IF v_row.id IS NULL THEN
    SELECT string_agg(d.version::text, ', ' ORDER BY d.version) INTO v_known
      FROM workflow_definitions d WHERE d.name = p_name;
    IF v_known IS NULL THEN
      RAISE EXCEPTION 'no workflow named %', coalesce(quote_literal(p_name), 'NULL') USING ERRCODE = 'no_data_found';
    END IF;
    RAISE EXCEPTION 'workflow % has no version % (versions: %)', quote_literal(p_name),
      coalesce(p_version::text, 'NULL'), v_known
      USING ERRCODE = 'no_data_found';
  END IF;
  SELECT d.* INTO v_prev FROM workflow_definitions d WHERE d.name = p_name AND d.is_active FOR UPDATE;
  IF v_row.is_active THEN
    RETURN QUERY SELECT v_row.id, v_row.version, false, v_row.version;
    RETURN;
  END IF;

  -- TRANSITION: the previous active version off, this one on
  UPDATE workflow_definitions d SET is_active = false WHERE d.name = p_name AND d.is_active;
  UPDATE workflow_definitions d SET is_active = true WHERE d.id = v_row.id;
  INSERT INTO workflow_events (execution_id, event_type, metadata, "timestamp")
  VALUES (NULL, 'definition_activated',
          jsonb_build_object('name', p_name, 'version', v_row.version, 'definition_id', v_row.id,
                             'previous_version', v_prev.version, 'previous_definition_id', v_prev.id),
          p_now);
  RETURN QUERY SELECT v_row.id, v_row.version, true, v_prev.version;
END
$$;
