"""The committed Grafana dashboard is what monitoring/grafana/dashboard.py generates,
and every metric it charts is one the service or the monitor exporter exposes."""

from __future__ import annotations

import importlib.util
import json
import re

from tests.support import ROOT

GRAFANA = ROOT / "monitoring" / "grafana"


def generator():
    spec = importlib.util.spec_from_file_location("mlops_dashboard", GRAFANA / "dashboard.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_dashboard_is_generated():
    assert (GRAFANA / "dashboard.json").read_text() == generator().render(), (
        "monitoring/grafana/dashboard.json is stale: python monitoring/grafana/dashboard.py "
        "> monitoring/grafana/dashboard.json")


def test_panels_chart_metrics_that_exist():
    board = json.loads((GRAFANA / "dashboard.json").read_text())
    titles = {p["title"] for p in board["panels"]}
    for wanted in ("Request rate", "Error ratio (5xx)", "Latency /predict", "Drift per feature (PSI)",
                   "Feature freshness", "Live error"):
        assert wanted in titles
    exprs = [t["expr"] for p in board["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\b(mlops_[a-z_]+)", e)}
    serve = (ROOT / "pipeline" / "serve.py").read_text()
    exporter = (ROOT / "pipeline" / "monitor_exporter.py").read_text()
    for metric in used:
        base = re.sub(r"_(total|bucket)$", "", metric)
        assert f'"{base}"' in serve or f'"{metric}"' in exporter, f"{metric} is exposed by nothing"
