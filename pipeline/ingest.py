"""Stage 1, ingest: the data set's rows into ``<shared>/data/raw/``, versioned with DVC.

A declared source (``source.path``: CSV or Parquet files) is copied, its
declared columns only, as text in CSV parts, so the features stage validates
every source alike. The built-in synthetic customers are generated instead
(:mod:`pipeline.synthetic`: seeded, with a known truth); with
``MLOPS_SYNTHETIC_BATCH`` the raw folder holds that batch (a newer snapshot,
not an append), with ``MLOPS_SYNTHETIC_DRIFT`` its features shifted. Parts are
written atomically, then the folder is put under DVC.
"""

from __future__ import annotations

import logging
import math
import time
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pa_csv

from pipeline import datacheck, source, versioning
from pipeline.dataset import DatasetError
from pipeline.io import atomic_path, file_md5, remove_stale_temps
from pipeline.stage import StageContext, StageResult
from pipeline.synthetic import (BAD_KINDS, CHUNK_ROWS, DEFAULT_BAD_FRACTION, GENERATOR_VERSION, SYNTHETIC, TRUTH,
                                draw_chunk, n_entities, sample_entity, write_chunk)
from pipeline.synthetic_drift import parse_drift

log = logging.getLogger(__name__)


def part_name(index: int) -> str:
    return f"part-{index:05d}.csv"


def run(ctx: StageContext, bad_fraction: float = DEFAULT_BAD_FRACTION) -> StageResult:
    if ctx.dataset.synthetic:
        return _synthetic(ctx, bad_fraction)
    return _copy_source(ctx)


def _synthetic(ctx: StageContext, bad_fraction: float) -> StageResult:
    settings, declared = ctx.settings, ctx.dataset.declaration.source.synthetic
    if ctx.schema.raw_columns != SYNTHETIC.raw_columns:
        raise DatasetError("source.synthetic generates the built-in customers' columns only "
                           f"({', '.join(SYNTHETIC.raw_columns)}); give source.path for your own data")
    rows = declared.rows or settings.rows
    seed = declared.seed if declared.seed is not None else settings.seed
    batch, drift = settings.synthetic_batch, parse_drift(settings.synthetic_drift)
    inputs = {"rows": rows, "seed": seed, "bad_fraction": bad_fraction,
              "generator_version": GENERATOR_VERSION, "dataset": ctx.schema.version}
    # Recorded only when set, so batch 0 without drift keeps the fingerprint it always had
    # (a folder ingested before batches existed is not ingested again).
    inputs.update({"batch": batch} if batch else {}, **({"drift": drift} if drift else {}))
    result = ctx.start(inputs)
    if result.unchanged() and versioning.changed_files(settings.shared) == []:
        return result.skip("raw data for these rows, seed, batch and drift is already versioned",
                           result.previous.outputs)

    raw = _fresh_raw_dir(settings)
    parts = math.ceil(rows / CHUNK_ROWS)
    wanted = {part_name(i) for i in range(parts)}
    _drop_parts_but(raw, wanted)
    injected = dict.fromkeys(BAD_KINDS, 0)
    started = time.monotonic()
    for index in range(parts):
        chunk = draw_chunk(rows, seed, index, bad_fraction, batch, drift)
        for kind, count in chunk.injected.items():
            injected[kind] += count
        with atomic_path(raw / part_name(index)) as tmp:
            write_chunk(chunk, tmp)
        done = min(rows, (index + 1) * CHUNK_ROWS)
        log.info("ingest: %d/%d rows written (%.0f rows/s)", done, rows,
                 done / max(time.monotonic() - started, 1e-9))
    log.info("ingest: versioning %s with DVC", raw)
    dvc_hash = versioning.add_and_push(settings.shared, raw, settings)
    outputs = {
        "raw_dir": str(raw),
        "parts": sorted(wanted),
        "rows": rows,
        "entities": n_entities(rows),
        "entity_type": "int",
        "sample_entity": sample_entity(),
        "bad_rows_injected": injected,
        "dvc_hash": dvc_hash,
        "truth": TRUTH.as_dict(),
        "dataset": ctx.dataset.name,
        "batch": batch,
        "drift": drift,
    }
    shifted = f", batch {batch}" + (f" shifted {drift}" if drift else "") if batch or drift else ""
    return result.done(outputs, f"{rows} rows in {parts} part(s){shifted}, DVC {dvc_hash}")


