-- 0012_rate_limits: rate limits of agents and capabilities (issue 19, docs/rate-limits.md). A
-- token bucket per limited agent ('agent:<uuid>') and capability ('capability:<name>'): `tokens`
-- as of `updated_at` (refilled at `per_s` tokens a second up to `burst` when it is next taken
-- from, lifecycle.rate_take); `per_s` and `burst` as at the last take; `taken`: tokens granted
-- since the row was created. An agent's limit is its config.rate_limit; a capability's is its row
-- of lifecycle.capability_limits (a capability has no row of its own anywhere else).
CREATE TABLE lifecycle.rate_buckets (
    key text NOT NULL,
    per_s double precision NOT NULL,
    burst double precision NOT NULL,
    tokens double precision NOT NULL,
    last_granted integer DEFAULT 0 NOT NULL,
    taken bigint DEFAULT 0 NOT NULL,
    updated_at timestamp with time zone NOT NULL,
    CONSTRAINT lifecycle_rate_buckets_pkey PRIMARY KEY (key),
    CONSTRAINT lifecycle_rate_buckets_key_valid CHECK (key ~ '^(agent|capability):.+$'),
    CONSTRAINT lifecycle_rate_buckets_per_s_valid CHECK (per_s > 0 AND per_s <= 1000000),
    CONSTRAINT lifecycle_rate_buckets_burst_valid CHECK (burst >= 1 AND burst <= 1000000000),
    CONSTRAINT lifecycle_rate_buckets_tokens_valid CHECK (tokens >= 0 AND tokens <= burst),
    CONSTRAINT lifecycle_rate_buckets_last_granted_not_negative CHECK (last_granted >= 0)
);

CREATE TABLE lifecycle.capability_limits (
    capability text NOT NULL,
    per_s double precision NOT NULL,
    burst double precision NOT NULL,
    updated_at timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT lifecycle_capability_limits_pkey PRIMARY KEY (capability),
    CONSTRAINT lifecycle_capability_limits_per_s_valid CHECK (per_s > 0 AND per_s <= 1000000),
    CONSTRAINT lifecycle_capability_limits_burst_valid CHECK (burst >= 1 AND burst <= 1000000000)
);
