"""The expected field mapping: it covers the contract, the Parquet schema and the core migration."""

import re
from dataclasses import replace

import pytest

from planpipe.contract import Envelope
from planpipe.db.migrate import migrations_dir
from planpipe.ingest import parquet_sink
from planpipe.quality import field_map
from planpipe.quality.field_map import FIELD_MAP, expected_postgres_columns

pytestmark = pytest.mark.unit


def test_mapping_covers_every_parquet_column_and_contract_field() -> None:
    assert {m.parquet for m in FIELD_MAP if m.parquet} == set(parquet_sink.SCHEMA)
    assert {m.field for m in FIELD_MAP if m.field} == set(Envelope.__struct_fields__)
    for m in FIELD_MAP:
        if m.parquet is not None:
            assert m.parquet_type == parquet_sink.SCHEMA[m.parquet], m


def test_mapping_covers_the_tables_of_the_core_migration() -> None:
    ddl = (migrations_dir() / "001_core.sql").read_text()
    created = set(re.findall(r"CREATE TABLE (\w+)", ddl))
    assert set(field_map.TRACKED_TABLES) == created
    for table in created:
        body = ddl.split(f"CREATE TABLE {table} (", 1)[1].split(");", 1)[0]
        columns = {
            line.split()[0]
            for line in body.splitlines()
            if line.strip() and not line.strip().startswith(("PRIMARY", "--", "CHECK", "REFERENCES"))
        }
        mapped = {key.split(".", 1)[1] for key in expected_postgres_columns() if key.startswith(f"{table}.")}
        assert mapped == columns, table


def test_a_column_mapped_twice_is_refused() -> None:
    twice = (*FIELD_MAP, replace(FIELD_MAP[0], field="again"))
    with pytest.raises(ValueError, match="mapped twice"):
        expected_postgres_columns(twice)


def test_mapping_markdown_lists_every_field() -> None:
    text = field_map.mapping_markdown()
    for m in FIELD_MAP:
        assert (m.field or m.parquet or "") in text
