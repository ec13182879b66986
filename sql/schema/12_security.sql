-- Security: row-level security, policies and privileges of every table and view.
-- anon: nothing. authenticated: its own rows (policies) and the client API. service_role: all.

-- schema lifecycle: service_role's only (the clients reach our objects through public)
REVOKE ALL ON SCHEMA lifecycle FROM PUBLIC, anon, authenticated, service_role;
GRANT USAGE ON SCHEMA lifecycle TO service_role;

-- rls agent_ontologies
ALTER TABLE public.agent_ontologies ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.agent_ontologies NO FORCE ROW LEVEL SECURITY;

-- rls agents
ALTER TABLE public.agents ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.agents NO FORCE ROW LEVEL SECURITY;

-- policy workflow_executions authenticated_insert_own
DROP POLICY IF EXISTS authenticated_insert_own ON public.workflow_executions;
CREATE POLICY authenticated_insert_own ON public.workflow_executions FOR INSERT TO authenticated WITH CHECK (((created_by = ( SELECT auth.uid() AS uid)) AND (status = 'pending'::text) AND (EXISTS ( SELECT 1
   FROM public.workflow_definitions d
  WHERE ((d.id = workflow_executions.workflow_definition_id) AND d.is_active)))));

-- policy workflow_definitions authenticated_read_active
DROP POLICY IF EXISTS authenticated_read_active ON public.workflow_definitions;
CREATE POLICY authenticated_read_active ON public.workflow_definitions FOR SELECT TO authenticated USING (is_active);

-- policy task_queue authenticated_read_own
DROP POLICY IF EXISTS authenticated_read_own ON public.task_queue;
CREATE POLICY authenticated_read_own ON public.task_queue FOR SELECT TO authenticated USING ((EXISTS ( SELECT 1
   FROM public.workflow_executions e
  WHERE ((e.id = task_queue.workflow_execution_id) AND (e.created_by = ( SELECT auth.uid() AS uid))))));

-- policy workflow_events authenticated_read_own
DROP POLICY IF EXISTS authenticated_read_own ON public.workflow_events;
CREATE POLICY authenticated_read_own ON public.workflow_events FOR SELECT TO authenticated USING ((EXISTS ( SELECT 1
   FROM public.workflow_executions e
  WHERE ((e.id = workflow_events.execution_id) AND (e.created_by = ( SELECT auth.uid() AS uid))))));

-- policy workflow_execution_logs authenticated_read_own
DROP POLICY IF EXISTS authenticated_read_own ON public.workflow_execution_logs;
CREATE POLICY authenticated_read_own ON public.workflow_execution_logs FOR SELECT TO authenticated USING ((EXISTS ( SELECT 1
   FROM public.workflow_executions e
  WHERE ((e.id = workflow_execution_logs.execution_id) AND (e.created_by = ( SELECT auth.uid() AS uid))))));

-- policy workflow_executions authenticated_read_own
DROP POLICY IF EXISTS authenticated_read_own ON public.workflow_executions;
CREATE POLICY authenticated_read_own ON public.workflow_executions FOR SELECT TO authenticated USING ((created_by = ( SELECT auth.uid() AS uid)));

-- policies authenticated_read_to_decide: an approver reads the execution that waits for its
-- decision, its stage logs and its events (public.is_approver_of, sql/schema/14_branches.sql)
DROP POLICY IF EXISTS authenticated_read_to_decide ON public.workflow_executions;
CREATE POLICY authenticated_read_to_decide ON public.workflow_executions FOR SELECT TO authenticated USING (public.is_approver_of(id));
DROP POLICY IF EXISTS authenticated_read_to_decide ON public.workflow_execution_logs;
CREATE POLICY authenticated_read_to_decide ON public.workflow_execution_logs FOR SELECT TO authenticated USING (public.is_approver_of(execution_id));
DROP POLICY IF EXISTS authenticated_read_to_decide ON public.workflow_events;
CREATE POLICY authenticated_read_to_decide ON public.workflow_events FOR SELECT TO authenticated USING (public.is_approver_of(execution_id));

