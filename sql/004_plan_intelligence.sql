-- Plan intelligence: who changed a plan's status and why, the baseline each query is
-- compared against, and regression findings with their evidence and plan diff.
SET search_path TO planpipe;

-- Append-only audit of plan status changes made by people (or jobs acting for them).
-- No foreign key to plan_baselines: the audit must outlive baseline rows removed by retention.
CREATE TABLE plan_status_history (
    id           bigserial   PRIMARY KEY,
    cluster_id   text        NOT NULL,
    query_hash   text        NOT NULL,
    fingerprint  text        NOT NULL,
    old_status   text        NOT NULL,
    new_status   text        NOT NULL CHECK (new_status IN ('accepted', 'candidate', 'rejected')),
    changed_by   text        NOT NULL,
    changed_at   timestamptz NOT NULL DEFAULT now(),
    reason       text
);
CREATE INDEX plan_status_history_query ON plan_status_history (cluster_id, query_hash, changed_at);

-- Several plans of a query may be accepted (as SQL Plan Management allows); the one a
-- query is compared against is the most recently accepted. Every reader uses this view
-- so "the baseline" means the same thing in detection, the CLI and the Dagster jobs.
CREATE VIEW current_baselines AS
SELECT DISTINCT ON (cluster_id, query_hash)
       cluster_id, query_hash, fingerprint, plan_version, status_by, status_at
FROM plan_baselines
WHERE status = 'accepted'
ORDER BY cluster_id, query_hash, status_at DESC NULLS LAST, plan_version DESC;

-- One row per finding. A finding is updated in place by later detection runs while it is
-- unresolved (partial unique index below); once resolved, a recurrence opens a new row.
CREATE TABLE plan_regressions (
    id                   bigserial   PRIMARY KEY,
    cluster_id           text        NOT NULL,
    query_hash           text        NOT NULL,
    baseline_fingerprint text        NOT NULL,
    new_fingerprint      text        NOT NULL,  -- = baseline_fingerprint for same_plan_slower
    kind                 text        NOT NULL
                         CHECK (kind IN ('plan_flip_regression', 'plan_flip_improvement', 'same_plan_slower')),
    severity             text        NOT NULL CHECK (severity IN ('info', 'medium', 'high', 'critical')),
    evidence             jsonb       NOT NULL,
    diff_markdown        text        NOT NULL,
    status               text        NOT NULL DEFAULT 'open'
                         CHECK (status IN ('open', 'acknowledged', 'resolved')),
    first_detected       timestamptz NOT NULL DEFAULT now(),
    last_detected        timestamptz NOT NULL DEFAULT now(),
    detections           integer     NOT NULL DEFAULT 1,
    acknowledged_by      text,
    acknowledged_at      timestamptz,
    acknowledged_note    text,
    resolved_at          timestamptz,
    resolved_by          text,
    resolution           text,
    CHECK (status <> 'acknowledged' OR (acknowledged_by IS NOT NULL AND acknowledged_at IS NOT NULL)),
    CHECK (status <> 'resolved' OR resolved_at IS NOT NULL)
);
CREATE UNIQUE INDEX plan_regressions_unresolved
    ON plan_regressions (cluster_id, query_hash, new_fingerprint, kind) WHERE status <> 'resolved';
CREATE INDEX plan_regressions_last_detected ON plan_regressions (last_detected);
-- The router's regression_candidate set is read from here every few seconds.
CREATE INDEX plan_regressions_open ON plan_regressions (query_hash) WHERE status = 'open';
