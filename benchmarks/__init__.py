"""Benchmarks: scripts that print tables and write JSON, run from the repository root as `python -m benchmarks.NAME`."""
