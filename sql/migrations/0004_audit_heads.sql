-- 0004_audit_heads: the audit feed's stream heads and retention marks (issue 14, items 7 and 12).
--
-- lifecycle.audit_heads: the newest chained event of every stream (one row per execution, 'global'
-- for events without one), written by lifecycle.audit_chain under the stream's lock. A DELETE on
-- workflow_events cannot touch it, so `audit verify` finds a stream, or the tail of one, removed
-- outside lifecycle.audit_prune.
--
-- lifecycle.audit_retention_marks: the transactions in which lifecycle.audit_prune is deleting
-- events (pg_current_xact_id()); lifecycle.audit_guard lets a DELETE through only in such a
-- transaction. Only the owner writes it (no role is granted more than SELECT), so a role cannot
-- switch the guard off by itself as it could with the old setting lifecycle.audit_retention.
--
-- lifecycle.executions_launchable takes the loaded jobs now (sql/schema/04_stage_transitions.sql).

DROP FUNCTION IF EXISTS lifecycle.executions_launchable(integer);

CREATE TABLE lifecycle.audit_heads (
    stream text NOT NULL,
    execution_id uuid,
    last_event_id bigint NOT NULL,
    last_hash text NOT NULL,
    updated_at timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT lifecycle_audit_heads_pkey PRIMARY KEY (stream),
    CONSTRAINT lifecycle_audit_heads_stream_valid CHECK (stream = coalesce(execution_id::text, 'global'))
);

CREATE TABLE lifecycle.audit_retention_marks (
    txid xid8 NOT NULL,
    CONSTRAINT lifecycle_audit_retention_marks_pkey PRIMARY KEY (txid)
);

-- the heads of the streams that exist already: their newest chained event, else their newest
-- retention checkpoint (a stream pruned whole)
INSERT INTO lifecycle.audit_heads (stream, execution_id, last_event_id, last_hash)
SELECT DISTINCT ON (ev.execution_id) coalesce(ev.execution_id::text, 'global'), ev.execution_id, ev.id, ev.hash
FROM public.workflow_events ev
WHERE ev.hash IS NOT NULL
ORDER BY ev.execution_id, ev.id DESC;

INSERT INTO lifecycle.audit_heads (stream, execution_id, last_event_id, last_hash)
SELECT DISTINCT ON (c.execution_id) coalesce(c.execution_id::text, 'global'), c.execution_id, c.last_event_id,
       c.last_hash
FROM lifecycle.audit_checkpoints c
WHERE c.last_hash IS NOT NULL
ORDER BY c.execution_id, c.id DESC
ON CONFLICT (stream) DO NOTHING;
