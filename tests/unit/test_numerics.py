"""Least squares a user can trust: predictions within 1e-9 (relative to their size)
of an exact rational solution, on a badly conditioned table and on a real one;
a reproducible split by entity key."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from pipeline.train import fit_least_squares, holdout_mask, split


def exact_predictions(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with an intercept in exact rational arithmetic (floats are
    dyadic rationals: the normal equations are solved without any rounding)."""
    rows = [[Fraction(1)] + [Fraction(float(v)) for v in row] for row in x]
    target = [Fraction(float(v)) for v in y]
    k = len(rows[0])
    a = [[sum(r[i] * r[j] for r in rows) for j in range(k)] for i in range(k)]
    b = [sum(r[i] * t for r, t in zip(rows, target)) for i in range(k)]
    for col in range(k):  # Gauss-Jordan, exact
        pivot = next(i for i in range(col, k) if a[i][col] != 0)
        a[col], a[pivot], b[col], b[pivot] = a[pivot], a[col], b[pivot], b[col]
        for i in range(k):
            if i != col and a[i][col] != 0:
                f = a[i][col] / a[col][col]
                a[i] = [u - f * v for u, v in zip(a[i], a[col])]
                b[i] -= f * b[col]
    beta = [b[i] / a[i][i] for i in range(k)]
    return np.array([float(sum(c * v for c, v in zip(beta, r))) for r in rows])


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def ill_conditioned(n: int = 120, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Scales from 1e-3 to 1e6 and two nearly collinear columns."""
    rng = np.random.default_rng(seed)
    small = rng.uniform(0, 1e-3, n)
    big = rng.uniform(1e6, 2e6, n)
    twin = big + rng.normal(0, 1e-2, n)  # collinear with `big` to 1 part in 1e8
    plain = rng.normal(0, 1, n)
    x = np.column_stack([small, big, twin, plain])
    y = 5.0 + 3e3 * small + 2e-6 * big - 1e-6 * twin + 0.5 * plain + rng.normal(0, 0.1, n)
    return x, y


def test_an_ill_conditioned_table_is_fitted_to_1e_9_of_the_exact_solution():
    x, y = ill_conditioned()
    assert np.linalg.cond(np.column_stack([np.ones(len(x)), x])) > 1e9
    fit = fit_least_squares(x, y)
    assert relative_error(fit.predict(x), exact_predictions(x, y)) < 1e-9


def test_plain_normal_equations_would_not_be_good_enough():
    """The bound above is not loose: the textbook solution misses it on the same table."""
    x, y = ill_conditioned()
    design = np.column_stack([np.ones(len(x)), x])
    naive = np.linalg.solve(design.T @ design, design.T @ y)
    assert relative_error(design @ naive, exact_predictions(x, y)) > 1e-9


def test_a_real_data_set_is_fitted_to_1e_9_of_the_exact_solution():
    from sklearn.datasets import load_diabetes  # ships its CSV inside the package

    data = load_diabetes(scaled=False)
    fit = fit_least_squares(data.data, data.target)
    assert relative_error(fit.predict(data.data), exact_predictions(data.data, data.target)) < 1e-9


def test_a_constant_column_does_not_break_the_fit():
    rng = np.random.default_rng(1)
    x = np.column_stack([rng.normal(size=50), np.full(50, 7.0)])
    y = 1 + 2 * x[:, 0]
    fit = fit_least_squares(x, y)
    np.testing.assert_allclose(fit.predict(x), y, rtol=1e-12)


def test_the_split_is_by_entity_reproducible_and_stable_as_rows_are_added():
    keys = np.repeat(np.arange(1000, 1400), 5)
    held = holdout_mask(keys, 0.2, seed=42)
    assert 0.15 < held.mean() < 0.25
    by_entity = {k: set(held[keys == k]) for k in np.unique(keys)[:50]}
    assert all(len(sides) == 1 for sides in by_entity.values())  # an entity never straddles the split
    np.testing.assert_array_equal(held, holdout_mask(keys, 0.2, seed=42))
    assert (held != holdout_mask(keys, 0.2, seed=43)).any()
    more = np.concatenate([keys, np.arange(5000, 5100)])
    np.testing.assert_array_equal(holdout_mask(more, 0.2, seed=42)[:len(keys)], held)
    strings = holdout_mask(np.array([f"house-{k}" for k in keys], dtype=object), 0.2, seed=42)
    assert 0.15 < strings.mean() < 0.25


def test_no_holdout_fits_on_every_row_and_too_few_rows_say_what_to_do():
    train, holdout = split(np.arange(10), 0.0, seed=1)
    assert len(train) == 10 and len(holdout) == 0
    from pipeline.errors import SchemaError

    with pytest.raises(SchemaError, match="holdout: 0 fits on every row"):
        split(np.arange(2), 0.5, seed=0)
