-- 0007_alerts: the alert outbox (issue 16). One row per event a person must hear about (a breaker
-- opened, a compensation failed, an execution failed, a queue's oldest pending task waited too
-- long), written in the transaction of the event that causes it (the trigger
-- workflow_events_zz_alert, lifecycle.alerts_scan) and POSTed by the code location's
-- lifecycle_alert_sensor. `key` makes each event one alert however often it is seen; `sent_at` is
-- set once the receiver accepted it; until then `next_attempt_at` is when it is tried next
-- (backoff after a failure, a short lease while a sensor sends it).
CREATE TABLE lifecycle.alerts (
    id bigint GENERATED ALWAYS AS IDENTITY,
    kind text NOT NULL,
    key text NOT NULL,
    payload jsonb NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    attempts integer DEFAULT 0 NOT NULL,
    next_attempt_at timestamp with time zone DEFAULT now() NOT NULL,
    sent_at timestamp with time zone,
    last_error text,
    CONSTRAINT lifecycle_alerts_pkey PRIMARY KEY (id),
    CONSTRAINT lifecycle_alerts_key_key UNIQUE (key),
    CONSTRAINT lifecycle_alerts_kind_valid CHECK (kind = ANY (ARRAY['breaker_opened'::text,
        'compensation_failed'::text, 'execution_failed'::text, 'queue_stale'::text])),
    CONSTRAINT lifecycle_alerts_attempts_not_negative CHECK (attempts >= 0)
);

-- the sender's claim: unsent alerts by due time
CREATE INDEX lifecycle_alerts_due_idx ON lifecycle.alerts (next_attempt_at, id) WHERE sent_at IS NULL;
