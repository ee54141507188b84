"""The monitor stage on a real pipeline run: a logged batch like the training data
stays below the drift thresholds, a batch with one feature shifted crosses them for
that feature only; freshness, quarantine ratio and live error against arriving
labels; the report logged to the served version's MLflow run (and an unreachable
MLflow costing only that); the exporter's freshness under an advanced clock fed to
the real stale-features rule in promtool; the HTML report screenshotted in headless
Chromium."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import urllib.request

import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient
from prometheus_client.parser import text_string_to_metric_families

from pipeline import monitor
from pipeline.dag import StageSpec
from pipeline.io import read_record
from pipeline.monitor_exporter import serve
from pipeline.predlog import PredictionLog, predictions_dir
from pipeline.stage import StageContext, upstream_records
from tests.support import ROOT, free_port

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


@pytest.fixture(scope="module")
def shifted_report(logged, steady_report):
    now = logged["shift_time"] + 3600
    th = monitor.Thresholds(window_seconds=7200)
    result = monitor.run(logged["ctx"], clock=lambda: now, thresholds=th)
    return result, json.loads(open(result.outputs["report"]).read()), now, th


def test_the_shifted_feature_crosses_the_thresholds_and_only_it(logged, shifted_report):
    result, report, _, th = shifted_report
    assert report["predictions_logged"] == 1500
    assert report["drifted_features"] == [SHIFTED]
    assert report["features"][SHIFTED]["psi"] > th.psi and report["features"][SHIFTED]["ks"] > th.ks
    for name in set(logged["names"]) - {SHIFTED}:
        assert report["features"][name]["psi"] < th.psi and report["features"][name]["ks"] < th.ks
    assert result.outputs["drifted_features"] == [SHIFTED]
    assert report["live"]["matched"] == 0  # no label is newer than these predictions
    assert report["freshness"]["offline_seconds"] > 10 * DAY


def test_each_report_is_logged_to_the_served_versions_run(logged, steady_report, shifted_report, tmp_path):
    settings = logged["ctx"].settings
    client = MlflowClient(settings.tracking_uri, settings.tracking_uri)
    served = client.get_model_version_by_alias(settings.model_name, settings.model_alias)
    runs = []
    for result, report, now, *_ in (steady_report, shifted_report):
        tracked = result.outputs["mlflow"]
        assert tracked["logged"] and tracked["run_id"] == served.run_id, tracked
        assert tracked["model_version"] == int(served.version)
        assert f"logged to MLflow run {served.run_id}" in result.message
        files = {a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(served.run_id, tracked["artifact_path"])}
        assert {"report.json", "drift.png", "distributions.png", "health.png"} <= files
        got = json.loads(open(client.download_artifacts(served.run_id, f"{tracked['artifact_path']}/report.json",
                                                        str(tmp_path))).read())
        assert got["generated_at_seconds"] == now and got["features"] == report["features"]
        runs.append((now, report))
    # one point per monitor run, at its time: the history shows the drift arrive
    history = {m.step: m.value for m in client.get_metric_history(served.run_id, f"monitor_psi_{SHIFTED}")}
    (steady_at, steady), (shifted_at, shifted) = runs
    assert history[int(steady_at)] == pytest.approx(steady["features"][SHIFTED]["psi"])
    assert history[int(shifted_at)] == pytest.approx(shifted["features"][SHIFTED]["psi"])
    assert history[int(shifted_at)] > 0.2 > history[int(steady_at)]
    rmse = client.get_metric_history(served.run_id, "monitor_live_rmse")
    assert [m.value for m in rmse if m.step == int(steady_at)] == [pytest.approx(steady["live"]["rmse"])]
    assert client.get_run(served.run_id).data.metrics.get("holdout_rmse") is not None  # training's, untouched


def test_an_unreachable_mlflow_costs_the_history_entry_not_the_report(logged, steady_report, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    settings = logged["ctx"].settings.model_copy(
        update={"mlflow_tracking_uri": f"http://user:secret@127.0.0.1:{free_port()}"})
    ctx = StageContext(logged["ctx"].spec, settings, logged["ctx"].upstream)
    now = logged["newest"] + 2 * DAY
    with caplog.at_level(logging.WARNING):
        result = monitor.run(ctx, clock=lambda: now,
                             thresholds=monitor.Thresholds(window_seconds=now - logged["newest"] + 400 * DAY))
    assert result.status == "ok"
    assert json.loads(open(result.outputs["report"]).read())["generated_at_seconds"] == now
    assert result.outputs["mlflow"]["logged"] is False and "not logged to MLflow" in result.message
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "not logged to MLflow" in warnings[0], warnings
    assert "secret" not in warnings[0] and "secret" not in json.dumps(result.outputs)


# ------------------------------------------------------------ freshness and the stale rule
RULES = ROOT / "monitoring" / "prometheus" / "rules.yml"


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool is missing on CI: apt-get install prometheus")
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    return path


def stale_rule() -> tuple[dict, float]:
    rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    rule = next(r for r in rules if r.get("alert") == "MlopsStaleFeatures")
    return rule, float(re.search(r">\s*([0-9.e+]+)\s*$", rule["expr"].strip()).group(1))


def humanize_duration(v: float) -> str:
    """Prometheus' humanizeDuration for a value of a day or more (what the rule's summary shows)."""
    whole = int(v)
    return f"{whole // 86400}d {whole // 3600 % 24}h {whole // 60 % 60}m {whole % 60}s"


def freshness_scraped(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {s.labels["store"]: s.value for family in text_string_to_metric_families(text)
            if family.name == "mlops_feature_freshness_seconds" for s in family.samples}


def test_stale_features_fire_only_once_the_clock_has_moved(steady_report, tmp_path):
    """Materialization stopped; the exporter's clock moves a day and an hour: the scraped freshness
    crosses the rule's threshold, and promtool, fed those scraped values, fires MlopsStaleFeatures
    for both stores after the move and not before."""
    tool = promtool()
    result, report, _ = steady_report
    rule, threshold = stale_rule()
    times = [pd.Timestamp(report["freshness"][k]).timestamp() for k in ("newest_event_time", "materialized_end")]
    clock = [max(times) + 60.0]  # just after the last materialization: fresh
    server, _ = serve(result.outputs["report"], "127.0.0.1", free_port(), clock=lambda: clock[0])
    try:
        url = f"http://127.0.0.1:{server.server_port}/metrics"
        before = freshness_scraped(url)
        clock[0] += threshold + 3600
        after = freshness_scraped(url)
    finally:
        server.shutdown()
    assert set(before) == set(after) == {"offline", "online"}
    assert max(before.values()) < threshold < min(after.values())
    assert after["online"] - before["online"] == pytest.approx(threshold + 3600)

    stores = sorted(before)
    case = {"rule_files": [str(RULES)], "evaluation_interval": "1m", "tests": [{
        "interval": "1m",
        # ten minutes as scraped before the clock moved, then ten as scraped after
        "input_series": [{"series": f'mlops_feature_freshness_seconds{{job="monitor",store="{s}"}}',
                          "values": f"{before[s]!r}x9 {after[s]!r}x10"} for s in stores],
        "alert_rule_test": [
            {"eval_time": "5m", "alertname": "MlopsStaleFeatures", "exp_alerts": []},
            {"eval_time": "15m", "alertname": "MlopsStaleFeatures", "exp_alerts": [
                {"exp_labels": {"store": s, **rule["labels"]},
                 "exp_annotations": {"summary": f"the {s} features are {humanize_duration(after[s])} old"}}
                for s in stores]}]}]}
    test_file = tmp_path / "stale_test.yml"
    test_file.write_text(yaml.safe_dump(case, sort_keys=False))
    proc = subprocess.run([tool, "test", "rules", str(test_file)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


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
