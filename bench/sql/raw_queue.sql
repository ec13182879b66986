-- bench: the minimal queue table of the raw SKIP LOCKED loop (what Postgres alone can do).
CREATE TABLE IF NOT EXISTS bench_raw_queue (
  id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  status       text        NOT NULL DEFAULT 'pending',
  payload      jsonb       NOT NULL,
  result       jsonb,
  claimed_by   text,
  created_at   timestamptz NOT NULL DEFAULT now(),
  started_at   timestamptz,
  completed_at timestamptz
);
CREATE INDEX IF NOT EXISTS bench_raw_queue_pending_idx ON bench_raw_queue (id) WHERE status = 'pending';
