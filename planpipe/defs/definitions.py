"""The one Definitions object of the code location, merged from the domain modules."""

import dagster as dg

defs = dg.Definitions.merge(
    dg.Definitions(),
)
