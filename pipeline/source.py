"""Reading a declared data set's source: CSV or Parquet files, as text columns.

Ingest copies the declared columns into ``<shared>/data/raw/`` as CSV text
exactly as the source holds them (Parquet values are written as text), so the
features stage validates every source the same way and quarantines what is
wrong row by row; :mod:`pipeline.datacheck` reads the same batches to check a
declaration against its data before anything is written.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from pipeline.dataset import Dataset, DatasetError

BATCH_BYTES = 8 << 20


def _csv_batches(path: Path) -> Iterator[pa.RecordBatch]:
    reader = pa_csv.open_csv(
        path, read_options=pa_csv.ReadOptions(block_size=BATCH_BYTES),
        convert_options=pa_csv.ConvertOptions(auto_dict_encode=False, strings_can_be_null=False,
                                              quoted_strings_can_be_null=False,
                                              column_types=_all_text(path)))
    yield from reader


def _all_text(path: Path) -> dict[str, pa.DataType]:
    """Every column of a CSV read as text (no type guessing): its header names, each to string."""
    import csv

    with open(path, newline="", encoding="utf-8", errors="replace") as fh:
        header = next(csv.reader(fh), [])
    return dict.fromkeys(header, pa.string())


def _as_text(column: pa.Array) -> pa.Array:
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return column.cast(pa.string())
    if pa.types.is_timestamp(column.type):
        unit = column.type.unit
        utc = column.cast(pa.timestamp(unit, tz="UTC")) if column.type.tz else column
        return pc.strftime(utc, format="%Y-%m-%dT%H:%M:%S" + ("Z" if column.type.tz else ""))
    if pa.types.is_dictionary(column.type):
        return _as_text(column.dictionary_decode())
    return column.cast(pa.string())


def _parquet_batches(path: Path) -> Iterator[pa.RecordBatch]:
    for batch in pq.ParquetFile(path, pre_buffer=False).iter_batches(batch_size=65_536):  # bounded memory
        yield pa.RecordBatch.from_arrays([_as_text(col) for col in batch.columns], names=batch.schema.names)


def columns_of(dataset: Dataset) -> list[str]:
    """The columns the declaration needs from its source, in the raw files' order."""
    d = dataset.declaration
    return [d.entity.column, *([d.timestamp.column] if d.timestamp else []), *d.features, d.target]


def batches(dataset: Dataset, ingested_at: datetime | None = None) -> Iterator[tuple[Path, pa.RecordBatch]]:
    """The declared columns of every source file, as text, in the raw files' column order.

    Without a declared timestamp every row gets ``ingested_at`` (UTC) as its event time.
    """
    schema = dataset.schema()
    stamp = (ingested_at or datetime.now(timezone.utc)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    wanted = columns_of(dataset)
    for path in dataset.files():
        reader = _csv_batches if path.suffix.lower() == ".csv" else _parquet_batches
        try:
            for batch in reader(path):
                missing = [c for c in wanted if c not in batch.schema.names]
                if missing:
                    field_of = _field_of(dataset, missing[0])
                    raise DatasetError(f"{field_of}: column {missing[0]!r} is not in {path.name} (its columns: "
                                       f"{', '.join(batch.schema.names[:20])}); fix the declaration")
                columns = {name: batch.column(name) for name in wanted}
                if schema.timestamp not in columns:
                    columns[schema.timestamp] = pa.array([stamp] * batch.num_rows, type=pa.string())
                yield path, pa.RecordBatch.from_arrays([columns[c] for c in schema.raw_columns],
                                                       names=list(schema.raw_columns))
        except (pa.ArrowInvalid, OSError) as exc:
            raise DatasetError(f"source.path: {path.name} cannot be read ({str(exc).splitlines()[0]}); "
                               "give a CSV file with a header row or a Parquet file") from None


def _field_of(dataset: Dataset, column: str) -> str:
    d = dataset.declaration
    if column == d.entity.column:
        return "entity.column"
    if d.timestamp and column == d.timestamp.column:
        return "timestamp.column"
    if column == d.target:
        return "target"
    return f"features.{column}"
