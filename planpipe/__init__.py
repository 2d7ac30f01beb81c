"""planpipe: query-plan baselines and plan-regression detection (see README.md)."""

import os

# polars allocates through jemalloc (its variables carry the `_RJEM_` prefix), which by default
# keeps freed memory in 4 arenas per CPU: on the 10 M-observation detection bench most of the
# peak RSS was memory freed and kept. One arena per CPU, set before polars loads, cut that peak
# from 321-331 MB to 261-278 MB at the same speed (bench/DETECT.md); a value set by the user wins.
os.environ.setdefault("_RJEM_MALLOC_CONF", f"narenas:{os.cpu_count() or 1}")
