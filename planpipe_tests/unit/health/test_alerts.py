"""deploy/prometheus/alerts.yml: every planpipe metric it names exists, and the broker rules hold
the runbook's thresholds."""

import re

import yaml
from prometheus_client import CollectorRegistry

from planpipe.agent import server  # noqa: F401 - registers the capture agent's metrics
from planpipe.ingest import metrics  # noqa: F401 - registers the ingest engine's metrics
from planpipe.routing import metrics as routing_metrics
from planpipe.routing import producer  # noqa: F401 - registers the producer's metrics
from planpipe.settings import REPO_ROOT

_OURS = re.compile(r"\b((?:explain_router|planpipe|kafka_consumer)_[a-z0-9_]+)")
_SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum")}


def _exported(*registries: CollectorRegistry) -> set[str]:
    names: set[str] = set()
    for registry in registries:
        for family in registry.collect():
            names.update(family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",)))
    return names


def _rules() -> dict[str, dict[str, object]]:
    doc = yaml.safe_load((REPO_ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    return {rule["alert"]: rule for group in doc["groups"] for rule in group["rules"]}


def test_every_planpipe_metric_in_the_alerts_is_exported() -> None:
    exported = _exported(routing_metrics.REGISTRY)
    named = {m for rule in _rules().values() for m in _OURS.findall(str(rule["expr"]))}
    assert named, "the rules name planpipe metrics"
    assert named <= exported, sorted(named - exported)


def test_broker_health_rules_hold_the_runbook_thresholds() -> None:
    rules = _rules()
    urp = rules["KafkaUnderReplicatedPartitions"]
    assert "UnderReplicatedPartitions" in str(urp["expr"]) and str(urp["expr"]).endswith("> 5")
    assert urp["for"] == "2m"
    iowait = rules["KafkaBrokerDiskIOWait"]
    assert 'mode="iowait"' in str(iowait["expr"]) and str(iowait["expr"]).endswith("> 0.65")
    assert "explain_router_request_timeouts_total" in str(rules["ProducerRequestTimeouts"]["expr"])
    assert "OfflinePartitionsCount" in str(rules["KafkaOfflinePartitions"]["expr"])
