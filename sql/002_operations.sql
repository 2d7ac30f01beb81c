-- Operational records written by the Dagster code location: lag samples taken by the
-- lag sensor (the lag SLA reads a window of them) and run failures it surfaces.
SET search_path TO planpipe;

CREATE TABLE lag_samples (
    consumer_group text        NOT NULL,
    topic          text        NOT NULL,
    partition      integer     NOT NULL,
    sampled_at     timestamptz NOT NULL DEFAULT now(),
    high_watermark bigint      NOT NULL,
    committed      bigint      NOT NULL,
    lag            bigint      NOT NULL,
    PRIMARY KEY (consumer_group, topic, partition, sampled_at)
);
CREATE INDEX lag_samples_sampled_at ON lag_samples (sampled_at);

CREATE TABLE run_failures (
    run_id      text        PRIMARY KEY,
    job_name    text        NOT NULL,
    failed_at   timestamptz NOT NULL DEFAULT now(),
    message     text        NOT NULL
);

-- Envelopes accepted by capture agents per hour, for lag reconciliation against
-- what the consumers committed (runbook: a divergence means silent drops).
CREATE TABLE capture_counts (
    agent       text        NOT NULL,
    topic       text        NOT NULL,
    hour        timestamptz NOT NULL,
    published   bigint      NOT NULL,
    PRIMARY KEY (agent, topic, hour)
);
