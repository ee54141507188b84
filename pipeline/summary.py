"""The end-of-run summary, built from the run records on the shared volume."""

from __future__ import annotations

from pipeline.dag import STAGE_NAMES
from pipeline.dataset import schema_for
from pipeline.io import read_record
from pipeline.settings import Settings


def render(settings: Settings) -> str:
    records = {name: read_record(settings.runs_dir, name) for name in STAGE_NAMES}
    ingest, features, train, promote = (records[n] for n in ("ingest", "features", "train", "promote"))
    schema = schema_for(settings.dataset, ingest)
    lines = [f"Pipeline summary ({settings.shared}, data set {schema.dataset!r})", ""]
    lines += [f"  {name:<9} {rec.status:<8} {rec.seconds:7.1f}s  {rec.message}" if rec
              else f"  {name:<9} not run" for name, rec in records.items()]
    if ingest and features:
        injected = ingest.outputs.get("bad_rows_injected") or {}
        verb = "generated" if ingest.outputs.get("truth") else "ingested "
        lines += ["", f"  rows {verb}    {ingest.outputs['rows']}",
                  f"  rows to features  {features.outputs['rows_out']}",
                  f"  rows quarantined  {features.outputs['rows_quarantined']} "
                  + (f"(injected: {sum(injected.values())}) " if injected else "")
                  + f"-> {features.outputs['quarantine_path']}",
                  f"  DVC hash (raw)    {ingest.outputs['dvc_hash']}"]
    if train:
        m = train.outputs["metrics"]
        scored_on = train.outputs.get("scored_on", "holdout")
        prefix = "holdout" if scored_on == "holdout" else "train"
        lines += [f"  model             {train.outputs['model_name']} version "
                  f"{train.outputs['model_version']}: predicts {schema.target} of a {schema.entity} "
                  f"from {len(schema.feature_names)} features",
                  f"  scored on the {scored_on}: RMSE {m[f'{prefix}_rmse']:.4g}  MAE {m[f'{prefix}_mae']:.4g}  "
                  f"R² {m[f'{prefix}_r2']:.4f}"]
        if "fit_plot" in train.outputs:
            lines.append(f"  fit plot          {train.outputs['fit_plot']} (and in the MLflow run)")
        truth = ingest.outputs.get("truth") if ingest else None
        if truth and "coefficients" in train.outputs:
            lines += ["", f"  {'coefficient':<18} {'true':>9} {'fitted':>10} {'error':>9}",
                      f"  {'intercept':<18} {truth['intercept']:>9.3f} "
                      f"{train.outputs['intercept']:>10.3f} "
                      f"{train.outputs['intercept'] - truth['intercept']:>+9.3f}"]
            for name in schema.feature_names:
                fitted = train.outputs["coefficients"][name]
                true = truth["coefficients"][name]
                lines.append(f"  {name:<18} {true:>9.3f} {fitted:>10.3f} {fitted - true:>+9.3f}")
    if promote:
        lines += ["", f"  alias '{promote.outputs['alias']}' -> version {promote.outputs['alias_version']}"
                      f"  ({promote.outputs['reason']})"]
    monitor = records.get("monitor")
    if monitor:
        out = monitor.outputs
        psi = {k: v for k, v in (out.get("psi") or {}).items() if v is not None}
        live = out.get("live_rmse")
        lines += ["", f"  monitor           {out.get('predictions_logged', 0)} logged predictions, drifted: "
                      f"{', '.join(out.get('drifted_features') or []) or 'none'}"
                      + (f", largest PSI {max(psi.values()):.3f} ({max(psi, key=psi.get)})" if psi else ""),
                  f"  freshness         newest features {_age(out.get('freshness_seconds'))} old, "
                  f"quarantine ratio {out.get('quarantine_ratio', 0):.2%}, live RMSE "
                  + (f"{live:.4g}" if live is not None else "n/a (no labels for logged predictions yet)"),
                  f"  report            {out.get('html')}"]
    return "\n".join(lines)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"
