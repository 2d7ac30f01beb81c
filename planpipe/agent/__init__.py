"""`planpipe agent`: one long-running capture process per database cluster.

It tails the cluster's auto_explain log (and optionally samples the top
pg_stat_statements statements live), routes every envelope through the router
and producer (validation, routing, sampling, spool, breaker) and, when Kafka is
degraded, through the Redis last-resort queue. Its log cursor advances only
after a batch is acknowledged by Kafka or durable in the spool or Redis; a
restart after `kill -9` reconciles the batch in doubt against Kafka, the spool
and Redis, so nothing is lost and nothing is published twice.

Modules: `config` (file + flags), `state` (the agent's SQLite: cursor, batches
in doubt, capture counts), `ledger` (capture ids, watermark snapshots, finding
ids in Kafka), `recovery`, `publisher` (router + producer), `handoff` (producer or Redis, the drainer),
`source` (the auto_explain reader with capture ids), `sampler` (live EXPLAIN
ANALYZE), `mode` (the fallback-mode hook), `counts`, `server` (metrics and
health on 127.0.0.1), `runner` (the process), `cli`.
"""
