"""Stage 2, features: check raw data against DVC, validate, quarantine, Parquet.

:func:`pipeline.validate.validate_chunk` is the pure core: text rows in, typed
good rows and rejected rows (with the reason) out. :func:`run` streams the CSV
parts through it in fixed-size chunks, so memory does not grow with the row count.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from pipeline import dask_engine, lakehouse, versioning
from pipeline.errors import RawDataChanged, SchemaError
from pipeline.io import TMP_PREFIX, atomic_path, file_md5, remove_stale_temps
from pipeline.schema import Schema
from pipeline.validate import validate_chunk
from pipeline.stage import StageContext, StageResult

log = logging.getLogger(__name__)

# About 60k rows of the generated CSV per block.
READ_BLOCK_BYTES = 8 << 20
REJECTED_FILE = "rejected.csv"

def key_type(schema: Schema) -> pa.DataType:
    return pa.int64() if schema.int_keys else pa.string()


def features_schema(schema: Schema) -> pa.Schema:
    """The features Parquet file: key, event time (UTC), one float64 column per feature."""
    return pa.schema(
        [pa.field(schema.join_key, key_type(schema), nullable=False),
         pa.field(schema.timestamp, pa.timestamp("us", tz="UTC"), nullable=False)]
        + [pa.field(name, pa.float64(), nullable=False) for name in schema.feature_names])


def labels_schema(schema: Schema) -> pa.Schema:
    return pa.schema([
        pa.field(schema.join_key, key_type(schema), nullable=False),
        pa.field(schema.timestamp, pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field(schema.target, pa.float64(), nullable=False),
    ])


def check_header(columns: list[str], source: str, schema: Schema) -> None:
    missing = [c for c in schema.raw_columns if c not in columns]
    extra = [c for c in columns if c not in schema.raw_columns]
    extra += sorted({c for c in columns if c in schema.raw_columns and columns.count(c) > 1})
    if missing or extra:
        raise SchemaError(
            f"{source}: columns do not match the data set {schema.dataset!r} "
            f"(missing: {missing or 'none'}, unexpected: {extra or 'none'}); "
            "fix the file, or the declaration (MLOPS_DATASET), then re-run ingest"
        )


def _tables(good: pa.Table, schema: Schema) -> tuple[pa.Table, pa.Table]:
    features = good.select([schema.join_key, schema.timestamp, *schema.feature_names])
    labels = good.select([schema.join_key, schema.timestamp, schema.target])
    return features.cast(features_schema(schema)), labels.cast(labels_schema(schema))


def _text_reader(part: Path, block_bytes: int, misshapen: list[pa.Table],
                 schema: Schema) -> pa_csv.CSVStreamingReader:
    """A streaming reader that keeps every schema column as text, untouched.

    A row with the wrong number of fields is not an error for the file: it
    goes to ``misshapen`` (its whole text in the reason) and reading goes on.
    """
    def misshapen_row(row) -> str:
        text = row.text if len(row.text) <= 2000 else row.text[:2000] + "..."
        misshapen.append(pa.table({
            "source": [part.name], **{name: [""] for name in schema.raw_columns},
            "reason": [f"row: expected {row.expected_columns} fields, got {row.actual_columns}: {text}"]}))
        return "skip"

    try:
        return pa_csv.open_csv(
            part,
            read_options=pa_csv.ReadOptions(block_size=block_bytes),
            parse_options=pa_csv.ParseOptions(invalid_row_handler=misshapen_row),
            convert_options=pa_csv.ConvertOptions(
                column_types=dict.fromkeys(schema.raw_columns, pa.string()),
                strings_can_be_null=False, quoted_strings_can_be_null=False),
        )
    except pa.ArrowInvalid as exc:
        raise _unreadable(part, exc, "not a CSV file with a header row") from None


def first_non_utf8(part: Path, chunk: int = 8 << 20) -> tuple[int, int] | None:
    """``(line, byte)`` of the first byte that is not UTF-8 text in ``part``, or None."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    line, offset = 1, 0
    with open(part, "rb") as fh:
        while True:
            block = fh.read(chunk)
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as exc:
                # the error's offset is within what this call was handed: the decoder's
                # carried-over bytes (at most 3) plus this block
                pending = len(exc.object) - len(block)
                at = max(exc.start - pending, 0)
                return line + block[:at].count(b"\n"), block[at] if at < len(block) else exc.object[exc.start]
            if not block:
                return None
            line += block.count(b"\n")
            offset += len(block)


