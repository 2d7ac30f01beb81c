"""The Kafka vocabulary the producing side (`routing/`) and the consuming side (`ingest/`,
`replay/`) share: message keys, routes and retention, header names, the metrics registry, and
the consumer-loop base of the two consuming engines.

Neutral ground: nothing here imports `routing/`, `ingest/` or `replay/`, so both sides may import it.
"""
