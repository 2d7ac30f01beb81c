"""The ingest's one decode per plan (fingerprint and work together) over the bench's real plans.

`planpipe bench ingest` captures 360 plans of a TPC-H-like schema under EXPLAIN (ANALYZE,
BUFFERS); the ingest reads each plan's fingerprint and top-node work in one msgspec pass.
Stored catalogs hold fingerprints of the two-pass code, so the single pass must give the same
fingerprint as `fingerprint` alone, and the work stdlib json reads from the same text.
"""

import msgspec

from planpipe.bench import workload
from planpipe.contract import EnvelopeDecoder
from planpipe.ingest.batch import prepare_batch
from planpipe.plans.fingerprint import fingerprint, fingerprint_and_work
from planpipe.routing.router import RoutingConfig
from planpipe.settings import Settings
from planpipe_tests.unit.ingest.test_latency_and_batch import Record
from planpipe_tests.unit.plans._fixtures import expected_work


def test_one_decode_gives_the_fingerprint_and_work_of_every_bench_plan(stack_settings: Settings) -> None:
    workload.ensure_schema(stack_settings.pg_dsn)
    plans = workload.capture(stack_settings.pg_dsn, compact=False)
    assert len({p.query_hash for p in plans}) == 120
    for plan in plans:
        decoded = msgspec.json.decode(plan.plan_text)
        # Server text (pretty-printed), the runbook producer's compact form, auto_explain's object.
        for text in (plan.plan_text, msgspec.json.encode(decoded).decode(), msgspec.json.encode(decoded[0]).decode()):
            found, work = fingerprint_and_work(text)
            assert found == fingerprint(text), plan.query_text
            assert tuple(work.columns().values()) == expected_work(text), plan.query_text

    # The same through the ingest's batch step, on the bench's own envelopes (jittered timings).
    factory = workload.EnvelopeFactory(plans, 5 * 1024, ["pg-a", "pg-b", "pg-c"])
    envelopes = [factory.make(i, 1_790_000_000.0 + i, 1_790_000_001.0 + i) for i in range(1500)]
    batch = prepare_batch(
        [Record(value, i, key) for i, (key, value) in enumerate(envelopes)], EnvelopeDecoder(), RoutingConfig()
    )
    obs = batch.observations
    assert len(obs) == len(envelopes) and not batch.dead_letters
    for i, text in enumerate(obs.plan_text):
        assert obs.fingerprint[i] == fingerprint(text)
        assert (obs.shared_blocks[i], obs.temp_blocks[i], obs.top_rows[i], obs.top_loops[i]) == expected_work(text)
    assert len(set(obs.fingerprint)) > 100  # the workload's distinct plans, not one repeated
