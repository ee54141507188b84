"""What people look at: the monitor's figures (PNG), its HTML page, and its history in MLflow.

:func:`figures` draws three PNGs from a report (drift per feature; each
feature's and the predictions' share per training decile; freshness and live
error against their thresholds); :func:`render_html` puts them inline in one
self-contained page with the figures as cards and a table. :func:`log_to_mlflow`
adds the report to the MLflow run of the model version the alias serves: the
PNGs and ``report.json`` under ``monitoring/<report time>/`` and the key
numbers as metrics (``monitor_psi_<feature>``, ``monitor_live_rmse``, ...)
stamped with the report time, so repeated monitors build a history beside the
run's training metrics.
"""

from __future__ import annotations

import html
import io
import logging
import re
import tempfile
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

LOG, NEWEST, TRAINING, BAD = "#3b7dd8", "#e08a2c", "#9a9a9a", "#c62828"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 11, "axes.titlesize": 12, "axes.spines.top": False,
                         "axes.spines.right": False})
    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _bars(ax, names, log_values, newest_values, threshold, title):
    x = np.arange(len(names))
    lv = [v if v is not None else 0.0 for v in log_values]
    nv = [v if v is not None else 0.0 for v in newest_values]
    ax.bar(x - 0.2, lv, 0.4, label="prediction log", color=[BAD if v > threshold else LOG for v in lv])
    ax.bar(x + 0.2, nv, 0.4, label="newest offline features", color=NEWEST, alpha=0.8)
    ax.axhline(threshold, color=BAD, linestyle="--", lw=1.2, label=f"threshold {threshold:g}")
    ax.set_xticks(x, names, rotation=25, ha="right")
    ax.set_title(title)
    ax.set_ylim(0, max(threshold * 1.6, max(lv + nv + [0.0]) * 1.15))
    ax.legend(fontsize=9, loc="upper left")


