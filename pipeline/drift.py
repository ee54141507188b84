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

Both need only counts: how many live values fall in each reference bin, and
how many lie below and at or below each sketch point. :class:`Tally` keeps
those counts and takes the values batch by batch (each batch sorted, counted
with ``searchsorted`` and dropped), so a drift pass over any number of logged
predictions holds one batch in memory. The KS statistic from those counts is
exactly scipy's ``ks_2samp(sketch, values)``: between two sketch points the
sketch's CDF is flat while the sample's only rises, so the largest gap is at a
sketch point or just before one. The p-value is the asymptotic Kolmogorov
one; the thresholds judge the statistic.

pandas is imported inside the functions that need it: the drift pass itself
runs on NumPy arrays only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from pipeline.predlog import FEATURE_PREFIX

EPS = 1e-4
SKETCH = 1001


@dataclass(frozen=True)
class Thresholds:
    """When the report calls a figure bad; the Prometheus rules use the same numbers."""

    psi: float = 0.2
    ks: float = 0.1
    window_seconds: float = 24 * 3600.0  # how far back the prediction log is read
    min_rows: int = 100  # fewer live values than this: no drift figure (too noisy to judge)
    stale_seconds: float = 86400.0  # features older than this are stale (rules.yml's MlopsStaleFeatures)

    @classmethod
    def of(cls, settings) -> Thresholds:
        """From the settings (``MLOPS_MONITOR_PSI_THRESHOLD`` ...)."""
        return cls(psi=settings.monitor_psi_threshold, ks=settings.monitor_ks_threshold,
                   window_seconds=settings.monitor_window_seconds, min_rows=settings.monitor_min_rows)


def _finite(values) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    return values if np.isfinite(values).all() else values[np.isfinite(values)]


def _sorted_finite(values) -> np.ndarray:
    """The finite values, sorted: NaN sorts last, so the finite ones are one slice (no mask pass)."""
    values = np.sort(np.asarray(values, dtype=np.float64))
    return values[np.searchsorted(values, -np.inf, side="right"):np.searchsorted(values, np.inf, side="left")]


def quantile_edges(values: np.ndarray, bins: int = 10) -> np.ndarray:
    """The inner edges of ``bins`` equal-mass bins of ``values`` (duplicates merged)."""
    values = _finite(values)
    if len(values) == 0:
        return np.array([])
    return np.unique(np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1]))


