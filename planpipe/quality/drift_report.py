"""What schema drift found: one `DriftFinding` per difference, gathered in a `DriftReport` that renders
itself as check metadata and Markdown."""

from dataclasses import dataclass, field
from typing import Final, Literal

from planpipe.quality.field_map import Source
from planpipe.quality.suites import MetadataValue, Plain

Kind = Literal["missing", "extra", "type_mismatch", "nullability"]


@dataclass(frozen=True)
class DriftFinding:
    source_a: Source
    source_b: Source
    column: str
    kind: Kind
    detail: str

    def to_plain(self) -> dict[str, Plain]:
        return {
            "source_a": self.source_a,
            "source_b": self.source_b,
            "column": self.column,
            "kind": self.kind,
            "detail": self.detail,
        }


@dataclass(frozen=True)
class DriftReport:
    findings: tuple[DriftFinding, ...]
    contract_fields: int
    parquet_columns: int
    parquet_files: tuple[str, ...]
    postgres_schema: str
    postgres_columns: int
    duration_ms: float
    notes: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return not self.findings

    def to_markdown(self) -> str:
        head = (
            f"**Schema drift: {'none' if self.ok else f'{len(self.findings)} finding(s)'}** — "
            f"contract {self.contract_fields} fields, Parquet {self.parquet_columns} columns "
            f"({len(self.parquet_files)} newest file(s) read), PostgreSQL `{self.postgres_schema}` "
            f"{self.postgres_columns} columns ({self.duration_ms:.0f} ms)"
        )
        lines = [head]
        lines += [f"- {note}" for note in self.notes]
        if self.findings:
            lines += ["", "| kind | column | expected by | found in | detail |", "| --- | --- | --- | --- | --- |"]
            lines += [
                f"| {f.kind} | `{f.column}` | {f.source_a} | {f.source_b} | {f.detail.replace('|', '/')} |"
                for f in self.findings
            ]
        return "\n".join(lines)

    def to_metadata(self) -> dict[str, MetadataValue]:
        counts = {kind: sum(f.kind == kind for f in self.findings) for kind in _KINDS}
        return {
            "ok": self.ok,
            "findings": [f.to_plain() for f in self.findings],
            "finding_count": len(self.findings),
            **{f"{kind}_count": n for kind, n in counts.items()},
            "contract_fields": self.contract_fields,
            "parquet_columns": self.parquet_columns,
            "parquet_files_checked": len(self.parquet_files),
            "postgres_schema": self.postgres_schema,
            "postgres_columns": self.postgres_columns,
            "drift_ms": round(self.duration_ms, 2),
        }


_KINDS: Final[tuple[Kind, ...]] = ("missing", "extra", "type_mismatch", "nullability")
