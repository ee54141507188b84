"""The committed Grafana dashboard and Prometheus console page are what
monitoring/grafana/dashboard.py generates, every metric they chart is one the
service or the monitor exporter exposes, and the real Prometheus renders the
console page with the compose twin's flags. (The e2e screenshots it with data:
tests/e2e/test_compose_monitoring.py.)"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import yaml

from tests.support import ROOT, free_port
from tests.unit.test_monitor_rules import tool

GRAFANA = ROOT / "monitoring" / "grafana"


def generator():
    spec = importlib.util.spec_from_file_location("mlops_dashboard", GRAFANA / "dashboard.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_committed_dashboard_is_generated():
    module = generator()
    stale = "is stale: python monitoring/grafana/dashboard.py writes it again"
    assert (GRAFANA / "dashboard.json").read_text() == module.render(), f"monitoring/grafana/dashboard.json {stale}"
    assert module.CONSOLE_HTML.read_text() == module.render_console(), f"{module.CONSOLE_HTML} {stale}"


def test_panels_chart_metrics_that_exist():
    board = json.loads((GRAFANA / "dashboard.json").read_text())
    titles = {p["title"] for p in board["panels"]}
    for wanted in ("Request rate", "Error ratio (5xx)", "Latency /predict", "Drift per feature (PSI)",
                   "Feature freshness", "Live error"):
        assert wanted in titles
    exprs = [t["expr"] for p in board["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\b(mlops_[a-z_]+)", e)}
    serve = (ROOT / "pipeline" / "metrics.py").read_text()
    exporter = (ROOT / "pipeline" / "monitor_exporter.py").read_text()
    for metric in used:
        base = re.sub(r"_(total|bucket)$", "", metric)
        assert f'"{base}"' in serve or f'"{metric}"' in exporter, f"{metric} is exposed by nothing"


def compose_prometheus_flags() -> list[str]:
    """compose.yaml's Prometheus command, with its in-container paths made this checkout's."""
    command = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]["prometheus"]["command"]
    return [arg.replace("/etc/prometheus", str(ROOT / "monitoring" / "prometheus")) for arg in command
            if arg.startswith("--web.console.")]


def test_prometheus_renders_the_console_page_with_every_panel(tmp_path):
    """With nothing scraped yet every value reads "no data" and no alert fires: the page
    still renders (a template error would be a 500 in the real Prometheus)."""
    prometheus = tool("prometheus", "prometheus")
    flags = compose_prometheus_flags()
    assert len(flags) == 2, "compose.yaml's Prometheus no longer serves the console page"
    config = tmp_path / "prometheus.yml"
    config.write_text("global: {scrape_interval: 15s}\nscrape_configs: []\n")
    port = free_port()
    proc = subprocess.Popen([prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}", *flags],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline, page = time.monotonic() + 60, None
        while page is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/consoles/mlops.html", timeout=5) as resp:
                    page = resp.read().decode()
            except urllib.error.HTTPError as err:  # Prometheus answered: a template error is a 500
                pytest.fail(f"the console page failed with {err.code}: {err.read().decode()[-2000:]}")
            except OSError:  # not listening yet
                time.sleep(0.3)
        if page is None:
            proc.kill()
            pytest.fail("Prometheus did not serve the console page: " + proc.communicate(timeout=30)[1][-2000:])
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    module = generator()
    for panel in module.PANELS:
        assert f"<h2>{panel.title}</h2>" in page
    assert page.count('class="nodata"') == sum(len(p.exprs) for p in module.PANELS)
    assert "No alert firing." in page and "{{" not in page
