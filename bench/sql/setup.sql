-- bench: the agents of the benchmark (only where absent). The queue agent is served by external
-- workers (kind queue); the no-op and failing agents run inside stage calls (kind python).
INSERT INTO agents (name, description, kind)
VALUES ('Bench Queue Agent', 'bench: no-op agent served by external workers', 'queue'),
       ('Bench Noop Agent', 'bench: no-op agent', 'python'),
       ('Bench Fail Agent', 'bench: always fails (not retryable)', 'python')
ON CONFLICT (name) DO NOTHING;

INSERT INTO agent_ontologies (agent_id, domain, knowledge, version)
SELECT a.id, 'orchestration', jsonb_build_object('capability', c.capability), 1
FROM (VALUES ('bench_queue', 'Bench Queue Agent'), ('bench_noop', 'Bench Noop Agent'),
             ('bench_fail', 'Bench Fail Agent')) AS c(capability, agent_name)
JOIN agents a ON a.name = c.agent_name
ON CONFLICT (agent_id, domain, version) DO NOTHING;
