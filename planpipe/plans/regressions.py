"""Plan-regression detection, one import away: the statistics (`stats`), the verdicts
(`verdicts`), the statistical core (`detection`), the findings store (`findings`) and
remediation (`remediation`) live in their own modules; this module re-exports what
callers use."""

from planpipe.plans.detection import Analysis, DetectionStats, SettledBaseline, find_regressions, scan_observations
from planpipe.plans.findings import (
    DETECTOR,
    FINDINGS_LOCK,
    DetectionResult,
    Regression,
    RegressionNotFoundError,
    RegressionStatus,
    acknowledge_regression,
    current_baselines,
    detect_regressions,
    get_regression,
    list_regressions,
    open_regression_candidates,
)
from planpipe.plans.stats import MannWhitney, SampleStats, benjamini_hochberg, find_change, mann_whitney_u
from planpipe.plans.verdicts import (
    FINDING_KINDS,
    REGRESSION_KINDS,
    ClusterSlowdown,
    Comparison,
    DetectionConfig,
    Evidence,
    FindingKind,
    Kind,
    Severity,
    Verdict,
    classify,
    severity_of,
)

__all__ = [
    "DETECTOR",
    "FINDINGS_LOCK",
    "FINDING_KINDS",
    "REGRESSION_KINDS",
    "Analysis",
    "ClusterSlowdown",
    "Comparison",
    "DetectionConfig",
    "DetectionResult",
    "DetectionStats",
    "Evidence",
    "FindingKind",
    "Kind",
    "MannWhitney",
    "Regression",
    "RegressionNotFoundError",
    "RegressionStatus",
    "SampleStats",
    "SettledBaseline",
    "Severity",
    "Verdict",
    "acknowledge_regression",
    "benjamini_hochberg",
    "classify",
    "current_baselines",
    "detect_regressions",
    "find_change",
    "find_regressions",
    "get_regression",
    "list_regressions",
    "mann_whitney_u",
    "open_regression_candidates",
    "scan_observations",
    "severity_of",
]
