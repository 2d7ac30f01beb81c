"""Capture agents: turn PostgreSQL plans into envelopes.

- `explain`: run a workload under EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) — read-only or rolled back.
- `autoexplain`: read auto_explain JSON plans from jsonlog/csvlog/stderr server logs, across rotation and restarts.
- `sqltext`: statement splitting and classification (PostgreSQL's parser, via pglast), and the fallback query hash.
- `safety`: what live capture refuses: superusers, and functions with effects outside the transaction.
- `cli`: `planpipe capture explain|autoexplain`, writing envelopes as JSONL for the publish stage.
"""
