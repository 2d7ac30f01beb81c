-- One row per sampled envelope (PLANPIPE_TRACE_SAMPLE_PCT, runbook: 1 %) once its batch
-- committed: the trace's publish → commit time, for the trace_sla check. The spans
-- themselves go to the OTLP collector when one is configured.
SET search_path TO planpipe;

CREATE TABLE trace_samples (
    trace_id              text             PRIMARY KEY,
    query_hash            text             NOT NULL,
    cluster_id            text             NOT NULL,
    consumer_group        text             NOT NULL,
    published_at          timestamptz      NOT NULL,
    committed_at          timestamptz      NOT NULL,
    publish_to_commit_ms  double precision NOT NULL,
    batch_id              bigint           NOT NULL
);
CREATE INDEX trace_samples_committed_at ON trace_samples (committed_at);
