"""Figures people look at: the fit of a trained model.

Drawn with matplotlib's Agg backend (no screen), saved on the volume by the
stage that makes them and logged to the MLflow run.
"""

from __future__ import annotations

import numpy as np

from pipeline.schema import Schema


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_fit(schema: Schema, y: np.ndarray, predicted: np.ndarray, scored_on: str, fitted: np.ndarray,
             errors: np.ndarray, truth: dict | None, rows: int | None = None):
    """Residuals against predictions; then, with a known truth (the synthetic
    data), each coefficient's error in standard errors (the coefficients differ
    in scale by orders of magnitude, so raw bars would hide the small ones),
    and without one, predicted against actual.

    ``y`` and ``predicted`` may be a sample (train passes a bounded one) of the
    ``rows`` scored rows; the title says so."""
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    residual = y - predicted
    ax1.scatter(predicted, residual, s=4, alpha=0.4)
    ax1.axhline(0, color="black", lw=1)
    ax1.set(xlabel=f"predicted {schema.target}", ylabel="residual (actual - predicted)",
            title=f"Residuals on the {scored_on} (n={len(y)})" if rows in (None, len(y)) else
            f"Residuals on the {scored_on} (a sample of {len(y)} of {rows} rows)")
    if truth is None:
        ax2.scatter(y, predicted, s=4, alpha=0.4)
        low, high = float(min(y.min(), predicted.min())), float(max(y.max(), predicted.max()))
        ax2.plot([low, high], [low, high], color="black", lw=1, label="predicted = actual")
        ax2.set(xlabel=f"actual {schema.target}", ylabel=f"predicted {schema.target}",
                title=f"Predicted against actual on the {scored_on}")
        ax2.legend(loc="lower right", fontsize=8)
    else:
        names = ["intercept", *schema.feature_names]
        true = np.array([truth["intercept"], *(truth["coefficients"][n] for n in schema.feature_names)])
        z = (fitted - true) / errors
        xs = np.arange(len(names))
        ax2.axhspan(-1.96, 1.96, color="tab:green", alpha=0.12, label="95 % band")
        ax2.axhline(0, color="black", lw=1)
        ax2.scatter(xs, z, zorder=3)
        for x, zi, f, e in zip(xs, z, fitted, errors):
            ax2.annotate(f"{f:.3g} ± {e:.2g}", (x, zi), textcoords="offset points", xytext=(0, 7),
                         fontsize=7, ha="center")
        ax2.set_xticks(xs, names, rotation=35, ha="right")
        ax2.set_ylim(min(-3.0, z.min() - 1), max(3.0, z.max() + 1))
        ax2.set(ylabel="(fitted - true) / standard error",
                title="Coefficients against the generator's truth (labels: fitted ± SE)")
        ax2.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig
