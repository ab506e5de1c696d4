"""Benchmarks: scripts that measure the figures the issues ask for (not timed tests)."""