def _unreadable(part: Path, exc: Exception, what: str) -> SchemaError:
    """The one line for a raw file pyarrow cannot read: where, and what to do."""
    if "UTF8" in str(exc) or "UTF-8" in str(exc):
        found = first_non_utf8(part)
        if found:
            line, byte = found
            return SchemaError(f"{part.name}: line {line} is not UTF-8 text (byte 0x{byte:02x}); save the "
                               "file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`), or run `dvc checkout` to "
                               "restore the versioned one")
    return SchemaError(f"{part.name}: {what} ({exc}); fix the file or run `dvc checkout` to restore the "
                       "versioned one")


def _blocks(parts: list[Path], block_bytes: int, misshapen: list[pa.Table],
            schema: Schema) -> Iterator[tuple[Path, pa.RecordBatch]]:
    """Record batches of every part, in order, each part's header checked first."""
    for part in parts:
        reader = _text_reader(part, block_bytes, misshapen, schema)
        check_header(reader.schema.names, part.name, schema)
        try:
            yield from ((part, batch) for batch in reader)
        except pa.ArrowInvalid as exc:
            raise _unreadable(part, exc, "cannot be read as CSV") from None


def transform(parts: list[Path], features_out: Path, labels_out: Path, rejected_out: Path,
              schema: Schema, block_bytes: int = READ_BLOCK_BYTES, preferred_sample=None) -> dict:
    """Stream ``parts`` through :func:`validate_chunk` into Parquet files.

    Reads ``block_bytes`` of CSV at a time with pyarrow's streaming reader, so
    memory stays flat as rows grow. Writes to the given (temporary) paths;
    returns counts and the event-time range of the good rows.
    """
    total = good_rows = rejected_rows = 0
    reasons: dict[str, int] = {}
    t_min = t_max = None
    started = time.monotonic()
    rejected_schema = pa.schema([pa.field(name, pa.string()) for name in
                                 ("source", *schema.raw_columns, "reason")])
    # Dictionary encoding only where values repeat (entity keys): on float
    # columns it costs three times the write and saves nothing.
    parquet = {"use_dictionary": [schema.join_key]}
    with pq.ParquetWriter(features_out, features_schema(schema), **parquet) as fwriter, \
            pq.ParquetWriter(labels_out, labels_schema(schema), **parquet) as lwriter, \
            pa_csv.CSVWriter(rejected_out, rejected_schema,
                             write_options=pa_csv.WriteOptions(quoting_style="needed")) as rwriter:
        first_key, has_preferred = None, False
        misshapen: list[pa.Table] = []
        for part, batch in _blocks(parts, block_bytes, misshapen, schema):
            good, rejected = validate_chunk(pa.Table.from_batches([batch]), schema)
            total += batch.num_rows + len(misshapen)
            rejected = rejected.add_column(0, "source", pa.array([part.name] * rejected.num_rows,
                                                                 type=pa.string()))
            if misshapen:
                rejected = pa.concat_tables([rejected, *misshapen])
                misshapen.clear()
            if good.num_rows:
                keys = good.column(schema.join_key)
                first_key = keys[0].as_py() if first_key is None else first_key
                if preferred_sample is not None and not has_preferred:
                    has_preferred = pc.any(pc.equal(keys, preferred_sample)).as_py()
                features, labels = _tables(good, schema)
                fwriter.write_table(features)
                lwriter.write_table(labels)
                good_rows += good.num_rows
                span = pc.min_max(good.column(schema.timestamp))
                lo, hi = span["min"].as_py(), span["max"].as_py()
                t_min = lo if t_min is None else min(t_min, lo)
                t_max = hi if t_max is None else max(t_max, hi)
            if rejected.num_rows:
                rwriter.write_table(rejected.cast(rejected_schema))
                rejected_rows += rejected.num_rows
                for why in rejected.column("reason").to_pylist():
                    column = why.split(":", 1)[0]
                    reasons[column] = reasons.get(column, 0) + 1
            log.info("features: %d rows read, %d quarantined (%.0f rows/s)", total,
                     rejected_rows, total / max(time.monotonic() - started, 1e-9))
    return {
        "rows_in": total, "rows_out": good_rows, "rows_quarantined": rejected_rows,
        # the entity GET /predict answers for: ingest's choice when it survived validation
        "sample_entity": preferred_sample if has_preferred else first_key,
        "quarantined_by_column": reasons,
        "event_time_min": t_min.isoformat() if t_min is not None else None,
        "event_time_max": t_max.isoformat() if t_max is not None else None,
    }


