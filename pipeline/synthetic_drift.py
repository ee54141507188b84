"""The synthetic customers' drift: which feature moves by how much, in what unit.

``MLOPS_SYNTHETIC_DRIFT`` (``feature=shift,...``, its shape checked by the
settings) names features of the synthetic customers and a shift in standard
deviations of each feature's *generated* distribution (:data:`GENERATED_SD`,
worked out from the distributions :func:`pipeline.synthetic._draw_features` draws;
a unit test holds the two together). :func:`shift_features` moves the drawn
values, rounds integer features and clips to the declared bounds, because the
features stage quarantines values outside them.
"""

from __future__ import annotations

import math

import numpy as np

from pipeline.dataset import CUSTOMERS as SYNTHETIC
from pipeline.dataset import DatasetError


def _discrete_uniform_sd(low: int, high_exclusive: int) -> float:
    n = high_exclusive - low
    return math.sqrt((n * n - 1) / 12.0)


# The standard deviation of each feature's generated distribution (as drawn by
# _draw_features): the unit of MLOPS_SYNTHETIC_DRIFT's shifts.
GENERATED_SD: dict[str, float] = {
    "age": _discrete_uniform_sd(18, 81),
    "tenure_months": _discrete_uniform_sd(0, 121),
    "monthly_spend": (500 - 10) / math.sqrt(12.0),
    "support_calls": math.sqrt(2.0),  # Poisson(2); the cap at 100 is never reached in practice
    "sessions_per_week": 30 / math.sqrt(12.0),
    "discount_rate": 0.5 / math.sqrt(12.0),
    "late_payments": 1.0,  # Poisson(1)
    "satisfaction": (5 - 1) / math.sqrt(12.0),
}


def parse_drift(spec: str | None) -> dict[str, float]:
    """``feature=shift,...`` (the settings validator has checked its shape) as
    ``{feature: shift}``; a feature the generator does not make is one line naming those it does."""
    if not spec:
        return {}
    shifts = {name.strip(): float(value) for name, value in
              (item.split("=", 1) for item in spec.split(",") if item.strip())}
    unknown = sorted(set(shifts) - set(SYNTHETIC.feature_names))
    if unknown:
        raise DatasetError(f"MLOPS_SYNTHETIC_DRIFT names {', '.join(unknown)}, not a feature of the synthetic "
                           f"customers; use one of: {', '.join(SYNTHETIC.feature_names)}")
    return shifts


def shift_features(features: dict[str, np.ndarray], drift: dict[str, float],
                   rng: np.random.Generator | None = None) -> None:
    """Move each named feature by its shift in generated standard deviations, then round
    integer features at random to a neighbour (up with the probability of the fraction,
    so the mean moves by the whole shift, even one below half a unit) and clip to the
    declared bounds (out-of-range values would be quarantined)."""
    for feature in SYNTHETIC.features:
        shift = drift.get(feature.name)
        if not shift:
            continue
        moved = features[feature.name] + shift * GENERATED_SD[feature.name]
        if feature.integer:
            floor = np.floor(moved)
            up = (rng or np.random.default_rng(0)).random(len(moved)) < moved - floor
            moved = (floor + up).astype(np.int64)
        features[feature.name] = np.clip(moved, feature.low, feature.high).astype(moved.dtype)
