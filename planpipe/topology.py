"""Cluster topology: which region each database cluster belongs to, and that region's topics.

Routing guide, "Cluster Topology: directs plans to region-specific log indices for data
residency compliance". A region has its own topic pair (by default `{topic}.{region}` and
`{topic}.{region}.dlq`), its own consumer groups and its own Parquet directory, so a plan
captured in one region is stored only by that region's ingest. Clusters no region names
stay on the base topics.

The topology is a small JSON file named by PLANPIPE_TOPOLOGY_FILE; cluster ids are exact or
shell-style globs, `topic`/`dlq_topic` are optional:

    {"regions": {
        "eu": {"clusters": ["pg-eu-*", "billing-fra"]},
        "us": {"clusters": ["pg-us-*"], "topic": "query-plans-us"}}}

PLANPIPE_REGION makes a process (ingest, replay, the Dagster code location, `planpipe up`)
work on one region's topics, groups and data: `region_settings` below.
"""

import fnmatch
import functools
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import msgspec

from planpipe.errors import PlanpipeError

if TYPE_CHECKING:  # settings.py applies PLANPIPE_REGION through this module
    from planpipe.settings import Settings

_REGION_NAME: Final = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")


class TopologyError(PlanpipeError, ValueError):
    """The topology file is missing, unreadable or inconsistent."""


@dataclass(frozen=True, slots=True)
class Region:
    name: str
    clusters: tuple[str, ...]  # exact ids or globs
    topic: str
    dlq_topic: str

    def matches(self, cluster_id: str) -> bool:
        return any(fnmatch.fnmatchcase(cluster_id, pattern) for pattern in self.clusters)


@dataclass(frozen=True)
class Topology:
    regions: tuple[Region, ...] = ()

    def __post_init__(self) -> None:
        # Bounded memo per instance: capture agents see a handful of cluster ids.
        object.__setattr__(self, "_memo", {})

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(r.name for r in self.regions)

    def region(self, name: str) -> Region:
        for region in self.regions:
            if region.name == name:
                return region
        raise TopologyError(f"region {name!r} is not in the topology (regions: {', '.join(self.names) or 'none'})")

    def region_of(self, cluster_id: str) -> str | None:
        """The first region whose patterns match (file order); None: no region, base topics."""
        memo: dict[str, str | None] = self._memo  # type: ignore[attr-defined]
        if cluster_id in memo:
            return memo[cluster_id]
        found = next((r.name for r in self.regions if r.matches(cluster_id)), None)
        if len(memo) < 100_000:
            memo[cluster_id] = found
        return found

    def topics(self, region: str | None, settings: "Settings") -> tuple[str, str]:
        """(topic, DLQ topic) of a region; the base ones for None."""
        if region is None:
            return settings.topic, settings.dlq_topic
        chosen = self.region(region)
        return chosen.topic, chosen.dlq_topic


def parse_topology(data: Mapping[str, Any], base_topic: str) -> Topology:
    regions_raw = data.get("regions") or {}
    if not isinstance(regions_raw, Mapping):
        raise TopologyError("`regions` must be a mapping of region name → {clusters: [...]}")
    regions = []
    for name, spec in regions_raw.items():
        if not isinstance(name, str) or not _REGION_NAME.match(name):
            raise TopologyError(f"region name {name!r} must be 1-32 of a-z, 0-9, '-', '_'")
        if not isinstance(spec, Mapping) or not isinstance(spec.get("clusters"), list) or not spec["clusters"]:
            raise TopologyError(f"region {name!r} needs a non-empty `clusters` list")
        clusters = tuple(str(c) for c in spec["clusters"])
        topic = str(spec.get("topic") or f"{base_topic}.{name}")
        regions.append(Region(name, clusters, topic, str(spec.get("dlq_topic") or f"{topic}.dlq")))
    topics = [t for r in regions for t in (r.topic, r.dlq_topic)]
    if len(set(topics)) != len(topics) or base_topic in topics:
        raise TopologyError("every region needs topics of its own (and none may be the base topic)")
    return Topology(tuple(regions))


@functools.cache
def _load(path: str, base_topic: str) -> Topology:
    try:
        data = msgspec.json.decode(Path(path).read_bytes())
    except (OSError, msgspec.DecodeError) as error:
        raise TopologyError(f"PLANPIPE_TOPOLOGY_FILE {path}: {error}") from error
    if not isinstance(data, Mapping):
        raise TopologyError(f"PLANPIPE_TOPOLOGY_FILE {path}: expected a mapping with `regions`")
    return parse_topology(data, base_topic)


def load_topology(settings: "Settings", environ: Mapping[str, str] | None = None) -> Topology:
    """The topology of PLANPIPE_TOPOLOGY_FILE (read once per process); empty when unset."""
    env = os.environ if environ is None else environ
    path = env.get("PLANPIPE_TOPOLOGY_FILE", "").strip()
    return _load(path, settings.topic) if path else Topology()


def region_settings(settings: "Settings", region: str, topology: Topology | None = None) -> "Settings":
    """The settings of one region (from the base settings): its topics, consumer groups and Parquet directory."""
    if settings.region is not None:
        raise TopologyError(f"settings are already those of region {settings.region!r}")
    chosen = (topology or load_topology(settings)).region(region)
    return replace(
        settings,
        region=region,
        topic=chosen.topic,
        dlq_topic=chosen.dlq_topic,
        consumer_group=f"{settings.consumer_group}.{region}",
        replay_group=f"{settings.replay_group}.{region}",
        data_dir=settings.data_dir / f"region={region}",
    )


def apply_region(settings: "Settings", environ: Mapping[str, str] | None = None) -> "Settings":
    """PLANPIPE_REGION set: the region's settings; else `settings` unchanged."""
    env = os.environ if environ is None else environ
    region = env.get("PLANPIPE_REGION", "").strip()
    if not region:
        return settings
    return region_settings(settings, region, load_topology(settings, env))
