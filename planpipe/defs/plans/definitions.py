"""The plans domain's definitions: plan regressions, their status job and automation."""

import dagster as dg

from planpipe.defs.plans.assets import plan_regressions, plan_status_job, regressions_automation

plans_defs = dg.Definitions(
    assets=[plan_regressions],
    jobs=[plan_status_job],
    sensors=[regressions_automation],
)
