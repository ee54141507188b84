"""The monitor stage: drift, freshness, data quality and live error, as a report.

The statistics are in :mod:`pipeline.drift` (pure); the page and its figures in
:mod:`pipeline.monitor_report`. :func:`run` reads the prediction log's window
(:func:`pipeline.predlog.scan_log`: only the columns it needs, batch by batch),
the offline features newer than the training reference and the upstream run
records, writes ``<shared>/monitoring/report.json``, ``report.html`` and the
figures' PNGs, each atomically, and then logs them to the MLflow run of the
model version the alias serves (:func:`pipeline.monitor_report.log_to_mlflow`).

Train records the training reference; for a model trained before it did, the
monitor builds it once per model version from the features Parquet rows and
keeps it beside the report.

The features and labels are read through :func:`pipeline.lakehouse.dataset`,
only the columns needed: the Parquet files on the volume, or with the lakehouse
the published version in the object store; the MLflow run's artifacts then go
to the store too, its keys in the environment for that block only.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline import lakehouse
from pipeline.drift import (EPS, SKETCH, Thresholds, bin_fractions, describe, drift, freshness,  # noqa: F401
                            ks, live_error, log_drift, psi, quantile_edges, reference, tally)
from pipeline.io import atomic_write_bytes, atomic_write_json
from pipeline.predlog import predictions_dir, scan_log
from pipeline.settings import Settings
from pipeline.stage import StageContext, StageResult

log = logging.getLogger(__name__)


# ------------------------------------------------------------------- reading
def model_predictions(train_outputs: dict, frame: pd.DataFrame, feature_names) -> np.ndarray | None:
    """The trained model's predictions on ``frame``, from the coefficients train recorded."""
    coefficients = train_outputs.get("coefficients")
    if not coefficients or "intercept" not in train_outputs:
        return None
    x = frame[list(feature_names)].to_numpy(dtype=np.float64)
    return train_outputs["intercept"] + x @ np.array([coefficients[n] for n in feature_names])


def training_reference(settings: Settings, schema, train_outputs: dict, folder: Path,
                       bins: int = 10) -> dict:
    """The reference of the model train last registered: train's own, else built once and kept."""
    if train_outputs.get("reference"):
        return {**train_outputs["reference"], "source": "train run record"}
    version = train_outputs.get("model_version")
    cached = folder / f"reference-v{version}.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    frame = lakehouse.dataset(settings, "features").to_table(
        columns=[schema.join_key, schema.timestamp, *schema.feature_names]).to_pandas()
    ref = reference(frame, schema.feature_names, bins,
                    model_predictions(train_outputs, frame, schema.feature_names), schema.timestamp)
    ref.update(source=f"features Parquet when model version {version} was first monitored",
               model_version=version)
    atomic_write_json(cached, ref)
    return ref


def _time_filter(dataset, column: str, op: str, when):
    """``column <op> when`` for a dataset whose timestamp column may or may not carry a zone."""
    import pyarrow.dataset as ds

    kind = dataset.schema.field(column).type
    cut = pd.Timestamp(when)
    zone = getattr(kind, "tz", None)
    if zone is None and cut.tzinfo is not None:
        cut = cut.tz_convert("UTC").tz_localize(None)
    elif zone is not None and cut.tzinfo is None:
        cut = cut.tz_localize("UTC")
    field, value = ds.field(column), pa.scalar(cut.to_pydatetime(), kind)
    return {">": field > value, ">=": field >= value, "<=": field <= value}[op]


def newest_drift(settings: Settings, schema, ref: dict, thresholds: Thresholds) -> tuple[dict[str, dict], int]:
    """Drift of the offline feature rows newer than the reference's newest event time."""
    dataset = lakehouse.dataset(settings, "features")
    after = ref.get("event_time_max")
    where = _time_filter(dataset, schema.timestamp, ">", after) if after else None
    names = list(schema.feature_names)
    return tally(dataset.to_batches(columns=names, filter=where, batch_size=65_536),
                 {n: ref["features"][n] for n in names}, lambda n: n, thresholds)


def labelled_error(settings: Settings, schema, since: float, until: float) -> dict:
    """Live error of the window's predictions that a label (arriving at or after them) can match."""
    dataset = lakehouse.dataset(settings, "labels")
    since_ts = pd.Timestamp(since, unit="s", tz="UTC")
    labels = dataset.to_table(columns=[schema.join_key, schema.timestamp, schema.target],
                              filter=_time_filter(dataset, schema.timestamp, ">=", since_ts)).to_pandas()
    if not len(labels):
        return live_error(None, labels, schema.join_key, schema.timestamp, schema.target)
    # only a prediction made before the newest label can have one: read just those
    newest = pd.Timestamp(labels[schema.timestamp].max())
    newest = newest.tz_localize("UTC") if newest.tzinfo is None else newest
    batches = list(scan_log(predictions_dir(settings.shared), since, min(until, newest.timestamp()),
                            ["entity_key", "time", "prediction"]))
    frame = pa.Table.from_batches(batches).to_pandas() if batches else None
    return live_error(frame, labels, schema.join_key, schema.timestamp, schema.target)


