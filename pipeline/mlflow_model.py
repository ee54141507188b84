"""The linear model as MLflow "model from code": this file is logged with the model.

MLflow stores this source file, not a pickle: loading the model runs this file
and reads the weights from a JSON artifact, so neither training nor serving
ever unpickles anything. The file depends only on NumPy, pandas and MLflow, so
``mlflow models serve`` and ``mlflow.pyfunc.load_model`` work without the
``pipeline`` package installed.

Loading this file (as MLflow does) registers the model object through
``mlflow.models.set_model``. Serving does not load it that way: it builds the
model from this module *as installed* (:meth:`LinearModel.from_weights`) and the
weights JSON alone, so the copy of this file stored with a version is never run
(pipeline/model_loading.py says why).
"""

from __future__ import annotations

import json
import math

import mlflow
import numpy as np
import pandas as pd

WEIGHTS_ARTIFACT = "weights"


class InvalidWeights(ValueError):
    pass


def parse_weights(payload: dict) -> tuple[list[str], float, np.ndarray]:
    """Check and unpack ``{"feature_names", "intercept", "coefficients"}``."""
    try:
        names = [str(n) for n in payload["feature_names"]]
        intercept = float(payload["intercept"])
        coef = np.asarray(payload["coefficients"], dtype=np.float64)
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidWeights(f"weights file is malformed: {exc}") from exc
    if coef.ndim != 1 or coef.shape[0] != len(names) or not names:
        raise InvalidWeights(f"weights have shape {coef.shape} for {len(names)} feature names")
    if not (math.isfinite(intercept) and np.isfinite(coef).all()):
        raise InvalidWeights("weights contain NaN or infinite values")
    return names, intercept, coef


class LinearModel(mlflow.pyfunc.PythonModel):
    """``prediction = intercept + features @ coefficients``."""

    feature_names: list[str]
    intercept: float
    coefficients: np.ndarray

    def load_context(self, context) -> None:
        with open(context.artifacts[WEIGHTS_ARTIFACT]) as fh:
            payload = json.load(fh)
        self.feature_names, self.intercept, self.coefficients = parse_weights(payload)

    @classmethod
    def from_weights(cls, payload: dict) -> LinearModel:
        """The model of a weights JSON payload (checked by :func:`parse_weights`)."""
        model = cls()
        model.feature_names, model.intercept, model.coefficients = parse_weights(payload)
        return model

    def predict_array(self, features: np.ndarray) -> np.ndarray:
        """The fast path for serving: a 2-D array in ``feature_names`` order."""
        return self.intercept + features @ self.coefficients

    def predict(self, context, model_input: pd.DataFrame, params=None) -> np.ndarray:
        frame = pd.DataFrame(model_input)
        missing = [n for n in self.feature_names if n not in frame.columns]
        if missing:
            raise ValueError(f"model input lacks the feature columns {missing}")
        return self.predict_array(frame[self.feature_names].to_numpy(dtype=np.float64))


if __name__ != "pipeline.mlflow_model":  # loaded by MLflow from the stored file, not imported from the package
    mlflow.models.set_model(LinearModel())
