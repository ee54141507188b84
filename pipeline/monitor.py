"""The monitor stage: drift, freshness, data quality and live error, as a report.

The statistics are in :mod:`pipeline.drift` (pure). :func:`run` reads the recent prediction log
(:mod:`pipeline.predlog`), the newest offline features and the upstream run
records, and writes ``<shared>/monitoring/report.json`` and
``report.html`` (plots inline), each atomically.

Train records the training reference; for a model trained before it did, the
monitor builds it once per model version from the features Parquet rows and
keeps it beside the report.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.drift import (EPS, SKETCH, Thresholds, bin_fractions, describe, drift, freshness,  # noqa: F401
                            ks, live_error, psi, quantile_edges, reference)
from pipeline.io import atomic_write_bytes, atomic_write_json
from pipeline.predlog import FEATURE_PREFIX, predictions_dir, read_log
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
    frame = pd.read_parquet(settings.features_path, columns=[schema.join_key, schema.timestamp,
                                                             *schema.feature_names])
    ref = reference(frame, schema.feature_names, bins,
                    model_predictions(train_outputs, frame, schema.feature_names), schema.timestamp)
    ref.update(source=f"features Parquet when model version {version} was first monitored",
               model_version=version)
    atomic_write_json(cached, ref)
    return ref


def newest_features(settings: Settings, schema, after: str | None) -> pd.DataFrame:
    """Offline feature rows with an event time after ``after`` (the reference's newest)."""
    table = pq.read_table(settings.features_path, columns=[schema.timestamp, *schema.feature_names])
    if after:
        column = table.column(schema.timestamp)
        cut = pd.Timestamp(after)
        if column.type.tz is None and cut.tzinfo is not None:
            cut = cut.tz_convert("UTC").tz_localize(None)
        table = table.filter(pc.greater(column, cut.to_pydatetime()))
    return table.to_pandas()


# ------------------------------------------------------------------- report
def build_report(settings: Settings, schema, upstream: dict, now: float, thresholds: Thresholds,
                 folder: Path) -> dict:
    features_rec, feast_rec, train_rec = (upstream.get(n) for n in ("features", "feast", "train"))
    train_out = train_rec.outputs if train_rec else {}
    ref = training_reference(settings, schema, train_out, folder)
    names = list(schema.feature_names)

    since = now - thresholds.window_seconds
    logged = read_log(predictions_dir(settings.shared), since, now)
    frame = logged.to_pandas() if logged is not None else pd.DataFrame()
    logged_drift = {name: drift(ref["features"][name], frame[FEATURE_PREFIX + name].to_numpy(dtype=float)
                                if FEATURE_PREFIX + name in frame else np.array([]), thresholds)
                    for name in names}
    prediction = (drift(ref["prediction"], frame["prediction"].to_numpy(dtype=float)
                        if "prediction" in frame else np.array([]), thresholds)
                  if ref.get("prediction") else {"psi": None, "note": "no reference predictions"})

    newest = newest_features(settings, schema, ref.get("event_time_max"))
    offline_drift = {name: drift(ref["features"][name], newest[name].to_numpy(dtype=float), thresholds)
                     for name in names}

    labels = pd.read_parquet(settings.labels_path)
    live = live_error(frame if len(frame) else None, labels, schema.join_key, schema.timestamp, schema.target)
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
        "model": {"name": train_out.get("model_name"), "version": train_out.get("model_version")},
        "thresholds": {"psi": thresholds.psi, "ks": thresholds.ks, "window_seconds": thresholds.window_seconds,
                       "min_rows": thresholds.min_rows},
        "reference": {k: ref.get(k) for k in ("source", "rows", "bins", "event_time_max", "model_version")},
        "predictions_logged": int(len(frame)),
        "features": logged_drift,
        "offline_features": {"rows": int(len(newest)), "features": offline_drift},
        "prediction": prediction,
        "freshness": freshness(now, f_out.get("event_time_max"),
                               ((feast_rec.outputs.get("materialized") or {}).get("end") if feast_rec else None)),
        "quarantine": {"rows_in": rows_in, "rows_quarantined": quarantined,
                       "ratio": (quarantined / rows_in) if rows_in else None},
        "live": live,
        "drifted_features": drifted,
        "_reference_features": {n: {"edges": ref["features"][n]["edges"],
                                    "fractions": ref["features"][n]["fractions"]} for n in names},
    }


