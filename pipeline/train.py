"""Stage 4, train: Feast historical retrieval, NumPy least squares, MLflow.

Pure core: :func:`split`, :func:`fit_least_squares`, :func:`regression_metrics`.
:func:`run` reads the training set through Feast's point-in-time join, logs
params, metrics, plots and lineage to MLflow, and registers a model version
(MLflow "model from code", weights as JSON: nothing is pickled).
"""

from __future__ import annotations

import json
import logging
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.errors import SchemaError
from pipeline.feast import open_store
from pipeline.io import atomic_path
from pipeline.drift import reference
from pipeline.plots import plot_fit
from pipeline.registry import find_version_by_fingerprint, mlflow_session, register_model_version
from pipeline.schema import Schema
from pipeline.settings import Settings
from pipeline.stage import StageContext, StageResult

log = logging.getLogger(__name__)

MODEL_CODE = Path(__file__).with_name("mlflow_model.py")
SOLVER = "centred, scaled columns; numpy.linalg.lstsq (SVD)"


@dataclass(frozen=True)
class Fit:
    intercept: float
    coefficients: np.ndarray

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.intercept + x @ self.coefficients

    def weights(self, feature_names: list[str]) -> dict:
        return {"feature_names": list(feature_names), "intercept": self.intercept,
                "coefficients": [float(c) for c in self.coefficients]}


def holdout_mask(keys: np.ndarray, holdout_fraction: float, seed: int) -> np.ndarray:
    """Which rows are held out: every row of an entity goes the same way.

    A row is held out when ``pandas.util.hash_array`` (SipHash-2-4) of its
    entity key written as text, with ``hash_key`` the seed as 16 digits,
    divided by 2**64, is below ``holdout_fraction``. So anyone can say which
    rows trained a model from the data, the key and the seed alone, and a row
    keeps its side when other rows are added.
    """
    if holdout_fraction <= 0:
        return np.zeros(len(keys), dtype=bool)
    text = np.asarray(keys).astype(str).astype(object)
    hashes = pd.util.hash_array(text, hash_key=f"{seed:016d}"[-16:], categorize=True)
    return hashes < np.uint64(min(holdout_fraction, 1.0) * 2.0**64)


