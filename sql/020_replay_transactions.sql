-- One row per replay Kafka transaction, written in the PostgreSQL transaction that records its
-- decisions. Transaction markers (one per partition written, at commit or abort) and aborted records
-- take offsets of the main topic that no consumer ever sees: lag reconciliation subtracts them.
SET search_path TO planpipe;

CREATE TABLE replay_transactions (
    id            bigserial   PRIMARY KEY,
    replay_group  text        NOT NULL,
    target_topic  text        NOT NULL,
    partitions    integer[]   NOT NULL,  -- partitions of target_topic the transaction wrote to
    records       integer     NOT NULL,
    outcome       text        NOT NULL DEFAULT 'committed' CHECK (outcome IN ('committed', 'aborted')),
    recorded_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX replay_transactions_recorded_at ON replay_transactions (recorded_at);
