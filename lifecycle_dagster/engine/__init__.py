"""The stage engine, with no Dagster in it: one stage attempt, one undo, calling an agent, the heartbeat."""
