"""The end-of-run summary, built from the run records on the shared volume."""

from __future__ import annotations

from pipeline import schema
from pipeline.dag import STAGE_NAMES
from pipeline.io import read_record
from pipeline.settings import Settings


def render(settings: Settings) -> str:
    records = {name: read_record(settings.runs_dir, name) for name in STAGE_NAMES}
    lines = [f"Pipeline summary ({settings.shared})", ""]
    lines += [f"  {name:<9} {rec.status:<8} {rec.seconds:7.1f}s  {rec.message}" if rec
              else f"  {name:<9} not run" for name, rec in records.items()]
    ingest, features, train, promote = (records[n] for n in ("ingest", "features", "train", "promote"))
    if ingest and features:
        lines += ["", f"  rows generated    {ingest.outputs['rows']}",
                  f"  rows to features  {features.outputs['rows_out']}",
                  f"  rows quarantined  {features.outputs['rows_quarantined']} "
                  f"(injected: {sum(ingest.outputs['bad_rows_injected'].values())}) -> "
                  f"{features.outputs['quarantine_path']}",
                  f"  DVC hash (raw)    {ingest.outputs['dvc_hash']}"]
    if train:
        m = train.outputs["metrics"]
        lines += [f"  model             {train.outputs['model_name']} version "
                  f"{train.outputs['model_version']}: predicts {schema.TARGET} of a {schema.ENTITY} "
                  f"from {len(schema.FEATURE_NAMES)} features",
                  f"  holdout           RMSE {m['holdout_rmse']:.3f}  MAE {m['holdout_mae']:.3f}  "
                  f"R² {m['holdout_r2']:.4f}"]
        if "fit_plot" in train.outputs:
            lines.append(f"  fit plot          {train.outputs['fit_plot']} (and in the MLflow run)")
        if ingest and "coefficients" in train.outputs:
            truth = ingest.outputs["truth"]
            lines += ["", f"  {'coefficient':<18} {'true':>9} {'fitted':>10} {'error':>9}",
                      f"  {'intercept':<18} {truth['intercept']:>9.3f} "
                      f"{train.outputs['intercept']:>10.3f} "
                      f"{train.outputs['intercept'] - truth['intercept']:>+9.3f}"]
            for name in schema.FEATURE_NAMES:
                fitted = train.outputs["coefficients"][name]
                true = truth["coefficients"][name]
                lines.append(f"  {name:<18} {true:>9.3f} {fitted:>10.3f} {fitted - true:>+9.3f}")
    if promote:
        lines += ["", f"  alias '{promote.outputs['alias']}' -> version {promote.outputs['alias_version']}"
                      f"  ({promote.outputs['reason']})"]
    return "\n".join(lines)
