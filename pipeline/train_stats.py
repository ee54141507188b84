"""Train's statistics over chunks of rows: what one pass leaves, and how passes merge.

Pure core of the train stage. :func:`gather` makes one pass over chunks of
rows (the streamed least squares of :mod:`pipeline.lstsq`, counts, the newest
training event time, a bounded seeded sample, every row spilled for
:func:`score`). :class:`Merging` (and :func:`merge`) puts the :class:`Gathered` of separate
passes (one per bucket, as the Dask engine computes them on its workers)
together as they arrive into what one pass over all of them leaves: the R
factors stacked in bucket order, the counts summed, the sample the lowest
hashes of the union in the single pass's row order; memory is one sample plus
the triangles still waiting for a lower bucket (about a kilobyte each), not a
sample per bucket.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import SchemaError
from pipeline.io import SCRATCH_PARQUET
from pipeline.lstsq import ErrorSums, Fit, StreamedLeastSquares
from pipeline.schema import Schema

# Rows kept (a seeded sample, the same whatever the chunking) for the fit plot and the
# monitor's reference: bounded, whatever the data's size.
SAMPLE_ROWS = 100_000


def holdout_mask(keys: np.ndarray, holdout_fraction: float, seed: int) -> np.ndarray:
    """Which rows are held out: every row of an entity goes the same way.

    A row is held out when ``pandas.util.hash_array`` (SipHash-2-4) of its
    entity key written as text, with ``hash_key`` the seed as 16 digits,
    divided by 2**64, is below ``holdout_fraction``. So anyone can say which
    rows trained a model from the data, the key and the seed alone, and a row
    keeps its side when other rows are added.
    """
    if holdout_fraction <= 0:
        return np.zeros(len(keys), dtype=bool)
    # each entity's key written and hashed once (an entity has several rows)
    each, unique = pd.factorize(np.asarray(keys), use_na_sentinel=False)
    hashes = pd.util.hash_array(np.asarray(unique).astype(str).astype(object), hash_key=f"{seed:016d}"[-16:],
                                categorize=False)
    return (hashes < np.uint64(min(holdout_fraction, 1.0) * 2.0**64))[each]


def check_split(train_rows: int, holdout_rows: int, holdout_fraction: float) -> None:
    if train_rows < 2 or (holdout_fraction > 0 and holdout_rows == 0):
        raise SchemaError(f"train: {train_rows + holdout_rows} usable rows are too few to hold out "
                          f"{holdout_fraction:.0%} and still train; ingest more rows (--rows), or declare a "
                          "different holdout (holdout: 0 fits on every row)")


def split(keys: np.ndarray, holdout_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(train_index, holdout_index)`` by :func:`holdout_mask`; with no holdout every row trains."""
    held = holdout_mask(keys, holdout_fraction, seed)
    train, holdout = np.flatnonzero(~held), np.flatnonzero(held)
    check_split(len(train), len(holdout), holdout_fraction)
    return train, holdout


@dataclass
class Gathered:
    """What one pass over the training chunks leaves: the streamed fit, counts, the
    newest training event time, and a bounded sample of rows (``held`` marks the holdout's)."""

    train: StreamedLeastSquares
    rows: int = 0
    holdout_rows: int = 0
    chunks: int = 0
    event_time_max: pd.Timestamp | None = None
    sample: pd.DataFrame | None = None
    priority: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.uint64))

    @property
    def train_rows(self) -> int:
        return self.rows - self.holdout_rows


def _lowest(rows: pd.DataFrame, priority: np.ndarray, size: int) -> tuple[pd.DataFrame, np.ndarray]:
    """The ``size`` rows of lowest priority, in their order in ``rows``."""
    if len(rows) <= size:
        return rows, priority
    keep = np.sort(np.argpartition(priority, size - 1)[:size])
    return rows.iloc[keep].reset_index(drop=True), priority[keep]


def _keep_sample(gathered: Gathered, frame: pd.DataFrame, held: np.ndarray, schema: Schema, seed: int,
                 size: int) -> None:
    """Keep the ``size`` rows of lowest seeded hash of (key, event time) seen so far: the
    same sample whatever the chunking."""
    priority = pd.util.hash_pandas_object(frame[[schema.join_key, schema.timestamp]], index=False,
                                          hash_key=f"{seed:016d}"[-16:]).to_numpy()
    rows = frame[[schema.join_key, schema.timestamp, *schema.feature_names, schema.target]].assign(held=held)
    if gathered.sample is not None:
        rows, priority = pd.concat([gathered.sample, rows], ignore_index=True), \
            np.concatenate([gathered.priority, priority])
    gathered.sample, gathered.priority = _lowest(rows, priority, size)


def spill_schema(schema: Schema) -> pa.Schema:
    """The spill's columns: each row's side of the split, target and features."""
    return pa.schema([("held", pa.bool_()), (schema.target, pa.float64())]
                     + [(name, pa.float64()) for name in schema.feature_names])


