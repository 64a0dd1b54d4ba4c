"""Benchmark tools: ``benchmarks.loadgen`` (closed-loop load) and ``benchmarks.plot`` (figures)."""
