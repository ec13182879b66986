-- Named queries run by the Python side. Each starts with a `-- name: <name>` line; parameters
-- are psycopg placeholders (%(name)s). Nothing here is assembled from user input.

-- name: active_definitions
-- The snapshot the code location builds its jobs from: every active version AND every version an
-- execution that is not final still runs on (final: completed, rolled_back, compensation_failed;
-- so pending, in_progress, failed, cancelled and compensating executions pin their version), so
-- a run started on v1 finishes on v1 and its compensation job exists after v2 is activated. By
-- name, version. dag_schema comes as text and is decoded row by row, so one pathological row
-- (nested thousands of levels deep, say) is skipped instead of failing the whole snapshot.
-- is_active: the row is its workflow's active version (the stable job <name> runs it).
SELECT d.id::text AS id, d.name, d.description, d.version, d.dag_schema::text AS dag_schema_json,
       d.is_active
FROM workflow_definitions d
WHERE d.is_active
   OR EXISTS (SELECT 1 FROM workflow_executions e
              WHERE e.workflow_definition_id = d.id
                AND e.status NOT IN ('completed', 'rolled_back', 'compensation_failed'))
ORDER BY d.name, d.version;

-- name: active_definition_by_name
SELECT id::text AS id, name, description, version, dag_schema::text AS dag_schema_json
FROM workflow_definitions
WHERE name = %(name)s AND is_active;

-- name: schedule_execution
-- The pending execution of one schedule tick, inserted once (lifecycle.execution_schedule).
SELECT status, execution_id::text AS execution_id
FROM lifecycle.execution_schedule(%(definition_id)s, %(tick)s, %(context)s);

-- name: create_execution
-- A pending execution of a definition, as the runbook's section 8 would insert it.
INSERT INTO workflow_executions (workflow_definition_id, status, context, created_by)
VALUES (%(definition_id)s, 'pending', %(context)s, %(created_by)s)
RETURNING id::text AS id;

-- name: create_execution_bound
-- A pending execution created already bound to the Dagster run that will execute it
-- (`lifecycle-dagster run`): the launch sensor launches only rows no run has bound, so it never
-- launches this one a second time.
INSERT INTO workflow_executions (workflow_definition_id, status, context, created_by, dagster_run_id)
VALUES (%(definition_id)s, 'pending', %(context)s, %(created_by)s, %(run_id)s)
RETURNING id::text AS id;

-- name: execution
SELECT e.id::text AS id, e.status, e.current_stage, e.error_message, e.dagster_run_id,
       e.context, d.name AS workflow_name, d.version
FROM workflow_executions e
JOIN workflow_definitions d ON d.id = e.workflow_definition_id
WHERE e.id = %(execution_id)s;

-- name: execution_by_run
SELECT e.id::text AS id, e.status
FROM workflow_executions e
WHERE e.dagster_run_id = %(run_id)s;

-- name: stage_logs
SELECT l.stage_id, l.status, l.attempt_number, l.started_at, l.completed_at,
       l.output_data, l.error_message
FROM workflow_execution_logs l
WHERE l.execution_id = %(execution_id)s
ORDER BY l.started_at NULLS LAST, l.stage_id;

-- name: ensure_execution
SELECT id::text AS id, status, context
FROM lifecycle.execution_ensure(%(definition_id)s, %(run_id)s, %(execution_id)s, %(context)s,
                                p_resume => %(resume)s);

-- name: execution_trace
-- What an execution's spans carry (lifecycle_dagster/tracing.py): its trace (NULL: none yet), workflow
-- and version.
SELECT e.trace_parent, d.name AS workflow, d.version
FROM workflow_executions e JOIN workflow_definitions d ON d.id = e.workflow_definition_id
WHERE e.id = %(execution_id)s;

-- name: set_trace_parent
SELECT lifecycle.execution_set_trace_parent(%(execution_id)s, %(trace_parent)s) AS trace_parent;

-- name: execution_of_runs
-- The execution of a definition that one of the Dagster runs %(run_ids)s (a re-execution's parent,
-- then its root run) executed: the run the execution is bound to now (unique index), else a run
-- its workflow_started / workflow_resumed events name (an execution resumed by a later run since).
-- The first run of the list wins.
SELECT execution_id FROM (
  SELECT e.id::text AS execution_id, array_position(%(run_ids)s::text[], e.dagster_run_id) AS rank, 0 AS via
  FROM workflow_executions e
  WHERE e.dagster_run_id = ANY(%(run_ids)s::text[]) AND e.workflow_definition_id = %(definition_id)s
  UNION ALL
  SELECT e.id::text, array_position(%(run_ids)s::text[], v.metadata->>'dagster_run_id'), 1
  FROM workflow_executions e
  JOIN workflow_events v ON v.execution_id = e.id
  WHERE e.workflow_definition_id = %(definition_id)s
    AND v.event_type IN ('workflow_started', 'workflow_resumed')
    AND v.metadata->>'dagster_run_id' = ANY(%(run_ids)s::text[])
) found
ORDER BY rank, via
LIMIT 1;

-- name: start_stage
SELECT log_id::text AS log_id, task_id::text AS task_id, agent_id::text AS agent_id,
       agent_name, agent_kind, input_data, attempt_number, already_completed, output_data
FROM lifecycle.stage_start(%(execution_id)s, %(stage_id)s, %(capability)s, %(ancestors)s,
                           %(attempt)s, p_timeout_s => %(timeout_s)s, p_resume => %(resume)s,
                           p_max_attempts => %(max_attempts)s, p_run_id => %(run_id)s);

-- name: resumable_executions
-- In-progress executions with a stage set back to pending (retry_stage) whose not-before time has
-- passed: the resume sensor launches a run for each whose Dagster run is over (or that left its
-- batch: docs/batches.md).
SELECT e.id::text AS execution_id, e.dagster_run_id, d.name, d.version, l.id::text AS log_id,
       l.stage_id, l.attempt_number,
       -- a member that left its batch to retry: resumed alone while its batch run goes on
       EXISTS (SELECT 1 FROM lifecycle.batch_members m
               WHERE m.execution_id = e.id AND m.left_at IS NOT NULL) AS left_batch
FROM workflow_executions e
JOIN workflow_definitions d ON d.id = e.workflow_definition_id
JOIN workflow_execution_logs l ON l.execution_id = e.id
WHERE e.status = 'in_progress' AND e.dagster_run_id IS NOT NULL AND l.status = 'pending'
  AND (l.not_before IS NULL OR l.not_before <= %(now)s)
ORDER BY l.not_before NULLS FIRST, e.id, l.stage_id
LIMIT %(limit)s;

-- name: complete_stage
SELECT lifecycle.stage_complete(%(log_id)s, %(task_id)s, %(output)s, p_attempt => %(attempt)s) AS status;

-- name: fail_stage
SELECT lifecycle.stage_fail(%(log_id)s, %(task_id)s, %(error)s, %(error_code)s, p_attempt => %(attempt)s) AS status;