def _bin_counts(sorted_values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts per right-closed bin (``edges[i-1] < v <= edges[i]``) of already sorted values."""
    at_or_below = np.searchsorted(sorted_values, edges, side="right")
    return np.diff(at_or_below, prepend=0, append=len(sorted_values))


def bin_fractions(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Fraction of the finite ``values`` in each of the ``len(edges) + 1`` bins (right-closed)."""
    values = _sorted_finite(values)
    return _bin_counts(values, np.asarray(edges, dtype=np.float64)) / max(len(values), 1)


def psi(expected: np.ndarray, actual: np.ndarray, eps: float = EPS) -> float:
    """Population stability index of two bin-fraction vectors."""
    e = np.clip(np.asarray(expected, dtype=np.float64), eps, None)
    a = np.clip(np.asarray(actual, dtype=np.float64), eps, None)
    return float(np.sum((a - e) * np.log(a / e)))


def kolmogorov_pvalue(statistic: float, m: int, n: int) -> float:
    """Asymptotic two-sided p-value of a two-sample KS statistic (sizes ``m`` and ``n``),
    with Stephens' small-sample correction of the Kolmogorov distribution's argument."""
    if m == 0 or n == 0:
        return float("nan")
    en = np.sqrt(m * n / (m + n))
    lam = (en + 0.12 + 0.11 / en) * statistic
    if lam < 0.2:  # the series converges slowly there, and the tail is 1 to many digits
        return 1.0
    k = np.arange(1, 101)
    return float(np.clip(2.0 * np.sum((-1.0) ** (k - 1) * np.exp(-2.0 * k * k * lam * lam)), 0.0, 1.0))


class Tally:
    """The counts of a stream of values against one column's reference: enough for
    PSI, KS, the mean shift and the share per reference bin, in memory that does
    not grow with the stream."""

    def __init__(self, ref: dict) -> None:
        self.ref = ref
        self.edges = np.asarray(ref["edges"], dtype=np.float64)
        sketch = np.sort(np.asarray(ref["sketch"], dtype=np.float64))
        self.points, counts = np.unique(sketch, return_counts=True)
        self.sketch_size = len(sketch)
        # the sketch's CDF at each of its points, and just before it
        self.ref_at = np.cumsum(counts) / max(len(sketch), 1)
        self.ref_before = self.ref_at - counts / max(len(sketch), 1)
        self.bins = np.zeros(len(self.edges) + 1, dtype=np.int64)
        self.below = np.zeros(len(self.points), dtype=np.int64)
        self.at_or_below = np.zeros(len(self.points), dtype=np.int64)
        self.n = 0
        self.total = 0.0

    def add(self, values) -> Tally:
        values = _sorted_finite(values)
        if len(values):
            self.n += len(values)
            self.total += float(values.sum())
            self.bins += _bin_counts(values, self.edges)
            self.below += np.searchsorted(values, self.points, side="left")
            self.at_or_below += np.searchsorted(values, self.points, side="right")
        return self

    def ks(self) -> tuple[float, float]:
        """``(statistic, p-value)`` of the values so far against the sketch."""
        if not self.n or not self.sketch_size:
            return float("nan"), float("nan")
        statistic = float(max(np.abs(self.ref_at - self.at_or_below / self.n).max(),
                              np.abs(self.ref_before - self.below / self.n).max()))
        return statistic, kolmogorov_pvalue(statistic, self.sketch_size, self.n)

    def result(self, thresholds: Thresholds) -> dict:
        """The column's drift figures: ``drifted`` when PSI or KS crosses its threshold."""
        if self.n < thresholds.min_rows or not self.sketch_size:
            return {"n": int(self.n), "psi": None, "ks": None, "ks_pvalue": None, "drifted": False,
                    "note": f"fewer than {thresholds.min_rows} values"}
        fractions = self.bins / self.n
        p = psi(self.ref["fractions"], fractions)
        statistic, pvalue = self.ks()
        std = self.ref.get("std")
        mean_shift = ((self.total / self.n - self.ref["mean"]) / std) if std else 0.0
        return {"n": int(self.n), "psi": p, "ks": statistic, "ks_pvalue": pvalue,
                "mean_shift_sigmas": mean_shift, "live_fractions": fractions.tolist(),
                "drifted": bool(p > thresholds.psi or statistic > thresholds.ks)}


def tally(batches: Iterable, refs: dict[str, dict], column_of: Callable[[str], str],
          thresholds: Thresholds) -> tuple[dict[str, dict], int]:
    """Drift figures of each column in ``refs`` over a stream of Arrow record batches, and the rows seen."""
    tallies = {name: Tally(ref) for name, ref in refs.items()}
    rows = 0
    for batch in batches:
        rows += batch.num_rows
        for name, t in tallies.items():
            t.add(batch.column(column_of(name)).to_numpy(zero_copy_only=False))
    return {name: t.result(thresholds) for name, t in tallies.items()}, rows


def log_drift(scan: Callable[[list[str]], Iterable], ref: dict, names,
              thresholds: Thresholds) -> tuple[dict[str, dict], dict, int]:
    """Per-feature drift of the logged predictions, the predictions' shift, and the rows read.

    ``scan(columns)`` yields the log window's batches with those columns
    (:func:`pipeline.predlog.scan_log`); the monitor and the benchmark pass it."""
    refs = {FEATURE_PREFIX + n: ref["features"][n] for n in names}
    if ref.get("prediction"):
        refs["prediction"] = ref["prediction"]
    figures, rows = tally(scan(list(refs)), refs, lambda column: column, thresholds)
    prediction = figures.pop("prediction", {"psi": None, "note": "no reference predictions"})
    return {n: figures[FEATURE_PREFIX + n] for n in names}, prediction, rows


def ks(reference_sample: np.ndarray, sample: np.ndarray) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov ``(statistic, p-value)``; the statistic equals
    ``scipy.stats.ks_2samp``'s, the p-value is the asymptotic one."""
    return Tally({"edges": [], "sketch": _finite(reference_sample)}).add(sample).ks()


def describe(values: np.ndarray, bins: int = 10) -> dict:
    """One column's reference: edges, fractions, a quantile sketch, mean and std."""
    values = _finite(values)
    edges = quantile_edges(values, bins)
    return {"edges": edges.tolist(), "fractions": bin_fractions(values, edges).tolist(),
            "sketch": np.quantile(values, np.linspace(0, 1, SKETCH)).tolist() if len(values) else [],
            "mean": float(values.mean()) if len(values) else None,
            "std": float(values.std()) if len(values) else None, "rows": int(len(values))}


def reference(frame, feature_names, bins: int = 10,
              predictions: np.ndarray | None = None, timestamp: str | None = None) -> dict:
    """The training reference of ``feature_names`` in ``frame`` (JSON-able; train may record it).

    ``predictions``: the model's on the same rows (the prediction shift's reference);
    ``timestamp``: the event-time column, whose newest value marks where "newer features" begin."""
    import pandas as pd

    ref = {"bins": bins, "rows": int(len(frame)),
           "features": {name: describe(frame[name].to_numpy(dtype=np.float64), bins) for name in feature_names}}
    if timestamp is not None and len(frame):
        ref["event_time_max"] = pd.Timestamp(frame[timestamp].max()).isoformat()
    if predictions is not None:
        ref["prediction"] = describe(predictions, bins)
    return ref


def drift(ref: dict, values: np.ndarray, thresholds: Thresholds) -> dict:
    """PSI and KS of ``values`` against one column's reference; ``drifted`` when either crosses."""
    return Tally(ref).add(values).result(thresholds)


def live_error(predictions, labels, key: str, timestamp: str, target: str, horizon=None) -> dict:
    """RMSE/MAE of logged predictions against the first label of the same entity at or after
    the prediction's time (``predictions``: entity_key, time, prediction)."""
    import pandas as pd

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
    import pandas as pd

    def age(iso):
        return None if not iso else max(0.0, now - pd.Timestamp(iso).timestamp())
    return {"offline_seconds": age(newest_event), "online_seconds": age(materialized_end),
            "newest_event_time": newest_event, "materialized_end": materialized_end}
