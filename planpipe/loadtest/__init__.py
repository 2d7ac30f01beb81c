"""The runbook's replay test: synthetic plan envelopes at 2x production throughput against the stack,
with a broker outage in the middle, verified end to end (`planpipe loadtest`)."""
