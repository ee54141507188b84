"""Stage 1, ingest: seeded synthetic CSVs with a known truth, versioned with DVC.

The generator is pure (:func:`generate_chunk`); :func:`run` writes the parts
atomically under ``<shared>/data/raw/`` and puts the folder under DVC.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline import schema, versioning
from pipeline.io import atomic_path, remove_stale_temps
from pipeline.stage import StageContext, StageResult

log = logging.getLogger(__name__)

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


def generate_chunk(rows: int, seed: int, index: int,
                   bad_fraction: float = DEFAULT_BAD_FRACTION) -> tuple[pd.DataFrame, dict[str, int]]:
    """Rows ``[index*CHUNK_ROWS, ...)`` of the data set of ``rows`` rows.

    Returns the chunk (as the CSV will hold it) and how many bad rows of each
    kind were injected, so the features stage's quarantine can be checked.
    """
    first = index * CHUNK_ROWS
    n = min(CHUNK_ROWS, rows - first)
    if n <= 0:
        raise ValueError(f"chunk {index} is past the end of {rows} rows")
    rng = np.random.default_rng([seed, index])
    position = np.arange(first, first + n)
    entities = ENTITY_BASE + position % n_entities(rows)
    step_us = SPAN.value // 1000 / rows
    stamps = START + pd.to_timedelta((position * step_us).astype(np.int64), unit="us")
    features = _draw_features(rng, n)
    target = TRUTH.intercept + sum(
        TRUTH.coefficients[name] * features[name].astype(float) for name in schema.FEATURE_NAMES
    ) + rng.normal(0.0, TRUTH.noise_sd, n)
    frame = pd.DataFrame({
        schema.JOIN_KEY: entities,
        schema.TIMESTAMP: stamps.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        **features,
        schema.TARGET: target,
    })
    injected = dict.fromkeys(BAD_KINDS, 0)
    n_bad = int(rng.binomial(n, bad_fraction)) if bad_fraction > 0 else 0
    if n_bad:
        rows_bad = rng.choice(n, size=n_bad, replace=False)
        kinds = rng.integers(0, len(BAD_KINDS), n_bad)
        columns = rng.integers(0, len(schema.FEATURE_NAMES), n_bad)
        frame = frame.astype({name: object for name in schema.FEATURE_NAMES})
        for row, kind, col in zip(rows_bad, kinds, columns):
            feature = schema.FEATURES[col]
            value = {"missing": "", "wrong_type": "n/a",
                     "out_of_range": feature.high * 10 + 1}[BAD_KINDS[kind]]
            frame.iat[row, frame.columns.get_loc(feature.name)] = value
            injected[BAD_KINDS[kind]] += 1
    return frame, injected


def part_name(index: int) -> str:
    return f"part-{index:05d}.csv"


def run(ctx: StageContext, bad_fraction: float = DEFAULT_BAD_FRACTION) -> StageResult:
    settings = ctx.settings
    rows, seed = settings.rows, settings.seed
    inputs = {"rows": rows, "seed": seed, "bad_fraction": bad_fraction,
              "schema_version": schema.SCHEMA_VERSION}
    result = ctx.start(inputs)
    if result.unchanged() and versioning.changed_files(settings.shared) == []:
        return result.skip("raw data for these rows and seed is already versioned",
                           result.previous.outputs)

    raw = settings.raw_dir
    raw.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(raw)
    parts = math.ceil(rows / CHUNK_ROWS)
    wanted = {part_name(i) for i in range(parts)}
    for stale in raw.glob("part-*.csv"):
        if stale.name not in wanted:
            stale.unlink()
    injected = dict.fromkeys(BAD_KINDS, 0)
    started = time.monotonic()
    for index in range(parts):
        frame, bad = generate_chunk(rows, seed, index, bad_fraction)
        for kind, count in bad.items():
            injected[kind] += count
        with atomic_path(raw / part_name(index)) as tmp:
            frame.to_csv(tmp, index=False)
        done = min(rows, (index + 1) * CHUNK_ROWS)
        log.info("ingest: %d/%d rows written (%.0f rows/s)", done, rows,
                 done / max(time.monotonic() - started, 1e-9))
    log.info("ingest: versioning %s with DVC", raw)
    dvc_hash = versioning.add_and_push(settings.shared, raw)
    outputs = {
        "raw_dir": str(raw),
        "parts": sorted(wanted),
        "rows": rows,
        "entities": n_entities(rows),
        "sample_entity": sample_entity(),
        "bad_rows_injected": injected,
        "dvc_hash": dvc_hash,
        "truth": TRUTH.as_dict(),
    }
    return result.done(outputs, f"{rows} rows in {parts} part(s), DVC {dvc_hash}")
