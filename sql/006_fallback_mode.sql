-- The capture agents' fallback mode, set by the broker_health_sensor (runbook fallback 3:
-- UnderReplicatedPartitions > 5 for > 2 min → route to the Redis queue) and read by every
-- agent with a short TTL cache. One row per Kafka cluster (its bootstrap servers).
SET search_path TO planpipe;

CREATE TABLE kafka_fallback_mode (
    cluster     text        PRIMARY KEY,
    mode        text        NOT NULL CHECK (mode IN ('kafka', 'redis')),
    reason      text        NOT NULL,
    changed_at  timestamptz NOT NULL DEFAULT now(),
    checked_at  timestamptz NOT NULL DEFAULT now()
);