-- rls lifecycle_adoption_rejects
ALTER TABLE lifecycle.adoption_rejects ENABLE ROW LEVEL SECURITY;
ALTER TABLE lifecycle.adoption_rejects NO FORCE ROW LEVEL SECURITY;

-- rls lifecycle_alerts
ALTER TABLE lifecycle.alerts ENABLE ROW LEVEL SECURITY;
ALTER TABLE lifecycle.alerts NO FORCE ROW LEVEL SECURITY;

-- rls lifecycle_artifacts
ALTER TABLE lifecycle.artifacts ENABLE ROW LEVEL SECURITY;
ALTER TABLE lifecycle.artifacts NO FORCE ROW LEVEL SECURITY;

-- rls lifecycle_audit_heads
ALTER TABLE lifecycle.audit_heads ENABLE ROW LEVEL SECURITY;
ALTER TABLE lifecycle.audit_heads NO FORCE ROW LEVEL SECURITY;

-- rls lifecycle_audit_retention_marks
ALTER TABLE lifecycle.audit_retention_marks ENABLE ROW LEVEL SECURITY;
ALTER TABLE lifecycle.audit_retention_marks NO FORCE ROW LEVEL SECURITY;

-- rls lifecycle_audit_checkpoints
ALTER TABLE lifecycle.audit_checkpoints ENABLE ROW LEVEL SECURITY;
ALTER TABLE lifecycle.audit_checkpoints NO FORCE ROW LEVEL SECURITY;

-- rls lifecycle_breaker_outcomes
ALTER TABLE lifecycle.breaker_outcomes ENABLE ROW LEVEL SECURITY;
ALTER TABLE lifecycle.breaker_outcomes NO FORCE ROW LEVEL SECURITY;

-- rls lifecycle_breakers
ALTER TABLE lifecycle.breakers ENABLE ROW LEVEL SECURITY;
ALTER TABLE lifecycle.breakers NO FORCE ROW LEVEL SECURITY;

-- rls lifecycle_capability_limits
ALTER TABLE lifecycle.capability_limits ENABLE ROW LEVEL SECURITY;
ALTER TABLE lifecycle.capability_limits NO FORCE ROW LEVEL SECURITY;

-- rls lifecycle_rate_buckets
ALTER TABLE lifecycle.rate_buckets ENABLE ROW LEVEL SECURITY;
ALTER TABLE lifecycle.rate_buckets NO FORCE ROW LEVEL SECURITY;
ALTER TABLE lifecycle.batches ENABLE ROW LEVEL SECURITY;
ALTER TABLE lifecycle.batches NO FORCE ROW LEVEL SECURITY;
ALTER TABLE lifecycle.batch_members ENABLE ROW LEVEL SECURITY;
ALTER TABLE lifecycle.batch_members NO FORCE ROW LEVEL SECURITY;

-- rls lifecycle.schema_files
ALTER TABLE lifecycle.schema_files ENABLE ROW LEVEL SECURITY;
ALTER TABLE lifecycle.schema_files NO FORCE ROW LEVEL SECURITY;

-- rls lifecycle_schema_fingerprints
ALTER TABLE lifecycle.schema_fingerprints ENABLE ROW LEVEL SECURITY;
ALTER TABLE lifecycle.schema_fingerprints NO FORCE ROW LEVEL SECURITY;

-- rls lifecycle_schema_migrations
ALTER TABLE lifecycle.schema_migrations ENABLE ROW LEVEL SECURITY;
ALTER TABLE lifecycle.schema_migrations NO FORCE ROW LEVEL SECURITY;

-- rls lifecycle_transitions
ALTER TABLE lifecycle.transitions ENABLE ROW LEVEL SECURITY;
ALTER TABLE lifecycle.transitions NO FORCE ROW LEVEL SECURITY;

-- policy agent_ontologies service_role_all
DROP POLICY IF EXISTS service_role_all ON public.agent_ontologies;
CREATE POLICY service_role_all ON public.agent_ontologies TO service_role USING (true) WITH CHECK (true);

-- policy agents service_role_all
DROP POLICY IF EXISTS service_role_all ON public.agents;
CREATE POLICY service_role_all ON public.agents TO service_role USING (true) WITH CHECK (true);