-- name: schedule_retry
SELECT lifecycle.stage_schedule_retry(%(log_id)s, %(task_id)s, %(attempt)s, %(error)s, %(error_code)s,
                                %(error_class)s, %(delay_s)s) AS status;

-- name: execution_status
SELECT status FROM workflow_executions WHERE id = %(execution_id)s;

-- name: cancel_execution
SELECT cancelled, status, previous_status, dagster_run_id
FROM lifecycle.execution_cancel(%(execution_id)s, %(reason)s, %(compensate)s);

-- name: heartbeat
SELECT lifecycle.run_heartbeat(%(run_id)s) AS alive;

-- name: start_compensation
SELECT action, log_id::text AS log_id, output_data, context, agent_name
FROM lifecycle.undo_start(%(execution_id)s, %(stage_id)s, %(run_id)s, %(dependents)s,
                                  %(attempt)s, %(takeover)s);

-- name: complete_compensation
SELECT lifecycle.undo_complete(%(log_id)s, %(void)s, %(result)s, %(attempt)s) AS status;

-- name: fail_compensation
SELECT lifecycle.undo_fail(%(log_id)s, %(error)s, %(final)s, %(attempt)s, %(delay_s)s) AS status;

-- name: route_capability
-- The agent that undoes a stage through its `compensate` capability. Undo calls do not consult the
-- circuit breakers (an undo must be attempted; its own retries apply): the active agent whose
-- latest orchestration ontology declares the capability, by name.
SELECT a.name AS agent_name
FROM agents a
JOIN LATERAL (
  SELECT o.knowledge FROM agent_ontologies o
  WHERE o.agent_id = a.id AND o.domain = 'orchestration'
  ORDER BY o.version DESC LIMIT 1
) latest ON true
WHERE a.is_active AND latest.knowledge ->> 'capability' = %(capability)s
ORDER BY a.name
LIMIT 1;

-- name: agent_kind
-- The kind of an agent by name (an http or queue agent has no undo of its own).
SELECT a.kind FROM agents a WHERE a.name = %(name)s;

-- name: perform_compensation
SELECT lifecycle.compensation_start(%(execution_id)s, %(reason)s);

-- name: fail_execution
SELECT lifecycle.execution_fail(%(execution_id)s, %(reason)s, %(run_id)s) AS failed;

-- name: stale_executions
SELECT execution_id::text AS execution_id, dagster_run_id, last_seen
FROM lifecycle.executions_stale(%(timeout_s)s);

-- name: unbound_pending_executions
-- Pending executions no run has started yet (unbound, or created bound to the run of
-- `lifecycle-dagster run`), older than the bound: the reconciler checks whether a run was launched
-- for them and lost (lifecycle_dagster.sensors._settle_unstarted).
SELECT e.id::text AS execution_id,
       (SELECT m.batch_id::text FROM lifecycle.batch_members m WHERE m.execution_id = e.id) AS batch_id
FROM workflow_executions e
WHERE e.status = 'pending'
  AND e.created_at < now() - make_interval(secs => %(timeout_s)s)
ORDER BY e.created_at
LIMIT %(limit)s;

-- name: compensation_due
SELECT execution_id::text AS execution_id, reason FROM lifecycle.compensation_due();

-- name: running_executions
-- Executions in progress under a Dagster run: the reconciler checks each run's status. Not those
-- a decision continued after that run's part ended (lifecycle.execution_continued_after): the run
-- may have failed since (a run worker killed after the approval was reached) without its
-- execution; the continuation run takes it over.
SELECT e.id::text AS execution_id, e.dagster_run_id
FROM workflow_executions e
WHERE e.status = 'in_progress' AND e.dagster_run_id IS NOT NULL
  AND NOT lifecycle.execution_continued_after(e.id, e.dagster_run_id)
ORDER BY e.updated_at
LIMIT %(limit)s;

-- name: compensation_owner
-- Whether a compensation run still owns its execution's compensation (an undo stops when not).
SELECT status, compensation_run_id FROM workflow_executions WHERE id = %(execution_id)s;

-- name: compensating_executions
-- `stale`: nothing was heard from its compensation run (lifecycle.run_heartbeat beats for it) for
-- over timeout_s seconds: its run worker is gone, and the reconciler takes the compensation over.
SELECT e.id::text AS execution_id, e.compensation_run_id, d.name, d.version,
       greatest(e.heartbeat_at, e.updated_at) < now() - make_interval(secs => %(timeout_s)s) AS stale
FROM workflow_executions e JOIN workflow_definitions d ON d.id = e.workflow_definition_id
WHERE e.status = 'compensating'
ORDER BY e.updated_at
LIMIT %(limit)s;

-- name: released_runs
-- Of the given STARTED Dagster runs (run_ids[i] tagged with execution_ids[i]; compensation[i]: a
-- run of a compensation job), those whose execution is no longer theirs (neither in_progress under
-- the run, nor compensating under it or with no owner yet for a compensation run, nor pending a
-- launch) and silent for over timeout_s seconds: their run worker is gone. An execution a decision
-- continued after the run's part (lifecycle.execution_continued_after) is no longer the run's.
SELECT x.run_id, e.id::text AS execution_id, e.status
FROM unnest(%(run_ids)s::text[], %(execution_ids)s::text[], %(compensation)s::boolean[])
       AS x(run_id, execution_id, compensation)
JOIN workflow_executions e ON e.id::text = x.execution_id
WHERE e.status <> 'pending'
  AND NOT (e.status = 'in_progress' AND e.dagster_run_id IS NOT DISTINCT FROM x.run_id
           AND NOT lifecycle.execution_continued_after(e.id, x.run_id))
  AND NOT (e.status = 'compensating' AND e.compensation_run_id IS NOT DISTINCT FROM x.run_id)
  AND NOT (e.status = 'compensating' AND e.compensation_run_id IS NULL AND x.compensation)
  AND greatest(e.heartbeat_at, e.updated_at) < now() - make_interval(secs => %(timeout_s)s);

-- name: execution_on_failure
SELECT e.id::text AS execution_id, e.status, coalesce(d.dag_schema ->> 'on_failure', 'compensate') AS on_failure
FROM workflow_executions e JOIN workflow_definitions d ON d.id = e.workflow_definition_id
WHERE e.id = %(execution_id)s OR e.dagster_run_id = %(run_id)s
LIMIT 1;

-- name: compensation_due_for
SELECT execution_id::text AS execution_id, reason FROM lifecycle.compensation_due()
WHERE execution_id = %(execution_id)s;

-- name: definition_of_execution
SELECT d.id::text AS id, d.name, d.description, d.version, d.dag_schema::text AS dag_schema_json
FROM workflow_executions e JOIN workflow_definitions d ON d.id = e.workflow_definition_id
WHERE e.id = %(execution_id)s;

-- name: capability_breakers
-- Why routing gave no agent: the capability's breaker and one row per agent serving it (none: no
-- agent serves the capability).
SELECT scope, key, name, state, opened_at, probes_left
FROM lifecycle.capability_breakers(%(capability)s)
ORDER BY scope DESC, name;

