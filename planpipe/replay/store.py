"""What the DLQ replay records in PostgreSQL: parked and replayed letters, each replay transaction's
footprint on the topic, and which letters were already handled (so nothing is done twice).

Rows are keyed by DLQ coordinates and written ON CONFLICT DO NOTHING in the step before the Kafka
transaction commits: a batch replayed again after a crash never records a letter twice.
"""

import logging
from collections.abc import Sequence

import msgspec
import psycopg

from planpipe.messaging.headers import H_DETAIL, H_FIELD, H_STAGE
from planpipe.replay.decide import Coords, Decision, Park, Republish, Skip

logger = logging.getLogger("planpipe.replay")


def _columns(rows: Sequence[Coords]) -> tuple[list[str], list[int], list[int]]:
    # Coordinates as three arrays, for `unnest(%s::text[], %s::int[], %s::bigint[])`.
    return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]


def _text(value: str | None) -> str | None:
    # PostgreSQL text cannot hold NUL; headers and details may (they come from anywhere).
    return None if value is None else value.replace("\x00", "\ufffd")


class ReplayStore:
    """The replay's PostgreSQL connection and the statements it runs."""

    def __init__(self, dsn: str, *, replay_group: str, topic: str) -> None:
        self.replay_group = replay_group
        self.topic = topic
        self._conn = psycopg.connect(dsn, autocommit=True)
        try:
            self._conn.execute("SELECT 1 FROM planpipe.dlq_parked, planpipe.dlq_replays LIMIT 0")
        except psycopg.errors.UndefinedTable:
            self._conn.close()
            raise RuntimeError("planpipe.dlq_parked is missing: run `planpipe migrate` (sql/003_replay.sql)") from None

    def close(self) -> None:
        self._conn.close()

    def deduplicate(self, decisions: list[Decision]) -> list[Decision]:
        """Skip what was already handled, so nothing is republished or parked twice.

        Two cases. (1) The DLQ is at-least-once: a source record republished or parked
        from other DLQ coordinates is a duplicate. (2) A DLQ record recorded by another
        replay group was that group's to finish (e.g. a group created to re-read the
        DLQ). A row under our own coordinates from our own group is different: we see
        the record again only because that attempt's transaction aborted, so we redo it.
        """
        group = self.replay_group
        handled_elsewhere: set[Coords] = set()
        coords = [d.letter.coords for d in decisions]
        for row in self._conn.execute(
            """WITH wanted (t, p, o) AS (SELECT * FROM unnest(%s::text[], %s::int[], %s::bigint[]))
               SELECT dlq_topic, dlq_partition, dlq_offset FROM planpipe.dlq_replays
               JOIN wanted ON (dlq_topic, dlq_partition, dlq_offset) = (t, p, o) WHERE replay_group <> %s
               UNION
               SELECT dlq_topic, dlq_partition, dlq_offset FROM planpipe.dlq_parked
               JOIN wanted ON (dlq_topic, dlq_partition, dlq_offset) = (t, p, o) WHERE replay_group <> %s""",
            (*_columns(coords), group, group),
        ):
            handled_elsewhere.add((row[0], row[1], row[2]))

        handled: dict[Coords, set[Coords]] = {}  # source coordinates → DLQ coordinates that handled it
        sources = list({d.letter.source for d in decisions if d.letter.source is not None})
        if sources:
            for row in self._conn.execute(
                """WITH wanted (t, p, o) AS (SELECT * FROM unnest(%s::text[], %s::int[], %s::bigint[]))
                   SELECT source_topic, source_partition, source_offset, dlq_topic, dlq_partition, dlq_offset
                   FROM planpipe.dlq_replays
                   JOIN wanted ON (source_topic, source_partition, source_offset) = (t, p, o)
                   WHERE outcome <> 'duplicate'
                   UNION ALL
                   SELECT source_topic, source_partition, source_offset, dlq_topic, dlq_partition, dlq_offset
                   FROM planpipe.dlq_parked
                   JOIN wanted ON (source_topic, source_partition, source_offset) = (t, p, o)""",
                _columns(sources),
            ):
                handled.setdefault((row[0], row[1], row[2]), set()).add((row[3], row[4], row[5]))

        out: list[Decision] = []
        for decision in decisions:
            letter = decision.letter
            source = letter.source
            others = handled.get(source, set()) - {letter.coords} if source is not None else set()
            if letter.coords in handled_elsewhere or others:
                key = decision.key if isinstance(decision, Republish | Skip) else None
                out.append(Skip(letter, "duplicate", decision.rules, key))
                continue
            if source is not None and not isinstance(decision, Skip):
                handled.setdefault(source, set()).add(letter.coords)  # a later copy in this batch
            out.append(decision)
        return out

    def record(self, decisions: list[Decision], partitions: set[int], records: int) -> int | None:
        """Decisions and the transaction's footprint on the topic, in one PostgreSQL transaction;
        returns the replay_transactions row (None when nothing was written to the topic)."""
        parked, replays = [], []
        group = self.replay_group
        for d in decisions:
            letter = d.letter
            source = letter.source or (None, None, None)
            meta = letter.meta
            if isinstance(d, Park):
                headers_json = msgspec.json.encode([[n, _text(v.decode(errors="replace"))] for n, v in letter.headers])
                parked.append(
                    (*letter.coords, letter.value, letter.key, headers_json.decode(),
                     _text(letter.reason), _text(meta.get(H_FIELD)), _text(meta.get(H_DETAIL)),
                     _text(meta.get(H_STAGE)), _text(d.why), list(d.rules), *source, _text(letter.trace_id), group)
                )  # fmt: skip
            else:
                outcome = "republished" if isinstance(d, Republish) else d.outcome
                key = d.key.decode(errors="replace") if d.key is not None else None
                target = self.topic if isinstance(d, Republish) else None
                replays.append(
                    (*letter.coords, outcome, list(d.rules), _text(letter.reason), target, _text(key),
                     *source, _text(letter.trace_id), group)
                )  # fmt: skip
        with self._conn.transaction(), self._conn.cursor() as cur:
            if parked:
                cur.executemany(
                    """INSERT INTO planpipe.dlq_parked (dlq_topic, dlq_partition, dlq_offset, value, key, headers,
                           reason, field, detail, stage, why, rules_applied, source_topic, source_partition,
                           source_offset, trace_id, replay_group)
                       VALUES (%s, %s, %s, %s, %s, %s::jsonb, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
                       ON CONFLICT DO NOTHING""",
                    parked,
                )
            if replays:
                cur.executemany(
                    """INSERT INTO planpipe.dlq_replays (dlq_topic, dlq_partition, dlq_offset, outcome, rules,
                           reason, target_topic, new_key, source_topic, source_partition, source_offset, trace_id,
                           replay_group)
                       VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
                       ON CONFLICT DO NOTHING""",
                    replays,
                )
            if not partitions:
                return None
            row = cur.execute(
                """INSERT INTO planpipe.replay_transactions (replay_group, target_topic, partitions, records)
                   VALUES (%s, %s, %s, %s) RETURNING id""",
                (group, self.topic, sorted(partitions), records),
            ).fetchone()
            return int(row[0]) if row else None

    def note_aborted(self, partitions: set[int], records: int, recorded: int | None) -> None:
        """Aborted records and their abort markers still take offsets on the topic: say so, for
        reconciliation (best effort — the database may be what failed)."""
        if not partitions:
            return
        try:
            with self._conn.transaction():
                if recorded is not None:
                    self._conn.execute(
                        "UPDATE planpipe.replay_transactions SET outcome = 'aborted' WHERE id = %s", (recorded,)
                    )
                else:
                    self._conn.execute(
                        """INSERT INTO planpipe.replay_transactions
                               (replay_group, target_topic, partitions, records, outcome)
                           VALUES (%s, %s, %s, %s, 'aborted')""",
                        (self.replay_group, self.topic, sorted(partitions), records),
                    )
        except psycopg.Error as error:
            logger.warning("could not record the aborted replay transaction: %s", error)


def parked_messages(
    dsn: str, *, dlq_topic: str | None = None, limit: int = 50, reason: str | None = None
) -> list[dict[str, object]]:
    """Most recently parked first, with a short preview of the original bytes."""
    with psycopg.connect(dsn) as conn:
        cursor = conn.execute(
            """SELECT dlq_topic, dlq_partition, dlq_offset, reason, field, why, rules_applied, stage,
                      source_topic, source_partition, source_offset, trace_id, parked_at, length(value) AS size,
                      substring(value from 1 for 160) AS preview
               FROM planpipe.dlq_parked
               WHERE (%(topic)s::text IS NULL OR dlq_topic = %(topic)s)
                 AND (%(reason)s::text IS NULL OR reason = %(reason)s)
               ORDER BY parked_at DESC, dlq_topic, dlq_partition, dlq_offset LIMIT %(limit)s""",
            {"topic": dlq_topic, "reason": reason, "limit": limit},
        )
        names = [column.name for column in cursor.description or ()]
        rows = [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
    for row in rows:
        preview = row["preview"]
        row["preview"] = bytes(preview).decode(errors="replace") if isinstance(preview, bytes | memoryview) else ""
    return rows
