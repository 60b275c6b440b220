"""Load benchmarks of the gateway (run on 127.0.0.1 only)."""