-- name: breakers
-- For operators: every circuit breaker, its state and its current window.
SELECT scope, key, name, state, state_since, opened_at, half_open_at, probes_left, calls, failures,
       rate, p95_ms, config
FROM lifecycle.breaker_status
ORDER BY scope, name;

-- name: task_claim
SELECT task_id::text AS task_id, lease_token, execution_id::text AS execution_id, stage_id, capability,
       attempt, input_data, lease_expires_at
FROM lifecycle.task_claim(%(worker)s, %(agent)s, %(limit)s, %(lease_s)s);

-- name: task_time_left
-- Seconds from now to each claimed task's deadline (its stage's timeout; NULL: none), by the
-- database's clock: an `agent serve` worker stops the agent when they run out; and the task's
-- traceparent, workflow and version, which the worker's span carries (NULL: none).
SELECT t.id::text AS id, extract(epoch FROM t.deadline_at - now())::float8 AS time_left_s, t.trace_parent,
       d.name AS workflow, d.version
FROM task_queue t
LEFT JOIN workflow_executions e ON e.id = t.workflow_execution_id
LEFT JOIN workflow_definitions d ON d.id = e.workflow_definition_id
WHERE t.id = ANY (%(ids)s::uuid[]);

-- name: task_heartbeat
SELECT lifecycle.task_heartbeat(%(task_id)s, %(token)s, %(lease_s)s) AS extended;

-- name: task_complete
SELECT lifecycle.task_complete(%(task_id)s, %(token)s, %(output)s) AS status;

-- name: task_fail
SELECT lifecycle.task_fail(%(task_id)s, %(token)s, %(error)s, %(error_code)s, %(retryable)s,
                           %(retry_after_s)s) AS status;

-- name: task_release
SELECT lifecycle.task_release(%(task_id)s, %(token)s) AS released;

-- name: task_reap
SELECT lifecycle.task_reap() AS reaped;

-- name: task_abandon
SELECT lifecycle.task_abandon(%(task_id)s, %(reason)s) AS previous_status;

-- name: task_state
-- the task and its execution's status in one statement: one snapshot (a completion that commits
-- both is seen whole or not at all)
SELECT t.id::text AS id, t.status, t.attempt, t.error_message, t.error_code, t.retryable, t.retry_after_s,
       t.output_data, t.lease_token, e.status AS execution_status
FROM task_queue t LEFT JOIN workflow_executions e ON e.id = t.workflow_execution_id
WHERE t.id = %(task_id)s;

-- name: agent_row
SELECT a.id::text AS id, a.name, a.kind, a.config FROM agents a WHERE a.id = %(agent_id)s;

-- name: stage_log_output
SELECT l.status, l.output_data, e.status AS execution_status
FROM workflow_execution_logs l JOIN workflow_executions e ON e.id = l.execution_id
WHERE l.id = %(log_id)s;

-- name: publish_definition
-- Publish a version (validated; nothing stored when identical to the latest version), optionally
-- activating it: one transaction under the name's advisory lock (lifecycle.definition_publish, sql/schema/03_versions.sql).
SELECT version, created, active, activated, definition_id::text AS definition_id, previous_version
FROM lifecycle.definition_publish(%(name)s, %(description)s, %(dag)s, %(activate)s, %(created_by)s);

-- name: activate_definition
SELECT definition_id::text AS definition_id, version, activated, previous_version
FROM lifecycle.definition_activate(%(name)s, %(version)s);

-- name: definition_versions
-- Every version of a workflow: whether it is active, its stage count and how many of its
-- executions are not final (they pin the version in the code location).
SELECT d.version, d.is_active AS active, d.created_at, d.description,
       CASE WHEN jsonb_typeof(d.dag_schema -> 'stages') = 'array'
            THEN jsonb_array_length(d.dag_schema -> 'stages') END AS stage_count,
       count(e.id) FILTER (WHERE e.status NOT IN ('completed', 'rolled_back', 'compensation_failed')) AS unfinished
FROM workflow_definitions d
LEFT JOIN workflow_executions e ON e.workflow_definition_id = d.id
WHERE d.name = %(name)s
GROUP BY d.id
ORDER BY d.version;

-- name: served_capabilities
-- Which of the given capabilities an active agent serves (its latest orchestration ontology).
SELECT DISTINCT latest.knowledge ->> 'capability' AS capability
FROM agents a
JOIN LATERAL (
  SELECT o.knowledge FROM agent_ontologies o
  WHERE o.agent_id = a.id AND o.domain = 'orchestration'
  ORDER BY o.version DESC LIMIT 1
) latest ON true
WHERE a.is_active AND latest.knowledge ->> 'capability' = ANY (%(capabilities)s::text[]);

-- name: validate_dag
-- The database's own verdict on a DAG (the trigger's rules): one row per problem.
SELECT code, stages, path, message FROM lifecycle.dag_validate(%(dag)s);

-- name: launchable_executions
-- The oldest pending rows not bound to a run whose job %(jobs)s (job names) has loaded.
SELECT execution_id::text AS execution_id, workflow_name, version, created_at, pending_reason
FROM lifecycle.executions_launchable(%(jobs)s::text[], %(limit)s);

-- name: unloaded_pending_executions
-- Pending rows not bound to a run, of a version whose job is not among %(jobs)s, with no pending_reason yet.
SELECT execution_id::text AS execution_id, workflow_name, version
FROM lifecycle.executions_unloaded(%(jobs)s::text[], %(limit)s);

-- name: set_pending_reason
SELECT lifecycle.execution_set_pending_reason(%(execution_id)s, %(reason)s) AS changed;

-- name: execution_progress
SELECT e.status, e.current_stage, e.pending_reason, e.error_message, e.dagster_run_id,
       jsonb_array_length(d.dag_schema -> 'stages') AS stages,
       (SELECT count(*) FROM workflow_execution_logs l WHERE l.execution_id = e.id AND l.status = 'completed') AS done,
       (SELECT count(*) FROM workflow_execution_logs l WHERE l.execution_id = e.id AND l.status = 'skipped') AS skipped,
       to_jsonb(e) ->> 'outcome' AS outcome
FROM workflow_executions e JOIN workflow_definitions d ON d.id = e.workflow_definition_id
WHERE e.id = %(execution_id)s;

