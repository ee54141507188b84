"""The monitor's pure core: bins, PSI, KS, the reference, drift, live error, freshness."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline import monitor
from pipeline.drift import Tally
from pipeline.monitor import Thresholds


def test_quantile_edges_make_equal_mass_bins():
    values = np.arange(1000, dtype=float)
    edges = monitor.quantile_edges(values, 10)
    assert len(edges) == 9
    np.testing.assert_allclose(monitor.bin_fractions(values, edges), 0.1, atol=0.002)


def test_quantile_edges_merge_ties_and_skip_nan():
    values = np.array([1.0] * 90 + [2.0] * 10 + [np.nan] * 5)
    edges = monitor.quantile_edges(values, 10)
    assert len(edges) == len(set(edges.tolist())) < 9  # eight deciles at 1.0 are one edge
    fractions = monitor.bin_fractions(values, edges)
    assert fractions[0] == pytest.approx(0.9) and fractions[-1] == pytest.approx(0.1)  # NaN not counted


def test_psi_is_zero_for_equal_and_grows_with_shift():
    expected = np.full(10, 0.1)
    assert monitor.psi(expected, expected) == 0.0
    rng = np.random.default_rng(0)
    base = rng.normal(size=20_000)
    edges = monitor.quantile_edges(base)
    small = monitor.psi(expected, monitor.bin_fractions(rng.normal(0.1, 1, 5000), edges))
    large = monitor.psi(expected, monitor.bin_fractions(rng.normal(1.0, 1, 5000), edges))
    assert small < 0.1 < 0.2 < large


def test_psi_of_an_empty_bin_is_finite():
    assert np.isfinite(monitor.psi([0.5, 0.5], [1.0, 0.0]))


def test_ks_matches_the_hand_computed_statistic():
    statistic, pvalue = monitor.ks(np.array([1.0, 2.0, 3.0, 4.0]), np.array([3.5, 4.5, 5.5, 6.5]))
    assert statistic == pytest.approx(0.75)  # after 3.0: reference at 0.75, sample at 0
    assert 0 < pvalue < 1


def test_reference_sketch_stands_in_for_the_sample_in_ks():
    rng = np.random.default_rng(1)
    train = rng.normal(size=50_000)
    live = rng.normal(0.3, 1.0, 3000)
    ref = monitor.describe(train)
    exact, _ = monitor.ks(train, live)
    approx, _ = monitor.ks(np.asarray(ref["sketch"]), live)
    assert abs(exact - approx) < 2.0 / monitor.SKETCH + 1e-9


def test_drift_flags_only_the_shifted_feature():
    rng = np.random.default_rng(2)
    frame = pd.DataFrame({"a": rng.normal(size=5000), "b": rng.uniform(0, 10, 5000),
                          "t": pd.date_range("2024-01-01", periods=5000, freq="min", tz="UTC")})
    ref = monitor.reference(frame, ["a", "b"], timestamp="t")
    assert ref["event_time_max"].startswith("2024-01-04")
    th = Thresholds()
    same = monitor.drift(ref["features"]["a"], rng.normal(size=2000), th)
    shifted = monitor.drift(ref["features"]["b"], rng.uniform(3, 13, 2000), th)
    assert not same["drifted"] and same["psi"] < th.psi and same["ks"] < th.ks
    assert shifted["drifted"] and shifted["psi"] > th.psi and shifted["ks"] > th.ks


def test_drift_refuses_to_judge_too_few_values():
    ref = monitor.describe(np.arange(1000.0))
    out = monitor.drift(ref, np.arange(10.0) + 1e6, Thresholds(min_rows=100))
    assert out["psi"] is None and not out["drifted"] and "fewer than 100" in out["note"]


def test_live_error_uses_the_first_label_at_or_after_the_prediction():
    t0 = pd.Timestamp("2024-05-01", tz="UTC")
    predictions = pd.DataFrame({"entity_key": ["1", "1", "2", "3"],
                                "time": [t0, t0 + pd.Timedelta(hours=2), t0, t0],
                                "prediction": [10.0, 20.0, 5.0, 7.0]})
    labels = pd.DataFrame({"id": [1, 1, 1, 2],
                           "ts": [t0 - pd.Timedelta(hours=1), t0 + pd.Timedelta(hours=1),
                                  t0 + pd.Timedelta(hours=3), t0 - pd.Timedelta(hours=1)],
                           "y": [100.0, 12.0, 23.0, 999.0]})
    out = monitor.live_error(predictions, labels, "id", "ts", "y")
    # entity 1 at t0 -> 12 (err 2); at t0+2h -> 23 (err 3); entity 2's label is older: unmatched; 3 has none
    assert out["matched"] == 2
    assert out["mae"] == pytest.approx(2.5)
    assert out["rmse"] == pytest.approx(np.sqrt((4 + 9) / 2))


def test_live_error_with_no_labels_yet():
    assert monitor.live_error(None, pd.DataFrame(), "id", "ts", "y") == {"matched": 0, "rmse": None, "mae": None}


def test_freshness_is_now_minus_the_newest_time():
    now = pd.Timestamp("2024-05-01T12:00:00Z").timestamp()
    out = monitor.freshness(now, "2024-05-01T11:00:00+00:00", "2024-05-01T11:59:00+00:00")
    assert out["offline_seconds"] == 3600 and out["online_seconds"] == 60
    assert monitor.freshness(now, None, None)["online_seconds"] is None


def test_ks_statistic_is_scipys_including_ties():
    from scipy import stats

    rng = np.random.default_rng(4)
    for reference_sample, sample in ((rng.integers(0, 5, 1001).astype(float), rng.integers(0, 6, 3000).astype(float)),
                                     (rng.normal(size=1001), rng.normal(0.2, 1.1, 5000)),
                                     (np.sort(rng.normal(size=1001)), rng.normal(size=7))):
        statistic, pvalue = monitor.ks(reference_sample, sample)
        expected = stats.ks_2samp(reference_sample, sample)
        assert statistic == pytest.approx(expected.statistic, abs=1e-12)
        assert 0 <= pvalue <= 1
    # the asymptotic p-value tells a shift from noise as scipy's does
    same = monitor.ks(rng.normal(size=1001), rng.normal(size=20_000))[1]
    moved = monitor.ks(rng.normal(size=1001), rng.normal(0.3, 1, 20_000))[1]
    assert same > 0.01 and moved < 1e-6


def test_drift_in_batches_equals_drift_in_one_pass():
    rng = np.random.default_rng(5)
    ref = monitor.describe(rng.normal(size=20_000))
    values = rng.normal(0.15, 1.2, 30_000)
    values[::97] = np.nan  # a null in the log: not counted
    whole = monitor.drift(ref, values, Thresholds())
    tally = Tally(ref)
    for part in np.array_split(values, 7):
        tally.add(part)
    batched = tally.result(Thresholds())
    assert batched["n"] == whole["n"] == int(np.isfinite(values).sum())
    for key in ("psi", "ks", "ks_pvalue", "mean_shift_sigmas"):
        assert batched[key] == pytest.approx(whole[key], rel=1e-9), key
    assert batched["live_fractions"] == pytest.approx(whole["live_fractions"])


def test_the_log_scan_reads_the_window_only(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.predlog import scan_log, to_table

    def write(first: float, last: float, features: dict, name_first=None):
        rows = [(t, i, features, 1.0, 1, "r") for i, t in enumerate(np.linspace(first, last, 10))]
        name = f"pred-{int((name_first or first) * 1000):013d}-{int(last * 1000):013d}-host-1-{int(first):06d}.parquet"
        pq.write_table(to_table(rows), tmp_path / name)

    write(100, 190, {"a": 1.0, "b": 2.0})  # straddles the window's start at 150
    write(200, 290, {"a": 3.0})  # written before feature b existed
    (tmp_path / f"pred-{10_000:013d}-{90_000:013d}-host-1-000009.parquet").write_bytes(b"not parquet")  # before
    (tmp_path / f"pred-{900_000:013d}-{990_000:013d}-host-1-000010.parquet").write_bytes(b"not parquet")  # after
    batches = list(scan_log(tmp_path, 150, 300, ["feature.a", "feature.b"]))
    table = pa.Table.from_batches(batches)
    assert table.column_names == ["feature.a", "feature.b"]  # projected: no time, keys or request ids
    assert table.column("feature.a").to_pylist() == [1.0] * 5 + [3.0] * 10  # 150..190, then 200..290
    assert table.column("feature.b").null_count == 10
    assert list(scan_log(tmp_path / "missing", 0, 1, ["prediction"])) == []
