import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from pipeline.dataset import CUSTOMERS as schema
from pipeline.validate import validate_chunk
from pipeline.synthetic import CHUNK_ROWS, TRUTH, generate_chunk, n_entities
from pipeline.train import fit_least_squares


def test_same_seed_same_data_other_seed_other_data():
    a, _ = generate_chunk(2000, seed=1, index=0)
    b, _ = generate_chunk(2000, seed=1, index=0)
    c, _ = generate_chunk(2000, seed=2, index=0)
    pd.testing.assert_frame_equal(a, b)
    assert not a[schema.target].equals(c[schema.target])


def test_columns_entities_and_timestamps():
    frame, _ = generate_chunk(1000, seed=3, index=0, bad_fraction=0)
    assert tuple(frame.columns) == schema.raw_columns
    assert frame[schema.join_key].between(1000, 1000 + n_entities(1000) - 1).all()
    assert frame[schema.join_key].nunique() == n_entities(1000)
    stamps = pd.to_datetime(frame[schema.timestamp], utc=True)
    assert stamps.is_monotonic_increasing
    # every entity has several time-stamped observations, never two at one instant
    assert not frame.assign(ts=stamps).duplicated([schema.join_key, "ts"]).any()
    assert frame.groupby(schema.join_key).size().min() >= 2


def test_chunks_continue_each_other():
    rows = CHUNK_ROWS + 500
    first, _ = generate_chunk(rows, seed=5, index=0, bad_fraction=0)
    second, _ = generate_chunk(rows, seed=5, index=1, bad_fraction=0)
    assert len(first) == CHUNK_ROWS and len(second) == 500
    assert first[schema.timestamp].iloc[-1] < second[schema.timestamp].iloc[0]
    with pytest.raises(ValueError):
        generate_chunk(rows, seed=5, index=2)


def test_injected_bad_rows_are_exactly_the_quarantined_ones():
    frame, injected = generate_chunk(20_000, seed=11, index=0, bad_fraction=0.01)
    assert sum(injected.values()) > 100 and all(injected.values())
    text = frame.astype(str).replace({"nan": ""})
    good, rejected = validate_chunk(pa.Table.from_pandas(text, preserve_index=False), schema)
    assert rejected.num_rows == sum(injected.values())
    assert good.num_rows + rejected.num_rows == len(frame)


def test_truth_is_recoverable_from_clean_rows():
    frame, _ = generate_chunk(20_000, seed=13, index=0, bad_fraction=0)
    x = frame[list(schema.feature_names)].to_numpy(float)
    fit = fit_least_squares(x, frame[schema.target].to_numpy(float))
    true = np.array([TRUTH.coefficients[n] for n in schema.feature_names])
    # standard errors of OLS: sigma * sqrt(diag((X'X)^-1)); allow 4 of them
    design = np.column_stack([np.ones(len(x)), x])
    se = TRUTH.noise_sd * np.sqrt(np.diag(np.linalg.inv(design.T @ design)))
    assert np.all(np.abs(fit.coefficients - true) < 4 * se[1:])
    assert abs(fit.intercept - TRUTH.intercept) < 4 * se[0]


def test_the_arrow_writer_writes_what_pandas_wrote_value_for_value(tmp_path):
    from pipeline.synthetic import draw_chunk, write_chunk

    frame, injected = generate_chunk(20_000, seed=11, index=0, bad_fraction=0.01)
    assert sum(injected.values()) > 50
    frame.to_csv(tmp_path / "pandas.csv", index=False)
    write_chunk(draw_chunk(20_000, seed=11, index=0, bad_fraction=0.01), tmp_path / "arrow.csv")
    ours = pd.read_csv(tmp_path / "arrow.csv", dtype=str, keep_default_na=False)
    theirs = pd.read_csv(tmp_path / "pandas.csv", dtype=str, keep_default_na=False)
    assert list(ours.columns) == list(theirs.columns) and len(ours) == len(theirs)
    differ = ours != theirs
    for column in ours.columns:  # where the text differs, it is the same number written another way
        rows = differ[column].to_numpy()
        assert all(float(a) == float(b) for a, b in zip(ours[column][rows], theirs[column][rows])), column
    assert (ours == "n/a").sum().sum() == injected["wrong_type"] and (ours == "").sum().sum() == injected["missing"]
