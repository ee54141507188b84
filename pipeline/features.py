"""Stage 2, features: check raw data against DVC, validate, quarantine, Parquet.

:func:`validate_chunk` is the pure core: text rows in, typed good rows and
rejected rows (with the reason) out. :func:`run` streams the CSV parts through
it in fixed-size chunks, so memory does not grow with the row count.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import schema, versioning
from pipeline.errors import RawDataChanged, SchemaError
from pipeline.io import atomic_path, file_md5, remove_stale_temps, wait_for_record
from pipeline.settings import Settings
from pipeline.stage import StageResult

log = logging.getLogger(__name__)

READ_CHUNK_ROWS = 50_000
REJECTED_FILE = "rejected.csv"

FEATURES_SCHEMA = pa.schema(
    [pa.field(schema.JOIN_KEY, pa.int64(), nullable=False),
     pa.field(schema.TIMESTAMP, pa.timestamp("us", tz="UTC"), nullable=False)]
    + [pa.field(name, pa.float64(), nullable=False) for name in schema.FEATURE_NAMES]
)
LABELS_SCHEMA = pa.schema([
    pa.field(schema.JOIN_KEY, pa.int64(), nullable=False),
    pa.field(schema.TIMESTAMP, pa.timestamp("us", tz="UTC"), nullable=False),
    pa.field(schema.TARGET, pa.float64(), nullable=False),
])


def check_header(columns: list[str], source: str) -> None:
    missing = [c for c in schema.RAW_COLUMNS if c not in columns]
    extra = [c for c in columns if c not in schema.RAW_COLUMNS]
    if missing or extra:
        raise SchemaError(
            f"{source}: columns do not match the schema in pipeline/schema.py "
            f"(missing: {missing or 'none'}, unexpected: {extra or 'none'}); "
            "fix the file, or change pipeline/schema.py to match your data"
        )


def _numeric(stripped: pd.Series) -> pd.Series:
    return pd.to_numeric(stripped, errors="coerce").astype(float)


def validate_chunk(raw: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split a chunk of text rows into typed good rows and rejected rows.

    A row is rejected for a missing value, a value that is not a number (or
    not a timestamp), a non-integer where an integer is expected, or a value
    outside the feature's range. Rejected rows keep their original text and
    gain a ``reason`` naming the first failing column.
    """
    raw = raw.fillna("")
    reason = pd.Series("", index=raw.index, dtype=object)

    def flag(mask: pd.Series, why: pd.Series | str) -> None:
        fresh = mask & (reason == "")
        if fresh.any():
            reason[fresh] = why if isinstance(why, str) else why[fresh]

    typed = pd.DataFrame(index=raw.index)
    # Each column is stripped once (the profile's largest cost), then reused.
    key_text = raw[schema.JOIN_KEY].str.strip()
    keys = _numeric(key_text)
    flag(key_text == "", f"{schema.JOIN_KEY}: missing")
    flag(keys.isna() | (keys != np.floor(keys)) | (keys < 0),
         f"{schema.JOIN_KEY}: not a non-negative integer")
    typed[schema.JOIN_KEY] = keys.fillna(-1).astype(np.int64)

    stamps = pd.to_datetime(raw[schema.TIMESTAMP], utc=True, errors="coerce", format="ISO8601")
    flag(raw[schema.TIMESTAMP].str.strip() == "", f"{schema.TIMESTAMP}: missing")
    flag(stamps.isna(), f"{schema.TIMESTAMP}: not an ISO 8601 timestamp")
    typed[schema.TIMESTAMP] = stamps

    for feature in (*schema.FEATURES, schema.Feature(schema.TARGET, -np.inf, np.inf)):
        text = raw[feature.name].str.strip()
        values = _numeric(text)
        flag(text == "", f"{feature.name}: missing")
        flag(values.isna(), f"{feature.name}: not a number")
        flag(~np.isfinite(values), f"{feature.name}: not finite")
        if feature.integer:
            flag(values != np.floor(values), f"{feature.name}: not an integer")
        flag((values < feature.low) | (values > feature.high),
             f"{feature.name}: out of range [{feature.low:g}, {feature.high:g}]")
        typed[feature.name] = values

    bad = reason != ""
    rejected = raw[bad].copy()
    rejected["reason"] = reason[bad]
    return typed[~bad], rejected


def _tables(good: pd.DataFrame) -> tuple[pa.Table, pa.Table]:
    stamps = good[schema.TIMESTAMP].dt.as_unit("us")
    features = pa.Table.from_pandas(
        good[[schema.JOIN_KEY, *schema.FEATURE_NAMES]].assign(**{schema.TIMESTAMP: stamps})
        [[schema.JOIN_KEY, schema.TIMESTAMP, *schema.FEATURE_NAMES]],
        schema=FEATURES_SCHEMA, preserve_index=False)
    labels = pa.Table.from_pandas(
        good[[schema.JOIN_KEY, schema.TARGET]].assign(**{schema.TIMESTAMP: stamps})
        [[schema.JOIN_KEY, schema.TIMESTAMP, schema.TARGET]],
        schema=LABELS_SCHEMA, preserve_index=False)
    return features, labels


