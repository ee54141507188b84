"""The exporter serves the last report's figures and notices a new report."""

from __future__ import annotations

import urllib.request

from prometheus_client import generate_latest

from pipeline.io import atomic_write_json
from pipeline.monitor_exporter import registry_for, serve
from tests.support import free_port, wait_until

NOW = 1_700_000_000.0


def report(psi_b: float, rmse: float | None) -> dict:
    figures = lambda psi: {"psi": psi, "ks": psi / 2, "drifted": psi > 0.2}  # noqa: E731
    return {
        "generated_at_seconds": NOW - 30,
        "features": {"a": figures(0.01), "b": figures(psi_b)},
        "offline_features": {"rows": 0, "features": {"a": {"psi": None, "ks": None}, "b": {"psi": None}}},
        "prediction": {"psi": 0.05},
        "freshness": {"newest_event_time": "2023-11-14T22:00:00+00:00", "materialized_end": None},
        "quarantine": {"ratio": 0.02},
        "live": {"rmse": rmse, "mae": None, "matched": 0, "holdout_rmse": 1.5},
        "predictions_logged": 10, "model": {"version": 3},
    }


def scrape(registry) -> str:
    return generate_latest(registry).decode()


def test_gauges_of_the_report(tmp_path):
    path = tmp_path / "report.json"
    registry = registry_for(path, clock=lambda: NOW)
    assert "mlops_monitor_report_present 0.0" in scrape(registry)
    atomic_write_json(path, report(0.5, None))
    text = scrape(registry)
    assert 'mlops_feature_psi{feature="b",source="predictions"} 0.5' in text
    assert 'mlops_feature_ks{feature="a",source="predictions"} 0.005' in text
    assert 'source="features"' not in text  # no newer offline rows: no figure, not a zero
    assert "mlops_live_rmse" not in text  # no labels yet: absent, not zero
    fresh = [line for line in text.splitlines() if line.startswith("mlops_feature_freshness_seconds{")]
    assert fresh == ['mlops_feature_freshness_seconds{store="offline"} 800.0']  # 22:13:20 - 22:00:00
    assert "mlops_monitor_report_age_seconds 30.0" in text
    assert "mlops_quarantine_ratio 0.02" in text and "mlops_training_holdout_rmse 1.5" in text


def test_served_and_reread_when_the_report_changes(tmp_path):
    path = tmp_path / "report.json"
    atomic_write_json(path, report(0.5, 2.0))
    server, thread = serve(path, "127.0.0.1", free_port())
    try:
        url = f"http://127.0.0.1:{server.server_port}/metrics"
        get = lambda: urllib.request.urlopen(url, timeout=5).read().decode()  # noqa: E731
        assert "mlops_live_rmse 2.0" in get()
        atomic_write_json(path, report(0.05, 3.25))
        wait_until(lambda: "mlops_live_rmse 3.25" in get(), 10, "the exporter to read the new report")
        assert 'mlops_feature_psi{feature="b",source="predictions"} 0.05' in get()
    finally:
        server.shutdown()


def test_freshness_keeps_growing_between_reports(tmp_path):
    """No new report (materialization stopped): each scrape ages the features by the clock."""
    path = tmp_path / "report.json"
    atomic_write_json(path, report(0.5, None))
    now = [NOW]
    registry = registry_for(path, clock=lambda: now[0])
    assert 'mlops_feature_freshness_seconds{store="offline"} 800.0' in scrape(registry)
    now[0] += 86400
    text = scrape(registry)
    assert 'mlops_feature_freshness_seconds{store="offline"} 87200.0' in text
    assert "mlops_monitor_report_age_seconds 86430.0" in text