def _fresh_raw_dir(settings) -> Path:
    raw = settings.raw_dir
    raw.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(raw)
    return raw


def _drop_parts_but(raw: Path, wanted: set[str]) -> None:
    for stale in raw.glob("part-*.csv"):
        if stale.name not in wanted:
            stale.unlink()


def _copy_source(ctx: StageContext) -> StageResult:
    """The declared columns of the user's files, as text, into CSV parts under DVC."""
    settings, dataset = ctx.settings, ctx.dataset
    if settings.synthetic_batch or settings.synthetic_drift:
        raise DatasetError(f"MLOPS_SYNTHETIC_BATCH and MLOPS_SYNTHETIC_DRIFT shape the synthetic data set only; "
                           f"{dataset.name} is read from its files: unset them")
    files = dataset.files()
    inputs = {"dataset": ctx.schema.version,
              "files": [{"name": f.name, "bytes": f.stat().st_size, "md5": file_md5(f)} for f in files]}
    result = ctx.start(inputs)
    if result.unchanged() and versioning.changed_files(settings.shared) == []:
        return result.skip(f"{len(files)} source file(s) of {dataset.name} are already versioned",
                           result.previous.outputs)
    # Declaration errors that only the data shows (nulls in the key, a feature with no
    # numbers) stop here, before anything is written.
    found = datacheck.check(dataset)
    log.info("ingest: %s checked: %d rows, %d would be quarantined", dataset.name, found.rows,
             sum(found.quarantined.values()))
    raw = _fresh_raw_dir(settings)
    written: list[str] = []
    pending: list[pa.RecordBatch] = []
    rows, sample = 0, None
    started = time.monotonic()

    def flush() -> None:  # one part of at most about CHUNK_ROWS rows, written atomically
        written.append(part_name(len(written)))
        with atomic_path(raw / written[-1]) as tmp:
            pa_csv.write_csv(pa.Table.from_batches(pending), tmp,
                             write_options=pa_csv.WriteOptions(quoting_style="needed"))
        pending.clear()

    # One timestamp for every row of this ingest when the declaration names none.
    ingested_at = datetime.now(timezone.utc)
    for _, batch in source.batches(dataset, ingested_at):
        key = batch.column(0)
        sample = sample if sample is not None else _first_key(key)
        pending.append(batch)
        rows += batch.num_rows
        if sum(b.num_rows for b in pending) >= CHUNK_ROWS:
            flush()
            log.info("ingest: %d rows copied from %s (%.0f rows/s)", rows, dataset.name,
                     rows / max(time.monotonic() - started, 1e-9))
    if pending and rows:
        flush()
    _drop_parts_but(raw, set(written))
    entity_type = dataset.declaration.entity.type or found.entity_type  # declared, or what the check read
    log.info("ingest: versioning %s with DVC", raw)
    dvc_hash = versioning.add_and_push(settings.shared, raw, settings)
    outputs = {
        "raw_dir": str(raw), "parts": written, "rows": rows, "entity_type": entity_type,
        "sample_entity": int(sample) if entity_type == "int" and sample and sample.isdigit() else sample,
        "bad_rows_injected": {}, "dvc_hash": dvc_hash, "truth": None, "dataset": dataset.name,
        "source_files": [str(f) for f in files],
        "ingested_at": None if dataset.declaration.timestamp else ingested_at.isoformat(),
    }
    return result.done(outputs, f"{rows} rows of {dataset.name} from {len(files)} file(s) in "
                                f"{len(written)} part(s), DVC {dvc_hash}")


def _first_key(column: pa.Array) -> str | None:
    for value in column.to_pylist()[:1000]:
        if value and value.strip():
            return value.strip()
    return None
