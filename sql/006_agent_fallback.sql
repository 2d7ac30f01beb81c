-- Capture agents (`planpipe agent`): the fallback mode an operator or the broker-health sensor
-- sets (runbook fallback 3: Kafka degraded, UnderReplicatedPartitions > 5 for > 2 min → the
-- agents write to their Redis last-resort queue), and envelopes agents dropped (Redis TTL).
SET search_path TO planpipe;

CREATE TABLE agent_fallback_mode (
    scope      text        PRIMARY KEY,  -- an agent's name, or '*' for every agent
    mode       text        NOT NULL CHECK (mode IN ('auto', 'redis')),
    reason     text        NOT NULL DEFAULT '',
    set_by     text        NOT NULL DEFAULT '',
    set_at     timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz           -- NULL: until changed; a sensor that stops renewing reverts to auto
);

-- Envelopes a capture agent accepted but never delivered (expired in its Redis queue): counted, never silent.
ALTER TABLE capture_counts ADD COLUMN dropped bigint NOT NULL DEFAULT 0;