-- policy lifecycle_adoption_rejects service_role_all
DROP POLICY IF EXISTS service_role_all ON lifecycle.adoption_rejects;
CREATE POLICY service_role_all ON lifecycle.adoption_rejects TO service_role USING (true) WITH CHECK (true);

-- policy lifecycle_alerts service_role_all
DROP POLICY IF EXISTS service_role_all ON lifecycle.alerts;
CREATE POLICY service_role_all ON lifecycle.alerts TO service_role USING (true) WITH CHECK (true);

-- policy lifecycle_artifacts service_role_all
DROP POLICY IF EXISTS service_role_all ON lifecycle.artifacts;
CREATE POLICY service_role_all ON lifecycle.artifacts TO service_role USING (true) WITH CHECK (true);

-- policy lifecycle_audit_heads service_role_read
DROP POLICY IF EXISTS service_role_read ON lifecycle.audit_heads;
CREATE POLICY service_role_read ON lifecycle.audit_heads FOR SELECT TO service_role USING (true);

-- policy lifecycle_audit_retention_marks service_role_read
DROP POLICY IF EXISTS service_role_read ON lifecycle.audit_retention_marks;
CREATE POLICY service_role_read ON lifecycle.audit_retention_marks FOR SELECT TO service_role USING (true);

-- policy lifecycle_audit_checkpoints service_role_all
DROP POLICY IF EXISTS service_role_all ON lifecycle.audit_checkpoints;
CREATE POLICY service_role_all ON lifecycle.audit_checkpoints TO service_role USING (true) WITH CHECK (true);

-- policy lifecycle_breaker_outcomes service_role_all
DROP POLICY IF EXISTS service_role_all ON lifecycle.breaker_outcomes;
CREATE POLICY service_role_all ON lifecycle.breaker_outcomes TO service_role USING (true) WITH CHECK (true);

-- policy lifecycle_breakers service_role_all
DROP POLICY IF EXISTS service_role_all ON lifecycle.breakers;
CREATE POLICY service_role_all ON lifecycle.breakers TO service_role USING (true) WITH CHECK (true);

-- policy lifecycle_capability_limits service_role_all
DROP POLICY IF EXISTS service_role_all ON lifecycle.capability_limits;
CREATE POLICY service_role_all ON lifecycle.capability_limits TO service_role USING (true) WITH CHECK (true);

-- policy lifecycle_rate_buckets service_role_all
DROP POLICY IF EXISTS service_role_all ON lifecycle.rate_buckets;
CREATE POLICY service_role_all ON lifecycle.rate_buckets TO service_role USING (true) WITH CHECK (true);

-- policy lifecycle.schema_files service_role_all
DROP POLICY IF EXISTS service_role_all ON lifecycle.schema_files;
CREATE POLICY service_role_all ON lifecycle.schema_files TO service_role USING (true) WITH CHECK (true);

-- policy lifecycle_schema_fingerprints service_role_all
DROP POLICY IF EXISTS service_role_all ON lifecycle.schema_fingerprints;
CREATE POLICY service_role_all ON lifecycle.schema_fingerprints TO service_role USING (true) WITH CHECK (true);

-- policy lifecycle_schema_migrations service_role_all
DROP POLICY IF EXISTS service_role_all ON lifecycle.schema_migrations;
CREATE POLICY service_role_all ON lifecycle.schema_migrations TO service_role USING (true) WITH CHECK (true);

-- policy lifecycle_transitions service_role_all
DROP POLICY IF EXISTS service_role_all ON lifecycle.transitions;
CREATE POLICY service_role_all ON lifecycle.transitions TO service_role USING (true) WITH CHECK (true);

-- policy task_queue service_role_all
DROP POLICY IF EXISTS service_role_all ON public.task_queue;
CREATE POLICY service_role_all ON public.task_queue TO service_role USING (true) WITH CHECK (true);

-- policy workflow_definitions service_role_all
DROP POLICY IF EXISTS service_role_all ON public.workflow_definitions;
CREATE POLICY service_role_all ON public.workflow_definitions TO service_role USING (true) WITH CHECK (true);

