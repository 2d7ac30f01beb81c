"""Kafka cluster health as the runbook reads it: under-replicated and offline partitions,
and the decision when capture agents must switch to the last-resort fallback path."""
