"""Data quality: the Great Expectations observations suite and schema drift detection.

Engine code, free of Dagster: asset checks and the nightly drift job call
`validate_observations` and `detect_drift` and turn `to_metadata()` /
`to_markdown()` into check metadata. GX itself is imported on first use.
"""

from planpipe.quality.drift import detect_drift
from planpipe.quality.drift_report import DriftFinding, DriftReport
from planpipe.quality.suites import FailedExpectation, SuiteResult, validate_observations

__all__ = [
    "DriftFinding",
    "DriftReport",
    "FailedExpectation",
    "SuiteResult",
    "detect_drift",
    "validate_observations",
]