-- policy workflow_events service_role_all
DROP POLICY IF EXISTS service_role_all ON public.workflow_events;
CREATE POLICY service_role_all ON public.workflow_events TO service_role USING (true) WITH CHECK (true);

-- policy workflow_execution_logs service_role_all
DROP POLICY IF EXISTS service_role_all ON public.workflow_execution_logs;
CREATE POLICY service_role_all ON public.workflow_execution_logs TO service_role USING (true) WITH CHECK (true);

-- policy workflow_executions service_role_all
DROP POLICY IF EXISTS service_role_all ON public.workflow_executions;
CREATE POLICY service_role_all ON public.workflow_executions TO service_role USING (true) WITH CHECK (true);

-- rls task_queue
ALTER TABLE public.task_queue ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.task_queue NO FORCE ROW LEVEL SECURITY;

-- rls workflow_definitions
ALTER TABLE public.workflow_definitions ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.workflow_definitions NO FORCE ROW LEVEL SECURITY;

-- rls workflow_events
ALTER TABLE public.workflow_events ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.workflow_events NO FORCE ROW LEVEL SECURITY;

-- rls workflow_execution_logs
ALTER TABLE public.workflow_execution_logs ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.workflow_execution_logs NO FORCE ROW LEVEL SECURITY;

-- rls workflow_executions
ALTER TABLE public.workflow_executions ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.workflow_executions NO FORCE ROW LEVEL SECURITY;

-- privileges workflow_executions
REVOKE ALL ON TABLE public.workflow_executions FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON TABLE public.workflow_executions TO service_role;
GRANT SELECT ON TABLE public.workflow_executions TO authenticated;

-- privileges workflow_executions.id
GRANT INSERT(id) ON TABLE public.workflow_executions TO authenticated;

-- privileges workflow_executions.workflow_definition_id
GRANT INSERT(workflow_definition_id) ON TABLE public.workflow_executions TO authenticated;

-- privileges workflow_executions.context
GRANT INSERT(context) ON TABLE public.workflow_executions TO authenticated;

-- privileges workflow_executions.created_by
GRANT INSERT(created_by) ON TABLE public.workflow_executions TO authenticated;

-- privileges workflow_execution_logs
REVOKE ALL ON TABLE public.workflow_execution_logs FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON TABLE public.workflow_execution_logs TO service_role;
GRANT SELECT ON TABLE public.workflow_execution_logs TO authenticated;

-- privileges task_queue
REVOKE ALL ON TABLE public.task_queue FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON TABLE public.task_queue TO service_role;
GRANT SELECT ON TABLE public.task_queue TO authenticated;

-- privileges agent_ontologies
REVOKE ALL ON TABLE public.agent_ontologies FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON TABLE public.agent_ontologies TO service_role;
GRANT SELECT ON TABLE public.agent_ontologies TO authenticated;

-- privileges agents
REVOKE ALL ON TABLE public.agents FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON TABLE public.agents TO service_role;
GRANT SELECT ON TABLE public.agents TO authenticated;

-- privileges lifecycle_adoption_rejects
REVOKE ALL ON TABLE lifecycle.adoption_rejects FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON TABLE lifecycle.adoption_rejects TO service_role;

-- privileges lifecycle_adoption_rejects_id_seq
REVOKE ALL ON SEQUENCE lifecycle.adoption_rejects_id_seq FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON SEQUENCE lifecycle.adoption_rejects_id_seq TO service_role;

-- privileges lifecycle_alerts
REVOKE ALL ON TABLE lifecycle.alerts FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON TABLE lifecycle.alerts TO service_role;

-- privileges lifecycle_alerts_id_seq
REVOKE ALL ON SEQUENCE lifecycle.alerts_id_seq FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON SEQUENCE lifecycle.alerts_id_seq TO service_role;

-- privileges lifecycle_artifacts
REVOKE ALL ON TABLE lifecycle.artifacts FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON TABLE lifecycle.artifacts TO service_role;

-- privileges lifecycle_artifacts_id_seq
REVOKE ALL ON SEQUENCE lifecycle.artifacts_id_seq FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON SEQUENCE lifecycle.artifacts_id_seq TO service_role;

