"""The monitor's statistics, pure: quantile bins, PSI, KS, the training reference,
drift per feature, live error and freshness.

The training reference is per-feature quantile bins (``bins`` equal-mass bins
of the training rows) plus a quantile sketch of ``SKETCH`` points that stands
in for the training sample in the two-sample KS test (its CDF is within
1/SKETCH of the sample's, so the statistic is too). Train records it
(``reference(frame, feature_names)`` in its run record's ``reference``).

PSI (population stability index) over the reference bins:
``sum((a - e) * ln(a / e))`` with both fractions floored at ``EPS`` so an
empty bin does not make it infinite. Rules of thumb: < 0.1 stable, 0.1-0.2
moderate, > 0.2 shifted; KS's statistic is the largest gap between the two
empirical CDFs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats


EPS = 1e-4
SKETCH = 1001


@dataclass(frozen=True)
class Thresholds:
    """When the report calls a figure bad; the Prometheus rules use the same numbers."""

    psi: float = 0.2
    ks: float = 0.1
    window_seconds: float = 24 * 3600.0  # how far back the prediction log is read
    min_rows: int = 100  # fewer live values than this: no drift figure (too noisy to judge)

    @classmethod
    def of(cls, settings) -> Thresholds:
        """From the settings (``MLOPS_MONITOR_PSI_THRESHOLD`` ...)."""
        return cls(psi=settings.monitor_psi_threshold, ks=settings.monitor_ks_threshold,
                   window_seconds=settings.monitor_window_seconds, min_rows=settings.monitor_min_rows)


def quantile_edges(values: np.ndarray, bins: int = 10) -> np.ndarray:
    """The inner edges of ``bins`` equal-mass bins of ``values`` (duplicates merged)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return np.array([])
    return np.unique(np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1]))


def bin_fractions(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Fraction of the finite ``values`` in each of the ``len(edges) + 1`` bins (right-closed)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    counts = np.bincount(np.searchsorted(np.asarray(edges), values, side="left"), minlength=len(edges) + 1)
    return counts / max(len(values), 1)


def psi(expected: np.ndarray, actual: np.ndarray, eps: float = EPS) -> float:
    """Population stability index of two bin-fraction vectors."""
    e = np.clip(np.asarray(expected, dtype=np.float64), eps, None)
    a = np.clip(np.asarray(actual, dtype=np.float64), eps, None)
    return float(np.sum((a - e) * np.log(a / e)))


def ks(reference_sample: np.ndarray, sample: np.ndarray) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov ``(statistic, p-value)`` (scipy.stats.ks_2samp)."""
    sample = np.asarray(sample, dtype=np.float64)
    sample = sample[np.isfinite(sample)]
    result = stats.ks_2samp(np.asarray(reference_sample, dtype=np.float64), sample)
    return float(result.statistic), float(result.pvalue)


def describe(values: np.ndarray, bins: int = 10) -> dict:
    """One column's reference: edges, fractions, a quantile sketch, mean and std."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    edges = quantile_edges(values, bins)
    return {"edges": edges.tolist(), "fractions": bin_fractions(values, edges).tolist(),
            "sketch": np.quantile(values, np.linspace(0, 1, SKETCH)).tolist() if len(values) else [],
            "mean": float(values.mean()) if len(values) else None,
            "std": float(values.std()) if len(values) else None, "rows": int(len(values))}


def reference(frame: pd.DataFrame, feature_names, bins: int = 10,
              predictions: np.ndarray | None = None, timestamp: str | None = None) -> dict:
    """The training reference of ``feature_names`` in ``frame`` (JSON-able; train may record it).

    ``predictions``: the model's on the same rows (the prediction shift's reference);
    ``timestamp``: the event-time column, whose newest value marks where "newer features" begin."""
    ref = {"bins": bins, "rows": int(len(frame)),
           "features": {name: describe(frame[name].to_numpy(dtype=np.float64), bins) for name in feature_names}}
    if timestamp is not None and len(frame):
        ref["event_time_max"] = pd.Timestamp(frame[timestamp].max()).isoformat()
    if predictions is not None:
        ref["prediction"] = describe(predictions, bins)
    return ref


def drift(ref: dict, values: np.ndarray, thresholds: Thresholds) -> dict:
    """PSI and KS of ``values`` against one column's reference; ``drifted`` when either crosses."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if len(values) < thresholds.min_rows or not ref["sketch"]:
        return {"n": int(len(values)), "psi": None, "ks": None, "ks_pvalue": None, "drifted": False,
                "note": f"fewer than {thresholds.min_rows} values"}
    p = psi(ref["fractions"], bin_fractions(values, np.asarray(ref["edges"])))
    statistic, pvalue = ks(np.asarray(ref["sketch"]), values)
    mean_shift = ((float(values.mean()) - ref["mean"]) / ref["std"]) if ref.get("std") else 0.0
    return {"n": int(len(values)), "psi": p, "ks": statistic, "ks_pvalue": pvalue,
            "mean_shift_sigmas": mean_shift,
            "live_fractions": bin_fractions(values, np.asarray(ref["edges"])).tolist(),
            "drifted": bool(p > thresholds.psi or statistic > thresholds.ks)}


def live_error(predictions: pd.DataFrame, labels: pd.DataFrame, key: str, timestamp: str,
               target: str, horizon: pd.Timedelta | None = None) -> dict:
    """RMSE/MAE of logged predictions against the first label of the same entity at or after
    the prediction's time (``predictions``: entity_key, time, prediction)."""
    if predictions is None or not len(predictions) or not len(labels):
        return {"matched": 0, "rmse": None, "mae": None}
    p = predictions[["entity_key", "time", "prediction"]].copy()
    p["time"] = pd.to_datetime(p["time"], utc=True)
    lab = pd.DataFrame({"entity_key": labels[key].astype(str),
                        "time": pd.to_datetime(labels[timestamp], utc=True).astype(p["time"].dtype),
                        "label": labels[target].to_numpy(dtype=np.float64)})
    joined = pd.merge_asof(p.sort_values("time"), lab.sort_values("time"), on="time", by="entity_key",
                           direction="forward", tolerance=horizon, allow_exact_matches=True)
    joined = joined.dropna(subset=["label"])
    if not len(joined):
        return {"matched": 0, "rmse": None, "mae": None}
    residual = joined["label"].to_numpy() - joined["prediction"].to_numpy()
    return {"matched": int(len(joined)), "rmse": float(np.sqrt(np.mean(residual ** 2))),
            "mae": float(np.mean(np.abs(residual)))}


def freshness(now: float, newest_event: str | None, materialized_end: str | None) -> dict:
    """Seconds since the newest offline event time and since the end of the last materialization."""
    def age(iso):
        return None if not iso else max(0.0, now - pd.Timestamp(iso).timestamp())
    return {"offline_seconds": age(newest_event), "online_seconds": age(materialized_end),
            "newest_event_time": newest_event, "materialized_end": materialized_end}
