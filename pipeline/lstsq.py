"""Least squares in bounded memory: a tall-skinny QR over chunks of rows.

:func:`fit_least_squares` is the in-memory fit (the reference). :class:`StreamedLeastSquares`
gives the same fit from chunks of any size, holding only a ``(k+2) x (k+2)``
triangle: each chunk's rows ``[1, x - c, y - c_y]`` are stacked under the
triangle so far and ``numpy.linalg.qr`` of the stack gives the next one. The
shift ``c`` is the first chunk's mean, so columns far from zero (1e6 give or
take 1) are not carried in full through the rotations. No sum of squares is
ever formed: the triangle of the ones column holds the means (``R[0, j] / R[0,
0]``) and the rest of it is the triangle of the exactly centred columns (the
ones column's rotation is the centring), whose column norms are the scales.
The scaled problem is then solved from the small triangle by SVD with the
cutoff the in-memory fit uses (``eps * max(rows, columns)``), so rank handling
is the same. :meth:`StreamedLeastSquares.merge` joins triangles computed apart
(on separate workers, each with its own shift): a shift only changes the ones
column's row, so a triangle is moved to another shift exactly, then stacked and
reduced like a chunk. :class:`ErrorSums` streams the metrics, with Chan's merge
for the target's spread.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Fit:
    intercept: float
    coefficients: np.ndarray

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.intercept + x @ self.coefficients

    def weights(self, feature_names: list[str]) -> dict:
        return {"feature_names": list(feature_names), "intercept": self.intercept,
                "coefficients": [float(c) for c in self.coefficients]}


def fit_least_squares(x: np.ndarray, y: np.ndarray) -> Fit:
    """Ordinary least squares with an intercept, numerically careful, all rows in memory.

    Columns are centred (which is the intercept, exactly) and scaled to unit
    norm, so columns on scales from 1e-3 to 1e6 weigh alike; the scaled
    problem is solved by SVD (``numpy.linalg.lstsq``, LAPACK's gelsd), which
    stays accurate for nearly collinear columns where the normal equations
    square the condition number. Tests hold predictions to an exact rational
    solution within 1e-9, and :class:`StreamedLeastSquares` to this one.
    """
    mean = x.mean(axis=0)
    centred = x - mean
    # a constant column: its coefficient is 0, the intercept takes it (its mean may be an
    # ulp off the value, and that rounding, scaled to unit norm, must not become a column)
    centred[:, x.min(axis=0) == x.max(axis=0)] = 0.0
    scale = np.linalg.norm(centred, axis=0)
    scale[scale == 0] = 1.0
    y_mean = float(y.mean())
    solution, *_ = np.linalg.lstsq(centred / scale, y - y_mean, rcond=None)
    coefficients = solution / scale
    return Fit(y_mean - float(mean @ coefficients), coefficients)


class StreamedLeastSquares:
    """:func:`fit_least_squares` from chunks of rows (see the module's notes)."""

    def __init__(self, columns: int):
        self.columns = columns
        self.rows = 0
        self.shift: np.ndarray | None = None
        self.y_shift = 0.0
        self.r = np.zeros((0, columns + 2))
        self.low = np.full(columns, np.inf)
        self.high = np.full(columns, -np.inf)

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float64).reshape(-1, self.columns)
        y = np.asarray(y, dtype=np.float64).reshape(-1)
        if not len(x):
            return
        if self.shift is None:
            self.shift, self.y_shift = x.mean(axis=0), float(y.mean())
        block = np.empty((len(x), self.columns + 2))
        block[:, 0] = 1.0
        np.subtract(x, self.shift, out=block[:, 1:-1])
        block[:, -1] = y - self.y_shift
        self.r = np.linalg.qr(np.vstack([self.r, block]), mode="r")
        self.rows += len(x)
        # exact min/max: a constant column is told apart from one with rounding-level spread
        self.low, self.high = np.minimum(self.low, x.min(axis=0)), np.maximum(self.high, x.max(axis=0))

    def merge(self, other: StreamedLeastSquares) -> None:
        """Add the rows ``other`` was fed, as if they had come to this one (TSQR's merge step).

        ``[1, x - c, y - c_y] = [1, x - c_o, y - c_o_y] M`` with ``M`` the identity
        plus ``(c_o - c, c_o_y - c_y)`` in its first row, so ``R_o M`` is ``other``'s
        triangle at this one's shift: only its first row changes."""
        if not other.rows:
            return
        if self.shift is None:
            self.shift, self.y_shift, self.r = other.shift.copy(), other.y_shift, other.r.copy()
        else:
            moved = other.r.copy()
            moved[0, 1:-1] += moved[0, 0] * (other.shift - self.shift)
            moved[0, -1] += moved[0, 0] * (other.y_shift - self.y_shift)
            self.r = np.linalg.qr(np.vstack([self.r, moved]), mode="r")
        self.rows += other.rows
        self.low, self.high = np.minimum(self.low, other.low), np.maximum(self.high, other.high)

    def _triangle(self) -> np.ndarray:
        if not self.rows:
            raise ValueError("no rows to fit")
        size = self.columns + 2
        return np.vstack([self.r, np.zeros((size - len(self.r), size))]) if len(self.r) < size else self.r

    def means(self) -> tuple[np.ndarray, float]:
        """The column means of ``x`` and the mean of ``y``."""
        r = self._triangle()
        return self.shift + r[0, 1:-1] / r[0, 0], self.y_shift + float(r[0, -1] / r[0, 0])

    def fit(self) -> Fit:
        r, k = self._triangle(), self.columns
        mean, y_mean = self.means()
        centred = r[1:, 1:]  # the triangle of [x - mean, y - y_mean]
        a, b = centred[:k, :k].copy(), centred[:k, k]
        a[:, self.low == self.high] = 0.0  # a constant column, as in the in-memory fit
        scale = np.linalg.norm(a, axis=0)
        scale[scale == 0] = 1.0
        solution, *_ = np.linalg.lstsq(a / scale, b, rcond=np.finfo(np.float64).eps * max(self.rows, k))
        coefficients = solution / scale
        return Fit(y_mean - float(mean @ coefficients), coefficients)

    def residual_ss(self) -> float:
        """The fit's residual sum of squares on the rows it was fitted to."""
        return float(self._triangle()[-1, -1] ** 2)

    def standard_errors(self, residual_ss: float) -> np.ndarray:
        """OLS standard errors of ``(intercept, *coefficients)``: sigma^2 (X'X)^-1 from the triangle.

        ``[1, x] = [1, x - c] M`` with ``M`` unit upper triangular, so ``R M`` is the
        triangle of the unshifted design; NaN where the design is singular."""
        k = self.columns
        unshift = np.eye(k + 1)
        unshift[0, 1:] = self.shift
        try:
            inverse = np.linalg.inv(self._triangle()[:k + 1, :k + 1] @ unshift)
        except np.linalg.LinAlgError:
            return np.full(k + 1, np.nan)
        dof = max(self.rows - (k + 1), 1)
        return np.sqrt(residual_ss / dof * (inverse ** 2).sum(axis=1))


class ErrorSums:
    """RMSE, MAE and R^2 of predictions, chunk by chunk (R^2's total spread by Chan's merge)."""

    def __init__(self):
        self.n, self.ss_res, self.abs_res, self.y_mean, self.y_m2 = 0, 0.0, 0.0, 0.0, 0.0

    def add(self, y: np.ndarray, predicted: np.ndarray) -> None:
        y = np.asarray(y, dtype=np.float64)
        if not len(y):
            return
        residual = y - predicted
        self.ss_res += float(residual @ residual)
        self.abs_res += float(np.abs(residual).sum())
        n_b, mean_b = len(y), float(y.mean())
        m2_b = float(((y - mean_b) ** 2).sum())
        n = self.n + n_b
        delta = mean_b - self.y_mean
        self.y_mean += delta * n_b / n
        self.y_m2 += m2_b + delta * delta * self.n * n_b / n
        self.n = n

    def merge(self, other: ErrorSums) -> None:
        """Add the predictions ``other`` was fed (Chan's merge of the spreads)."""
        if not other.n:
            return
        n = self.n + other.n
        delta = other.y_mean - self.y_mean
        self.ss_res += other.ss_res
        self.abs_res += other.abs_res
        self.y_mean += delta * other.n / n
        self.y_m2 += other.y_m2 + delta * delta * self.n * other.n / n
        self.n = n

    def metrics(self) -> dict[str, float]:
        n = max(self.n, 1)
        return {"rmse": float(np.sqrt(self.ss_res / n)), "mae": self.abs_res / n,
                "r2": 1.0 - self.ss_res / self.y_m2 if self.y_m2 > 0 else float("nan")}