def transform(parts: list[Path], features_out: Path, labels_out: Path, rejected_out: Path,
              chunk_rows: int = READ_CHUNK_ROWS) -> dict:
    """Stream ``parts`` through :func:`validate_chunk` into Parquet files.

    Writes to the given (temporary) paths; returns counts and the event-time
    range of the good rows.
    """
    total = good_rows = rejected_rows = 0
    reasons: dict[str, int] = {}
    t_min = t_max = None
    started = time.monotonic()
    with pq.ParquetWriter(features_out, FEATURES_SCHEMA) as fwriter, \
            pq.ParquetWriter(labels_out, LABELS_SCHEMA) as lwriter, \
            open(rejected_out, "w", newline="") as rejected_fh:
        wrote_header = False
        for part in parts:
            reader = pd.read_csv(part, dtype=str, keep_default_na=False, chunksize=chunk_rows)
            for chunk in reader:
                check_header(list(chunk.columns), part.name)
                good, rejected = validate_chunk(chunk)
                total += len(chunk)
                if len(good):
                    features, labels = _tables(good)
                    fwriter.write_table(features)
                    lwriter.write_table(labels)
                    good_rows += len(good)
                    lo, hi = good[schema.TIMESTAMP].min(), good[schema.TIMESTAMP].max()
                    t_min = lo if t_min is None else min(t_min, lo)
                    t_max = hi if t_max is None else max(t_max, hi)
                if len(rejected):
                    rejected.insert(0, "source", part.name)
                    rejected.to_csv(rejected_fh, index=False, header=not wrote_header)
                    wrote_header = True
                    rejected_rows += len(rejected)
                    for why, count in rejected["reason"].str.split(":").str[0].value_counts().items():
                        reasons[why] = reasons.get(why, 0) + int(count)
                log.info("features: %d rows read, %d quarantined (%.0f rows/s)", total,
                         rejected_rows, total / max(time.monotonic() - started, 1e-9))
    return {
        "rows_in": total, "rows_out": good_rows, "rows_quarantined": rejected_rows,
        "quarantined_by_column": reasons,
        "event_time_min": t_min.isoformat() if t_min is not None else None,
        "event_time_max": t_max.isoformat() if t_max is not None else None,
    }


def run(settings: Settings) -> StageResult:
    ingest = wait_for_record(settings.runs_dir, "features", "ingest", settings.wait_seconds, settings.run_id)
    changed = versioning.changed_files(settings.shared)
    if changed is None:
        raise RawDataChanged([versioning.RAW_TARGET + " (never versioned)"],
                             versioning.dvc_file(settings.shared))
    if changed:
        raise RawDataChanged(changed, versioning.dvc_file(settings.shared))
    raw_hash = versioning.recorded_hash(settings.shared)
    inputs = {"raw_dvc_hash": raw_hash, "schema_version": schema.SCHEMA_VERSION}
    result = StageResult.start("features", settings, inputs)
    outputs_intact = (
        result.previous is not None
        and settings.features_path.is_file() and settings.labels_path.is_file()
        and result.previous.outputs.get("features_md5") == file_md5(settings.features_path)
    )
    if result.unchanged() and outputs_intact:
        return result.skip(f"features for DVC {raw_hash} are in place", result.previous.outputs)

    parts = sorted(settings.shared.joinpath(p) for p in
                   (f"{versioning.RAW_TARGET}/{name}" for name in ingest.outputs["parts"]))
    for folder in (settings.features_dir, settings.quarantine_dir):
        folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(folder)
    rejected_path = settings.quarantine_dir / REJECTED_FILE
    with atomic_path(settings.features_path) as f_tmp, atomic_path(settings.labels_path) as l_tmp, \
            atomic_path(rejected_path) as r_tmp:
        stats = transform(parts, f_tmp, l_tmp, r_tmp)
    if stats["rows_out"] == 0:
        raise SchemaError("features: every row was quarantined; see "
                          f"{rejected_path} for the reasons and fix the raw data")
    outputs = {
        **stats,
        "raw_dvc_hash": raw_hash,
        "features_path": str(settings.features_path),
        "labels_path": str(settings.labels_path),
        "quarantine_path": str(rejected_path),
        "features_md5": file_md5(settings.features_path),
        "labels_md5": file_md5(settings.labels_path),
    }
    return result.done(outputs, f"{stats['rows_out']} rows to Parquet, "
                                f"{stats['rows_quarantined']} quarantined")
