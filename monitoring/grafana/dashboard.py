"""The Grafana dashboard, generated from code with grafanalib.

    python monitoring/grafana/dashboard.py > monitoring/grafana/dashboard.json

A test regenerates it and compares with the committed JSON (which the chart's
Grafana sidecar provisions), so edit this file, never the JSON.
"""

from __future__ import annotations

import json
import sys

from grafanalib.core import Dashboard, GaugePanel, GridPos, Target, TimeSeries
from grafanalib._gen import DashboardEncoder

DATASOURCE = "${DS_PROMETHEUS}"


def panel(title: str, exprs: dict[str, str], x: int, y: int, unit: str = "", w: int = 12) -> TimeSeries:
    return TimeSeries(
        title=title, dataSource=DATASOURCE, unit=unit, gridPos=GridPos(h=8, w=w, x=x, y=y),
        targets=[Target(expr=expr, legendFormat=legend, refId=chr(ord("A") + i))
                 for i, (legend, expr) in enumerate(exprs.items())])


def dashboard() -> Dashboard:
    return Dashboard(
        title="mlops-shared-volume", uid="mlops-shared-volume", timezone="utc", refresh="30s",
        description="The served model and its data: requests, errors, latency, drift, freshness, live error.",
        tags=["mlops"],
        panels=[
            panel("Request rate", {"{{route}} {{status}}":
                                   "sum by (route, status) (rate(mlops_http_requests_total[5m]))"}, 0, 0, "reqps"),
            panel("Error ratio (5xx)", {"5xx": 'sum(rate(mlops_http_requests_total{status=~"5.."}[5m])) '
                                               "/ sum(rate(mlops_http_requests_total[5m]))",
                                        "online store errors/s": "sum(rate(mlops_online_lookup_errors_total[5m]))"},
                  12, 0, "percentunit"),
            panel("Latency /predict", {
                q: f'histogram_quantile({v}, sum by (le) (rate(mlops_http_request_duration_seconds_bucket'
                   f'{{route="/predict"}}[5m])))' for q, v in (("p50", 0.5), ("p99", 0.99))}, 0, 8, "s"),
            GaugePanel(title="Model version", dataSource=DATASOURCE, gridPos=GridPos(h=8, w=12, x=12, y=8),
                       targets=[Target(expr="max(mlops_model_version)", refId="A")]),
            panel("Drift per feature (PSI)", {"{{feature}} ({{source}})": "mlops_feature_psi"}, 0, 16),
            panel("Drift per feature (KS)", {"{{feature}} ({{source}})": "mlops_feature_ks"}, 12, 16),
            panel("Feature freshness", {"{{store}}": "mlops_feature_freshness_seconds"}, 0, 24, "s"),
            panel("Live error", {"live RMSE": "max(mlops_live_rmse)", "live MAE": "max(mlops_live_mae)",
                                 "training holdout RMSE": "max(mlops_training_holdout_rmse)"}, 12, 24),
            panel("Prediction shift and quarantine", {"prediction PSI": "max(mlops_prediction_shift)",
                                                      "quarantine ratio": "max(mlops_quarantine_ratio)"}, 0, 32,
                  w=24),
        ],
    ).auto_panel_ids()


def render() -> str:
    return json.dumps(dashboard().to_json_data(), cls=DashboardEncoder, indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