def render_html(report: dict) -> str:
    """A self-contained page: figures tables and plots (PNG inline), for people and screenshots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    refs = report["_reference_features"]
    names = list(refs)
    fig, axes = plt.subplots(1 + len(names), 1, figsize=(8, 2.4 * (1 + len(names))), squeeze=False)
    ax = axes[0][0]
    live_psi = [report["features"][n]["psi"] or 0 for n in names]
    off_psi = [report["offline_features"]["features"][n]["psi"] or 0 for n in names]
    x = np.arange(len(names))
    ax.bar(x - 0.2, live_psi, 0.4, label="prediction log", color="#3b7dd8")
    ax.bar(x + 0.2, off_psi, 0.4, label="newest features", color="#e08a2c")
    ax.axhline(report["thresholds"]["psi"], color="red", linestyle="--", label="threshold")
    ax.set_xticks(x, names)
    ax.set_title("PSI per feature")
    ax.legend(fontsize=8)
    for i, name in enumerate(names):
        ax = axes[i + 1][0]
        ref = np.asarray(refs[name]["fractions"])
        bins = np.arange(len(ref))
        ax.bar(bins - 0.2, ref, 0.4, label="training", color="#999999")
        for source, color, shift in (("features", "#3b7dd8", 0.2),):
            live = report[source][name].get("live_fractions")
            if live:
                ax.bar(bins + shift, live, 0.4, label="prediction log", color=color)
        ax.set_title(f"{name}: share per training decile")
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    png = base64.b64encode(buf.getvalue()).decode()

    def num(v, fmt="{:.3f}"):
        return "n/a" if v is None else fmt.format(v)

    rows = "".join(
        f"<tr class='{'bad' if report['features'][n]['drifted'] or report['offline_features']['features'][n]['drifted'] else ''}'>"
        f"<td>{n}</td><td>{num(report['features'][n]['psi'])}</td><td>{num(report['features'][n]['ks'])}</td>"
        f"<td>{num(report['offline_features']['features'][n]['psi'])}</td>"
        f"<td>{num(report['offline_features']['features'][n]['ks'])}</td></tr>" for n in names)
    fresh, live, q = report["freshness"], report["live"], report["quarantine"]
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>mlops monitor</title>
<style>body{{font-family:sans-serif;margin:1.5em;background:#fff;color:#222}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 10px}}
tr.bad td{{background:#fbd5d5}}.cards span{{display:inline-block;margin:0 1em 1em 0;padding:.6em 1em;
background:#eef3fb;border-radius:6px}}</style></head><body>
<h1>Monitor: {report['dataset']} model v{report['model']['version']}</h1>
<p>generated {report['generated_at']}; {report['predictions_logged']} logged predictions in the window;
reference: {report['reference']['source']} ({report['reference']['rows']} rows)</p>
<div class="cards"><span>offline freshness {num(fresh['offline_seconds'], '{:.0f}')} s</span>
<span>online freshness {num(fresh['online_seconds'], '{:.0f}')} s</span>
<span>quarantine ratio {num(q['ratio'], '{:.2%}')}</span>
<span>prediction PSI {num(report['prediction'].get('psi'))}</span>
<span>live RMSE {num(live['rmse'])} ({live['matched']} labelled; holdout {num(live['holdout_rmse'])})</span></div>
<table><tr><th>feature</th><th>PSI (log)</th><th>KS (log)</th><th>PSI (newest)</th><th>KS (newest)</th></tr>
{rows}</table>
<p>drifted: {', '.join(report['drifted_features']) or 'none'}</p>
<img alt="drift plots" src="data:image/png;base64,{png}">
</body></html>
"""


def monitoring_dir(settings: Settings) -> Path:
    return settings.shared / "monitoring"


def run(ctx: StageContext, clock: Callable[[], float] = time.time,
        thresholds: Thresholds | None = None) -> StageResult:
    """The stage body; ``clock`` and ``thresholds`` are injectable (tests advance the clock)."""
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
    html = render_html(report)
    report_path, html_path = folder / "report.json", folder / "report.html"
    atomic_write_json(report_path, report)
    atomic_write_bytes(html_path, html.encode())
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
    }
    drifted = ", ".join(report["drifted_features"]) or "none"
    return result.done(outputs, f"{report['predictions_logged']} logged predictions; drifted: {drifted}; "
                                f"live RMSE {report['live']['rmse'] if report['live']['rmse'] is not None else 'n/a'}")
