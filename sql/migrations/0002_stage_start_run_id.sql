-- 0002_stage_start_run_id: lifecycle.stage_start takes the Dagster run id (p_run_id), so a stage op
-- ensures its execution once per run instead of once per stage. CREATE OR REPLACE cannot add an
-- argument (it would add a second overload): the old signature is dropped here, and
-- sql/schema/04_stage_transitions.sql creates the new one when the schema is applied after this
-- migration. IF EXISTS: a new database has no functions yet.
DROP FUNCTION IF EXISTS lifecycle.stage_start(uuid, text, text, jsonb, integer, timestamptz, double precision, boolean, integer);
