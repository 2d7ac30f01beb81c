"""Find the records a sink rejects, so one bad record never holds back its batch.

When PostgreSQL or the Parquet writer refuses a batch for a data reason, the
batch is bisected with trial writes that are always rolled back (or written to
memory) until each failing record stands alone. Those records become dead
letters (reason `sink_rejected`, the sink's message as detail, the source
coordinates in headers); the rest of the batch commits with the batch's full
offset ranges, so the rejected records are never consumed again.
"""

from collections.abc import Callable, Sequence
from dataclasses import fields

from planpipe.contract import Reason
from planpipe.ingest.batch import KafkaRecord, Observations, PreparedBatch, dead_letter

# Returns None when the sinks accept these observations, else why they refused.
Trial = Callable[[PreparedBatch], str | None]


def subset(batch: PreparedBatch, indices: Sequence[int]) -> PreparedBatch:
    """The batch restricted to some observations (same offset ranges, no dead letters)."""
    source = batch.observations
    picked = Observations(**{f.name: [getattr(source, f.name)[i] for i in indices] for f in fields(Observations)})
    fingerprints = set(picked.fingerprint)
    return PreparedBatch(
        observations=picked,
        dead_letters=[],
        offset_ranges=batch.offset_ranges,
        consumed=len(indices),
        dropped_low=0,
        new_plan_samples={fp: text for fp, text in batch.new_plan_samples.items() if fp in fingerprints},
    )


def find_rejects(batch: PreparedBatch, trial: Trial) -> dict[int, str]:
    """Indices of the observations the sinks refuse on their own, with the sink's reason.

    Empty when every record passes alone (the failure needs a combination, or was
    not about the data after all): the caller then retries the batch as a whole.
    """
    rejects: dict[int, str] = {}
    pending: list[list[int]] = [list(range(len(batch.observations)))]
    while pending:
        indices = pending.pop()
        reason = trial(subset(batch, indices))
        if reason is None:
            continue
        if len(indices) == 1:
            rejects[indices[0]] = reason
            continue
        middle = len(indices) // 2
        pending += [indices[middle:], indices[:middle]]
    return rejects


def without_rejects(
    batch: PreparedBatch,
    rejects: dict[int, str],
    records: Sequence[KafkaRecord],
) -> PreparedBatch:
    """The batch minus the rejected observations, which join its dead letters."""
    by_coordinates = {(r.topic(), r.partition(), r.offset()): r for r in records}
    obs = batch.observations
    dead = list(batch.dead_letters)
    for index, reason in sorted(rejects.items()):
        record = by_coordinates[(obs.kafka_topic[index], obs.kafka_partition[index], obs.kafka_offset[index])]
        dead.append(dead_letter(record, record.value(), Reason.SINK_REJECTED, None, reason))
    kept = [i for i in range(len(obs)) if i not in rejects]
    remaining = subset(batch, kept)
    return PreparedBatch(
        observations=remaining.observations,
        dead_letters=dead,
        offset_ranges=batch.offset_ranges,
        consumed=batch.consumed,
        dropped_low=batch.dropped_low,
        new_plan_samples=remaining.new_plan_samples,
    )