def run(ctx: StageContext) -> StageResult:
    settings, ingest = ctx.settings, ctx.upstream["ingest"]
    changed = versioning.changed_files(settings.shared)
    if changed is None:
        raise RawDataChanged([versioning.RAW_TARGET + " (never versioned)"],
                             versioning.dvc_file(settings.shared))
    if changed:
        raise RawDataChanged(changed, versioning.dvc_file(settings.shared))
    raw_hash = versioning.recorded_hash(settings.shared)
    schema = ctx.schema
    inputs = {"raw_dvc_hash": raw_hash, "dataset": schema.version, "entity_type": schema.key_type}
    if settings.lakehouse_uri:
        inputs["lakehouse"] = settings.lakehouse_uri
    result = ctx.start(inputs)
    if settings.lakehouse_uri:
        # ingest may have pushed to the volume's remote: the raw data goes to the store's
        versioning.push_to_lakehouse(settings)
    outputs_intact = (
        result.previous is not None
        and result.previous.outputs.get("features_md5") == lakehouse.table_md5(settings, "features")
        and result.previous.outputs.get("labels_md5") == lakehouse.table_md5(settings, "labels")
        and (not settings.lakehouse_uri or settings.labels_path.is_file())
    )
    if result.unchanged() and outputs_intact:
        return result.skip(f"features for DVC {raw_hash} are in place", result.previous.outputs)

    parts = sorted(settings.shared.joinpath(p) for p in
                   (f"{versioning.RAW_TARGET}/{name}" for name in ingest.outputs["parts"]))
    for folder in (settings.features_dir, settings.quarantine_dir):
        folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(folder)
    rejected_path = settings.quarantine_dir / REJECTED_FILE
    with contextlib.ExitStack() as stack:
        if settings.lakehouse_uri:  # written beside the process, then published to the store
            local = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"{TMP_PREFIX}publish-",
                                                                         dir=settings.features_dir)))
        with contextlib.ExitStack() as files:
            if settings.lakehouse_uri:
                f_tmp, l_tmp = local / "features.parquet", local / "labels.parquet"
            else:
                f_tmp = files.enter_context(atomic_path(settings.features_path))
                l_tmp = files.enter_context(atomic_path(settings.labels_path))
            r_tmp = files.enter_context(atomic_path(rejected_path))
            sample = ingest.outputs.get("sample_entity")
            if settings.dask_scheduler:  # one task per part on the Dask cluster, same files
                stats = dask_engine.transform(settings, parts, f_tmp, l_tmp, r_tmp, schema, preferred_sample=sample)
            else:
                stats = transform(parts, f_tmp, l_tmp, r_tmp, schema, preferred_sample=sample)
            md5s = {"features": file_md5(f_tmp), "labels": file_md5(l_tmp)}
        _check_rows(stats, parts, settings, rejected_path)
        where = {"features_path": str(settings.features_path), "labels_path": str(settings.labels_path)}
        if settings.lakehouse_uri:
            pointer = lakehouse.publish(settings, {"features": f_tmp, "labels": l_tmp}, md5s, schema.timestamp)
            where = {"features_path": pointer["tables"]["features"]["uri"],
                     "labels_path": pointer["tables"]["labels"]["uri"], "lakehouse_version": pointer["version"]}
            # train and the monitor read the labels from the volume still (docs/objectstore.md#lakehouse)
            with atomic_path(settings.labels_path) as copy:
                copy.write_bytes(l_tmp.read_bytes())
            settings.features_path.unlink(missing_ok=True)
    outputs = {
        **stats,
        "raw_dvc_hash": raw_hash,
        **where,
        "quarantine_path": str(rejected_path),
        "features_md5": md5s["features"],
        "labels_md5": md5s["labels"],
    }
    return result.done(outputs, f"{stats['rows_out']} rows to Parquet, "
                                f"{stats['rows_quarantined']} quarantined")


def _check_rows(stats: dict, parts: list[Path], settings, rejected_path: Path) -> None:
    if stats["rows_in"] == 0:
        raise SchemaError(f"features: the raw data holds no rows, only header lines ({', '.join(p.name for p in parts)} "
                          f"in {settings.raw_dir}); ingest data with rows")
    if stats["rows_out"] == 0:
        raise SchemaError("features: every row was quarantined; see "
                          f"{rejected_path} for the reasons and fix the raw data")
