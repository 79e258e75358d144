"""The output table: one row per input image, a fixed pyarrow schema, documented column by column.

Every stage fills its own columns of the same row dict; `to_table` turns a list of rows into a table with
exactly this schema (missing columns become nulls), so every Parquet file of every run is uniform.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

BOX = pa.struct([("x1", pa.int32()), ("y1", pa.int32()), ("x2", pa.int32()), ("y2", pa.int32()),
                 ("score", pa.float32())])
MEMBER = pa.struct([("model", pa.string()), ("version", pa.string()), ("score", pa.float32()),
                    ("threshold", pa.float32())])

# (name, type, description). The schema table in docs/OUTPUT.md is generated from this list
# (`python -m eagle.io.schema`).
COLUMNS: list[tuple[str, pa.DataType, str]] = [
    ("run_id", pa.string(), "Run identifier; a re-run with the same id resumes that run."),
    ("audited_at", pa.timestamp("us", tz="UTC"), "When this row was produced."),
    ("image_uri", pa.string(), "Input image URI (s3://… or local path)."),
    ("image_version", pa.string(), "Change token of the input: S3 ETag, or size+mtime locally."),
    ("image_size_bytes", pa.int64(), "Size of the input file."),
    ("content_sha256", pa.string(), "SHA-256 of the image bytes (null when unreadable)."),
    ("product", pa.string(), "Product, from the manifest or the first path segment below the input prefix."),
    ("width", pa.int32(), "Width after EXIF orientation, pixels."),
    ("height", pa.int32(), "Height after EXIF orientation, pixels."),
    ("status", pa.string(), "'ok' or 'error'."),
    ("error", pa.string(), "Why the image could not be audited (null when ok)."),
    ("error_stage", pa.string(), "Stage that failed: read, decode, expert, mllm."),
    ("expert_score", pa.float32(), "Expert image score; an ensemble's: its members' scores, each divided by "
     "the member's threshold, combined by expert.ensemble.combine."),
    ("threshold", pa.float32(), "Label-free threshold of the product's expert (an ensemble's: 1)."),
    ("score_max", pa.float32(), "Largest training score (upper edge of EAGLE's uncertain band); an "
     "ensemble's: its members' score_max / threshold combined by expert.ensemble.combine."),
    ("threshold_method", pa.string(), "k-sigma, mad, quantile or evt; an ensemble's: e.g. "
     "'max(patchcore k-sigma, padim mad)'."),
    ("expert_verdict", pa.string(), "'normal' or 'anomalous' (score >= threshold)."),
    ("confidence", pa.string(), "'confident_normal', 'uncertain' or 'confident_anomalous': 'uncertain' when "
     "the score is in the routing policy's unsure band (band_low..band_high)."),
    ("band_low", pa.float32(), "Lower edge of the unsure band: normal verdicts scoring at least this are "
     "'uncertain' (EAGLE's band: the threshold, i.e. none)."),
    ("band_high", pa.float32(), "Upper edge of the unsure band: anomalous verdicts scoring below this are "
     "'uncertain' (EAGLE's band: score_max)."),
    ("boxes", pa.list_(BOX), "Up to 3 regions, original-image pixels, ordered by peak score: the anomalous "
     "regions of an anomalous verdict, or the highest-scoring regions of an uncertain normal one; else empty."),
    ("mask_png", pa.binary(), "Binary mask of those regions as 8-bit PNG, longer side = regions.mask_size."),
    ("anomaly_map_png", pa.binary(), "Anomaly map as 8-bit PNG (same size as the mask), 0..255 = 0..map_max."),
    ("map_max", pa.float32(), "Score units of anomaly_map_png's 255."),
    ("mllm_ran", pa.bool_(), "Whether the MLLM was asked about this image."),
    ("guided", pa.bool_(), "Whether attention guidance (CAAS) was applied."),
    ("answer", pa.string(), "MLLM answer: 'yes' (defect), 'no' or 'unparsed'; null when not asked."),
    ("verdict", pa.string(), "Final verdict: the MLLM's when it answered yes/no, else the expert's."),
    ("explanation", pa.string(), "One sentence: what and where, or why normal."),
    ("explanation_source", pa.string(), "'mllm' or 'expert'."),
    ("mllm_reply", pa.string(), "The MLLM's raw reply when it could not be parsed (answer 'unparsed'; the "
     "explanation is then the expert's); null otherwise."),
    ("image_attention_share", pa.float32(), "Share of image-token attention inside the expert's region."),
    ("expert_model_version", pa.string(), "Content hash of the expert artifact used; an ensemble's: "
     "'model:version' of each member joined by '+'."),
    ("expert_members", pa.list_(MEMBER), "Each expert that scored the image (one, or an ensemble's members): "
     "model, artifact version, its own score and threshold."),
    ("mllm_model", pa.string(), "MLLM id/path used (null when none)."),
    ("config_hash", pa.string(), "Hash of the result-affecting config sections."),
    ("eagle_version", pa.string(), "eagle-audit package version."),
    ("decode_ms", pa.float32(), "Time to read and decode this image."),
    ("expert_ms", pa.float32(), "Expert time per image (batch time / batch size)."),
    ("mllm_ms", pa.float32(), "MLLM time per image (batch time / batch size)."),
    ("audit_date", pa.string(), "Partition: run start date, YYYY-MM-DD (UTC)."),
]

OUTPUT_SCHEMA = pa.schema([pa.field(name, typ) for name, typ, _ in COLUMNS])
COLUMN_NAMES = [name for name, _, _ in COLUMNS]


def _plain(value: Any) -> Any:
    """Python value for Arrow: numpy scalars/arrays unwrapped, NaN (Ray's stand-in for a missing number) → None."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def to_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows (dicts with any subset of the columns; extra keys ignored) → a table with OUTPUT_SCHEMA."""
    return pa.Table.from_pydict({name: [_plain(row.get(name)) for row in rows] for name in COLUMN_NAMES},
                                schema=OUTPUT_SCHEMA)


_SQL_TYPES = {"string": "VARCHAR", "bool": "BOOLEAN", "timestamp[us, tz=UTC]": "TIMESTAMPTZ", "float": "FLOAT",
              "int32": "INTEGER", "int64": "BIGINT", "binary": "BLOB"}


def empty_sql(columns: Sequence[str]) -> str:
    """DuckDB SQL for no rows with these output columns, typed as in OUTPUT_SCHEMA."""
    cols = ", ".join(f"NULL::{_SQL_TYPES[str(OUTPUT_SCHEMA.field(c).type)]} AS {c}" for c in columns)
    return f"SELECT {cols} WHERE false"


def markdown_table() -> str:
    """The schema as a Markdown table, for docs/OUTPUT.md."""
    lines = ["| column | type | meaning |", "| --- | --- | --- |"]
    lines += [f"| `{name}` | `{typ}` | {desc} |" for name, typ, desc in COLUMNS]
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
