"""Benchmarks of planpipe against its ceiling (the broker) and the runbook's reference consumer.

`planpipe bench ingest` (see `planpipe.bench.ingest` and bench/README.md).
Nothing here is imported by the pipeline itself.
"""
