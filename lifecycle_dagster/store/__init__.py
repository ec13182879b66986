"""The database seam: connections, the SQL files and named queries, migrations, versions, audit and
invariant reads, the embedded server."""
