-- DAG validation: the plpgsql twin of lifecycle_dagster/dag.py. Both agree on every case of
-- tests/dag_cases.json; messages name what is wrong and where.

-- lifecycle.dag_assert_valid
CREATE OR REPLACE FUNCTION lifecycle.dag_assert_valid(p_dag jsonb, p_what text) RETURNS void
    LANGUAGE plpgsql STABLE
    AS $$
DECLARE
  v_n      integer;
  v_text   text;
  v_detail text;
BEGIN
  SELECT count(*), string_agg(p.message, '; '), string_agg(format('  - [%s at %s] %s', p.code, p.path, p.message), E'\n')
    INTO v_n, v_text, v_detail
    FROM lifecycle.dag_validate(p_dag) AS p;
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

REVOKE ALL ON FUNCTION lifecycle.dag_assert_valid(p_dag jsonb, p_what text) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.dag_assert_valid(p_dag jsonb, p_what text) TO service_role;


-- lifecycle.dag_check_approval: the keys of one kind of stage (dag_structure.StructureRules.approval):
-- an approval stage's approvers (required), on_timeout and on_reject; in an agent stage each of
-- those is bad_value; a stage whose kind is invalid (p_kind NULL) gets neither rule
CREATE OR REPLACE FUNCTION lifecycle.dag_check_approval(p_raw jsonb, p_kind text, p_where text, p_label text, p_stages text[]) RETURNS SETOF lifecycle.dag_problem
    LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
    AS $_$
DECLARE
  c_approver_re CONSTANT text :=  -- dag_structure.APPROVER_PATTERN
    '^([0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}|role:[A-Za-z0-9_.:-]{1,63})$';
  v_key      text;
  v_list     jsonb := p_raw -> 'approvers';
  v_approver jsonb;
  v_rel      text;
  v_k        integer := 0;
