"""Stage 4, train: Feast historical retrieval, NumPy least squares, MLflow.

Pure core in :mod:`pipeline.train_stats`: :func:`split`, :func:`gather` (one
pass over chunks of rows: the streamed least squares of :mod:`pipeline.lstsq`,
counts, a bounded sample) and :func:`score` (the metrics, streamed). :func:`run`
reads the training set in chunks through Feast's point-in-time join
(:mod:`pipeline.train_data`; with ``MLOPS_DASK_SCHEDULER``, one task per chunk
on a Dask cluster, :mod:`pipeline.dask_train`), so
memory is set by ``train_chunk_rows``, not by the data; it logs params,
metrics, plots and lineage to MLflow and registers a model version (MLflow
"model from code", weights as JSON: nothing is pickled).
"""

from __future__ import annotations

import json
import logging
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from pipeline.drift import reference
from pipeline.io import TMP_PREFIX, atomic_path, remove_stale_temps
from pipeline.lstsq import ErrorSums, Fit, StreamedLeastSquares, fit_least_squares  # noqa: F401 (the core's names)
from pipeline.plots import plot_fit
from pipeline.registry import (
    find_version_by_fingerprint,
    mlflow_session,
    register_model_version,
)
from pipeline.schema import Schema
from pipeline.settings import Settings
from pipeline.stage import StageContext, StageResult
from pipeline.train_stats import (  # noqa: F401 (the core's names)
    SAMPLE_ROWS,
    Gathered,
    check_split,
    gather,
    holdout_mask,
    score,
    split,
)

log = logging.getLogger(__name__)

MODEL_CODE = Path(__file__).with_name("mlflow_model.py")
SOLVER = "centred, scaled columns; tall-skinny QR over chunks, SVD of the final triangle"


def regression_metrics(y: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    residual = y - predicted
    ss_res = float(residual @ residual)
    ss_tot = float(((y - y.mean()) ** 2).sum())
    return {"rmse": float(np.sqrt(ss_res / len(y))), "mae": float(np.abs(residual).mean()),
            "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")}


def coefficient_errors(fit: Fit, truth: dict, names: tuple[str, ...]) -> dict[str, float]:
    """Absolute error of each fitted coefficient against the generator's truth."""
    errors = {name: abs(float(c) - truth["coefficients"][name]) for name, c in zip(names, fit.coefficients)}
    errors["intercept"] = abs(fit.intercept - truth["intercept"])
    return errors


def standard_errors(x: np.ndarray, y: np.ndarray, fit: Fit) -> np.ndarray:
    """OLS standard errors of ``(intercept, *coefficients)``: sigma^2 (X'X)^-1 through QR."""
    design = np.column_stack([np.ones(len(x)), x])
    residual = y - fit.predict(x)
    dof = max(len(y) - design.shape[1], 1)
    r_inv = np.linalg.inv(np.linalg.qr(design, mode="r"))
    return np.sqrt(float(residual @ residual) / dof * (r_inv ** 2).sum(axis=1))


def git_commit(settings: Settings) -> str | None:
    if settings.git_commit:
        return settings.git_commit
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def metrics_of(train: ErrorSums, holdout: ErrorSums) -> tuple[dict[str, float], str]:
    """``(metrics, scored_on)``: the holdout's, or in-sample with no holdout."""
    metrics = {f"train_{k}": v for k, v in train.metrics().items()}
    if holdout.n:
        metrics.update({f"holdout_{k}": v for k, v in holdout.metrics().items()})
        return metrics, "holdout"
    return metrics, "training rows (in-sample: holdout is 0)"


def training_reference(fit: Fit, gathered: Gathered, schema: Schema) -> dict:
    """The monitor's reference from the sample's training rows (bounded whatever the data),
    with the row count and newest event time of all the training rows."""
    rows = gathered.sample[~gathered.sample["held"].to_numpy(dtype=bool)]
    ref = reference(rows, schema.feature_names,
                    predictions=fit.predict(rows[list(schema.feature_names)].to_numpy(dtype=np.float64)))
    ref.update({"rows": gathered.train_rows, "sample_rows": len(rows)})
    if gathered.event_time_max is not None:
        ref["event_time_max"] = gathered.event_time_max.isoformat()
    return ref


def engine_of(settings: Settings) -> str:
    """Where train's statistics were computed, as the MLflow run records it."""
    return "dask" if settings.dask_scheduler else "single process"


def train_model(settings: Settings, schema: Schema, holdout_fraction: float):
    """``(fit, gathered, train error sums, holdout error sums)`` from Feast, chunk by chunk."""
    from pipeline.train_data import training_chunks

    remove_stale_temps(settings.shared)  # a killed train's buckets (under the lock: none is live)
    from pipeline.registry import remove_stale_store_temps, sqlite_path

    if db := sqlite_path(settings.tracking_uri):  # and a killed store maker's temp store
        remove_stale_store_temps(db)
    # ignore_cleanup_errors: a Dask task still writing into the folder when train fails must
    # not hide the error at hand behind the clean-up's own (a killed run's leftovers go next start)
    with tempfile.TemporaryDirectory(prefix=f"{TMP_PREFIX}train-", dir=settings.shared,
                                     ignore_cleanup_errors=True) as tmp:
        if settings.dask_scheduler:  # one task per bucket on the Dask cluster, the same statistics
            from pipeline import dask_train

            return dask_train.train_model(settings, schema, holdout_fraction, Path(tmp))
        spill = Path(tmp) / "scored.parquet"
        gathered = gather(training_chunks(settings, schema, Path(tmp)), schema, holdout_fraction,
                          settings.seed, spill)
        fit = gathered.train.fit()
        train, holdout = score(fit, spill, schema)
    return fit, gathered, train, holdout