-- name: audit_feed
-- The audit feed of one execution: one row per event, newest first, with its execution, definition
-- and stage log. The same rows as the runbook's view workflow_audit_feed, read from the tables: the
-- engine never reads a runbook-named object (re-running the runbook's section 5 replaces the view).
SELECT e.execution_id::text AS execution_id, wd.name AS workflow_name, wd.version, e.stage_id,
       wel.status AS stage_status, wel.attempt_number, wel.started_at, wel.completed_at, wel.error_message,
       we.status AS workflow_status, we.circuit_breaker_state, we.context,
       e.event_type, e.metadata, e."timestamp" AS event_timestamp
FROM workflow_events e
JOIN workflow_executions we ON we.id = e.execution_id
JOIN workflow_definitions wd ON wd.id = we.workflow_definition_id
LEFT JOIN workflow_execution_logs wel ON wel.execution_id = e.execution_id AND wel.stage_id = e.stage_id
WHERE e.execution_id = %(execution_id)s
ORDER BY e."timestamp" DESC, e.id DESC;

-- name: audit_latest
-- The newest events of every execution, newest first (workflow_events_timestamp_idx).
SELECT e.execution_id::text AS execution_id, wd.name AS workflow_name, wd.version, e.stage_id,
       wel.status AS stage_status, e.event_type, e.metadata, e."timestamp" AS event_timestamp
FROM workflow_events e
JOIN workflow_executions we ON we.id = e.execution_id
JOIN workflow_definitions wd ON wd.id = we.workflow_definition_id
LEFT JOIN workflow_execution_logs wel ON wel.execution_id = e.execution_id AND wel.stage_id = e.stage_id
ORDER BY e."timestamp" DESC, e.id DESC
LIMIT %(limit)s;

-- name: audit_execution_exists
SELECT EXISTS (SELECT 1 FROM workflow_executions WHERE id = %(execution_id)s) AS found;

-- name: audit_events_all
-- Every event of every stream, stream by stream (execution_id order, the global stream last), in
-- chain order; metadata as jsonb prints it (numbers exact).
SELECT id, execution_id::text AS execution_id, event_type, stage_id, metadata::text AS metadata,
       "timestamp", prev_hash, hash
FROM workflow_events
ORDER BY execution_id, id;

-- name: audit_events_of_execution
SELECT id, execution_id::text AS execution_id, event_type, stage_id, metadata::text AS metadata,
       "timestamp", prev_hash, hash
FROM workflow_events
WHERE execution_id = %(execution_id)s
ORDER BY id;

-- name: audit_checkpoints
-- The newest retention checkpoint of each stream (NULL execution_id: the global stream).
SELECT DISTINCT ON (execution_id) execution_id::text AS execution_id, last_event_id, last_hash
FROM lifecycle.audit_checkpoints
ORDER BY execution_id, id DESC;

-- name: audit_heads
-- The head of each stream as lifecycle.audit_chain last wrote it (NULL execution_id: the global
-- stream), optionally of one execution only (%(execution_id)s NULL: every stream).
SELECT execution_id::text AS execution_id, last_event_id, last_hash
FROM lifecycle.audit_heads
WHERE %(execution_id)s::uuid IS NULL OR execution_id = %(execution_id)s::uuid
ORDER BY stream;

-- name: audit_canonical_event
-- The database's canonical form and hash of one stored event (to compare with Python's).
SELECT lifecycle.audit_canonical_event(id, execution_id, event_type, stage_id, metadata, "timestamp") AS canonical,
       lifecycle.audit_hash(prev_hash, lifecycle.audit_canonical_event(id, execution_id, event_type, stage_id,
                                                                       metadata, "timestamp")) AS hash
FROM workflow_events
WHERE id = %(id)s;

-- name: audit_prune
SELECT executions, events, global_events FROM lifecycle.audit_prune(%(before)s, %(max_streams)s);

-- name: executions_prune
-- Retention: one bounded batch of finished executions older than `before`, after the keyset cursor
-- (after_created, after_id; NULL: from the oldest); dry_run counts without deleting.
SELECT executions, tasks, stage_logs, artifacts, breaker_outcomes, events, deferred, last_created_at,
       last_id::text AS last_id, execution_ids::text[] AS execution_ids, run_ids
FROM lifecycle.executions_prune(%(before)s, %(limit)s, %(dry_run)s, %(after_created)s::timestamptz, %(after_id)s::uuid,
                                    coalesce(%(now)s::timestamptz, now()));

