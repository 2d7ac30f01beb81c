"""Dagster code location for planpipe. Only wiring lives under defs/: the engine never imports Dagster."""

from planpipe.defs.definitions import defs

__all__ = ["defs"]
