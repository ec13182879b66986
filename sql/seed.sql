-- seed: the runbook's lifecycle_v1 version 1 (section 1's DAG, exactly), its five agents and
-- their capability rows (section 7). Installs only what is absent: it never rewrites or
-- reactivates anything, so it is safe to run on every `lifecycle-dagster run`.

INSERT INTO workflow_definitions (name, description, version, dag_schema, is_active, created_by)
SELECT 'lifecycle_v1', 'E2E lifecycle orchestration', 1, '{
    "stages": [
      {"id": "discover", "next": ["qualify"], "capability": "opportunity"},
      {"id": "qualify", "next": ["target_design"], "capability": "assessment"},
      {"id": "target_design", "next": ["value_realization"], "capability": "design"},
      {"id": "value_realization", "next": ["integrity"], "capability": "execution"},
      {"id": "integrity", "next": [], "capability": "governance"}
    ],
    "edges": [
      {"from": "discover", "to": "qualify"},
      {"from": "qualify", "to": "target_design"},
      {"from": "target_design", "to": "value_realization"},
      {"from": "value_realization", "to": "integrity"}
    ]
  }'::jsonb, true, auth.uid()
WHERE NOT EXISTS (SELECT 1 FROM workflow_definitions WHERE name = 'lifecycle_v1')
ON CONFLICT (name, version) DO NOTHING;

INSERT INTO agents (name, description, kind)
VALUES
  ('Opportunity Agent', 'Finds value opportunities in a customer profile', 'python'),
  ('Assessment Agent',  'Scores and qualifies opportunities', 'python'),
  ('Design Agent',      'Sets value targets for qualified opportunities', 'python'),
  ('Realization Agent', 'Measures realised value against targets', 'python'),
  ('Integrity Agent',   'Checks that the lifecycle''s figures reconcile', 'python')
ON CONFLICT (name) DO NOTHING;

-- the runbook's section 7 statement, as written
INSERT INTO agent_ontologies (agent_id, domain, knowledge, version)
SELECT a.id, 'orchestration', jsonb_build_object('capability', c.capability), 1
FROM (VALUES ('opportunity','Opportunity Agent'),('assessment','Assessment Agent'),('design','Design Agent'),('execution','Realization Agent'),('governance','Integrity Agent')) AS c(capability, agent_name)
JOIN agents a ON a.name = c.agent_name
ON CONFLICT (agent_id, domain, version) DO NOTHING;
