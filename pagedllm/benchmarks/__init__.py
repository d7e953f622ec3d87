"""Benchmarks: named workloads with a peer measured in the same run."""