def run(ctx: StageContext) -> StageResult:
    settings, schema, dataset = ctx.settings, ctx.schema, ctx.dataset
    feast, features, ingest = (ctx.upstream[name] for name in ("feast", "features", "ingest"))
    holdout = dataset.declaration.holdout
    inputs = {
        "features_md5": features.outputs["features_md5"],
        "labels_md5": features.outputs["labels_md5"],
        "feature_refs": feast.outputs["feature_refs"],
        "seed": settings.seed,
        "holdout_fraction": holdout,
        "dataset": schema.version,
        "model_name": settings.model_name,
        "solver": SOLVER,
    }
    result = ctx.start(inputs)
    with mlflow_session(settings, schema) as client:
        existing = find_version_by_fingerprint(client, settings.model_name, result.fingerprint)
        if existing is not None:
            outputs = result.previous.outputs if result.unchanged() else {
                "model_name": settings.model_name, "model_version": int(existing.version),
                "run_id": existing.run_id,
                "metrics": json.loads(existing.tags.get("mlops.metrics", "{}")),
            }
            return result.skip(f"version {existing.version} of {settings.model_name} was trained "
                               "on these inputs", outputs)
        fit, gathered, train_sums, holdout_sums = train_model(settings, schema, holdout)
        metrics, scored_on = metrics_of(train_sums, holdout_sums)
        score_rmse = metrics["holdout_rmse" if holdout_sums.n else "train_rmse"]
        truth = ingest.outputs.get("truth")
        errors = coefficient_errors(fit, truth, schema.feature_names) if truth else {}
        log.info("train: %d rows (%d train / %d holdout), RMSE %.4g on the %s%s", gathered.rows,
                 gathered.train_rows, gathered.holdout_rows, score_rmse, scored_on,
                 f", largest coefficient error {max(errors.values()):.4f}" if errors else "")
        se = gathered.train.standard_errors(train_sums.ss_res)
        sample = gathered.sample
        x_sample = sample[list(schema.feature_names)].to_numpy(dtype=np.float64)
        y_sample = sample[schema.target].to_numpy(dtype=np.float64)
        held = sample["held"].to_numpy(dtype=bool)
        scored = held if holdout_sums.n else ~held
        fig = plot_fit(schema, y_sample[scored], fit.predict(x_sample[scored]), scored_on,
                       np.array([fit.intercept, *fit.coefficients]), se, truth,
                       rows=holdout_sums.n if holdout_sums.n else train_sums.n)
        plot_path = settings.runs_dir / "train" / "fit.png"
        with atomic_path(plot_path) as tmp_png:
            fig.savefig(tmp_png, format="png", dpi=110)
        with tempfile.TemporaryDirectory() as tmp:
            weights_path = Path(tmp) / "weights.json"
            weights_path.write_text(json.dumps(fit.weights(list(schema.feature_names)), indent=2))
            version = register_model_version(
                client, settings, schema,
                params={"rows": gathered.rows, "train_rows": gathered.train_rows,
                        "holdout_rows": gathered.holdout_rows, "seed": settings.seed,
                        "train_chunk_rows": settings.train_chunk_rows,
                        "holdout_fraction": holdout, "scored_on": scored_on, "solver": SOLVER,
                        "engine": engine_of(settings)},
                metrics={**metrics, **{f"coef_abs_error_{k}": v for k, v in errors.items()}},
                score=(score_rmse, scored_on),
                lineage={
                    "mlops.dataset": schema.dataset,
                    "mlops.dataset_version": schema.version,
                    "mlops.target": schema.target,
                    "mlops.raw_dvc_hash": features.outputs["raw_dvc_hash"],
                    "mlops.features_md5": features.outputs["features_md5"],
                    "mlops.labels_md5": features.outputs["labels_md5"],
                    "mlops.feature_refs": ",".join(feast.outputs["feature_refs"]),
                    "mlops.feast_registry": feast.outputs["registry"],
                    "mlops.git_commit": git_commit(settings) or "none",
                },
                fingerprint=result.fingerprint,
                weights_path=weights_path, model_code=MODEL_CODE, figure=fig,
                coefficients={"fitted": fit.weights(list(schema.feature_names)),
                              "standard_errors": dict(zip(["intercept", *schema.feature_names], map(float, se))),
                              "truth": truth},
            )
    import matplotlib.pyplot as plt

    plt.close(fig)  # a long-running retrain webhook trains many times in one process
    outputs = {
        "model_name": settings.model_name,
        "model_version": int(version.version),
        "run_id": version.run_id,
        "dataset": schema.dataset,
        "rows": gathered.rows,
        "train_rows": gathered.train_rows,
        "holdout_rows": gathered.holdout_rows,
        "train_chunks": gathered.chunks,
        "engine": engine_of(settings),
        "scored_on": scored_on,
        "score_rmse": score_rmse,
        "metrics": metrics,
        "intercept": fit.intercept,
        "coefficients": dict(zip(schema.feature_names, map(float, fit.coefficients))),
        "coefficient_abs_errors": errors,
        "fit_plot": str(plot_path),
        # what the monitor compares recent traffic and features with (quantile bins per feature)
        "reference": training_reference(fit, gathered, schema),
    }
    return result.done(outputs, f"registered {settings.model_name} version {version.version} "
                                f"(RMSE {score_rmse:.4g} on the {scored_on})")
