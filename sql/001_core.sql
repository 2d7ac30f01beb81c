-- planpipe core schema: catalogs, baselines, rollups, ingestion stats, consumer offsets.
-- Latency distributions are sparse log-scale histograms {bucket: count} (see
-- planpipe/plans/latency.py): adding counts per bucket merges them exactly under upserts.

CREATE SCHEMA IF NOT EXISTS planpipe;
SET search_path TO planpipe;

CREATE OR REPLACE FUNCTION planpipe.hist_add(a jsonb, b jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT coalesce(jsonb_object_agg(bucket, total), '{}'::jsonb)
    FROM (
        SELECT bucket, sum(count::bigint) AS total
        FROM (
            SELECT key AS bucket, value AS count FROM jsonb_each_text(coalesce(a, '{}'::jsonb))
            UNION ALL
            SELECT key, value FROM jsonb_each_text(coalesce(b, '{}'::jsonb))
        ) AS both_sides
        GROUP BY bucket
    ) AS merged
$$;

CREATE TABLE query_catalog (
    cluster_id     text        NOT NULL,
    query_hash     text        NOT NULL,
    query_type     text,
    query_text     text,
    first_seen     timestamptz NOT NULL,
    last_seen      timestamptz NOT NULL,
    PRIMARY KEY (cluster_id, query_hash)
);

CREATE TABLE plan_catalog (
    fingerprint      text        PRIMARY KEY,
    normalized_plan  jsonb       NOT NULL,
    summary          text        NOT NULL,
    sample_plan_text text        NOT NULL,
    first_seen       timestamptz NOT NULL DEFAULT now()
);

-- One row per (cluster, query, plan). plan_version numbers the plans of a query in
-- order of first appearance; status follows SQL Plan Management: accepted/candidate/rejected.
CREATE TABLE plan_baselines (
    cluster_id      text             NOT NULL,
    query_hash      text             NOT NULL,
    fingerprint     text             NOT NULL REFERENCES plan_catalog (fingerprint),
    plan_version    integer          NOT NULL,
    status          text             NOT NULL DEFAULT 'candidate'
                    CHECK (status IN ('accepted', 'candidate', 'rejected')),
    status_by       text,
    status_at       timestamptz,
    first_seen      timestamptz      NOT NULL,
    last_seen       timestamptz      NOT NULL,
    executions      bigint           NOT NULL,
    total_time_sum  double precision NOT NULL,
    total_time_min  double precision NOT NULL,
    total_time_max  double precision NOT NULL,
    rows_sum        numeric          NOT NULL,
    latency_hist    jsonb            NOT NULL,
    PRIMARY KEY (cluster_id, query_hash, fingerprint)
);
-- Runbook: missing composite indexes on (query_hash, plan_version) cause lock contention.
CREATE INDEX plan_baselines_query_version ON plan_baselines (query_hash, plan_version);

CREATE TABLE plan_rollups_hourly (
    cluster_id      text             NOT NULL,
    query_hash      text             NOT NULL,
    fingerprint     text             NOT NULL,
    hour            timestamptz      NOT NULL,
    route           text             NOT NULL,
    executions      bigint           NOT NULL,
    total_time_sum  double precision NOT NULL,
    rows_sum        numeric          NOT NULL,
    latency_hist    jsonb            NOT NULL,
    PRIMARY KEY (cluster_id, query_hash, fingerprint, hour)
);
CREATE INDEX plan_rollups_hourly_hour ON plan_rollups_hourly (hour);

-- The source of truth for where each consumer group resumes. Written in the same
-- transaction as the baseline upserts; Kafka offsets are committed only afterwards.
CREATE TABLE consumer_offsets (
    consumer_group text        NOT NULL,
    topic          text        NOT NULL,
    partition      integer     NOT NULL,
    next_offset    bigint      NOT NULL,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, topic, partition)
);

CREATE TABLE ingest_batches (
    batch_id          bigserial        PRIMARY KEY,
    consumer_group    text             NOT NULL,
    committed_at      timestamptz      NOT NULL DEFAULT now(),
    offset_ranges     jsonb            NOT NULL,  -- [{"topic","partition","first","last"}]
    consumed          integer          NOT NULL,
    valid             integer          NOT NULL,
    dlq               integer          NOT NULL,
    dropped_low       integer          NOT NULL DEFAULT 0,
    p50_latency_ms    double precision,
    p95_latency_ms    double precision,
    max_latency_ms    double precision,
    lock_wait_ms      double precision NOT NULL,
    duration_ms       double precision NOT NULL,
    parquet_files     jsonb            NOT NULL
);
CREATE INDEX ingest_batches_committed_at ON ingest_batches (committed_at);
