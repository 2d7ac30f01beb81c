-- Settled capture counts for lag reconciliation. A capture agent writes one when nothing of its own is
-- in flight (no batch between hand-off and count, spool and Redis empty): its cumulative count of
-- records durable on `topic` together with the topic's end offsets read at that moment. Of the records
-- below those offsets, exactly `captured` are the agent's, so a lag sample with the same end offsets
-- (nothing appended in between) knows the agent's share of what reached the topic, to the record.
SET search_path TO planpipe;

CREATE TABLE capture_checkpoints (
    agent           text        NOT NULL,
    topic           text        NOT NULL,
    taken_at        timestamptz NOT NULL DEFAULT clock_timestamp(),
    kind            text        NOT NULL CHECK (kind IN ('start', 'idle', 'stop')),
    high_watermarks bigint[]    NOT NULL,  -- by partition
    captured        bigint      NOT NULL,  -- cumulative, as in the agent's state (all hours)
    dropped         bigint      NOT NULL,
    PRIMARY KEY (agent, topic, taken_at)
);
CREATE INDEX capture_checkpoints_topic_taken_at ON capture_checkpoints (topic, taken_at);
