"""DLQ replay and schema correction: `run_replay` republishes corrected envelopes, parks the rest."""

from planpipe.replay.engine import ReplaySummary, run_replay
from planpipe.replay.rules import RULES, Corrected, Rule, Uncorrectable, correct
from planpipe.replay.store import parked_messages

__all__ = ["RULES", "Corrected", "ReplaySummary", "Rule", "Uncorrectable", "correct", "parked_messages", "run_replay"]
