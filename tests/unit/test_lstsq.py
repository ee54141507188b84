"""The streamed least squares is the in-memory one: predictions within 1e-9 of it
(and of the exact rational solution) whatever the chunking, on a badly
conditioned table, with chunks smaller than the number of columns, with a
constant and a duplicated (rank-deficient) column; streamed metrics and
standard errors equal the in-memory ones."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.lstsq import ErrorSums, StreamedLeastSquares, fit_least_squares
from pipeline.train import regression_metrics, standard_errors
from tests.unit.test_numerics import exact_predictions, ill_conditioned, relative_error


def streamed(x: np.ndarray, y: np.ndarray, sizes) -> StreamedLeastSquares:
    """Feed ``x, y`` in chunks of the given sizes, cycling through them."""
    acc, start, i = StreamedLeastSquares(x.shape[1]), 0, 0
    while start < len(x):
        size = sizes[i % len(sizes)]
        acc.add(x[start:start + size], y[start:start + size])
        start, i = start + size, i + 1
    return acc


CHUNKINGS = [[len(ill_conditioned()[0])], [1], [3], [2, 7, 1, 40], [17], [60]]


@pytest.fixture(scope="module")
def exact():
    return exact_predictions(*ill_conditioned())


@pytest.mark.parametrize("sizes", CHUNKINGS, ids=lambda s: "chunks-" + "-".join(map(str, s)))
def test_streamed_fit_matches_in_memory_and_exact_on_an_ill_conditioned_table(sizes, exact):
    x, y = ill_conditioned()
    want = fit_least_squares(x, y).predict(x)
    got = streamed(x, y, sizes).fit().predict(x)
    assert relative_error(got, want) < 1e-9
    assert relative_error(got, exact) < 1e-9


@pytest.mark.parametrize("sizes", [[1], [4], [2, 9, 5], [500]], ids=lambda s: "chunks-" + "-".join(map(str, s)))
def test_a_duplicated_and_a_constant_column_are_handled_as_in_memory(sizes):
    x, y = ill_conditioned()
    # a duplicate of `plain` (rank deficient: the SVD cutoff drops it, both halves share
    # the weight) and a constant column (coefficient 0, the intercept takes it)
    x = np.column_stack([x, x[:, 3], np.full(len(x), 0.1)])
    reference = fit_least_squares(x, y)
    fit = streamed(x, y, sizes).fit()
    assert relative_error(fit.predict(x), reference.predict(x)) < 1e-9
    assert fit.coefficients[-1] == 0.0 and reference.coefficients[-1] == 0.0
    # the data fix only the duplicates' sum (their split is at rounding's mercy in any fit)
    assert fit.coefficients[3] + fit.coefficients[4] == pytest.approx(
        reference.coefficients[3] + reference.coefficients[4], rel=1e-9)
    # new rows (the constant at another value: its coefficient is 0, not a rounding blown up)
    other = x[::-1] * np.array([1.0, 1.0, 1.0, 1.0, 1.0, 3.0])
    assert relative_error(fit.predict(other), reference.predict(other)) < 1e-9


def test_means_stay_exact_for_columns_far_from_zero():
    rng = np.random.default_rng(5)
    x = 1e9 + rng.normal(0, 1, (5000, 2))
    y = 3 * (x[:, 0] - 1e9) + rng.normal(0, 0.01, 5000)
    acc = streamed(x, y, [333])
    mean, y_mean = acc.means()
    exact = np.array([math.fsum(column - 1e9) / len(x) for column in x.T])  # x - 1e9 is exact
    np.testing.assert_allclose(mean - 1e9, exact, atol=2.5e-7)  # an ulp of 1e9 is 1.2e-7
    assert y_mean == pytest.approx(math.fsum(y) / len(y), abs=1e-12)
    assert acc.fit().coefficients[0] == pytest.approx(3.0, rel=1e-3)


def test_streamed_metrics_and_standard_errors_equal_the_in_memory_ones():
    rng = np.random.default_rng(2)
    x = rng.uniform(-5, 5, (3000, 3)) * np.array([1e-3, 1.0, 1e4])
    y = 7 + x @ np.array([2e3, -2.0, 1e-4]) + rng.normal(0, 0.5, len(x))
    acc = streamed(x, y, [250, 1, 999])
    fit = acc.fit()
    sums = ErrorSums()
    for start in range(0, len(x), 400):
        sums.add(y[start:start + 400], fit.predict(x[start:start + 400]))
    want = regression_metrics(y, fit.predict(x))
    for name in ("rmse", "mae", "r2"):
        assert sums.metrics()[name] == pytest.approx(want[name], rel=1e-12)
    assert acc.residual_ss() == pytest.approx(float(((y - fit.predict(x)) ** 2).sum()), rel=1e-9)
    np.testing.assert_allclose(acc.standard_errors(acc.residual_ss()), standard_errors(x, y, fit), rtol=1e-8)


def test_no_rows_is_an_error_not_a_zero_model():
    with pytest.raises(ValueError, match="no rows"):
        StreamedLeastSquares(3).fit()
