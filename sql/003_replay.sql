-- DLQ replay: what the correction job parked (could not correct) and what it republished.
-- Both are keyed by the DLQ record's coordinates and written with ON CONFLICT DO NOTHING
-- in the same step as the Kafka transaction that advances the replay group's offsets,
-- so a replay that is retried after a crash never records a message twice.
SET search_path TO planpipe;

CREATE TABLE dlq_parked (
    dlq_topic        text        NOT NULL,
    dlq_partition    integer     NOT NULL,
    dlq_offset       bigint      NOT NULL,
    value            bytea       NOT NULL,             -- the original bytes, untouched
    key              bytea,
    headers          jsonb       NOT NULL,             -- [[name, value], ...] as read from the DLQ
    reason           text,                             -- planpipe-reason (NULL: header missing)
    field            text,                             -- planpipe-field
    detail           text,                             -- planpipe-detail
    stage            text,                             -- planpipe-stage: router or ingest
    why              text        NOT NULL,             -- why the replay could not correct it
    rules_applied    text[]      NOT NULL DEFAULT '{}',
    source_topic     text,
    source_partition integer,
    source_offset    bigint,
    trace_id         text,
    replay_group     text        NOT NULL,
    parked_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (dlq_topic, dlq_partition, dlq_offset)
);
CREATE INDEX dlq_parked_parked_at ON dlq_parked (parked_at);
-- The DLQ is at-least-once: the same source record may be dead-lettered twice.
CREATE INDEX dlq_parked_source ON dlq_parked (source_topic, source_partition, source_offset)
    WHERE source_topic IS NOT NULL;

CREATE TABLE dlq_replays (
    dlq_topic        text        NOT NULL,
    dlq_partition    integer     NOT NULL,
    dlq_offset       bigint      NOT NULL,
    outcome          text        NOT NULL CHECK (outcome IN ('republished', 'sampled_out', 'duplicate')),
    rules            text[]      NOT NULL,             -- correction rules applied, in order
    reason           text,
    target_topic     text,
    new_key          text,                             -- "{priority}:{query_hash}"
    source_topic     text,
    source_partition integer,
    source_offset    bigint,
    trace_id         text,
    replay_group     text        NOT NULL,
    replayed_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (dlq_topic, dlq_partition, dlq_offset)
);
CREATE INDEX dlq_replays_replayed_at ON dlq_replays (replayed_at);
CREATE INDEX dlq_replays_source ON dlq_replays (source_topic, source_partition, source_offset)
    WHERE source_topic IS NOT NULL;
