"""Dagster wiring of Kafka broker health (observations, check, fallback-mode sensor) and the trace SLA check."""