# ------------------------------------------------------------------- report
def build_report(settings: Settings, schema, upstream: dict, now: float, thresholds: Thresholds,
                 folder: Path) -> dict:
    features_rec, feast_rec, train_rec, promote_rec = (upstream.get(n)
                                                       for n in ("features", "feast", "train", "promote"))
    train_out = train_rec.outputs if train_rec else {}
    ref = training_reference(settings, schema, train_out, folder)
    names = list(schema.feature_names)

    since = now - thresholds.window_seconds
    logged_drift, prediction, logged_rows = log_drift(
        lambda columns: scan_log(predictions_dir(settings.shared), since, now, columns), ref, names, thresholds)
    offline_drift, newest_rows = newest_drift(settings, schema, ref, thresholds)
    live = labelled_error(settings, schema, since, now)
    metrics = train_out.get("metrics", {})
    live["holdout_rmse"] = metrics.get("holdout_rmse", metrics.get("train_rmse"))
    live["holdout_mae"] = metrics.get("holdout_mae", metrics.get("train_mae"))

    f_out = features_rec.outputs if features_rec else {}
    rows_in, quarantined = f_out.get("rows_in"), f_out.get("rows_quarantined")
    drifted = sorted({n for n in names if logged_drift[n]["drifted"] or offline_drift[n]["drifted"]})
    return {
        "generated_at": pd.Timestamp(now, unit="s", tz="UTC").isoformat(),
        "generated_at_seconds": now,
        "dataset": schema.dataset,
        "model": {"name": train_out.get("model_name"), "version": train_out.get("model_version"),
                  "alias": promote_rec.outputs.get("alias") if promote_rec else None,
                  "served_version": promote_rec.outputs.get("alias_version") if promote_rec else None},
        "thresholds": {"psi": thresholds.psi, "ks": thresholds.ks, "window_seconds": thresholds.window_seconds,
                       "min_rows": thresholds.min_rows, "stale_seconds": thresholds.stale_seconds},
        "reference": {k: ref.get(k) for k in ("source", "rows", "bins", "event_time_max", "model_version")},
        "predictions_logged": int(logged_rows),
        "features": logged_drift,
        "offline_features": {"rows": int(newest_rows), "features": offline_drift},
        "prediction": prediction,
        "freshness": freshness(now, f_out.get("event_time_max"),
                               ((feast_rec.outputs.get("materialized") or {}).get("end") if feast_rec else None)),
        "quarantine": {"rows_in": rows_in, "rows_quarantined": quarantined,
                       "ratio": (quarantined / rows_in) if rows_in else None},
        "live": live,
        "drifted_features": drifted,
        "_reference_features": {n: {"edges": ref["features"][n]["edges"],
                                    "fractions": ref["features"][n]["fractions"]} for n in names},
        "_reference_prediction": ({"fractions": ref["prediction"]["fractions"]} if ref.get("prediction")
                                  else None),
    }


def monitoring_dir(settings: Settings) -> Path:
    return settings.shared / "monitoring"


def run(ctx: StageContext, clock: Callable[[], float] = time.time,
        thresholds: Thresholds | None = None) -> StageResult:
    """The stage body; ``clock`` and ``thresholds`` are injectable (tests advance the clock)."""
    from pipeline.monitor_report import figures, log_to_mlflow, render_html

    settings, schema = ctx.settings, ctx.schema
    thresholds = thresholds or Thresholds.of(settings)
    now = clock()
    train = ctx.upstream.get("train")
    # Time is an input: the monitor looks again every run, it is never "up to date".
    result = ctx.start({"model_version": train.outputs.get("model_version") if train else None,
                        "features_md5": ctx.upstream["features"].outputs.get("features_md5"),
                        "now": now})
    folder = monitoring_dir(settings)
    report = build_report(settings, schema, ctx.upstream, now, thresholds, folder)
    pngs = figures(report)
    report_path, html_path = folder / "report.json", folder / "report.html"
    for name, png in pngs.items():
        atomic_write_bytes(folder / name, png)
    atomic_write_json(report_path, report)
    atomic_write_bytes(html_path, render_html(report, pngs).encode())
    # The report is written first: an MLflow outage costs the run's history entry, never the report,
    # the exporter's gauges or the alerts (docs/monitoring.md, "History in MLflow").
    with lakehouse.s3_environment(settings):  # with the lakehouse, the run's artifacts go to the store
        tracked = log_to_mlflow(settings, report, {**pngs, "report.json": report_path.read_bytes()}, now)
    outputs = {
        "report": str(report_path), "html": str(html_path),
        "predictions_logged": report["predictions_logged"],
        "drifted_features": report["drifted_features"],
        "psi": {n: report["features"][n]["psi"] for n in schema.feature_names},
        "offline_psi": {n: report["offline_features"]["features"][n]["psi"] for n in schema.feature_names},
        "freshness_seconds": report["freshness"]["offline_seconds"],
        "online_freshness_seconds": report["freshness"]["online_seconds"],
        "quarantine_ratio": report["quarantine"]["ratio"],
        "live_rmse": report["live"]["rmse"],
        "mlflow": tracked,
    }
    drifted = ", ".join(report["drifted_features"]) or "none"
    rmse = report["live"]["rmse"]
    where = (f"logged to MLflow run {tracked['run_id']} (version {tracked['model_version']})" if tracked["logged"]
             else f"not logged to MLflow ({tracked['reason']})")
    return result.done(outputs, f"{report['predictions_logged']} logged predictions; drifted: {drifted}; "
                                f"live RMSE {rmse if rmse is not None else 'n/a'}; {where}")
