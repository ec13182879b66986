-- 0003_fingerprint_kinds: doctor also fingerprints rules, constraints, the state machine's rows and
-- the lifecycle schema's privileges (lifecycle.schema_catalog in sql/schema/09_schema_management.sql).
ALTER TABLE lifecycle.schema_fingerprints DROP CONSTRAINT lifecycle_schema_fingerprints_kind_valid;
ALTER TABLE lifecycle.schema_fingerprints ADD CONSTRAINT lifecycle_schema_fingerprints_kind_valid
  CHECK (kind IN ('function', 'view', 'table', 'trigger', 'policy', 'privileges', 'rule', 'constraint', 'data',
                  'schema'));
