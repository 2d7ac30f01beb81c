-- Plan intelligence driven by evidence (issue 11): cluster-wide slowdowns are findings of their
-- own, improvements are closed as 'improvement' when detected (nothing to act on), and each
-- finding carries the remediation an engineer can apply (missing index, statistics, a
-- pg_hint_plan hint that forces the baseline plan).
SET search_path TO planpipe;

ALTER TABLE plan_regressions DROP CONSTRAINT plan_regressions_kind_check;
ALTER TABLE plan_regressions ADD CONSTRAINT plan_regressions_kind_check
    CHECK (kind IN ('plan_flip_regression', 'plan_flip_improvement', 'same_plan_slower', 'cluster_slowdown'));

ALTER TABLE plan_regressions DROP CONSTRAINT plan_regressions_status_check;
ALTER TABLE plan_regressions ADD CONSTRAINT plan_regressions_status_check
    CHECK (status IN ('open', 'acknowledged', 'resolved', 'improvement'));

-- When the change began (the change point, or the new plan's first execution), and what to do.
ALTER TABLE plan_regressions ADD COLUMN started_at timestamptz;
ALTER TABLE plan_regressions ADD COLUMN remediation jsonb NOT NULL DEFAULT '{}'::jsonb;
