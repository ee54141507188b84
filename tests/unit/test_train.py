import numpy as np
import pytest

from pipeline.errors import SchemaError
from pipeline.train import fit_least_squares, regression_metrics, split


def test_least_squares_recovers_coefficients_within_noise():
    rng = np.random.default_rng(0)
    x = rng.uniform(-5, 5, size=(4000, 3))
    beta, intercept, sigma = np.array([1.5, -2.0, 0.25]), 7.0, 0.5
    y = intercept + x @ beta + rng.normal(0, sigma, len(x))
    fit = fit_least_squares(x, y)
    design = np.column_stack([np.ones(len(x)), x])
    se = sigma * np.sqrt(np.diag(np.linalg.inv(design.T @ design)))
    assert abs(fit.intercept - intercept) < 4 * se[0]
    assert np.all(np.abs(fit.coefficients - beta) < 4 * se[1:])


def test_exact_data_fits_exactly():
    x = np.arange(20, dtype=float).reshape(10, 2)
    x[:, 1] = x[:, 1] ** 2
    y = 3 + x @ np.array([2.0, -1.0])
    fit = fit_least_squares(x, y)
    assert fit.predict(x) == pytest.approx(y)
    m = regression_metrics(y, fit.predict(x))
    assert m["rmse"] == pytest.approx(0, abs=1e-9) and m["r2"] == pytest.approx(1)


def test_metrics_against_hand_computed_values():
    y = np.array([1.0, 2.0, 3.0, 4.0])
    pred = np.array([1.0, 2.0, 3.0, 6.0])
    m = regression_metrics(y, pred)
    assert m["rmse"] == pytest.approx(1.0)  # sqrt(4 / 4)
    assert m["mae"] == pytest.approx(0.5)
    assert m["r2"] == pytest.approx(1 - 4 / 5)


def test_split_is_seeded_disjoint_and_complete():
    keys = np.arange(1000)
    train, holdout = split(keys, 0.2, seed=3)
    again_train, again_holdout = split(keys, 0.2, seed=3)
    other_train, _ = split(keys, 0.2, seed=4)
    assert 150 <= len(holdout) <= 250 and len(train) + len(holdout) == 1000
    assert set(train).isdisjoint(holdout) and set(train) | set(holdout) == set(range(1000))
    assert (train == again_train).all() and (holdout == again_holdout).all()
    assert not np.array_equal(train, other_train)
    with pytest.raises(SchemaError, match="too few"):
        split(np.arange(2), 0.5, seed=0)


def test_standard_errors_are_the_ols_ones_and_cover_the_truth():
    from pipeline.dataset import CUSTOMERS as schema
    from pipeline.synthetic import TRUTH, generate_chunk
    from pipeline.train import standard_errors

    frame, _ = generate_chunk(20_000, seed=1, index=0, bad_fraction=0)
    x = frame[list(schema.feature_names)].to_numpy(float)
    y = frame[schema.target].to_numpy(float)
    fit = fit_least_squares(x, y)
    design = np.column_stack([np.ones(len(x)), x])
    residual = y - fit.predict(x)
    expected = np.sqrt(np.diag(np.linalg.inv(design.T @ design)) * (residual @ residual) / (len(y) - 9))
    got = standard_errors(x, y, fit)
    np.testing.assert_allclose(got, expected, rtol=1e-9)
    truth = np.array([TRUTH.intercept, *(TRUTH.coefficients[n] for n in schema.feature_names)])
    z = (np.array([fit.intercept, *fit.coefficients]) - truth) / got
    assert np.abs(z).max() < 4.5  # nine coefficients: a 4.5-sigma miss means the errors are wrong


def test_scoring_the_spill_holds_a_batch_at_a_time_not_what_it_read(tmp_path):
    """score() reads train's spill (every row: 0.8 GB at 10^7 rows) batch by batch:
    Arrow holds a batch or two at any time, not what it has read so far."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.dataset import CUSTOMERS as schema
    from pipeline.io import SCRATCH_PARQUET
    from pipeline.train_stats import score, spill_schema

    rng, groups, rows = np.random.default_rng(3), 60, 20_000
    spill, columns = tmp_path / "scored.parquet", spill_schema(schema)
    with pq.ParquetWriter(spill, columns, **SCRATCH_PARQUET) as writer:
        for _ in range(groups):  # one row group per write, as gather writes a chunk
            x, held = rng.normal(size=(rows, len(schema.feature_names))), rng.random(rows) < 0.2
            writer.write_table(pa.table([held, x.sum(axis=1) + 1.0, *x.T], schema=columns))
    batch_bytes = (1 << 16) * 8 * (len(schema.feature_names) + 2)  # score's batches of 65536 rows
    held_by_arrow = []

    class Fit:
        def predict(self, x):
            held_by_arrow.append(pa.total_allocated_bytes())
            return x.sum(axis=1)

    before = pa.total_allocated_bytes()
    train, holdout = score(Fit(), spill, schema)
    assert train.n + holdout.n == groups * rows
    assert max(held_by_arrow) - before < 3 * batch_bytes  # a batch or two, not the file's 77 MB