def split(keys: np.ndarray, holdout_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(train_index, holdout_index)`` by :func:`holdout_mask`; with no holdout every row trains."""
    held = holdout_mask(keys, holdout_fraction, seed)
    train, holdout = np.flatnonzero(~held), np.flatnonzero(held)
    if len(train) < 2 or (holdout_fraction > 0 and len(holdout) == 0):
        raise SchemaError(f"train: {len(keys)} usable rows are too few to hold out {holdout_fraction:.0%} and "
                          "still train; ingest more rows (--rows), or declare a different holdout "
                          "(holdout: 0 fits on every row)")
    return train, holdout


def fit_least_squares(x: np.ndarray, y: np.ndarray) -> Fit:
    """Ordinary least squares with an intercept, numerically careful.

    Columns are centred (which is the intercept, exactly) and scaled to unit
    norm, so columns on scales from 1e-3 to 1e6 weigh alike; the scaled
    problem is solved by SVD (``numpy.linalg.lstsq``, LAPACK's gelsd), which
    stays accurate for nearly collinear columns where the normal equations
    square the condition number. Tests hold predictions to an exact rational
    solution within 1e-9.
    """
    mean = x.mean(axis=0)
    centred = x - mean
    scale = np.linalg.norm(centred, axis=0)
    scale[scale == 0] = 1.0  # a constant column: its coefficient is 0, the intercept takes it
    y_mean = float(y.mean())
    solution, *_ = np.linalg.lstsq(centred / scale, y - y_mean, rcond=None)
    coefficients = solution / scale
    return Fit(y_mean - float(mean @ coefficients), coefficients)


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


def training_frame(settings: Settings, schema: Schema) -> pd.DataFrame:
    """Labels joined point-in-time to their features through Feast."""
    entity_df = pd.read_parquet(settings.labels_path)
    store = open_store(settings)
    log.info("train: historical retrieval of %d feature(s) for %d label rows",
             len(schema.feature_names), len(entity_df))
    frame = store.get_historical_features(entity_df=entity_df, features=schema.feature_refs()).to_df()
    frame = frame.dropna(subset=[*schema.feature_names, schema.target])
    return frame.sort_values([schema.timestamp, schema.join_key], kind="stable").reset_index(drop=True)


def evaluate(fit: Fit, x: np.ndarray, y: np.ndarray, train_idx: np.ndarray,
             holdout_idx: np.ndarray) -> tuple[dict[str, float], str, np.ndarray]:
    """``(metrics, scored_on, score index)``: the holdout's, or in-sample with no holdout."""
    metrics = {f"train_{k}": v for k, v in regression_metrics(y[train_idx], fit.predict(x[train_idx])).items()}
    if len(holdout_idx):
        metrics.update({f"holdout_{k}": v for k, v in
                        regression_metrics(y[holdout_idx], fit.predict(x[holdout_idx])).items()})
        return metrics, "holdout", holdout_idx
    return metrics, "training rows (in-sample: holdout is 0)", train_idx


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
        frame = training_frame(settings, schema)
        x = frame[list(schema.feature_names)].to_numpy(dtype=np.float64)
        y = frame[schema.target].to_numpy(dtype=np.float64)
        train_idx, holdout_idx = split(frame[schema.join_key].to_numpy(), holdout, settings.seed)
        fit = fit_least_squares(x[train_idx], y[train_idx])
        metrics, scored_on, scored = evaluate(fit, x, y, train_idx, holdout_idx)
        score = metrics["holdout_rmse" if len(holdout_idx) else "train_rmse"]
        truth = ingest.outputs.get("truth")
        errors = coefficient_errors(fit, truth, schema.feature_names) if truth else {}
        log.info("train: %d rows (%d train / %d holdout), RMSE %.4g on the %s%s", len(frame), len(train_idx),
                 len(holdout_idx), score, scored_on,
                 f", largest coefficient error {max(errors.values()):.4f}" if errors else "")
        se = standard_errors(x[train_idx], y[train_idx], fit)
        fig = plot_fit(schema, y[scored], fit.predict(x[scored]), scored_on,
                       np.array([fit.intercept, *fit.coefficients]), se, truth)
        plot_path = settings.runs_dir / "train" / "fit.png"
        with atomic_path(plot_path) as tmp_png:
            fig.savefig(tmp_png, format="png", dpi=110)
        with tempfile.TemporaryDirectory() as tmp:
            weights_path = Path(tmp) / "weights.json"
            weights_path.write_text(json.dumps(fit.weights(list(schema.feature_names)), indent=2))
            version = register_model_version(
                client, settings, schema,
                params={"rows": len(frame), "train_rows": len(train_idx),
                        "holdout_rows": len(holdout_idx), "seed": settings.seed,
                        "holdout_fraction": holdout, "scored_on": scored_on, "solver": SOLVER},
                metrics={**metrics, **{f"coef_abs_error_{k}": v for k, v in errors.items()}},
                score=(score, scored_on),
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
        "rows": len(frame),
        "train_rows": len(train_idx),
        "holdout_rows": len(holdout_idx),
        "scored_on": scored_on,
        "score_rmse": score,
        "metrics": metrics,
        "intercept": fit.intercept,
        "coefficients": dict(zip(schema.feature_names, map(float, fit.coefficients))),
        "coefficient_abs_errors": errors,
        "fit_plot": str(plot_path),
        # what the monitor compares recent traffic and features with (quantile bins per feature)
        "reference": reference(frame.iloc[train_idx], schema.feature_names,
                               predictions=fit.predict(x[train_idx]), timestamp=schema.timestamp),
    }
    return result.done(outputs, f"registered {settings.model_name} version {version.version} "
                                f"(RMSE {score:.4g} on the {scored_on})")