-- privileges lifecycle_audit_heads (written only by lifecycle.audit_chain, as the owner)
REVOKE ALL ON TABLE lifecycle.audit_heads FROM PUBLIC, anon, authenticated, service_role;
GRANT SELECT ON TABLE lifecycle.audit_heads TO service_role;

-- privileges lifecycle_audit_retention_marks (written only by lifecycle.audit_prune, as the owner)
REVOKE ALL ON TABLE lifecycle.audit_retention_marks FROM PUBLIC, anon, authenticated, service_role;
GRANT SELECT ON TABLE lifecycle.audit_retention_marks TO service_role;

-- privileges lifecycle_audit_checkpoints
REVOKE ALL ON TABLE lifecycle.audit_checkpoints FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON TABLE lifecycle.audit_checkpoints TO service_role;

-- privileges lifecycle_audit_checkpoints_id_seq
REVOKE ALL ON SEQUENCE lifecycle.audit_checkpoints_id_seq FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON SEQUENCE lifecycle.audit_checkpoints_id_seq TO service_role;

-- privileges lifecycle_breaker_outcomes
REVOKE ALL ON TABLE lifecycle.breaker_outcomes FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON TABLE lifecycle.breaker_outcomes TO service_role;

-- privileges lifecycle_breaker_outcomes_id_seq
REVOKE ALL ON SEQUENCE lifecycle.breaker_outcomes_id_seq FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON SEQUENCE lifecycle.breaker_outcomes_id_seq TO service_role;

-- privileges lifecycle_breakers
REVOKE ALL ON TABLE lifecycle.breakers FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON TABLE lifecycle.breakers TO service_role;

-- privileges lifecycle_capability_limits
REVOKE ALL ON TABLE lifecycle.capability_limits FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON TABLE lifecycle.capability_limits TO service_role;

-- privileges lifecycle_rate_buckets
REVOKE ALL ON TABLE lifecycle.rate_buckets FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON TABLE lifecycle.rate_buckets TO service_role;
REVOKE ALL ON TABLE lifecycle.batches FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON TABLE lifecycle.batches TO service_role;
REVOKE ALL ON TABLE lifecycle.batch_members FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON TABLE lifecycle.batch_members TO service_role;

-- privileges lifecycle_breaker_status
REVOKE ALL ON TABLE lifecycle.breaker_status FROM PUBLIC, anon, authenticated, service_role;
GRANT SELECT ON TABLE lifecycle.breaker_status TO service_role;

-- privileges lifecycle_schema_fingerprints
REVOKE ALL ON TABLE lifecycle.schema_fingerprints FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON TABLE lifecycle.schema_fingerprints TO service_role;

-- privileges lifecycle_schema_migrations
REVOKE ALL ON TABLE lifecycle.schema_migrations FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON TABLE lifecycle.schema_migrations TO service_role;

-- privileges lifecycle_transitions
REVOKE ALL ON TABLE lifecycle.transitions FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON TABLE lifecycle.transitions TO service_role;

-- privileges workflow_definitions
REVOKE ALL ON TABLE public.workflow_definitions FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON TABLE public.workflow_definitions TO service_role;
GRANT SELECT ON TABLE public.workflow_definitions TO authenticated;

-- privileges workflow_events
REVOKE ALL ON TABLE public.workflow_events FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON TABLE public.workflow_events TO service_role;
GRANT SELECT ON TABLE public.workflow_events TO authenticated;

-- privileges workflow_audit_feed
REVOKE ALL ON TABLE public.workflow_audit_feed FROM PUBLIC, anon, authenticated, service_role;
GRANT SELECT ON TABLE public.workflow_audit_feed TO service_role;

-- privileges workflow_events_id_seq
REVOKE ALL ON SEQUENCE public.workflow_events_id_seq FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON SEQUENCE public.workflow_events_id_seq TO service_role;

-- privileges lifecycle.schema_files
REVOKE ALL ON TABLE lifecycle.schema_files FROM PUBLIC, anon, authenticated, service_role;
GRANT ALL ON TABLE lifecycle.schema_files TO service_role;