def add_chunk(gathered: Gathered, frame: pd.DataFrame, schema: Schema, holdout_fraction: float, seed: int,
              writer: pq.ParquetWriter | None, sample_rows: int) -> None:
    """One chunk of rows into ``gathered`` (and its rows to the spill ``writer``)."""
    names = list(schema.feature_names)
    x = frame[names].to_numpy(dtype=np.float64)
    y = frame[schema.target].to_numpy(dtype=np.float64)
    held = holdout_mask(frame[schema.join_key].to_numpy(), holdout_fraction, seed)
    gathered.train.add(x[~held], y[~held])
    gathered.rows += len(frame)
    gathered.chunks += 1
    gathered.holdout_rows += int(held.sum())
    if (~held).any():
        newest = pd.Timestamp(frame[schema.timestamp][~held].max())
        newest = newest.tz_localize("UTC") if newest.tzinfo is None else newest
        gathered.event_time_max = max(filter(None, [gathered.event_time_max, newest]))
    if writer is not None:
        writer.write_table(pa.table([held, y, *x.T], schema=writer.schema))
    _keep_sample(gathered, frame, held, schema, seed, sample_rows)


def gather(chunks: Iterable[pd.DataFrame], schema: Schema, holdout_fraction: float, seed: int,
           spill: Path | None = None, sample_rows: int = SAMPLE_ROWS, check: bool = True) -> Gathered:
    """One pass: the training rows into the streamed least squares, every row's
    ``(held, target, features)`` to the Parquet file ``spill`` (read again by :func:`score`).
    ``check=False`` for one bucket of many: the split is checked on the merged counts."""
    gathered = Gathered(StreamedLeastSquares(len(schema.feature_names)))
    writer = pq.ParquetWriter(spill, spill_schema(schema), **SCRATCH_PARQUET) if spill is not None else None
    try:
        for frame in chunks:
            add_chunk(gathered, frame, schema, holdout_fraction, seed, writer, sample_rows)
            del frame  # not alive while the next chunk is retrieved
    finally:
        if writer is not None:
            writer.close()
    if check:
        check_split(gathered.train_rows, gathered.holdout_rows, holdout_fraction)
    return gathered


class Merging:
    """Passes of separate buckets folded in as they arrive, in any order, into what one
    pass over the buckets in index order leaves (:meth:`result`).

    Memory is bounded whatever the number of buckets: an arriving part's triangle
    waits only until those of the lower indices have come (triangles are merged in
    index order, so the result does not depend on the order parts arrive in), and
    its sample is folded at once into the running sample, the ``sample_rows``
    lowest hashes of the union so far, tagged with its bucket; the caller can drop
    the part as soon as :meth:`add` returns."""

    def __init__(self, columns: int, sample_rows: int = SAMPLE_ROWS):
        self.total = Gathered(StreamedLeastSquares(columns))
        self.sample_rows = sample_rows
        self.waiting: dict[int, StreamedLeastSquares] = {}  # triangles ahead of a missing lower index
        self.next = 0
        self.rows: pd.DataFrame | None = None
        self.priority = np.empty(0, dtype=np.uint64)

    def add(self, index: int, part: Gathered) -> None:
        total = self.total
        self.waiting[index] = part.train
        while self.next in self.waiting:
            total.train.merge(self.waiting.pop(self.next))
            self.next += 1
        total.rows += part.rows
        total.holdout_rows += part.holdout_rows
        total.chunks += part.chunks
        if part.event_time_max is not None:
            total.event_time_max = max(filter(None, [total.event_time_max, part.event_time_max]))
        if part.sample is not None and len(part.sample):
            tagged = part.sample.assign(_bucket=index)
            rows = tagged if self.rows is None else pd.concat([self.rows, tagged], ignore_index=True)
            self.rows, self.priority = _lowest(rows, np.concatenate([self.priority, part.priority]),
                                               self.sample_rows)

    def result(self) -> Gathered:
        """The merged pass: triangles past a missing index merged in index order, the
        sample in the one pass's row order (by bucket, each bucket's rows in their order)."""
        total = self.total
        for index in sorted(self.waiting):
            total.train.merge(self.waiting.pop(index))
        if self.rows is not None:
            order = np.argsort(self.rows["_bucket"].to_numpy(), kind="stable")
            total.sample = self.rows.iloc[order].drop(columns="_bucket").reset_index(drop=True)
            total.priority = self.priority[order]
            self.rows = None
        return total


def merge(parts: Iterable[tuple[int, Gathered]], columns: int, sample_rows: int = SAMPLE_ROWS) -> Gathered:
    """The passes ``(bucket index, gathered)`` as one pass over the buckets in index order,
    whatever order ``parts`` come in; each part is folded in as it comes (:class:`Merging`),
    so a generator of parts is merged in bounded memory."""
    merging = Merging(columns, sample_rows)
    for index, part in parts:
        merging.add(index, part)
    return merging.result()


def score(fit: Fit, spill: Path, schema: Schema) -> tuple[ErrorSums, ErrorSums]:
    """``(train, holdout)`` error sums of ``fit`` over the rows :func:`gather` spilled."""
    train, holdout = ErrorSums(), ErrorSums()
    # pre_buffer=False: pre-buffered, the reader kept every row group it had read (0.7 GiB at 10^7 rows)
    for batch in pq.ParquetFile(spill, pre_buffer=False).iter_batches(batch_size=1 << 16):
        held = batch.column("held").to_numpy(zero_copy_only=False)
        y = batch.column(schema.target).to_numpy()
        x = np.column_stack([batch.column(name).to_numpy() for name in schema.feature_names])
        predicted = fit.predict(x)
        train.add(y[~held], predicted[~held])
        holdout.add(y[held], predicted[held])
    return train, holdout