def figures(report: dict) -> dict[str, bytes]:
    """``{file name: PNG}``: drift.png, health.png, distributions.png (the page's order)."""
    plt = _pyplot()
    refs = report["_reference_features"]
    names = list(refs)
    logged, newest, th = report["features"], report["offline_features"]["features"], report["thresholds"]
    out = {}

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 3.6))
    _bars(a1, names, [logged[n]["psi"] for n in names], [newest[n]["psi"] for n in names], th["psi"],
          "Drift per feature: PSI against training")
    _bars(a2, names, [logged[n]["ks"] for n in names], [newest[n].get("ks") for n in names], th["ks"],
          "Drift per feature: KS statistic")
    fig.tight_layout()
    out["drift.png"] = _png(fig)
    plt.close(fig)

    panels = [(n, refs[n]["fractions"], logged[n], newest[n]) for n in names]
    if report.get("_reference_prediction"):
        panels.append(("prediction", report["_reference_prediction"]["fractions"], report["prediction"], {}))
    cols = 3
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(12, 2.5 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (name, ref, live, new) in zip(axes.flat, panels):
        bins = np.arange(1, len(ref) + 1)
        ax.bar(bins - 0.27, ref, 0.27, color=TRAINING, label="training")
        if live.get("live_fractions"):
            ax.bar(bins, live["live_fractions"], 0.27, color=LOG, label="prediction log")
        if new.get("live_fractions"):
            ax.bar(bins + 0.27, new["live_fractions"], 0.27, color=NEWEST, label="newest features")
        figures_ = (f"PSI {live['psi']:.2f}  KS {live['ks']:.2f}" if live.get("psi") is not None
                    else "too few values")
        ax.set_title(f"{name}: {figures_}", color=BAD if live.get("drifted") else "black", fontsize=11)
        ax.set_xticks(bins)
        ax.tick_params(labelsize=8)
    axes.flat[0].legend(fontsize=8, loc="upper left")
    fig.supxlabel("training decile (share of values in each)", fontsize=10)
    fig.tight_layout()
    out["distributions.png"] = _png(fig)
    plt.close(fig)

    fig, (a1, a2) = plt.subplots(2, 1, figsize=(5.6, 3.6))
    fresh = report["freshness"]
    stale = th.get("stale_seconds", 86400.0)
    ages = [fresh["offline_seconds"] or 0.0, fresh["online_seconds"] or 0.0]
    unit, per = ("days", 86400.0) if max(ages) > 3 * 86400 else ("hours", 3600.0)
    a1.barh(["offline\n(newest event)", "online\n(materialized)"], [a / per for a in ages],
            color=[BAD if a > stale else LOG for a in ages])
    a1.axvline(stale / per, color=BAD, linestyle="--", lw=1.2)
    for i, a in enumerate(ages):
        a1.annotate(f"{a / per:.1f}", (a / per, i), xytext=(4, 0), textcoords="offset points", va="center",
                    fontsize=10)
    a1.set(title=f"Feature age in {unit} (dashed: stale)",
           xlim=(0, max(ages + [stale]) / per * 1.2))
    live = report["live"]
    if live.get("rmse") is not None and live.get("holdout_rmse"):
        values = [live["holdout_rmse"], live["rmse"]]
        a2.barh(["training\nholdout", f"live\n({live['matched']} labelled)"], values,
                color=[TRAINING, BAD if live["rmse"] > 1.2 * live["holdout_rmse"] else LOG])
        a2.axvline(1.2 * live["holdout_rmse"], color=BAD, linestyle="--", lw=1.2)
        for i, v in enumerate(values):
            a2.annotate(f"{v:.3g}", (v, i), xytext=(4, 0), textcoords="offset points", va="center", fontsize=10)
        a2.set_xlim(0, max(values + [1.2 * live["holdout_rmse"]]) * 1.2)
    else:
        a2.text(0.5, 0.5, "no label has arrived for the logged predictions yet", ha="center", va="center",
                transform=a2.transAxes)
        a2.set_yticks([])
    a2.set(title="Live RMSE (dashed: holdout + 20%)")
    fig.tight_layout()
    out["health.png"] = _png(fig)
    plt.close(fig)
    return {name: out[name] for name in ("drift.png", "health.png", "distributions.png")}


def _num(v, fmt="{:.3f}"):
    return "n/a" if v is None else fmt.format(v)


def _age(seconds):
    if seconds is None:
        return "n/a"
    return f"{seconds / 86400:.1f} d" if seconds >= 86400 else f"{seconds / 3600:.1f} h"


def render_html(report: dict, pngs: dict[str, bytes]) -> str:
    """A self-contained page: cards, a table and the figures (PNG inline), for people and screenshots."""
    import base64

    names = list(report["_reference_features"])
    th, fresh, live, q, pred = (report["thresholds"], report["freshness"], report["live"], report["quarantine"],
                                report["prediction"])
    stale = th.get("stale_seconds", 86400.0)

    def card(label, value, bad):
        return f"<div class='card {'bad' if bad else 'ok'}'><b>{html.escape(value)}</b>{html.escape(label)}</div>"

    live_bad = live["rmse"] is not None and live.get("holdout_rmse") and live["rmse"] > 1.2 * live["holdout_rmse"]
    cards = "".join([
        card("features drifted", f"{len(report['drifted_features'])} of {len(names)}", report["drifted_features"]),
        card("prediction shift (PSI)", _num(pred.get("psi")), (pred.get("psi") or 0) > th["psi"]),
        card("offline features age", _age(fresh["offline_seconds"]), (fresh["offline_seconds"] or 0) > stale),
        card("online store age", _age(fresh["online_seconds"]), (fresh["online_seconds"] or 0) > stale),
        card(f"live RMSE (holdout {_num(live.get('holdout_rmse'))})",
             _num(live["rmse"]), live_bad),
        card("quarantined at the last ingest", _num(q["ratio"], "{:.1%}"), (q["ratio"] or 0) > 0.1),
    ])
    rows = []
    for n in names:
        lg, nw = report["features"][n], report["offline_features"]["features"][n]
        cls = "bad" if lg["drifted"] or nw["drifted"] else ""
        rows.append(f"<tr class='{cls}'><td>{html.escape(n)}</td><td>{_num(lg['psi'])}</td><td>{_num(lg['ks'])}</td>"
                    f"<td>{_num(lg.get('mean_shift_sigmas'), '{:+.2f}')}</td><td>{_num(nw['psi'])}</td>"
                    f"<td>{_num(nw['ks'])}</td></tr>")
    def img(name):
        return f"<img alt='{name}' src='data:image/png;base64,{base64.b64encode(pngs[name]).decode()}'>"

    model = report["model"]
    served = (f"; the alias '{model['alias']}' serves v{model['served_version']}"
              if model.get("served_version") not in (None, model.get("version")) else "")
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>mlops monitor</title>
<style>body{{font-family:sans-serif;margin:1.2em 1.5em;background:#fff;color:#222;max-width:1200px}}
h1{{font-size:1.6em;margin:0 0 .2em}} p.sub{{margin:0 0 1em;color:#555}}
.cards{{display:flex;gap:.6em;margin-bottom:1em}} .row{{display:flex;gap:1.5em;align-items:flex-start}}
.card{{flex:1 1 0;padding:.5em .8em;border-radius:6px}} .card b{{display:block;font-size:1.5em}}
.ok{{background:#e8f1fb}} .bad{{background:#fbd5d5}}
table{{border-collapse:collapse;margin-bottom:.6em;white-space:nowrap;flex:none}} td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}
td:first-child{{text-align:left}} tr.bad td{{background:#fbd5d5}} img{{max-width:100%;display:block}}
.row img{{flex:1 1 auto;min-width:0}}</style>
</head><body>
<h1>Monitor: {html.escape(str(report['dataset']))} model v{model['version']}</h1>
<p class="sub">{report['generated_at'][:19].replace('T', ' ')} UTC; {report['predictions_logged']} logged
predictions in the last {_age(th['window_seconds'])}; {report['offline_features']['rows']} offline rows newer
than training; reference: {html.escape(str(report['reference']['source']))} ({report['reference']['rows']} rows){served}</p>
<div class="cards">{cards}</div>
<div class="row"><table><tr><th>feature</th><th>PSI (log)</th><th>KS (log)</th><th>mean shift (sd)</th>
<th>PSI (newest)</th><th>KS (newest)</th></tr>{''.join(rows)}</table>{img("health.png")}</div>
{img("drift.png")}{img("distributions.png")}
</body></html>
"""


# ------------------------------------------------------------------- MLflow
def monitor_metrics(report: dict) -> dict[str, float]:
    """The report's key numbers under MLflow metric names (absent figures left out, not zeroed)."""
    def key(name):
        return re.sub(r"[^A-Za-z0-9_\-. /]", "_", name)

    out = {}
    for name, figures_ in report["features"].items():
        out[key(f"monitor_psi_{name}")] = figures_.get("psi")
        out[key(f"monitor_ks_{name}")] = figures_.get("ks")
    out.update(monitor_prediction_psi=report["prediction"].get("psi"),
               monitor_live_rmse=report["live"].get("rmse"), monitor_live_mae=report["live"].get("mae"),
               monitor_live_labelled=report["live"].get("matched"),
               monitor_predictions_logged=report["predictions_logged"],
               monitor_drifted_features=len(report["drifted_features"]),
               monitor_freshness_offline_seconds=report["freshness"].get("offline_seconds"),
               monitor_freshness_online_seconds=report["freshness"].get("online_seconds"),
               monitor_quarantine_ratio=report["quarantine"].get("ratio"))
    return {k: float(v) for k, v in out.items() if v is not None}


def _redacted(uri: str) -> str:
    return re.sub(r"//[^/@]*@", "//***@", uri)


def log_to_mlflow(settings, report: dict, files: dict[str, bytes], now: float) -> dict:
    """Log ``files`` and :func:`monitor_metrics` to the run of the version the alias serves.

    Never raises: the report is already written, and an unreachable MLflow costs
    only this entry of the history (one warning line; the outcome names why)."""
    folder = "monitoring/" + time.strftime("%Y-%m-%dT%H-%M-%SZ", time.gmtime(now))
    uri = settings.tracking_uri
    try:
        from mlflow.entities import Metric

        from pipeline.registry import alias_version, dispose, open_client

        client = open_client(uri)
        try:
            version = alias_version(client, settings.model_name, settings.model_alias)
            if version is None or not version.run_id:
                reason = f"no version of {settings.model_name} holds the alias '{settings.model_alias}'"
                log.warning("monitor: the report is not logged to MLflow: %s", reason)
                return {"logged": False, "reason": reason}
            stamp = int(now * 1000)
            metrics = monitor_metrics(report)
            client.log_batch(version.run_id, metrics=[Metric(k, v, stamp, int(now)) for k, v in metrics.items()])
            with tempfile.TemporaryDirectory(prefix="mlops-monitor-") as tmp:
                for name, data in files.items():
                    (Path(tmp) / name).write_bytes(data)
                client.log_artifacts(version.run_id, tmp, folder)
        finally:
            dispose(client)
    except Exception as exc:  # noqa: BLE001 - whatever MLflow raises, the report stands
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
        log.warning("monitor: the report was written but not logged to MLflow at %s (%s); "
                    "this run is missing from the model's monitoring history", _redacted(uri), _redacted(reason))
        return {"logged": False, "reason": _redacted(reason)}
    log.info("monitor: logged %d metrics and %s to MLflow run %s (model version %s)", len(metrics), folder,
             version.run_id, version.version)
    return {"logged": True, "run_id": version.run_id, "model_version": int(version.version),
            "artifact_path": folder, "metrics": sorted(metrics), "step": int(now)}
