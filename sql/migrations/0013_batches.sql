-- 0013_batches: batch runs (issue 18, docs/batches.md). A batch is one Dagster run that carries
-- many executions of one definition version: lifecycle.batch_form groups pending executions into
-- a batch (its run key is 'batch:<id>'); the run's first op binds every member to the run
-- (lifecycle.batch_ensure sets `run_id`); each stage op then starts, completes and fails its
-- stage for all the batch's live members in a few statements. A member that needs a retry, or
-- failed for good, leaves the batch (`left_at`, `left_reason`): a retry is a resume of that
-- execution alone (the resume sensor), a failure goes to compensation as usual.
CREATE TABLE lifecycle.batches (
    id uuid DEFAULT gen_random_uuid() NOT NULL,
    workflow_definition_id uuid NOT NULL,
    size integer NOT NULL,
    max_executions integer NOT NULL,
    max_wait_s double precision NOT NULL,
    run_id text,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    bound_at timestamp with time zone,
    CONSTRAINT lifecycle_batches_pkey PRIMARY KEY (id),
    CONSTRAINT lifecycle_batches_definition_fkey FOREIGN KEY (workflow_definition_id)
        REFERENCES public.workflow_definitions(id) ON DELETE CASCADE,
    CONSTRAINT lifecycle_batches_size_valid CHECK (size >= 1 AND size <= max_executions),
    CONSTRAINT lifecycle_batches_max_executions_valid CHECK (max_executions >= 1 AND max_executions <= 10000),
    CONSTRAINT lifecycle_batches_max_wait_s_valid CHECK (max_wait_s >= 0 AND max_wait_s <= 3600),
    CONSTRAINT lifecycle_batches_bound_with_run CHECK ((run_id IS NULL) = (bound_at IS NULL))
);

-- the batches the launch sensor has still to launch (no run bound them yet)
CREATE INDEX lifecycle_batches_unbound_idx ON lifecycle.batches (created_at) WHERE run_id IS NULL;
CREATE INDEX lifecycle_batches_run_idx ON lifecycle.batches (run_id) WHERE run_id IS NOT NULL;

-- one row per execution a batch carries: an execution belongs to at most one batch
CREATE TABLE lifecycle.batch_members (
    execution_id uuid NOT NULL,
    batch_id uuid NOT NULL,
    left_at timestamp with time zone,
    left_reason text,
    CONSTRAINT lifecycle_batch_members_pkey PRIMARY KEY (execution_id),
    CONSTRAINT lifecycle_batch_members_execution_fkey FOREIGN KEY (execution_id)
        REFERENCES public.workflow_executions(id) ON DELETE CASCADE,
    CONSTRAINT lifecycle_batch_members_batch_fkey FOREIGN KEY (batch_id)
        REFERENCES lifecycle.batches(id) ON DELETE CASCADE,
    CONSTRAINT lifecycle_batch_members_left_valid CHECK (
        (left_at IS NULL AND left_reason IS NULL)
        OR (left_at IS NOT NULL AND left_reason IN ('retry', 'failed', 'stopped', 'not_runnable')))
);

CREATE INDEX lifecycle_batch_members_batch_idx ON lifecycle.batch_members (batch_id, execution_id);

-- the batch an execution was launched in (NULL: it ran alone); batch members share their batch's
-- Dagster run, so one run per execution holds only for executions outside a batch
ALTER TABLE public.workflow_executions ADD COLUMN batch_id uuid;
ALTER TABLE public.workflow_executions
    ADD CONSTRAINT workflow_executions_batch_fkey FOREIGN KEY (batch_id) REFERENCES lifecycle.batches(id) ON DELETE SET NULL;
ALTER TABLE public.workflow_executions DROP CONSTRAINT workflow_executions_dagster_run_id_key;
CREATE UNIQUE INDEX workflow_executions_dagster_run_id_key ON public.workflow_executions (dagster_run_id)
    WHERE batch_id IS NULL;
-- every lookup by run (the heartbeat, the failure sensor, stage_start's fencing) whatever the batch
CREATE INDEX workflow_executions_dagster_run_idx ON public.workflow_executions (dagster_run_id);
CREATE INDEX workflow_executions_batch_idx ON public.workflow_executions (batch_id) WHERE batch_id IS NOT NULL;
