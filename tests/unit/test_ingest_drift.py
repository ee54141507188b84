"""Synthetic batches and drift: batch 0 without drift is the data it always was,
batch n follows batch n-1 in time with rows of its own, and a drift moves only
the named features, in the declared bounds, by the stated standard deviations."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from pipeline.dataset import CUSTOMERS as schema
from pipeline.dataset import DatasetError
from pipeline.settings import Settings
from pipeline.synthetic import (
    Chunk,
    SPAN,
    START,
    TRUTH,
    _draw_features,
    draw_chunk,
    generate_chunk,
    write_chunk,
)
from pipeline.synthetic_drift import GENERATED_SD, parse_drift
from pipeline.validate import validate_chunk

# sha256 of the CSV bytes the stage writes and the injected counts, computed with the
# generator as it was before batches and drift existed: a change here changes every
# user's raw data and its DVC hash.
BEFORE_BATCHES = {
    (1000, 42): "647556fd8cc3533d67abedac88c2c817fc4a5b254cc42b0e7aee15be57056e37",
    (2500, 7): "ed7c4b3657583ffd3c7e1a2af6af0e4ddc6e2e35f84be5323038fe5ce2823350",
}


def digest(chunk: Chunk, tmp_path) -> str:
    path = tmp_path / "part.csv"
    write_chunk(chunk, path)  # what the ingest stage writes
    return hashlib.sha256(path.read_bytes() + repr(sorted(chunk.injected.items())).encode()).hexdigest()


@pytest.mark.parametrize("rows, seed", sorted(BEFORE_BATCHES))
def test_batch_0_without_drift_is_byte_identical_to_the_data_before_batches(rows, seed, tmp_path):
    assert digest(draw_chunk(rows, seed, 0), tmp_path) == BEFORE_BATCHES[rows, seed]
    assert digest(draw_chunk(rows, seed, 0, batch=0, drift={}), tmp_path) == BEFORE_BATCHES[rows, seed]


def test_batch_1_follows_batch_0_in_time_with_the_same_customers_and_other_rows():
    zero, _ = generate_chunk(2000, seed=5, index=0, bad_fraction=0)
    one, _ = generate_chunk(2000, seed=5, index=0, bad_fraction=0, batch=1)
    two, _ = generate_chunk(2000, seed=5, index=0, bad_fraction=0, batch=2)
    times = [pd.to_datetime(f[schema.timestamp], utc=True) for f in (zero, one, two)]
    assert times[0].max() < times[1].min() and times[1].max() < times[2].min()
    assert times[1].min() == START + SPAN and times[2].min() == START + 2 * SPAN
    assert (zero[schema.join_key] == one[schema.join_key]).all()
    for name in schema.feature_names:  # a seed stream of its own: not the same draws again
        assert not zero[name].equals(one[name]) and not one[name].equals(two[name]), name
    assert one.equals(generate_chunk(2000, seed=5, index=0, bad_fraction=0, batch=1)[0])


def test_a_drift_moves_only_the_named_feature_by_its_standard_deviations():
    plain, _ = generate_chunk(20_000, seed=9, index=0, bad_fraction=0, batch=1)
    moved, _ = generate_chunk(20_000, seed=9, index=0, bad_fraction=0, batch=1, drift={"monthly_spend": 1.5})
    shift = moved["monthly_spend"] - plain["monthly_spend"]
    assert np.allclose(shift, 1.5 * GENERATED_SD["monthly_spend"])  # far from its bound: nothing clipped
    for name in set(schema.feature_names) - {"monthly_spend"}:
        assert moved[name].equals(plain[name]), name
    # covariate shift: the target is drawn from the moved values with the same truth and noise
    assert np.allclose(moved[schema.target] - plain[schema.target],
                       TRUTH.coefficients["monthly_spend"] * shift)


def test_a_large_drift_stays_in_the_declared_bounds_so_nothing_extra_is_quarantined():
    drift = {"age": 3.0, "satisfaction": -2.0, "support_calls": 4.0}
    frame, injected = generate_chunk(5000, seed=3, index=0, bad_fraction=0.01, drift=drift)
    clean, _ = generate_chunk(5000, seed=3, index=0, bad_fraction=0, drift=drift)
    bounds = {f.name: f for f in schema.features}
    for name in drift:
        values = clean[name]
        assert values.between(bounds[name].low, bounds[name].high).all(), name
        if bounds[name].integer:
            assert values.dtype.kind == "i", name
    assert (clean["age"] == 100).mean() > 0.1  # 18..80 moved by 3 sd piles up at the bound
    assert (clean["satisfaction"] == 1).mean() > 0.3
    text = frame.astype(str).replace({"nan": ""})
    _, rejected = validate_chunk(pa.Table.from_pandas(text, preserve_index=False), schema)
    assert rejected.num_rows == sum(injected.values())  # only the injected bad rows


def test_the_drift_unit_is_each_features_generated_standard_deviation():
    drawn = _draw_features(np.random.default_rng(0), 200_000)
    assert set(GENERATED_SD) == set(schema.feature_names)
    for name, values in drawn.items():
        assert np.std(values) == pytest.approx(GENERATED_SD[name], rel=0.01), name


def test_a_drift_spec_is_checked_and_written_one_way():
    assert Settings(synthetic_drift=" monthly_spend = 1 , age=-0.5").synthetic_drift == \
        "age=-0.5,monthly_spend=1.0"
    assert parse_drift("age=-0.5,monthly_spend=1.0") == {"age": -0.5, "monthly_spend": 1.0}
    assert Settings(synthetic_drift="").synthetic_drift is None
    for bad in ("monthly_spend", "monthly_spend=x", "age=1,age=2", "age=nan", "age=1e999", "age=1,"):
        with pytest.raises(ValueError, match="is not `feature=shift"):
            Settings(synthetic_drift=bad)


def test_an_unknown_feature_is_one_line_naming_the_known_ones():
    with pytest.raises(DatasetError) as caught:
        parse_drift("monthly_spent=1.0")
    message = str(caught.value)
    assert "monthly_spent" in message and "\n" not in message
    assert all(name in message for name in schema.feature_names)


@pytest.mark.parametrize("flags, expected", [
    (["--drift", "monthly_spend=x"], "is not `feature=shift"),
    (["--drift", "monthly_spent=1"], "use one of: age, tenure_months"),
    (["--batch", "-1"], "synthetic_batch"),
])
def test_the_cli_says_what_is_wrong_with_a_batch_or_drift_in_one_line(flags, expected, tmp_path, capsys):
    from pipeline.cli import main

    assert main(["ingest", "--shared-dir", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and "Traceback" not in err and len(err.splitlines()) == 1, err


def test_a_shift_below_half_a_unit_still_moves_an_integer_feature():
    """Rounding to the nearest integer would undo it: late_payments' shift is 0.45 of a
    payment here; the mean must move by it (random rounding), within sampling error."""
    rows = 100_000
    plain, _ = generate_chunk(rows, 3, 0, bad_fraction=0, batch=1)
    shifted, _ = generate_chunk(rows, 3, 0, bad_fraction=0, batch=1, drift={"late_payments": 0.45})
    wanted = 0.45 * GENERATED_SD["late_payments"]
    assert wanted < 0.5
    moved = shifted["late_payments"].mean() - plain["late_payments"].mean()
    assert abs(moved - wanted) < 0.02, (moved, wanted)
    assert (shifted["late_payments"] >= 0).all()


@pytest.mark.parametrize("drift", [{}, {"age": 3.0, "satisfaction": -2.0, "late_payments": 0.45}])
def test_the_stage_s_csv_holds_the_frame_the_tests_read(drift, tmp_path):
    """ingest writes each part from the drawn columns (no column of Python objects); read
    back as text, it holds the values of the frame :func:`generate_chunk` hands the other
    tests, bad values and all."""
    chunk = draw_chunk(20_000, 11, 0, 0.01, batch=1, drift=drift)
    assert len(chunk.bad) > 100
    write_chunk(chunk, tmp_path / "stage.csv")
    written = pd.read_csv(tmp_path / "stage.csv", dtype=str, keep_default_na=False)
    frame = generate_chunk(20_000, 11, 0, 0.01, batch=1, drift=drift)[0]
    assert list(written.columns) == list(frame.columns) and len(written) == len(frame)
    for column in frame.columns:
        for text, value in zip(written[column], frame[column]):
            assert text == value if isinstance(value, str) else float(text) == float(value), column
