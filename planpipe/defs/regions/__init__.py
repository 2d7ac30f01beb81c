"""Dagster wiring per region of the cluster topology (data residency): each region's topic asset,
ingest job and lag sensor."""
