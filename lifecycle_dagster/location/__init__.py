"""The Dagster code location: definitions, the job factory, resources, sensors, the Dagster instance."""