-- name: ops_executions
-- `lifecycle-dagster list`: executions newest first, optionally by workflow, status and creation
-- time. manual: driven by hand (inserted as in_progress, the runbook's section 8): no Dagster run,
-- not waiting to be launched, and not a pending row cancelled before any stage ran.
SELECT e.id::text AS id, d.name AS workflow, d.version, e.status, to_jsonb(e) ->> 'outcome' AS outcome,
       e.current_stage, e.created_at, e.updated_at, e.dagster_run_id,
       (e.dagster_run_id IS NULL AND e.status <> 'pending'
        AND (e.status NOT IN ('cancelled', 'compensating', 'rolled_back', 'compensation_failed')
             OR EXISTS (SELECT 1 FROM workflow_execution_logs l WHERE l.execution_id = e.id))) AS manual
FROM workflow_executions e
JOIN workflow_definitions d ON d.id = e.workflow_definition_id
WHERE (%(workflow)s::text IS NULL OR d.name = %(workflow)s::text)
  AND (%(status)s::text IS NULL OR e.status = %(status)s::text)
  AND (%(since)s::timestamptz IS NULL OR e.created_at >= %(since)s::timestamptz)
ORDER BY e.created_at DESC, e.id
LIMIT %(limit)s;

-- name: ops_execution
-- `lifecycle-dagster status`: one execution (pending_reason read through to_jsonb, so that it is
-- NULL where the column does not exist), with the batch it was launched in, if any.
SELECT e.id::text AS id, d.name AS workflow, d.version, e.status, e.current_stage, e.created_at,
       e.updated_at, e.dagster_run_id, e.compensation_run_id, e.error_message,
       e.created_by::text AS created_by, to_jsonb(e) ->> 'pending_reason' AS pending_reason,
       to_jsonb(e) ->> 'outcome' AS outcome, to_jsonb(e) ->> 'outcome_reason' AS outcome_reason,
       (e.dagster_run_id IS NULL AND e.status <> 'pending'
        AND (e.status NOT IN ('cancelled', 'compensating', 'rolled_back', 'compensation_failed')
             OR EXISTS (SELECT 1 FROM workflow_execution_logs l WHERE l.execution_id = e.id))) AS manual,
       b.id::text AS batch_id, b.size AS batch_size, b.run_id AS batch_run_id,
       m.left_at AS batch_left_at, m.left_reason AS batch_left_reason
FROM workflow_executions e
JOIN workflow_definitions d ON d.id = e.workflow_definition_id
LEFT JOIN lifecycle.batch_members m ON m.execution_id = e.id
LEFT JOIN lifecycle.batches b ON b.id = m.batch_id
WHERE e.id = %(execution_id)s;

-- name: ops_execution_stages
-- Every stage of the execution's DAG in DAG order, with its log (NULL: not started), the agent of
-- its latest task and the duration of its latest attempt (completed_at - started_at).
SELECT s.stage ->> 'id' AS stage, s.stage ->> 'capability' AS capability, l.status,
       l.attempt_number AS attempts, l.started_at, l.completed_at,
       round(extract(epoch FROM (l.completed_at - l.started_at))::numeric, 3)::float8 AS duration_s,
       t.agent, l.error_message AS error, s.stage ->> 'kind' AS kind,
       (to_jsonb(l) ->> 'wait_until')::timestamptz AS wait_until
FROM workflow_executions e
JOIN workflow_definitions d ON d.id = e.workflow_definition_id
CROSS JOIN LATERAL jsonb_array_elements(
  CASE WHEN jsonb_typeof(d.dag_schema -> 'stages') = 'array' THEN d.dag_schema -> 'stages' ELSE '[]'::jsonb END
) WITH ORDINALITY AS s(stage, ord)
LEFT JOIN workflow_execution_logs l ON l.execution_id = e.id AND l.stage_id = s.stage ->> 'id'
LEFT JOIN LATERAL (
  SELECT a.name AS agent FROM task_queue tq LEFT JOIN agents a ON a.id = tq.agent_id
  WHERE tq.workflow_execution_id = e.id AND tq.task_type = s.stage ->> 'id'
  ORDER BY tq.attempt DESC, tq.created_at DESC LIMIT 1
) t ON true
WHERE e.id = %(execution_id)s
ORDER BY s.ord;

-- name: ops_breakers
-- `lifecycle-dagster breakers`: every agent and every capability an active agent serves (or that
-- has a breaker row), closed with no history when it has no row; the rest from
-- lifecycle.breaker_status (window at now()).
WITH targets AS (
  SELECT 'agent'::text AS scope, a.name, a.id::text AS key,
         array_to_string(lifecycle.agent_capabilities(a.id), ', ') AS serves, a.is_active
  FROM agents a
  UNION ALL
  SELECT 'capability', c.name, c.name, NULL, true
  FROM (SELECT DISTINCT cap AS name FROM agents a, unnest(lifecycle.agent_capabilities(a.id)) cap WHERE a.is_active
        UNION
        SELECT b.key FROM lifecycle.breakers b WHERE b.scope = 'capability') c
)
SELECT r.scope, r.name, r.serves, r.is_active AS active, coalesce(s.state, 'closed') AS state, s.state_since,
       s.opened_at, s.half_open_at, coalesce(s.calls, 0) AS calls, coalesce(s.failures, 0) AS failures,
       s.rate, s.p95_ms
FROM targets r
LEFT JOIN lifecycle.breaker_status s ON s.scope = r.scope AND s.key = r.key
ORDER BY r.scope, r.name;

-- name: breaker_reset
SELECT lifecycle.breaker_reset(%(agent)s) AS previous_state;

-- name: stage_rate_take
-- A stage op's token for one call of its agent (lifecycle.stage_rate_take): granted, waiting
-- (wait_s: seconds until a token; note: write the stage_rate_limited event) or refused.
SELECT status, wait_s, scope FROM lifecycle.stage_rate_take(%(task_id)s, %(note)s);

-- name: rate_wait
-- Seconds until the agent's bucket and its capabilities' each hold a token (0: now or no limit):
-- how long `agent serve` waits after a claim that came back short.
SELECT lifecycle.rate_wait(%(agent)s) AS wait_s;

-- name: capability_limit_set
SELECT lifecycle.capability_limit_set(%(capability)s, %(per_s)s, %(burst)s) AS status;

-- name: ops_limits
-- `lifecycle-dagster limits`: every rate limit (agents' config.rate_limit, lifecycle.capability_limits),
-- its tokens now and the calls started in the last 60 s (lifecycle.rate_limit_status).
SELECT scope, name, per_s, burst, tokens, taken, last_taken_at, calls_60s
FROM lifecycle.rate_limit_status
ORDER BY scope, name;

-- name: schema_fingerprints_present
SELECT to_regclass('lifecycle.schema_fingerprints') IS NOT NULL AS present;

-- name: schema_fingerprints_recorded
-- The schema as shipped: recorded right after sql/schema/ was applied (lifecycle.schema_fingerprints_record).
SELECT kind, object, md5 FROM lifecycle.schema_fingerprints ORDER BY kind, object;

-- name: schema_fingerprints_now
SELECT kind, object, md5 FROM lifecycle.schema_catalog() ORDER BY kind, object;

-- name: client_role_escalations
-- Supabase's client roles (anon, authenticated) holding a role that reaches our objects: a
-- membership of service_role, of the owner of schema lifecycle, or of a superuser or BYPASSRLS
-- role, or such an attribute of their own. A membership hands over every privilege of that role,
-- in every database of the cluster; roles are cluster-wide, so doctor reports and --repair leaves.
SELECT r.rolname AS role, coalesce(g.rolname, '') AS member_of,
       r.rolsuper OR r.rolbypassrls AS own_attribute
FROM pg_roles r
LEFT JOIN pg_auth_members m ON m.member = r.oid
LEFT JOIN pg_roles g ON g.oid = m.roleid
WHERE r.rolname IN ('anon', 'authenticated')
  AND (r.rolsuper OR r.rolbypassrls
       OR g.rolname = 'service_role' OR g.rolsuper OR g.rolbypassrls
       OR g.oid = (SELECT n.nspowner FROM pg_namespace n WHERE n.nspname = 'lifecycle'))
ORDER BY 1, 2;

-- name: capability_limits
-- Per capability: the sum of its active agents' concurrency limits, NULL when one has none.
SELECT c AS capability,
       CASE WHEN bool_and(a.config ? 'concurrency') THEN sum((a.config ->> 'concurrency')::int) END AS slots
FROM agents a, unnest(lifecycle.agent_capabilities(a.id)) c
WHERE a.is_active
GROUP BY c
ORDER BY c;

-- name: adopt_existing_tables
-- The runbook's tables that exist in public on a database with no migration recorded: the user's
-- own schema, to be adopted by the first upgrade (lifecycle.adopt_rows in sql/schema/09_schema_management.sql).
SELECT c.relname AS table_name, c.reltuples::bigint AS estimated_rows
FROM pg_class c
WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p')
  AND c.relname IN ('workflow_definitions', 'agents', 'agent_ontologies', 'workflow_executions',
                    'workflow_execution_logs', 'workflow_events', 'task_queue')
ORDER BY c.relname;

-- name: adopt_move_aside
-- Move the user's tables, views, sequences and functions whose names ours use (the runbook's seven
-- tables, workflow_* and lifecycle_* relations, and the runbook's functions) from public into the
-- new schema lifecycle_adopted, as they are: indexes, constraints, triggers, policies and owned
-- sequences go with their tables, and views keep pointing at them. Identifiers come from the
-- catalog (regclass, regprocedure), never from input.
DO $adopt$
DECLARE
  v record;
BEGIN
  IF to_regnamespace('lifecycle_adopted') IS NOT NULL THEN
    RAISE EXCEPTION 'schema lifecycle_adopted exists already: it holds the originals of an earlier adoption'
      USING ERRCODE = 'duplicate_schema',
            HINT = 'rename it (ALTER SCHEMA lifecycle_adopted RENAME TO ...) and upgrade again';
  END IF;
  CREATE SCHEMA lifecycle_adopted;
  REVOKE ALL ON SCHEMA lifecycle_adopted FROM PUBLIC;
  FOR v IN
    SELECT c.oid::regclass AS rel, c.relkind
    FROM pg_class c
    WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S')
      AND (c.relname IN ('agents', 'agent_ontologies', 'task_queue')
           OR c.relname LIKE 'workflow\_%' OR c.relname LIKE 'lifecycle\_%'
           OR c.relname LIKE 'agents\_%' OR c.relname LIKE 'agent\_ontologies\_%' OR c.relname LIKE 'task\_queue\_%')
      -- a sequence owned by a table moves with it
      AND NOT (c.relkind = 'S' AND EXISTS (SELECT 1 FROM pg_depend dep
                                           WHERE dep.objid = c.oid AND dep.classid = 'pg_class'::regclass
                                             AND dep.deptype IN ('a', 'i')))
    ORDER BY CASE WHEN c.relkind IN ('v', 'm') THEN 0 ELSE 1 END, c.relname
  LOOP
    EXECUTE format('ALTER %s %s SET SCHEMA lifecycle_adopted',
                   CASE v.relkind WHEN 'v' THEN 'VIEW' WHEN 'm' THEN 'MATERIALIZED VIEW'
                                  WHEN 'f' THEN 'FOREIGN TABLE' WHEN 'S' THEN 'SEQUENCE' ELSE 'TABLE' END,
                   v.rel);
  END LOOP;
  FOR v IN
    SELECT p.oid::regprocedure AS fn, p.prokind
    FROM pg_proc p
    WHERE p.pronamespace = 'public'::regnamespace
      AND (p.proname LIKE 'lifecycle\_%' OR p.proname LIKE 'workflow\_%'
           OR p.proname IN ('perform_workflow_compensation', 'retry_stage', 'trip_circuit_breaker'))
    ORDER BY 1
  LOOP
    EXECUTE format('ALTER %s %s SET SCHEMA lifecycle_adopted',
                   CASE v.prokind WHEN 'p' THEN 'PROCEDURE' WHEN 'a' THEN 'AGGREGATE' ELSE 'FUNCTION' END, v.fn);
  END LOOP;
END
$adopt$;

-- name: adopt_rows
SELECT copied, rejected FROM lifecycle.adopt_rows(%(table)s);

-- name: adoption_rejects
SELECT table_name, row_id, rule, message FROM lifecycle.adoption_rejects ORDER BY id;

-- name: adopt_dropped_columns
-- Columns of the adopted tables that ours do not have: their values stay in lifecycle_adopted only.
SELECT s.relname AS table_name, a.attname AS column_name
FROM pg_class s
JOIN pg_attribute a ON a.attrelid = s.oid AND a.attnum > 0 AND NOT a.attisdropped
WHERE s.relnamespace = to_regnamespace('lifecycle_adopted') AND s.relkind IN ('r', 'p')
  AND s.relname IN ('workflow_definitions', 'agents', 'agent_ontologies', 'workflow_executions',
                    'workflow_execution_logs', 'workflow_events', 'task_queue')
  AND NOT EXISTS (SELECT 1 FROM pg_attribute t
                  WHERE t.attrelid = to_regclass(format('public.%I', s.relname))
                    AND t.attname = a.attname AND NOT t.attisdropped)
ORDER BY 1, a.attnum;

-- name: schema_drift
SELECT kind, object, problem FROM lifecycle.schema_drift();

-- name: invariant_executions
-- The invariant checker (lifecycle_dagster.invariants): every execution, whether its status may
-- rest (completed, rolled_back, compensation_failed; failed under on_failure: hold; cancelled whose
-- latest cancel said compensate = false), how long it has been idle and its DAG.
SELECT e.id::text AS execution_id, e.status, e.dagster_run_id,
       coalesce(d.dag_schema ->> 'on_failure', 'compensate') AS on_failure,
       coalesce((SELECT (ev.metadata ->> 'compensate')::boolean FROM workflow_events ev
                 WHERE ev.execution_id = e.id AND ev.event_type = 'workflow_cancelled'
                 ORDER BY ev.id DESC LIMIT 1), true) AS cancel_compensates,
       extract(epoch FROM (now() - greatest(e.updated_at, e.heartbeat_at)))::float8 AS idle_s,
       d.dag_schema::text AS dag_schema_json, e.context::text AS context_json
FROM workflow_executions e
JOIN workflow_definitions d ON d.id = e.workflow_definition_id
ORDER BY e.created_at, e.id;

-- name: invariant_stages
-- Per (execution, stage) that has a stage log or a stage event: the log's status, whether the stage
-- is compensable, and what the audit trail and the task queue recorded about it.
WITH ev AS (
  SELECT ev.execution_id, ev.stage_id,
         count(*) FILTER (WHERE ev.event_type = 'stage_started') AS starts,
         count(*) FILTER (WHERE ev.event_type = 'stage_completed') AS completions,
         count(*) FILTER (WHERE ev.event_type = 'stage_compensated') AS compensations,
         min(ev.id) FILTER (WHERE ev.event_type = 'stage_compensating') AS first_compensating,
         max(ev.id) FILTER (WHERE ev.event_type = 'stage_compensated') AS last_compensated
  FROM workflow_events ev
  WHERE ev.execution_id IS NOT NULL AND ev.stage_id IS NOT NULL
  GROUP BY ev.execution_id, ev.stage_id
), tk AS (
  SELECT t.workflow_execution_id AS execution_id, t.task_type AS stage_id,
         count(*) FILTER (WHERE t.status = 'completed') AS completed_tasks
  FROM task_queue t
  WHERE t.workflow_execution_id IS NOT NULL
  GROUP BY t.workflow_execution_id, t.task_type
)
SELECT coalesce(l.execution_id, ev.execution_id)::text AS execution_id,
       coalesce(l.stage_id, ev.stage_id) AS stage_id, l.status,
       lifecycle.stage_compensable(e.workflow_definition_id, coalesce(l.stage_id, ev.stage_id)) AS compensable,
       coalesce(ev.starts, 0) AS starts, coalesce(ev.completions, 0) AS completions,
       coalesce(ev.compensations, 0) AS compensations, ev.first_compensating, ev.last_compensated,
       coalesce(tk.completed_tasks, 0) AS completed_tasks,
       l.output_data::text AS output_json, l.error_message AS error
FROM workflow_execution_logs l
FULL JOIN ev ON ev.execution_id = l.execution_id AND ev.stage_id = l.stage_id
JOIN workflow_executions e ON e.id = coalesce(l.execution_id, ev.execution_id)
LEFT JOIN tk ON tk.execution_id = coalesce(l.execution_id, ev.execution_id)
            AND tk.stage_id = coalesce(l.stage_id, ev.stage_id)
ORDER BY 1, 2;

-- name: invariant_breaker_outcomes
-- Every agent call whose outcome counts (sql/schema/07_breakers.sql: a completion, a failure or retry whose code
-- is not the caller's fault, a completion refused because its attempt timed out) against the
-- outcome rows recorded for it, per breaker (the agent's, the capability's): one row per mismatch.
WITH calls AS (
  SELECT (ev.metadata ->> 'task_id')::uuid AS task_id,
         bool_or(ev.event_type = 'stage_completed') AS succeeded,
         bool_or((ev.event_type IN ('stage_retrying', 'stage_failed')
                  AND NOT lifecycle.breaker_caller_fault(ev.metadata ->> 'error_code'))
                 OR (ev.event_type = 'stage_result_refused' AND ev.metadata ->> 'outcome' = 'completed'
                     AND ev.metadata ->> 'reason' LIKE 'attempt % timed out at %')) AS failed
  FROM workflow_events ev
  WHERE ev.event_type IN ('stage_completed', 'stage_retrying', 'stage_failed', 'stage_result_refused')
    AND ev.execution_id IS NOT NULL AND ev.metadata ->> 'task_id' IS NOT NULL
  GROUP BY 1
), expected AS (
  SELECT c.task_id, s.scope, s.key, c.succeeded AND NOT c.failed AS success,
         t.workflow_execution_id AS execution_id, t.task_type AS stage_id
  FROM calls c
  JOIN task_queue t ON t.id = c.task_id
  CROSS JOIN LATERAL (VALUES ('agent', t.agent_id::text), ('capability', t.capability)) AS s(scope, key)
  WHERE t.agent_id IS NOT NULL AND (c.succeeded OR c.failed) AND s.key IS NOT NULL
), recorded AS (
  SELECT o.task_id, o.scope, o.key, o.success FROM lifecycle.breaker_outcomes o WHERE o.task_id IS NOT NULL
)
SELECT coalesce(x.task_id, r.task_id)::text AS task_id, coalesce(x.scope, r.scope) AS scope,
       x.key AS expected_key, r.key AS recorded_key, x.success AS expected_success, r.success AS recorded_success,
       coalesce(x.execution_id, t.workflow_execution_id)::text AS execution_id,
       coalesce(x.stage_id, t.task_type) AS stage_id
FROM expected x
FULL JOIN recorded r ON r.task_id = x.task_id AND r.scope = x.scope
LEFT JOIN task_queue t ON t.id = r.task_id
WHERE x.task_id IS NULL OR r.task_id IS NULL OR x.key IS DISTINCT FROM r.key OR x.success IS DISTINCT FROM r.success
ORDER BY 1, 2;

-- name: invariant_breaker_states
-- Each breaker's state against the transition its latest breaker event recorded (none: closed).
SELECT b.scope, b.key, b.state,
       coalesce((SELECT CASE ev.event_type WHEN 'breaker_opened' THEN 'open'
                                           WHEN 'breaker_half_open' THEN 'half_open' ELSE 'closed' END
                 FROM workflow_events ev
                 WHERE ev.execution_id IS NULL
                   AND ev.event_type IN ('breaker_opened', 'breaker_half_open', 'breaker_closed')
                   AND ev.metadata ->> 'scope' = b.scope AND ev.metadata ->> 'key' = b.key
                 ORDER BY ev.id DESC LIMIT 1), 'closed') AS evented_state
FROM lifecycle.breakers b
ORDER BY 1, 2;

-- name: invariant_late_completions
-- Tasks a worker completed after its lease had expired (sql/schema/05_task_protocol.sql: the lease fences workers).
SELECT t.id::text AS task_id, t.workflow_execution_id::text AS execution_id, t.task_type AS stage_id,
       t.claimed_by, t.lease_expires_at, t.completed_at
FROM task_queue t
WHERE t.status = 'completed' AND t.claimed_by IS DISTINCT FROM 'op'
  AND t.lease_expires_at IS NOT NULL AND t.completed_at > t.lease_expires_at
ORDER BY t.completed_at;

-- name: alerts_scan
-- Record an alert for each capability whose oldest pending task waited threshold_s seconds or more.
SELECT lifecycle.alerts_scan(%(threshold_s)s, %(now)s) AS recorded;

-- name: alerts_claim
-- Lease up to `limit` due unsent alerts for lease_s seconds (attempts + 1), oldest due first.
SELECT id, kind, key, payload, created_at, attempts, next_attempt_at, last_error
FROM lifecycle.alerts_claim(%(limit)s, %(lease_s)s, %(now)s);

-- name: alert_sent
SELECT lifecycle.alert_sent(%(id)s, %(now)s) AS recorded;

-- name: alert_failed
SELECT lifecycle.alert_failed(%(id)s, %(error)s, %(delay_s)s, %(now)s) AS recorded;

-- ------------------------------------------------------------------------------------------------
-- Metrics (`lifecycle-dagster metrics serve`, lifecycle_dagster/store/metrics.py): read only. The
-- task and event figures are read incrementally: the scraper keeps the totals of rows finished
-- before a cutoff and reads only (after, until] on each scrape (task_queue_finished_idx,
-- workflow_events_timestamp_idx); see docs/observability.md#metrics.

-- name: metrics_clock
-- The database's clock, and the cutoff before which finished rows are taken as settled.
SELECT clock_timestamp() AS now, clock_timestamp() - make_interval(secs => %(settle_s)s) AS cutoff;

-- name: metrics_stage_attempts
-- Stage attempts that ended (events stage_completed, stage_failed, stage_retrying naming a task,
-- "timestamp" in (after, until]: workflow_events_timestamp_idx) by workflow, version, stage,
-- capability, agent, outcome (completed, failed, retrying) and duration bucket. Duration: the
-- event's time - the task's started_at (its claim), in seconds; bucket i counts bounds[i-1] <
-- seconds <= bounds[i] (i = 0: seconds <= bounds[0]; NULL: the task never started).
SELECT coalesce(w.name, '') AS workflow, coalesce(w.version::text, '') AS version, ev.stage_id AS stage,
       coalesce(t.capability, '') AS capability, coalesce(a.name, '') AS agent,
       CASE ev.event_type WHEN 'stage_completed' THEN 'completed' WHEN 'stage_failed' THEN 'failed'
                          ELSE 'retrying' END AS outcome,
       width_bucket(x.s, %(bounds)s::float8[]) - (x.s = ANY (%(bounds)s::float8[]))::int AS bucket,
       count(*) AS n, coalesce(sum(x.s), 0)::float8 AS seconds
FROM workflow_events ev
JOIN task_queue t ON t.id = (ev.metadata ->> 'task_id')::uuid
CROSS JOIN LATERAL (SELECT greatest(extract(epoch FROM ev."timestamp" - t.started_at), 0)::float8 AS s) x
LEFT JOIN workflow_executions e ON e.id = ev.execution_id
LEFT JOIN workflow_definitions w ON w.id = e.workflow_definition_id
LEFT JOIN agents a ON a.id = t.agent_id
WHERE ev.event_type IN ('stage_completed', 'stage_failed', 'stage_retrying')
  AND ev."timestamp" > %(after)s AND ev."timestamp" <= %(until)s
GROUP BY 1, 2, 3, 4, 5, 6, 7;

-- name: metrics_lease_expiries
-- Leases that expired and were reaped (events task_reaped with "timestamp" in (after, until]), by
-- the task's capability and agent.
SELECT coalesce(t.capability, '') AS capability, coalesce(a.name, '') AS agent, count(*) AS n
FROM workflow_events ev
LEFT JOIN task_queue t ON t.id = (ev.metadata ->> 'task_id')::uuid
LEFT JOIN agents a ON a.id = t.agent_id
WHERE ev.event_type = 'task_reaped' AND ev."timestamp" > %(after)s AND ev."timestamp" <= %(until)s
GROUP BY 1, 2;

-- name: metrics_executions
-- Executions by workflow, version and status: an index-only scan of
-- workflow_executions_definition_status_idx (migration 0009).
SELECT d.name AS workflow, d.version::text AS version, x.status, x.n
FROM (SELECT e.workflow_definition_id, e.status, count(*) AS n
      FROM workflow_executions e GROUP BY 1, 2) x
JOIN workflow_definitions d ON d.id = x.workflow_definition_id;

-- name: metrics_breakers
-- Every breaker row: an agent's (its name) or a capability's, and its state.
SELECT b.scope, CASE WHEN b.scope = 'agent' THEN coalesce(a.name, b.key) ELSE '' END AS agent,
       CASE WHEN b.scope = 'capability' THEN b.key ELSE '' END AS capability, b.state
FROM lifecycle.breakers b
LEFT JOIN agents a ON b.scope = 'agent' AND a.id::text = b.key;

-- name: metrics_queue
-- Pending tasks per capability (task_queue_claimable_idx) and the age in seconds of the oldest
-- (by created_at, never below 0); every capability an active agent serves appears, with 0 when
-- nothing waits.
WITH pending AS (
  SELECT t.capability, count(*) AS depth, min(t.created_at) AS oldest
  FROM task_queue t WHERE t.status = 'pending' GROUP BY t.capability
), served AS (
  SELECT DISTINCT c AS capability
  FROM agents a CROSS JOIN LATERAL unnest(lifecycle.agent_capabilities(a.id)) c
  WHERE a.is_active
)
SELECT coalesce(p.capability, s.capability, '') AS capability, coalesce(p.depth, 0) AS depth,
       greatest(coalesce(extract(epoch FROM clock_timestamp() - p.oldest), 0), 0)::float8 AS oldest_age_s
FROM pending p
FULL JOIN served s ON s.capability = p.capability;

-- name: stage_readiness
SELECT lifecycle.stage_readiness(%(execution_id)s, %(stage_id)s) AS status;

-- name: stage_edges
SELECT target, fired FROM lifecycle.stage_edges(%(execution_id)s, %(stage_id)s);

-- name: approval_wait
SELECT status, wait_until, output
FROM lifecycle.approval_wait(%(execution_id)s, %(stage_id)s, %(ancestors)s, %(run_id)s);

-- name: approval_decide
SELECT lifecycle.approval_decide(%(execution_id)s, %(stage_id)s, %(decision)s, %(comment)s, %(actor)s,
                                 p_operator => %(operator)s) AS status;

-- name: approvals_expire
SELECT execution_id::text AS execution_id, stage_id, status FROM lifecycle.approvals_expire(%(limit)s);

-- name: pending_stages
-- The stages of an execution set to pending (a decision made them runnable, or retry_stage).
SELECT stage_id FROM workflow_execution_logs
WHERE execution_id = %(execution_id)s AND status = 'pending'
ORDER BY stage_id;

-- name: batch_form
SELECT batch_id::text AS batch_id, size
FROM lifecycle.batch_form(%(definition_id)s, %(max_executions)s, %(max_wait_s)s);

-- name: batch_ensure
SELECT execution_id::text AS execution_id, status, message
FROM lifecycle.batch_ensure(%(batch_id)s, %(definition_id)s, %(run_id)s, %(after)s, %(limit)s);

-- name: batch_stage_start
SELECT execution_id::text AS execution_id, state, log_id::text AS log_id, task_id::text AS task_id,
       agent_id::text AS agent_id, agent_name, agent_kind, input_data, attempt_number, output_data, message
FROM lifecycle.batch_stage_start(%(batch_id)s, %(run_id)s, %(stage_id)s, %(capability)s, %(ancestors)s,
                                 %(timeout_s)s, %(max_attempts)s, %(after)s, %(limit)s);

-- name: rate_limited_agents
-- Of the given agents, those with a rate limit of their own, or all of them when the capability
-- has one: a batch asks lifecycle.stage_rate_take for a token only for these.
SELECT a.id::text AS agent_id FROM agents a
WHERE a.id::text = ANY(%(agent_ids)s::text[])
  AND (EXISTS (SELECT 1 FROM lifecycle.agent_rate_limit(a.config))
       OR EXISTS (SELECT 1 FROM lifecycle.capability_limits c WHERE c.capability = %(capability)s));

-- name: batch_stage_record
SELECT execution_id::text AS execution_id, log_id::text AS log_id, status, error_state, message
FROM lifecycle.batch_stage_record(%(results)s);

-- name: batch_stage_edges
SELECT target FROM lifecycle.batch_stage_edges(%(batch_id)s, %(run_id)s, %(stage_id)s);

-- name: batches_unlaunched
-- Batches no run has bound yet, oldest first, with their job's name and version: the launch
-- sensor requests their runs every tick (run key 'batch:<id>': Dagster launches each once).
SELECT b.id::text AS batch_id, b.size, d.name, d.version
FROM lifecycle.batches b JOIN workflow_definitions d ON d.id = b.workflow_definition_id
WHERE b.run_id IS NULL
ORDER BY b.created_at, b.id
LIMIT %(limit)s;

-- name: batch_of_execution
-- The batch an execution was launched in (none: no row), its size, run and whether it left.
SELECT b.id::text AS batch_id, b.size, b.run_id, m.left_at, m.left_reason
FROM lifecycle.batch_members m JOIN lifecycle.batches b ON b.id = m.batch_id
WHERE m.execution_id = %(execution_id)s;

-- name: executions_of_run
-- The in_progress executions bound to a Dagster run (a batch run binds many).
SELECT e.id::text AS execution_id FROM workflow_executions e
WHERE e.dagster_run_id = %(run_id)s AND e.status = 'in_progress'
ORDER BY e.id;

-- name: batch_live_members
-- The members still in a batch and held by its run, in execution id order.
SELECT m.execution_id::text AS execution_id
FROM lifecycle.batch_members m JOIN workflow_executions e ON e.id = m.execution_id
WHERE m.batch_id = %(batch_id)s AND m.left_at IS NULL AND e.dagster_run_id = %(run_id)s
ORDER BY m.execution_id;

-- name: batch_leave
SELECT lifecycle.batch_leave(%(execution_id)s, %(reason)s);
