"""The built-in synthetic customers: seeded parts drawn from a known truth, written as CSV.

:func:`draw_chunk` is pure: a part depends on ``(rows, seed, index)`` (and the
batch and drift) alone; its target is drawn from :data:`TRUTH` plus Gaussian
noise, and a few values are broken on purpose, so the features stage's
quarantine and the fit can both be checked. :func:`write_chunk` writes a part
as the ingest stage stores it.

Batches and drift (the monitor's drill, docs/monitoring.md): batch ``n``
(``MLOPS_SYNTHETIC_BATCH``) holds the same customers observed over the ``SPAN``
after batch ``n-1``'s, drawn from a seed stream of its own. ``MLOPS_SYNTHETIC_DRIFT``
(``feature=shift,...``) moves a feature's values by ``shift`` standard
deviations of its generated distribution (:mod:`pipeline.synthetic_drift`) *before* the
target is drawn: the covariate moves, the truth stays (covariate shift). Values
are then rounded (integer features) and clipped to the declared bounds, since
the features stage quarantines a value outside them; a large shift therefore
piles values up at a bound. Batch 0 without drift is the data it always was.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv

from pipeline.dataset import CUSTOMERS
from pipeline.synthetic_drift import shift_features

# The truth the generator draws the target from: training must recover it.
TRUE_INTERCEPT = 20.0
TRUE_COEFFICIENTS: dict[str, float] = {
    "age": 0.3,
    "tenure_months": 0.05,
    "monthly_spend": 0.8,
    "support_calls": -2.0,
    "sessions_per_week": 1.5,
    "discount_rate": -40.0,
    "late_payments": -3.0,
    "satisfaction": 6.0,
}
NOISE_SD = 5.0
# Bump when the generator changes meaning: old raw data is not reused.
# 2: the parts are written by pyarrow (tiny numbers as 0.0000123, not 1.23e-05).
GENERATOR_VERSION = 2
# The built-in declaration's schema: the columns the generator writes.
SYNTHETIC = CUSTOMERS
# Rows per CSV part. Fixed, so the data depends on (rows, seed) alone.
CHUNK_ROWS = 100_000
ENTITY_BASE = 1000
ROWS_PER_ENTITY = 5
START = pd.Timestamp("2026-01-01T00:00:00Z")
SPAN = pd.Timedelta(days=90)
DEFAULT_BAD_FRACTION = 0.005
BAD_KINDS = ("missing", "wrong_type", "out_of_range")


@dataclass(frozen=True)
class Truth:
    intercept: float
    coefficients: dict[str, float]
    noise_sd: float

    def as_dict(self) -> dict:
        return {"intercept": self.intercept, "coefficients": dict(self.coefficients),
                "noise_sd": self.noise_sd}


TRUTH = Truth(TRUE_INTERCEPT, TRUE_COEFFICIENTS, NOISE_SD)


def n_entities(rows: int) -> int:
    return max(1, rows // ROWS_PER_ENTITY)


def sample_entity() -> int:
    """An entity that every data set contains (GET /predict answers for it)."""
    return ENTITY_BASE


def _draw_features(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    return {
        "age": rng.integers(18, 81, n),
        "tenure_months": rng.integers(0, 121, n),
        "monthly_spend": rng.uniform(10, 500, n),
        "support_calls": np.minimum(rng.poisson(2.0, n), 100),
        "sessions_per_week": rng.uniform(0, 30, n),
        "discount_rate": rng.uniform(0, 0.5, n),
        "late_payments": np.minimum(rng.poisson(1.0, n), 120),
        "satisfaction": rng.uniform(1, 5, n),
    }


@dataclass(frozen=True)
class Chunk:
    """One generated part: numeric columns (the timestamp as text), and the bad values to
    put in place, ``(row, feature index, value)`` in the order they were drawn."""

    columns: dict[str, np.ndarray | pa.Array]
    bad: list[tuple[int, int, object]]
    injected: dict[str, int]


def draw_chunk(rows: int, seed: int, index: int, bad_fraction: float = DEFAULT_BAD_FRACTION,
               batch: int = 0, drift: dict[str, float] | None = None) -> Chunk:
    """Rows ``[index*CHUNK_ROWS, ...)`` of batch ``batch`` of the data set of ``rows`` rows.

    Batch ``n``'s event times start ``n * SPAN`` after batch 0's; ``drift``
    shifts features (see the module's docstring). The bad values come back
    apart from the numbers, so writing the part needs no column of Python objects."""
    first = index * CHUNK_ROWS
    n = min(CHUNK_ROWS, rows - first)
    if n <= 0:
        raise ValueError(f"chunk {index} is past the end of {rows} rows")
    # batch 0 keeps the stream it always had (same data, same DVC hash); batch n its own
    rng = np.random.default_rng([seed, index] if batch == 0 else [seed, index, batch])
    position = np.arange(first, first + n)
    entities = ENTITY_BASE + position % n_entities(rows)
    step_us = SPAN.value // 1000 / rows
    micros = (START + batch * SPAN).value // 1000 + (position * step_us).astype(np.int64)
    # Arrow writes a microsecond timestamp as 2026-01-01 00:00:07.776000 (six digits always):
    # the T and the Z make it ISO 8601 in UTC, ten times as fast as strftime
    text = pc.cast(pa.array(micros, pa.timestamp("us")), pa.string())
    stamps = pc.binary_join_element_wise(pc.utf8_replace_slice(text, 10, 11, "T"), "Z", "")
    features = _draw_features(rng, n)
    # the rounding draws from a stream of its own: the other columns are those of the undrifted batch
    shift_features(features, drift or {}, np.random.default_rng([seed, index, batch, 1]))
    target = TRUTH.intercept + sum(
        TRUTH.coefficients[name] * features[name].astype(float) for name in SYNTHETIC.feature_names
    ) + rng.normal(0.0, TRUTH.noise_sd, n)
    columns = {SYNTHETIC.join_key: entities, SYNTHETIC.timestamp: stamps, **features, SYNTHETIC.target: target}
    injected = dict.fromkeys(BAD_KINDS, 0)
    bad: list[tuple[int, int, object]] = []
    n_bad = int(rng.binomial(n, bad_fraction)) if bad_fraction > 0 else 0
    if n_bad:
        rows_bad = rng.choice(n, size=n_bad, replace=False)
        kinds = rng.integers(0, len(BAD_KINDS), n_bad)
        which = rng.integers(0, len(SYNTHETIC.feature_names), n_bad)
        for row, kind, col in zip(rows_bad, kinds, which):
            feature = SYNTHETIC.features[col]
            beyond = feature.high * 10 + 1  # written as an integer where it is one, as the data always was
            value = {"missing": "", "wrong_type": "n/a",
                     "out_of_range": int(beyond) if float(beyond).is_integer() else beyond}[BAD_KINDS[kind]]
            bad.append((int(row), int(col), value))
            injected[BAD_KINDS[kind]] += 1
    return Chunk(columns, bad, injected)


def generate_chunk(rows: int, seed: int, index: int, bad_fraction: float = DEFAULT_BAD_FRACTION,
                   batch: int = 0, drift: dict[str, float] | None = None) -> tuple[pd.DataFrame, dict[str, int]]:
    """:func:`draw_chunk` as one frame, as the CSV holds it (the bad values in place, so
    a feature column with any is a column of objects), and how many bad rows of each
    kind were injected, so the features stage's quarantine can be checked."""
    chunk = draw_chunk(rows, seed, index, bad_fraction, batch, drift)
    frame = pd.DataFrame({name: values.to_numpy(zero_copy_only=False) if isinstance(values, pa.Array) else values
                          for name, values in chunk.columns.items()})
    if chunk.bad:
        frame = frame.astype({name: object for name in SYNTHETIC.feature_names})
        for row, col, value in chunk.bad:
            frame.iat[row, frame.columns.get_loc(SYNTHETIC.features[col].name)] = value
    return frame, chunk.injected


def _as_text(numbers: np.ndarray, odd: np.ndarray, values: np.ndarray) -> pa.Array:
    """A number column as Arrow writes it, the ``odd`` rows' text put in their place."""
    return pc.replace_with_mask(pa.array(numbers).cast(pa.string()), pa.array(odd),
                                pa.array(values, type=pa.string()))


def write_chunk(chunk: Chunk, path: Path) -> None:
    """Write a drawn part with pyarrow's CSV writer (several times pandas' ``to_csv``),
    the bad values put in place without a column of Python objects. Arrow writes the
    shortest text that reads back as the same float (``0.0000123`` where pandas wrote
    ``1.23e-05``)."""
    columns = dict(chunk.columns)
    cells: dict[int, list[tuple[int, object]]] = {}
    for row, col, value in chunk.bad:
        cells.setdefault(col, []).append((row, value))
    for col, found in cells.items():
        name = SYNTHETIC.features[col].name
        rows = np.array([row for row, _ in found])
        order = np.argsort(rows, kind="stable")
        odd = np.zeros(len(columns[name]), bool)
        odd[rows] = True
        numbers = np.where(odd, 0, columns[name]).astype(np.int64 if SYNTHETIC.features[col].integer
                                                          else np.float64)
        columns[name] = _as_text(numbers, odd, np.array([str(found[i][1]) for i in order], dtype=object))
    pa_csv.write_csv(pa.table(columns), path, write_options=pa_csv.WriteOptions(quoting_style="none"))
