"""The benchmark harness of issue 7: ``bench/run`` (see README, "Benchmarks")."""
