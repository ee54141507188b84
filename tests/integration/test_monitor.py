"""The monitor stage on a real pipeline run: a logged batch like the training data
stays below the drift thresholds, a batch with one feature shifted crosses them for
that feature only; freshness, quarantine ratio and live error against arriving
labels; the HTML report screenshotted in headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest

from pipeline import monitor
from pipeline.dag import StageSpec
from pipeline.io import read_record
from pipeline.predlog import PredictionLog, predictions_dir
from pipeline.stage import StageContext, upstream_records

pytestmark = pytest.mark.integration

SHIFTED = "monthly_spend"
DAY = 86400.0


def monitor_spec() -> StageSpec:
    """The monitor's declaration in pipeline/dag.py, or the one it is to have."""
    from pipeline.dag import STAGE_NAMES, spec

    if "monitor" in STAGE_NAMES:
        return spec("monitor")
    return StageSpec("monitor", "drift, freshness and live error", needs=("features", "feast", "train"))


@pytest.fixture(scope="module")
def logged(sqlite_pipeline):
    """Two batches in the prediction log: ``steady`` (training rows, each logged one
    second before its label's time) and ``shifted`` (ten days after the data, with
    ``SHIFTED`` moved by one standard deviation)."""
    settings = sqlite_pipeline
    ctx = StageContext(monitor_spec(), settings, upstream_records(monitor_spec(), settings, wait=False))
    schema, train = ctx.schema, ctx.upstream["train"].outputs
    features = pd.read_parquet(settings.features_path)
    labels = pd.read_parquet(settings.labels_path)
    rows = features.sample(n=1500, random_state=3).sort_index()
    names = list(schema.feature_names)
    coef = np.array([train["coefficients"][n] for n in names])
    predict = lambda frame: train["intercept"] + frame[names].to_numpy(float) @ coef  # noqa: E731
    log_ = PredictionLog(predictions_dir(settings.shared), max_rows=400)
    steady_times = pd.to_datetime(rows[schema.timestamp], utc=True).map(pd.Timestamp.timestamp) - 1.0
    for (key, values), p, t in zip(rows[[schema.join_key, *names]].set_index(schema.join_key).iterrows(),
                                   predict(rows), steady_times):
        log_.append(key, values.to_dict(), float(p), train["model_version"], "steady", time=t)
    newest = float(steady_times.max()) + 1.0
    shifted = rows.copy()
    shifted[SHIFTED] = shifted[SHIFTED] + shifted[SHIFTED].std()
    shift_time = newest + 10 * DAY
    for (key, values), p in zip(shifted[[schema.join_key, *names]].set_index(schema.join_key).iterrows(),
                                predict(shifted)):
        log_.append(key, values.to_dict(), float(p), train["model_version"], "shifted", time=shift_time)
    assert log_.flush() and log_.dropped == 0
    log_.close()
    label_rows = labels.loc[rows.index]
    expected = label_rows[schema.target].to_numpy(float) - predict(rows)
    return {"ctx": ctx, "newest": newest, "shift_time": shift_time, "names": names,
            "expected_rmse": float(np.sqrt(np.mean(expected ** 2))),
            "expected_mae": float(np.mean(np.abs(expected)))}


@pytest.fixture(scope="module")
def steady_report(logged):
    now = logged["newest"] + DAY
    th = monitor.Thresholds(window_seconds=now - logged["newest"] + 400 * DAY)
    result = monitor.run(logged["ctx"], clock=lambda: now, thresholds=th)
    return result, json.loads(open(result.outputs["report"]).read()), now


def test_a_batch_like_training_does_not_drift(steady_report, logged):
    result, report, _ = steady_report
    assert result.status == "ok" and report["predictions_logged"] == 1500
    for name in logged["names"]:
        figures = report["features"][name]
        assert figures["psi"] < 0.1 and figures["ks"] < 0.1 and not figures["drifted"], name
    assert report["drifted_features"] == [] and report["prediction"]["psi"] < 0.1


def test_live_error_against_labels_that_arrived(steady_report, logged):
    _, report, _ = steady_report
    live = report["live"]
    assert live["matched"] == 1500
    assert live["rmse"] == pytest.approx(logged["expected_rmse"], rel=1e-9)
    assert live["mae"] == pytest.approx(logged["expected_mae"], rel=1e-9)
    assert live["holdout_rmse"] > 0


def test_freshness_and_quarantine_come_from_the_records(steady_report, logged):
    _, report, now = steady_report
    settings = logged["ctx"].settings
    features = read_record(settings.runs_dir, "features").outputs
    feast = read_record(settings.runs_dir, "feast").outputs
    assert report["freshness"]["offline_seconds"] == pytest.approx(
        now - pd.Timestamp(features["event_time_max"]).timestamp())
    assert report["freshness"]["online_seconds"] == pytest.approx(
        now - pd.Timestamp(feast["materialized"]["end"]).timestamp())
    assert report["quarantine"]["ratio"] == pytest.approx(features["rows_quarantined"] / features["rows_in"])
    assert report["quarantine"]["ratio"] > 0  # the synthetic source injects bad rows


def test_the_shifted_feature_crosses_the_thresholds_and_only_it(logged, steady_report):
    now = logged["shift_time"] + 3600
    th = monitor.Thresholds(window_seconds=7200)
    result = monitor.run(logged["ctx"], clock=lambda: now, thresholds=th)
    report = json.loads(open(result.outputs["report"]).read())
    assert report["predictions_logged"] == 1500
    assert report["drifted_features"] == [SHIFTED]
    assert report["features"][SHIFTED]["psi"] > th.psi and report["features"][SHIFTED]["ks"] > th.ks
    for name in set(logged["names"]) - {SHIFTED}:
        assert report["features"][name]["psi"] < th.psi and report["features"][name]["ks"] < th.ks
    assert result.outputs["drifted_features"] == [SHIFTED]
    assert report["live"]["matched"] == 0  # no label is newer than these predictions
    assert report["freshness"]["offline_seconds"] > 10 * DAY


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_html_report_screenshot_is_not_blank(steady_report, tmp_path):
    browser = chromium()
    if browser is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is missing on CI: apt-get install chromium")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    from PIL import Image

    result, _, _ = steady_report
    png = tmp_path / "report.png"
    proc = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                           "--disable-background-networking", "--hide-scrollbars",
                           f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1000,1400",
                           f"--screenshot={png}", "file://" + result.outputs["html"]],
                          capture_output=True, text=True, timeout=90)
    assert png.is_file(), proc.stderr[-2000:]
    image = np.asarray(Image.open(png).convert("L"), dtype=float)
    assert image.shape[0] >= 1000 and image.shape[1] >= 900
    assert image.std() > 10, "the screenshot is blank"
    dark = (image < 128).mean()
    assert 0.01 < dark < 0.6, f"{dark:.1%} of the page is dark: text and plots should be a modest share"
