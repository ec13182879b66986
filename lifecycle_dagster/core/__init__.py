"""Pure model, no database and no Dagster: the DAG and its validator, retry policy, payload rules."""