BEGIN
  IF p_kind = 'agent' THEN
    FOREACH v_key IN ARRAY ARRAY['approvers', 'on_timeout', 'on_reject'] LOOP
      IF p_raw ? v_key THEN
        RETURN NEXT lifecycle.dag_report('bad_value', p_where, v_key, p_label, p_stages,
          'only an approval stage has ' || v_key);
      END IF;
    END LOOP;
    RETURN;
  ELSIF p_kind IS DISTINCT FROM 'approval' THEN
    RETURN;
  END IF;
  IF v_list IS NULL THEN
    RETURN NEXT lifecycle.dag_report('bad_value', p_where, 'approvers', p_label, p_stages,
      'an approval stage needs approvers');
  ELSIF jsonb_typeof(v_list) <> 'array' THEN
    RETURN NEXT lifecycle.dag_report('wrong_type', p_where, 'approvers', p_label, p_stages,
      'approvers must be an array, got ' || lifecycle.dag_kind(v_list));
  ELSIF jsonb_array_length(v_list) = 0 THEN
    RETURN NEXT lifecycle.dag_report('bad_value', p_where, 'approvers', p_label, p_stages,
      'approvers is empty: an approval stage needs approvers');
  END IF;
  FOR v_approver IN SELECT e FROM jsonb_array_elements(CASE WHEN jsonb_typeof(v_list) = 'array' THEN v_list
                                                             ELSE '[]'::jsonb END) AS e LOOP
    v_rel := format('approvers[%s]', v_k);
    IF jsonb_typeof(v_approver) <> 'string' THEN
      RETURN NEXT lifecycle.dag_report('wrong_type', p_where, v_rel, p_label, p_stages,
        format('%s must be a string, got %s', v_rel, lifecycle.dag_kind(v_approver)));
    ELSIF NOT (v_approver #>> '{}') COLLATE "C" ~ c_approver_re THEN
      RETURN NEXT lifecycle.dag_report('bad_value', p_where, v_rel, p_label, p_stages,
        format('%s must be a user id (a UUID) or role:<name> (name: [A-Za-z0-9_.:-], 1 to 63), got %s', v_rel,
               lifecycle.dag_quote(v_approver #>> '{}')));
    ELSIF EXISTS (SELECT 1 FROM jsonb_array_elements(v_list) WITH ORDINALITY AS t(e, i)
                  WHERE i <= v_k AND e = v_approver) THEN
      RETURN NEXT lifecycle.dag_report('bad_value', p_where, v_rel, p_label, p_stages,
        format('%s repeats %s', v_rel, lifecycle.dag_quote(v_approver #>> '{}')));
    END IF;
    v_k := v_k + 1;
  END LOOP;
  RETURN QUERY SELECT * FROM lifecycle.dag_check_string(p_raw -> 'on_timeout', 'on_timeout', p_where, p_label,
                                                        p_stages, '', ARRAY['reject', 'approve', 'fail']);
  RETURN QUERY SELECT * FROM lifecycle.dag_check_string(p_raw -> 'on_reject', 'on_reject', p_where, p_label,
                                                        p_stages, '', ARRAY['end', 'fail', 'branch']);
END
$_$;

REVOKE ALL ON FUNCTION lifecycle.dag_check_approval(p_raw jsonb, p_kind text, p_where text, p_label text, p_stages text[]) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.dag_check_approval(p_raw jsonb, p_kind text, p_where text, p_label text, p_stages text[]) TO service_role;


-- lifecycle.dag_check_batch: the problems of the optional top-level "batch" object (the rules of
-- lifecycle_dagster/core/dag_batch.py, with its messages, in its order): absent or null is no
-- batch; else an object with only max_executions (required, an integer from 1 to 10000) and
-- max_wait_s (optional, a number from 0 to 3600); unknown keys in code-point order
CREATE OR REPLACE FUNCTION lifecycle.dag_check_batch(p_dag jsonb) RETURNS SETOF lifecycle.dag_problem
    LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
    AS $$
DECLARE
  c_max_executions CONSTANT integer := 10000;         -- dag_batch.MAX_BATCH_EXECUTIONS
  c_max_wait_s     CONSTANT double precision := 3600;  -- dag_batch.MAX_BATCH_WAIT_S
  v_raw   jsonb := p_dag -> 'batch';
  v_value jsonb;
  v_key   text;
  v_rule  text;
  v_n     double precision;
  v_ok    boolean;
BEGIN
  IF v_raw IS NULL OR jsonb_typeof(v_raw) = 'null' THEN
    RETURN;
  END IF;
  IF jsonb_typeof(v_raw) <> 'object' THEN
    RETURN NEXT lifecycle.dag_report('wrong_type', '', 'batch', 'workflow DAG', '{}',
      'batch must be an object or null, got ' || lifecycle.dag_kind(v_raw));
    RETURN;
  END IF;
  FOR v_key IN
    SELECT k FROM jsonb_object_keys(v_raw) AS k
    WHERE k NOT IN ('max_executions', 'max_wait_s') ORDER BY k COLLATE "C"
  LOOP
    RETURN NEXT lifecycle.dag_report('unknown_key', 'batch', v_key, 'workflow DAG', '{}',
      'unknown key ' || lifecycle.dag_quote('batch.' || v_key));
  END LOOP;
  FOREACH v_key IN ARRAY ARRAY['max_executions', 'max_wait_s'] LOOP
    v_value := v_raw -> v_key;
    CONTINUE WHEN v_value IS NULL AND v_key = 'max_wait_s';
    v_rule := CASE v_key WHEN 'max_executions' THEN format('an integer from 1 to %s', c_max_executions)
                         ELSE format('a number from 0 to %s', c_max_wait_s) END;
    IF jsonb_typeof(v_value) IS DISTINCT FROM 'number' THEN
      RETURN NEXT lifecycle.dag_report('wrong_type', 'batch', v_key, 'workflow DAG', '{}',
        format('batch.%s must be %s, got %s', v_key, v_rule, lifecycle.dag_kind(v_value)));
      CONTINUE;
    END IF;
    v_n := lifecycle.dag_float(v_value);
    IF v_n IS NULL THEN
      RETURN NEXT lifecycle.dag_report('bad_value', 'batch', v_key, 'workflow DAG', '{}',
        format('batch.%s must be a number a double can hold (finite, and not so small that it rounds to 0), got %s',
               v_key,
               CASE WHEN length(v_value::text) <= 24 THEN v_value::text ELSE left(v_value::text, 20) || '...' END));
      CONTINUE;
    END IF;
    IF v_key = 'max_executions' THEN
      v_ok := v_n = trunc(v_n) AND v_n >= 1 AND v_n <= c_max_executions;
    ELSE
      v_ok := v_n >= 0 AND v_n <= c_max_wait_s;
    END IF;
    IF NOT v_ok THEN
      RETURN NEXT lifecycle.dag_report('bad_value', 'batch', v_key, 'workflow DAG', '{}',
        format('batch.%s must be %s, got %s', v_key, v_rule,
               CASE WHEN length(v_value::text) <= 24 THEN v_value::text ELSE left(v_value::text, 20) || '...' END));
    END IF;
  END LOOP;
END
$$;

REVOKE ALL ON FUNCTION lifecycle.dag_check_batch(p_dag jsonb) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.dag_check_batch(p_dag jsonb) TO service_role;


-- lifecycle.dag_check_context
CREATE OR REPLACE FUNCTION lifecycle.dag_check_context(p_value jsonb) RETURNS SETOF lifecycle.dag_problem
    LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
    AS $$
DECLARE
  v_required jsonb;
  v_example  jsonb;
  v_name     jsonb;
  v_k        integer := 0;
  v_key      text;
BEGIN
  -- the context declaration (dag_structure.StructureRules.context): required, example, description
  IF jsonb_typeof(p_value) <> 'object' THEN
    RETURN NEXT lifecycle.dag_report('wrong_type', '', 'context', 'workflow DAG', '{}',
      'context must be an object, got ' || lifecycle.dag_kind(p_value));
    RETURN;
  END IF;
  RETURN QUERY SELECT * FROM lifecycle.dag_check_keys(p_value, ARRAY['required', 'example', 'description'],
                                                      'context', 'context', '{}', 'context.');
  RETURN QUERY SELECT * FROM lifecycle.dag_check_string(p_value -> 'description', 'description', 'context',
                                                        'context', '{}', 'context.');
  v_required := coalesce(p_value -> 'required', '[]'::jsonb);
  IF jsonb_typeof(v_required) <> 'array' THEN
    RETURN NEXT lifecycle.dag_report('wrong_type', 'context', 'required', 'context', '{}',
      'context.required must be an array, got ' || lifecycle.dag_kind(v_required));
    v_required := '[]'::jsonb;
  END IF;
  FOR v_name IN SELECT e FROM jsonb_array_elements(v_required) AS e LOOP
    IF v_name = '""'::jsonb THEN
      RETURN NEXT lifecycle.dag_report('bad_value', 'context', format('required[%s]', v_k), 'context', '{}',
        format('context.required[%s] is empty', v_k));
    ELSIF jsonb_typeof(v_name) = 'string' AND EXISTS (
        SELECT 1 FROM jsonb_array_elements(v_required) WITH ORDINALITY AS t(e, i) WHERE i <= v_k AND e = v_name) THEN
      RETURN NEXT lifecycle.dag_report('bad_value', 'context', format('required[%s]', v_k), 'context', '{}',
        format('context.required[%s] repeats %s', v_k, lifecycle.dag_quote(v_name #>> '{}')));
    END IF;
    RETURN QUERY SELECT * FROM lifecycle.dag_check_string(v_name, format('required[%s]', v_k), 'context',
                                                          'context', '{}', 'context.');
    v_k := v_k + 1;
  END LOOP;
  IF NOT p_value ? 'example' THEN
    RETURN;
  END IF;
  v_example := p_value -> 'example';
  IF jsonb_typeof(v_example) <> 'object' THEN
    RETURN NEXT lifecycle.dag_report('wrong_type', 'context', 'example', 'context', '{}',
      'context.example must be an object, got ' || lifecycle.dag_kind(v_example));
    RETURN;
  END IF;
  FOR v_key IN
    SELECT e #>> '{}' FROM jsonb_array_elements(v_required) WITH ORDINALITY AS t(e, i)
    WHERE jsonb_typeof(e) = 'string' AND e <> '""'::jsonb
    GROUP BY e ORDER BY min(i)
  LOOP
    IF NOT v_example ? v_key THEN
      RETURN NEXT lifecycle.dag_report('bad_value', 'context', 'example', 'context', '{}',
        'context.example lacks the required key ' || lifecycle.dag_quote(v_key));
    END IF;
  END LOOP;
END
$$;

REVOKE ALL ON FUNCTION lifecycle.dag_check_context(p_value jsonb) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.dag_check_context(p_value jsonb) TO service_role;


-- lifecycle.dag_check_keys
CREATE OR REPLACE FUNCTION lifecycle.dag_check_keys(p_obj jsonb, p_allowed text[], p_where text, p_label text, p_stages text[], p_field text) RETURNS SETOF lifecycle.dag_problem
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$
  SELECT lifecycle.dag_report('unknown_key', p_where, k, p_label, p_stages,
                               'unknown key ' || lifecycle.dag_quote(p_field || k))
  FROM jsonb_object_keys(p_obj) AS k
  WHERE NOT k = ANY (p_allowed)
$$;

REVOKE ALL ON FUNCTION lifecycle.dag_check_keys(p_obj jsonb, p_allowed text[], p_where text, p_label text, p_stages text[], p_field text) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.dag_check_keys(p_obj jsonb, p_allowed text[], p_where text, p_label text, p_stages text[], p_field text) TO service_role;


-- lifecycle.dag_check_next_edges: next_edges_mismatch (dag_structure.StructureRules.mismatches):
-- for each stage with an id in p_nodes and a next array, its entries and the edges from it must be
-- the same set of {to, when, unless} (jsonb equality; a string entry and an absent condition are
-- null conditions); the message names the targets when they differ, else those whose conditions do
CREATE OR REPLACE FUNCTION lifecycle.dag_check_next_edges(p_stages jsonb, p_edges jsonb, p_nodes text[]) RETURNS SETOF lifecycle.dag_problem
    LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
    AS $$
DECLARE
  v_raw    jsonb;
  v_i      integer := 0;
  v_listed jsonb[];
  v_linked jsonb[];
  v_to_l   text[];
  v_to_e   text[];
  v_text   text;
BEGIN
  FOR v_raw IN SELECT s FROM jsonb_array_elements(p_stages) AS s LOOP
    v_i := v_i + 1;
    CONTINUE WHEN NOT coalesce(jsonb_typeof(v_raw) = 'object' AND jsonb_typeof(v_raw -> 'id') = 'string'
                               AND (v_raw ->> 'id') = ANY (p_nodes) AND jsonb_typeof(v_raw -> 'next') = 'array',
                               false);
    v_listed := ARRAY(SELECT DISTINCT jsonb_build_object('to', x -> 'to', 'when', x -> 'when', 'unless', x -> 'unless')
                      FROM jsonb_array_elements(v_raw -> 'next') AS n,
                           LATERAL (SELECT CASE WHEN jsonb_typeof(n) = 'string' THEN jsonb_build_object('to', n)
                                                ELSE n END AS x) l
                      WHERE jsonb_typeof(x) = 'object' AND jsonb_typeof(x -> 'to') = 'string');
    v_linked := ARRAY(SELECT DISTINCT jsonb_build_object('to', e -> 'to', 'when', e -> 'when', 'unless', e -> 'unless')
                      FROM jsonb_array_elements(p_edges) AS e
                      WHERE jsonb_typeof(e) = 'object' AND e -> 'from' = to_jsonb(v_raw ->> 'id')
                        AND jsonb_typeof(e -> 'to') = 'string');
    CONTINUE WHEN v_listed <@ v_linked AND v_linked <@ v_listed;
    v_to_l := ARRAY(SELECT DISTINCT (x ->> 'to') COLLATE "C" FROM unnest(v_listed) AS x ORDER BY 1);
    v_to_e := ARRAY(SELECT DISTINCT (x ->> 'to') COLLATE "C" FROM unnest(v_linked) AS x ORDER BY 1);
    IF v_to_l <> v_to_e THEN
      v_text := format('next [%s] disagrees with the edges from %s to [%s]',
                       (SELECT string_agg(lifecycle.dag_quote(x), ', ' ORDER BY o) FROM unnest(v_to_l) WITH ORDINALITY AS u(x, o)),
                       lifecycle.dag_quote(v_raw ->> 'id'),
                       (SELECT string_agg(lifecycle.dag_quote(x), ', ' ORDER BY o) FROM unnest(v_to_e) WITH ORDINALITY AS u(x, o)));
    ELSE
      v_text := format('the when/unless of next disagree with those of the edges from %s (to %s)',
                       lifecycle.dag_quote(v_raw ->> 'id'),
                       (SELECT string_agg(lifecycle.dag_quote(t), ', ' ORDER BY t COLLATE "C")
                        FROM (SELECT DISTINCT x ->> 'to' AS t
                              FROM unnest(v_listed || v_linked) AS x
                              WHERE NOT (x = ANY (v_listed) AND x = ANY (v_linked))) d));
    END IF;
    RETURN NEXT lifecycle.dag_report('next_edges_mismatch', format('stages[%s]', v_i - 1), 'next',
      'stage ' || lifecycle.dag_quote(v_raw ->> 'id'), ARRAY[v_raw ->> 'id'], v_text);
  END LOOP;
END
$$;

REVOKE ALL ON FUNCTION lifecycle.dag_check_next_edges(p_stages jsonb, p_edges jsonb, p_nodes text[]) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.dag_check_next_edges(p_stages jsonb, p_edges jsonb, p_nodes text[]) TO service_role;


-- lifecycle.dag_check_number
CREATE OR REPLACE FUNCTION lifecycle.dag_check_number(p_obj jsonb, p_key text, p_where text, p_label text, p_stages text[], p_field text, p_minimum double precision, p_positive boolean DEFAULT false, p_integral boolean DEFAULT false) RETURNS SETOF lifecycle.dag_problem
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
    RETURN NEXT lifecycle.dag_report('wrong_type', p_where, p_key, p_label, p_stages,
      format('%s must be a number, got %s', v_name, lifecycle.dag_kind(v_value)));
    RETURN;
  END IF;
  IF lifecycle.dag_float(v_value) IS NULL THEN
    RETURN NEXT lifecycle.dag_report('bad_value', p_where, p_key, p_label, p_stages,
      format('%s must be a number a double can hold (finite, and not so small that it rounds to 0), got %s',
             v_name,
             CASE WHEN length(v_value::text) <= 24 THEN v_value::text ELSE left(v_value::text, 20) || '...' END));
    RETURN;
  END IF;
  IF lifecycle.dag_number_value(v_value, p_minimum, p_positive, p_integral) IS NULL THEN
    v_rule := CASE WHEN p_integral THEN 'an integer from 1 to 1000'
                   ELSE format('%s %s', CASE WHEN p_positive THEN '>' ELSE '>=' END, p_minimum) END;
    RETURN NEXT lifecycle.dag_report('bad_value', p_where, p_key, p_label, p_stages,
      format('%s must be %s, got %s', v_name, v_rule,
             CASE WHEN length(v_value::text) <= 24 THEN v_value::text ELSE left(v_value::text, 20) || '...' END));
  END IF;
END
$$;

REVOKE ALL ON FUNCTION lifecycle.dag_check_number(p_obj jsonb, p_key text, p_where text, p_label text, p_stages text[], p_field text, p_minimum double precision, p_positive boolean, p_integral boolean) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.dag_check_number(p_obj jsonb, p_key text, p_where text, p_label text, p_stages text[], p_field text, p_minimum double precision, p_positive boolean, p_integral boolean) TO service_role;


-- lifecycle.dag_check_pattern: an optional when/unless pattern (dag_structure.StructureRules.pattern):
-- a non-empty object whose keys are output and/or context; one problem at most
CREATE OR REPLACE FUNCTION lifecycle.dag_check_pattern(p_value jsonb, p_rel text, p_where text, p_label text, p_stages text[]) RETURNS SETOF lifecycle.dag_problem
    LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
    AS $$
DECLARE
  v_other text;
BEGIN
  IF p_value IS NULL THEN
    RETURN;
  END IF;
  IF jsonb_typeof(p_value) <> 'object' THEN
    RETURN NEXT lifecycle.dag_report('wrong_type', p_where, p_rel, p_label, p_stages,
      format('%s must be an object, got %s', p_rel, lifecycle.dag_kind(p_value)));
    RETURN;
  END IF;
  SELECT string_agg(lifecycle.dag_quote(k), ', ' ORDER BY k COLLATE "C") INTO v_other
    FROM jsonb_object_keys(p_value) AS k WHERE k NOT IN ('output', 'context');
  IF p_value = '{}'::jsonb OR v_other IS NOT NULL THEN
    RETURN NEXT lifecycle.dag_report('bad_value', p_where, p_rel, p_label, p_stages,
      format('%s must have the key output, context or both, and no other; got %s', p_rel, coalesce(v_other, '{}')));
  END IF;
END
$$;

REVOKE ALL ON FUNCTION lifecycle.dag_check_pattern(p_value jsonb, p_rel text, p_where text, p_label text, p_stages text[]) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.dag_check_pattern(p_value jsonb, p_rel text, p_where text, p_label text, p_stages text[]) TO service_role;


-- lifecycle.dag_check_retry
CREATE OR REPLACE FUNCTION lifecycle.dag_check_retry(p_value jsonb, p_where text, p_label text, p_stages text[]) RETURNS SETOF lifecycle.dag_problem
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
    RETURN NEXT lifecycle.dag_report('wrong_type', p_where, '', p_label, p_stages,
      'retry must be an object, got ' || lifecycle.dag_kind(p_value));
    RETURN;
  END IF;
  RETURN QUERY SELECT * FROM lifecycle.dag_check_keys(p_value,
    ARRAY['max_attempts', 'base_delay_s', 'max_delay_s', 'multiplier', 'jitter', 'non_retryable'],
    p_where, p_label, p_stages, 'retry.');
  RETURN QUERY SELECT * FROM lifecycle.dag_check_number(p_value, 'max_attempts', p_where, p_label, p_stages,
                                                        'retry.', 1, p_integral => true);
  RETURN QUERY SELECT * FROM lifecycle.dag_check_number(p_value, 'base_delay_s', p_where, p_label, p_stages,
                                                        'retry.', 0);
  RETURN QUERY SELECT * FROM lifecycle.dag_check_number(p_value, 'max_delay_s', p_where, p_label, p_stages,
                                                        'retry.', 0);
  v_base := lifecycle.dag_number_value(p_value -> 'base_delay_s', 0, false, false);
  v_most := lifecycle.dag_number_value(p_value -> 'max_delay_s', 0, false, false);
  IF v_base IS NOT NULL AND v_most IS NOT NULL AND v_most < v_base THEN
    RETURN NEXT lifecycle.dag_report('bad_value', p_where, 'max_delay_s', p_label, p_stages,
      format('retry.max_delay_s (%s) must be >= retry.base_delay_s (%s)', v_most, v_base));
  END IF;
  RETURN QUERY SELECT * FROM lifecycle.dag_check_number(p_value, 'multiplier', p_where, p_label, p_stages,
                                                        'retry.', 1);
  RETURN QUERY SELECT * FROM lifecycle.dag_check_string(p_value -> 'jitter', 'jitter', p_where, p_label,
                                                        p_stages, 'retry.', ARRAY['none', 'full', 'equal']);
  v_names := coalesce(p_value -> 'non_retryable', '[]'::jsonb);
  IF jsonb_typeof(v_names) <> 'array' THEN
    RETURN NEXT lifecycle.dag_report('wrong_type', p_where, 'non_retryable', p_label, p_stages,
      'retry.non_retryable must be an array, got ' || lifecycle.dag_kind(v_names));
    RETURN;
  END IF;
  v_k := 0;
  FOR v_name IN SELECT e FROM jsonb_array_elements(v_names) AS e LOOP
    IF v_name = '""'::jsonb THEN
      RETURN NEXT lifecycle.dag_report('bad_value', p_where, format('non_retryable[%s]', v_k), p_label,
        p_stages, format('retry.non_retryable[%s] is empty', v_k));
    END IF;
    RETURN QUERY SELECT * FROM lifecycle.dag_check_string(v_name, format('non_retryable[%s]', v_k), p_where,
                                                          p_label, p_stages, 'retry.');
    v_k := v_k + 1;
  END LOOP;
END
$$;

REVOKE ALL ON FUNCTION lifecycle.dag_check_retry(p_value jsonb, p_where text, p_label text, p_stages text[]) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.dag_check_retry(p_value jsonb, p_where text, p_label text, p_stages text[]) TO service_role;


-- lifecycle.dag_check_schedule: the problems of the optional top-level "schedule" object (the rules
-- of lifecycle_dagster/core/dag_schedule.py, with its messages). STABLE, not IMMUTABLE: it reads
-- the time zone names of the server (lifecycle.dag_timezone_known).
CREATE OR REPLACE FUNCTION lifecycle.dag_check_schedule(p_dag jsonb) RETURNS SETOF lifecycle.dag_problem
    LANGUAGE plpgsql STABLE PARALLEL SAFE
    AS $$
DECLARE
  v_raw   jsonb := p_dag -> 'schedule';
  v_value jsonb;
  v_why   text;
BEGIN
  IF v_raw IS NULL THEN
    RETURN;
  END IF;
  IF jsonb_typeof(v_raw) <> 'object' THEN
    RETURN NEXT lifecycle.dag_report('wrong_type', '', 'schedule', 'workflow DAG', '{}',
      'schedule must be an object, got ' || lifecycle.dag_kind(v_raw));
    RETURN;
  END IF;
  RETURN QUERY SELECT * FROM lifecycle.dag_check_keys(v_raw, ARRAY['cron', 'timezone', 'context', 'enabled'],
                                                      'schedule', 'workflow DAG', '{}', 'schedule.');
  v_value := v_raw -> 'cron';
  IF jsonb_typeof(v_value) IS DISTINCT FROM 'string' THEN
    RETURN NEXT lifecycle.dag_report('wrong_type', 'schedule', 'cron', 'workflow DAG', '{}',
      'schedule.cron must be a string, got ' || lifecycle.dag_kind(v_value));
  ELSE
    v_why := lifecycle.dag_cron_problem(v_value #>> '{}');
    IF v_why IS NOT NULL THEN
      RETURN NEXT lifecycle.dag_report('bad_value', 'schedule', 'cron', 'workflow DAG', '{}',
        format('schedule.cron %s is not a valid cron: %s', lifecycle.dag_quote(v_value #>> '{}'), v_why));
    END IF;
  END IF;
  v_value := coalesce(v_raw -> 'timezone', '"UTC"'::jsonb);
  IF jsonb_typeof(v_value) <> 'string' THEN
    RETURN NEXT lifecycle.dag_report('wrong_type', 'schedule', 'timezone', 'workflow DAG', '{}',
      'schedule.timezone must be a string, got ' || lifecycle.dag_kind(v_value));
  ELSIF NOT lifecycle.dag_timezone_known(v_value #>> '{}') THEN
    RETURN NEXT lifecycle.dag_report('bad_value', 'schedule', 'timezone', 'workflow DAG', '{}',
      format('schedule.timezone must be an IANA time zone name (Europe/Berlin, UTC...), got %s',
             lifecycle.dag_quote(v_value #>> '{}')));
  END IF;
  v_value := coalesce(v_raw -> 'context', '{}'::jsonb);
  IF jsonb_typeof(v_value) <> 'object' THEN
    RETURN NEXT lifecycle.dag_report('wrong_type', 'schedule', 'context', 'workflow DAG', '{}',
      'schedule.context must be an object, got ' || lifecycle.dag_kind(v_value));
  END IF;
  v_value := coalesce(v_raw -> 'enabled', 'true'::jsonb);
  IF jsonb_typeof(v_value) <> 'boolean' THEN
    RETURN NEXT lifecycle.dag_report('wrong_type', 'schedule', 'enabled', 'workflow DAG', '{}',
      'schedule.enabled must be a boolean, got ' || lifecycle.dag_kind(v_value));
  END IF;
END
$$;

REVOKE ALL ON FUNCTION lifecycle.dag_check_schedule(p_dag jsonb) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.dag_check_schedule(p_dag jsonb) TO service_role;


-- lifecycle.dag_check_string
CREATE OR REPLACE FUNCTION lifecycle.dag_check_string(p_value jsonb, p_rel text, p_where text, p_label text, p_stages text[], p_field text, p_choices text[] DEFAULT '{}'::text[]) RETURNS SETOF lifecycle.dag_problem
    LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
    AS $$
BEGIN
  IF p_value IS NULL THEN
    RETURN;
  END IF;
  IF jsonb_typeof(p_value) <> 'string' THEN
    RETURN NEXT lifecycle.dag_report('wrong_type', p_where, p_rel, p_label, p_stages,
      format('%s must be a string, got %s', p_field || p_rel, lifecycle.dag_kind(p_value)));
  ELSIF cardinality(p_choices) > 0 AND NOT (p_value #>> '{}') = ANY (p_choices) THEN
    RETURN NEXT lifecycle.dag_report('bad_value', p_where, p_rel, p_label, p_stages,
      format('%s must be one of %s, got %s', p_field || p_rel, array_to_string(p_choices, ', '),
             lifecycle.dag_quote(p_value #>> '{}')));
  END IF;
END
$$;

REVOKE ALL ON FUNCTION lifecycle.dag_check_string(p_value jsonb, p_rel text, p_where text, p_label text, p_stages text[], p_field text, p_choices text[]) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.dag_check_string(p_value jsonb, p_rel text, p_where text, p_label text, p_stages text[], p_field text, p_choices text[]) TO service_role;


-- lifecycle.dag_cron_field_values: the values one field of a schedule's cron stands for (a list of
-- *, n, a-b with a <= b, each with an optional step /s, s >= 1, within p_low..p_high), or NULL when
-- the field breaks that rule (lifecycle_dagster/core/dag_schedule.py's cron_field_values)
CREATE OR REPLACE FUNCTION lifecycle.dag_cron_field_values(p_field text, p_low integer, p_high integer) RETURNS integer[]
    LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
    AS $$
DECLARE
  v_item  text;
  v_m     text[];
  v_first integer;
  v_last  integer;
  v_step  integer;
  v_out   integer[] := '{}';
BEGIN
  IF p_field = '' THEN
    RETURN NULL;
  END IF;
  FOREACH v_item IN ARRAY string_to_array(p_field, ',') LOOP
    v_m := regexp_match(v_item, '^(\*|([0-9]{1,2})(-([0-9]{1,2}))?)(/([0-9]{1,2}))?$');
    IF v_m IS NULL THEN
      RETURN NULL;
    END IF;
    v_step := coalesce(v_m[6]::integer, 1);
    IF v_m[1] = '*' THEN
      v_first := p_low;
      v_last := p_high;
    ELSE
      v_first := v_m[2]::integer;
      -- n/s: from n to the end of the range
      v_last := coalesce(v_m[4]::integer, CASE WHEN v_m[6] IS NOT NULL THEN p_high ELSE v_first END);
    END IF;
    IF v_step < 1 OR NOT (p_low <= v_first AND v_first <= v_last AND v_last <= p_high) THEN
      RETURN NULL;
    END IF;
    v_out := v_out || ARRAY(SELECT generate_series(v_first, v_last, v_step));
  END LOOP;
  RETURN v_out;
END
$$;

REVOKE ALL ON FUNCTION lifecycle.dag_cron_field_values(p_field text, p_low integer, p_high integer) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.dag_cron_field_values(p_field text, p_low integer, p_high integer) TO service_role;


-- lifecycle.dag_cron_problem: why a schedule's cron breaks the rule of
-- lifecycle_dagster/core/dag_schedule.py (same words), or NULL when it is valid
CREATE OR REPLACE FUNCTION lifecycle.dag_cron_problem(p_cron text) RETURNS text
    LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
    AS $$
DECLARE
  c_names  CONSTANT text[] := ARRAY['minute', 'hour', 'day of month', 'month', 'day of week'];
  c_low    CONSTANT integer[] := ARRAY[0, 0, 1, 1, 0];
  c_high   CONSTANT integer[] := ARRAY[59, 23, 31, 12, 7];
  -- days in each month (February: 29, Dagster runs a 29 Feb schedule in leap years)
  c_days   CONSTANT integer[] := ARRAY[31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
  v_fields text[];
  v_values integer[];
  v_days   integer[];
  v_months integer[];
BEGIN
  IF p_cron = '' THEN
    RETURN 'it is empty';
  END IF;
  v_fields := string_to_array(p_cron, ' ');
  IF cardinality(v_fields) <> 5 THEN
    RETURN format('it has %s fields separated by single spaces, not 5', cardinality(v_fields));
  END IF;
  FOR v_i IN 1..5 LOOP
    v_values := lifecycle.dag_cron_field_values(v_fields[v_i], c_low[v_i], c_high[v_i]);
    IF v_values IS NULL THEN
      RETURN format('the %s field %s is not *, a number from %s to %s, a range a-b (a <= b), a step'
                    ' (*/s, n/s or a-b/s, s >= 1) or a comma-separated list of these',
                    c_names[v_i], lifecycle.dag_quote(v_fields[v_i]), c_low[v_i], c_high[v_i]);
    END IF;
    IF v_i = 3 THEN
      v_days := v_values;
    ELSIF v_i = 4 THEN
      v_months := v_values;
    END IF;
  END LOOP;
  IF (SELECT min(d) FROM unnest(v_days) AS d) > (SELECT max(c_days[m]) FROM unnest(v_months) AS m) THEN
    RETURN 'no listed day of month occurs in a listed month';
  END IF;
  RETURN NULL;
END
$$;

REVOKE ALL ON FUNCTION lifecycle.dag_cron_problem(p_cron text) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.dag_cron_problem(p_cron text) TO service_role;


-- lifecycle.dag_float
CREATE OR REPLACE FUNCTION lifecycle.dag_float(p_value jsonb) RETURNS double precision
    LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
    AS $$
BEGIN
  IF jsonb_typeof(p_value) IS DISTINCT FROM 'number' THEN
    RETURN NULL;
  END IF;
  RETURN (p_value #>> '{}')::double precision;
EXCEPTION WHEN numeric_value_out_of_range THEN
  RETURN NULL;  -- 1e400 overflows, 1e-400 rounds to 0: a double cannot hold it (read it, and it fails)
END
$$;

REVOKE ALL ON FUNCTION lifecycle.dag_float(p_value jsonb) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.dag_float(p_value jsonb) TO service_role;


-- lifecycle.dag_has_stage
CREATE OR REPLACE FUNCTION lifecycle.dag_has_stage(p_definition_id uuid, p_stage_id text) RETURNS boolean
    LANGUAGE plpgsql STABLE
    AS $$
BEGIN
  -- plpgsql, not sql: its plan is kept for the session (a SQL function that is not inlined is
  -- planned again on every call, and a trigger calls this one for every stage log written)
  RETURN EXISTS (
    SELECT 1 FROM public.workflow_definitions d, jsonb_array_elements(
      CASE WHEN jsonb_typeof(d.dag_schema -> 'stages') = 'array' THEN d.dag_schema -> 'stages' ELSE '[]'::jsonb END
    ) s
    WHERE d.id = p_definition_id AND s ->> 'id' = p_stage_id);
END
$$;

REVOKE ALL ON FUNCTION lifecycle.dag_has_stage(p_definition_id uuid, p_stage_id text) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.dag_has_stage(p_definition_id uuid, p_stage_id text) TO service_role;


-- lifecycle.dag_kind
CREATE OR REPLACE FUNCTION lifecycle.dag_kind(p_value jsonb) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$
  SELECT CASE jsonb_typeof(p_value)
           WHEN 'null' THEN 'null' WHEN 'boolean' THEN 'a boolean' WHEN 'number' THEN 'a number'
           WHEN 'string' THEN 'a string' WHEN 'array' THEN 'an array' WHEN 'object' THEN 'an object'
           ELSE 'nothing' END
$$;

REVOKE ALL ON FUNCTION lifecycle.dag_kind(p_value jsonb) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.dag_kind(p_value jsonb) TO service_role;


-- lifecycle.dag_number_value
CREATE OR REPLACE FUNCTION lifecycle.dag_number_value(p_value jsonb, p_minimum double precision, p_positive boolean, p_integral boolean) RETURNS double precision
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$
  SELECT v FROM (SELECT lifecycle.dag_float(p_value) AS v) x
  WHERE v IS NOT NULL AND v NOT IN ('Infinity', '-Infinity')
    AND CASE WHEN p_positive THEN v > p_minimum ELSE v >= p_minimum END
    AND (NOT p_integral OR (v = trunc(v) AND v <= 1000))
$$;

REVOKE ALL ON FUNCTION lifecycle.dag_number_value(p_value jsonb, p_minimum double precision, p_positive boolean, p_integral boolean) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.dag_number_value(p_value jsonb, p_minimum double precision, p_positive boolean, p_integral boolean) TO service_role;


-- lifecycle.dag_quote
CREATE OR REPLACE FUNCTION lifecycle.dag_quote(p_text text) RETURNS text
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

REVOKE ALL ON FUNCTION lifecycle.dag_quote(p_text text) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.dag_quote(p_text text) TO service_role;


-- lifecycle.dag_report
CREATE OR REPLACE FUNCTION lifecycle.dag_report(p_code text, p_where text, p_rel text, p_label text, p_stages text[], p_text text) RETURNS lifecycle.dag_problem
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$
  SELECT ROW(
    p_code,
    coalesce((SELECT array_agg(s ORDER BY first_at)
              FROM (SELECT s, min(i) AS first_at FROM unnest(p_stages) WITH ORDINALITY AS u(s, i)
                    WHERE s IS NOT NULL AND s <> '' GROUP BY s) d), '{}'::text[]),
    p_where || CASE WHEN p_where <> '' AND left(p_rel, 1) NOT IN ('', '[') THEN '.' ELSE '' END || p_rel,
    p_label || ': ' || p_text
  )::lifecycle.dag_problem
$$;

REVOKE ALL ON FUNCTION lifecycle.dag_report(p_code text, p_where text, p_rel text, p_label text, p_stages text[], p_text text) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.dag_report(p_code text, p_where text, p_rel text, p_label text, p_stages text[], p_text text) TO service_role;


-- lifecycle.dag_timezone_known: whether a schedule's timezone is one of lifecycle.dag_timezone_names()
CREATE OR REPLACE FUNCTION lifecycle.dag_timezone_known(p_name text) RETURNS boolean
    LANGUAGE sql STABLE PARALLEL SAFE
    AS $$
  SELECT EXISTS (SELECT 1 FROM lifecycle.dag_timezone_names() AS z(name) WHERE z.name = p_name)
$$;

REVOKE ALL ON FUNCTION lifecycle.dag_timezone_known(p_name text) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.dag_timezone_known(p_name text) TO service_role;


-- lifecycle.dag_timezone_names: the IANA time zone names a schedule may use: pg_timezone_names
-- without its posix/ and right/ copies and posixrules, the names Python's
-- zoneinfo.available_timezones() lists. STABLE: the server's time zone data can change.
CREATE OR REPLACE FUNCTION lifecycle.dag_timezone_names() RETURNS SETOF text
    LANGUAGE sql STABLE PARALLEL SAFE
    AS $$
  SELECT z.name FROM pg_catalog.pg_timezone_names AS z
  WHERE z.name !~ '^(posix|right)/' AND z.name <> 'posixrules'
$$;

REVOKE ALL ON FUNCTION lifecycle.dag_timezone_names() FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.dag_timezone_names() TO service_role;

-- lifecycle.dag_validate
CREATE OR REPLACE FUNCTION lifecycle.dag_validate(p_dag jsonb) RETURNS TABLE(code text, stages text[], path text, message text)
    LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
    AS $$
#variable_conflict use_column
DECLARE
  c_max_stages CONSTANT integer := 500;
  c_max_edges  CONSTANT integer := 5000;
  v_stages integer := 0;
  v_edges  integer := 0;
BEGIN
  IF jsonb_typeof(p_dag) = 'object' THEN
    IF jsonb_typeof(p_dag -> 'stages') = 'array' THEN
      v_stages := jsonb_array_length(p_dag -> 'stages');
      SELECT coalesce(sum(jsonb_array_length(s -> 'next')), 0) INTO v_edges
        FROM jsonb_array_elements(p_dag -> 'stages') AS s
       WHERE jsonb_typeof(s) = 'object' AND jsonb_typeof(s -> 'next') = 'array';
    END IF;
    IF jsonb_typeof(p_dag -> 'edges') = 'array' THEN
      v_edges := v_edges + jsonb_array_length(p_dag -> 'edges');
    END IF;
    IF v_stages > c_max_stages THEN
      RETURN QUERY SELECT * FROM lifecycle.dag_report('bad_value', '', 'stages', 'workflow DAG', '{}',
        format('stages has %s entries, over the limit of %s', v_stages, c_max_stages));
    END IF;
    IF v_edges > c_max_edges THEN
      RETURN QUERY SELECT * FROM lifecycle.dag_report('bad_value', '', 'edges', 'workflow DAG', '{}',
        format('the DAG has %s edge entries (edges and next), over the limit of %s', v_edges, c_max_edges));
    END IF;
    IF v_stages > c_max_stages OR v_edges > c_max_edges THEN
      RETURN;
    END IF;
  END IF;
  RETURN QUERY SELECT * FROM lifecycle.dag_validate_rules(p_dag);
END
$$;

REVOKE ALL ON FUNCTION lifecycle.dag_validate(p_dag jsonb) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.dag_validate(p_dag jsonb) TO service_role;

COMMENT ON FUNCTION lifecycle.dag_validate(p_dag jsonb) IS 'every problem of a workflow dag_schema (the rules of lifecycle_dagster/dag.py); no rows when valid';


-- lifecycle.dag_validate_rules
CREATE OR REPLACE FUNCTION lifecycle.dag_validate_rules(p_dag jsonb) RETURNS TABLE(code text, stages text[], path text, message text)
    LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
    AS $_$
#variable_conflict use_column
DECLARE
  c_id_re    CONSTANT text := '^[a-z][a-z0-9_]{0,62}$';
  c_reserved CONSTANT text[] := ARRAY['compensate'];  -- dag_structure.RESERVED_STAGE_IDS
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
  v_to       jsonb;                -- the target of a next entry: the entry, or its "to"
  v_rel      text;
  v_to_rel   text;
  v_kind     text;                 -- 'agent', 'approval', or NULL when the kind is invalid
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
    RETURN QUERY SELECT * FROM lifecycle.dag_report('not_an_object', '', '', 'workflow DAG', '{}',
      'must be a JSON object, got ' || lifecycle.dag_kind(p_dag));
    RETURN;
  END IF;

  -- top level
  RETURN QUERY SELECT * FROM lifecycle.dag_check_keys(p_dag, ARRAY['stages', 'edges', 'defaults', 'on_failure',
                                                      'context', 'schedule', 'batch'], '', 'workflow DAG', '{}',
                                                      '');
  RETURN QUERY SELECT * FROM lifecycle.dag_check_string(p_dag -> 'on_failure', 'on_failure', '', 'workflow DAG',
                                                        '{}', '', ARRAY['compensate', 'hold']);
  IF p_dag ? 'context' THEN
    RETURN QUERY SELECT * FROM lifecycle.dag_check_context(p_dag -> 'context');
  END IF;
  v_defaults := coalesce(p_dag -> 'defaults', '{}'::jsonb);
  IF jsonb_typeof(v_defaults) <> 'object' THEN
    RETURN QUERY SELECT * FROM lifecycle.dag_report('wrong_type', '', 'defaults', 'workflow DAG', '{}',
      'defaults must be an object, got ' || lifecycle.dag_kind(v_defaults));
  ELSE
    RETURN QUERY SELECT * FROM lifecycle.dag_check_keys(v_defaults, ARRAY['retry', 'timeout_s'], 'defaults',
                                                        'defaults', '{}', '');
    IF v_defaults ? 'retry' THEN
      RETURN QUERY SELECT * FROM lifecycle.dag_check_retry(v_defaults -> 'retry', 'defaults.retry', 'defaults', '{}');
    END IF;
    RETURN QUERY SELECT * FROM lifecycle.dag_check_number(v_defaults, 'timeout_s', 'defaults', 'defaults', '{}',
                                                          '', 0, p_positive => true);
  END IF;

  v_stages := coalesce(p_dag -> 'stages', '[]'::jsonb);
  IF jsonb_typeof(v_stages) <> 'array' THEN
    RETURN QUERY SELECT * FROM lifecycle.dag_report('wrong_type', '', 'stages', 'workflow DAG', '{}',
      'stages must be an array, got ' || lifecycle.dag_kind(v_stages));
    v_stages := '[]'::jsonb;
  ELSIF jsonb_array_length(v_stages) = 0 THEN
    RETURN QUERY SELECT * FROM lifecycle.dag_report('empty_dag', '', 'stages', 'workflow DAG', '{}',
      'stages is missing or empty');
  END IF;
  -- STABLE (it reads pg_timezone_names) inside this IMMUTABLE function: the names change only
  -- with the server's time zone data, so a folded result stays right while the server runs
  RETURN QUERY SELECT * FROM lifecycle.dag_check_schedule(p_dag);
  RETURN QUERY SELECT * FROM lifecycle.dag_check_batch(p_dag);

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
    RETURN QUERY SELECT * FROM lifecycle.dag_report('duplicate_stage', v_dup.at[2], '', 'stage ' || lifecycle.dag_quote(v_dup.sid),
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
    v_wlabel := CASE WHEN v_label <> '' THEN 'stage ' || lifecycle.dag_quote(v_label) ELSE v_where END;
    v_i := v_i + 1;
    IF jsonb_typeof(v_raw) <> 'object' THEN
      RETURN QUERY SELECT * FROM lifecycle.dag_report('wrong_type', v_where, '', v_wlabel, ARRAY[v_label],
        'a stage must be an object, got ' || lifecycle.dag_kind(v_raw));
      CONTINUE;
    END IF;
    IF NOT v_label COLLATE "C" ~ c_id_re THEN
      RETURN QUERY SELECT * FROM lifecycle.dag_report('bad_stage_id', v_where, 'id', v_wlabel, ARRAY[v_label],
        format('id must match %s, got %s', c_id_re,
               CASE WHEN jsonb_typeof(v_sid) = 'string' THEN lifecycle.dag_quote(v_label)
                    ELSE lifecycle.dag_kind(v_sid) END));
    ELSIF v_label = ANY (c_reserved) THEN
      -- the op of stage 'compensate' would be <job>__compensate, the compensation job's name
      RETURN QUERY SELECT * FROM lifecycle.dag_report('bad_stage_id', v_where, 'id', v_wlabel, ARRAY[v_label],
        format('id %s is reserved: its op would be named like the compensation job (<name>__v<version>__compensate)',
               lifecycle.dag_quote(v_label)));
    END IF;
    RETURN QUERY SELECT * FROM lifecycle.dag_check_keys(v_raw,
      ARRAY['id', 'kind', 'capability', 'next', 'description', 'retry', 'timeout_s', 'compensate', 'approvers',
            'on_timeout', 'on_reject'],
      v_where, v_wlabel, ARRAY[v_label], '');
    RETURN QUERY SELECT * FROM lifecycle.dag_check_string(v_raw -> 'kind', 'kind', v_where, v_wlabel, ARRAY[v_label],
                                                          '', ARRAY['agent', 'approval']);
    v_kind := CASE WHEN NOT v_raw ? 'kind' THEN 'agent'
                   WHEN v_raw -> 'kind' IN ('"agent"'::jsonb, '"approval"'::jsonb) THEN v_raw ->> 'kind' END;
    IF v_kind = 'agent' AND (v_raw -> 'capability' IS NULL OR v_raw -> 'capability' = '""'::jsonb) THEN
      RETURN QUERY SELECT * FROM lifecycle.dag_report('missing_capability', v_where, 'capability', v_wlabel,
        ARRAY[v_label], 'capability is missing or empty');
    END IF;
    IF v_kind = 'agent' THEN
      RETURN QUERY SELECT * FROM lifecycle.dag_check_string(v_raw -> 'capability', 'capability', v_where, v_wlabel,
                                                            ARRAY[v_label], '');
    ELSIF v_kind = 'approval' AND v_raw ? 'capability' THEN
      RETURN QUERY SELECT * FROM lifecycle.dag_report('bad_value', v_where, 'capability', v_wlabel, ARRAY[v_label],
        'an approval stage has no capability');
    END IF;
    RETURN QUERY SELECT * FROM lifecycle.dag_check_string(v_raw -> 'description', 'description', v_where,
                                                          v_wlabel, ARRAY[v_label], '');
    IF v_raw ? 'retry' AND v_kind = 'agent' THEN
      RETURN QUERY SELECT * FROM lifecycle.dag_check_retry(v_raw -> 'retry', v_where || '.retry', v_wlabel,
                                                           ARRAY[v_label]);
    ELSIF v_raw ? 'retry' AND v_kind = 'approval' THEN
      RETURN QUERY SELECT * FROM lifecycle.dag_report('bad_value', v_where, 'retry', v_wlabel, ARRAY[v_label],
        'an approval stage has no retry');
    END IF;
    RETURN QUERY SELECT * FROM lifecycle.dag_check_number(v_raw, 'timeout_s', v_where, v_wlabel, ARRAY[v_label],
                                                          '', 0, p_positive => true);
    IF v_raw ? 'compensate' AND v_kind = 'approval' THEN
      RETURN QUERY SELECT * FROM lifecycle.dag_report('bad_value', v_where, 'compensate', v_wlabel, ARRAY[v_label],
        'an approval stage has no compensate');
    ELSIF v_kind IS DISTINCT FROM 'agent' THEN
      NULL;
    ELSIF v_raw -> 'compensate' IN ('true'::jsonb, '""'::jsonb) THEN
      RETURN QUERY SELECT * FROM lifecycle.dag_report('bad_value', v_where, 'compensate', v_wlabel, ARRAY[v_label],
        'compensate must be a capability name or false');
    ELSIF v_raw -> 'compensate' IS DISTINCT FROM 'false'::jsonb THEN
      RETURN QUERY SELECT * FROM lifecycle.dag_check_string(v_raw -> 'compensate', 'compensate', v_where,
                                                            v_wlabel, ARRAY[v_label], '');
    END IF;
    RETURN QUERY SELECT * FROM lifecycle.dag_check_approval(v_raw, v_kind, v_where, v_wlabel, ARRAY[v_label]);
    -- next: each entry (a stage id, or an object {to, when, unless}) yields at most one problem for
    -- its target (wrong_type, unknown_stage, self_loop, duplicate_edge), then its patterns' own
    v_target := coalesce(v_raw -> 'next', '[]'::jsonb);
    IF jsonb_typeof(v_target) <> 'array' THEN
      RETURN QUERY SELECT * FROM lifecycle.dag_report('wrong_type', v_where, 'next', v_wlabel, ARRAY[v_label],
        'next must be an array, got ' || lifecycle.dag_kind(v_target));
      CONTINUE;
    END IF;
    v_local := '{}';
    v_k := 0;
    FOR v_target IN SELECT e FROM jsonb_array_elements(v_raw -> 'next') AS e LOOP
      v_rel := format('next[%s]', v_k);
      v_to := v_target;
      v_to_rel := v_rel;
      IF jsonb_typeof(v_target) = 'object' THEN
        RETURN QUERY SELECT * FROM lifecycle.dag_check_keys(v_target, ARRAY['to', 'when', 'unless'],
          v_where || '.' || v_rel, v_wlabel, ARRAY[v_label], v_rel || '.');
        v_to := v_target -> 'to';
        v_to_rel := v_rel || '.to';
      END IF;
      IF jsonb_typeof(v_target) NOT IN ('string', 'object') THEN
        RETURN QUERY SELECT * FROM lifecycle.dag_report('wrong_type', v_where, v_rel, v_wlabel, ARRAY[v_label],
          format('%s must be a stage id or an object, got %s', v_rel, lifecycle.dag_kind(v_target)));
      ELSIF jsonb_typeof(v_to) IS DISTINCT FROM 'string' THEN
        RETURN QUERY SELECT * FROM lifecycle.dag_report('wrong_type', v_where, v_to_rel, v_wlabel, ARRAY[v_label],
          format('%s must be a stage id, got %s', v_to_rel, lifecycle.dag_kind(v_to)));
      ELSIF NOT (v_to #>> '{}') = ANY (v_declared) THEN
        RETURN QUERY SELECT * FROM lifecycle.dag_report('unknown_stage', v_where, v_to_rel, v_wlabel,
          ARRAY[v_label], 'edge to unknown stage ' || lifecycle.dag_quote(v_to #>> '{}'));
      ELSIF (v_to #>> '{}') = v_label THEN
        RETURN QUERY SELECT * FROM lifecycle.dag_report('self_loop', v_where, v_rel, v_wlabel,
          ARRAY[v_label], format('edge to itself (%s)', v_rel));
      ELSIF (v_to #>> '{}') = ANY (v_local) THEN
        RETURN QUERY SELECT * FROM lifecycle.dag_report('duplicate_edge', v_where, v_rel, v_wlabel,
          ARRAY[v_label, v_to #>> '{}'],
          format('edge to %s is listed twice', lifecycle.dag_quote(v_to #>> '{}')));
      ELSE
        v_local := v_local || (v_to #>> '{}');
        v_gfrom := v_gfrom || v_label;
        v_gto := v_gto || (v_to #>> '{}');
      END IF;
      IF jsonb_typeof(v_target) = 'object' THEN
        RETURN QUERY SELECT * FROM lifecycle.dag_check_pattern(v_target -> 'when', v_rel || '.when', v_where,
                                                               v_wlabel, ARRAY[v_label]);
        RETURN QUERY SELECT * FROM lifecycle.dag_check_pattern(v_target -> 'unless', v_rel || '.unless', v_where,
                                                               v_wlabel, ARRAY[v_label]);
      END IF;
      v_k := v_k + 1;
    END LOOP;
  END LOOP;

  -- edges
  v_edges := coalesce(p_dag -> 'edges', '[]'::jsonb);
  IF jsonb_typeof(v_edges) <> 'array' THEN
    RETURN QUERY SELECT * FROM lifecycle.dag_report('wrong_type', '', 'edges', 'workflow DAG', '{}',
      'edges must be an array, got ' || lifecycle.dag_kind(v_edges));
  ELSIF p_dag ? 'edges' THEN
    v_k := 0;
    FOR v_raw IN SELECT e FROM jsonb_array_elements(v_edges) AS e LOOP
      v_where := format('edges[%s]', v_k);
      v_k := v_k + 1;
      IF jsonb_typeof(v_raw) <> 'object' THEN
        RETURN QUERY SELECT * FROM lifecycle.dag_report('wrong_type', v_where, '', v_where, '{}',
          'an edge must be an object, got ' || lifecycle.dag_kind(v_raw));
        CONTINUE;
      END IF;
      v_ends := ARRAY[v_raw -> 'from', v_raw -> 'to'];
      v_known := ARRAY(SELECT e #>> '{}' FROM unnest(v_ends) WITH ORDINALITY AS u(e, i)
                       WHERE jsonb_typeof(e) = 'string' AND (e #>> '{}') = ANY (v_declared) ORDER BY i);
      v_shown := ARRAY(SELECT CASE WHEN jsonb_typeof(e) = 'string' THEN lifecycle.dag_quote(e #>> '{}')
                                   ELSE lifecycle.dag_kind(e) END
                       FROM unnest(v_ends) WITH ORDINALITY AS u(e, i) ORDER BY i);
      v_wlabel := format('%s (from %s to %s)', v_where, v_shown[1], v_shown[2]);
      RETURN QUERY SELECT * FROM lifecycle.dag_check_keys(v_raw, ARRAY['from', 'to', 'when', 'unless'], v_where,
                                                          v_wlabel, v_known, '');
      FOR v_i IN 1..2 LOOP
        IF jsonb_typeof(v_ends[v_i]) IS DISTINCT FROM 'string' THEN
          RETURN QUERY SELECT * FROM lifecycle.dag_report('wrong_type', v_where, (ARRAY['from', 'to'])[v_i], v_wlabel,
            v_known, format('%s must be a stage id, got %s', (ARRAY['from', 'to'])[v_i],
                            lifecycle.dag_kind(v_ends[v_i])));
        ELSIF NOT (v_ends[v_i] #>> '{}') = ANY (v_declared) THEN
          RETURN QUERY SELECT * FROM lifecycle.dag_report('unknown_stage', v_where, (ARRAY['from', 'to'])[v_i], v_wlabel,
            v_known, 'unknown stage ' || lifecycle.dag_quote(v_ends[v_i] #>> '{}'));
        END IF;
      END LOOP;
      IF cardinality(v_known) = 2 THEN
        IF v_known[1] = v_known[2] THEN
          RETURN QUERY SELECT * FROM lifecycle.dag_report('self_loop', v_where, '', v_wlabel, v_known,
            format('edge from stage %s to itself', lifecycle.dag_quote(v_known[1])));
        ELSIF jsonb_build_array(v_known[1], v_known[2])::text = ANY (v_seen) THEN
          RETURN QUERY SELECT * FROM lifecycle.dag_report('duplicate_edge', v_where, '', v_wlabel, v_known,
            'edge is listed twice');
        ELSE
          v_seen := v_seen || jsonb_build_array(v_known[1], v_known[2])::text;
          v_gfrom := v_gfrom || v_known[1];
          v_gto := v_gto || v_known[2];
        END IF;
      END IF;
      RETURN QUERY SELECT * FROM lifecycle.dag_check_pattern(v_raw -> 'when', 'when', v_where, v_wlabel, v_known);
      RETURN QUERY SELECT * FROM lifecycle.dag_check_pattern(v_raw -> 'unless', 'unless', v_where, v_wlabel, v_known);
    END LOOP;

    -- next_edges_mismatch: a stage's next entries against its edges, conditions included
    RETURN QUERY SELECT * FROM lifecycle.dag_check_next_edges(v_stages, v_edges, v_nodes);
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
    RETURN QUERY SELECT * FROM lifecycle.dag_report('cycle',
      format('stages[%s]', array_position(v_ids, v_nodes[v_comp[1]]) - 1), '', 'cycle',
      ARRAY(SELECT v_nodes[x] FROM unnest(v_comp) AS x ORDER BY x),
      format('%s (stages %s)',
             (SELECT string_agg(v_nodes[x], ' -> ' ORDER BY o) FROM unnest(v_path) WITH ORDINALITY AS p(x, o)),
             (SELECT string_agg(lifecycle.dag_quote(v_nodes[x]), ', ' ORDER BY x) FROM unnest(v_comp) AS x)));
  END LOOP;
END
$_$;

REVOKE ALL ON FUNCTION lifecycle.dag_validate_rules(p_dag jsonb) FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON FUNCTION lifecycle.dag_validate_rules(p_dag jsonb) TO service_role;

COMMENT ON FUNCTION lifecycle.dag_validate_rules(p_dag jsonb) IS 'the rules of lifecycle_dagster/dag.py for a dag_schema within the size limits (lifecycle.dag_validate checks those first)';
