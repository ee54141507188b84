"""The dashboard, declared once and generated for both places it is shown:

* Grafana (``monitoring/grafana/dashboard.json``, with grafanalib), which the chart's
  Grafana sidecar provisions;
* Prometheus's own console page (``monitoring/prometheus/consoles/mlops.html``), which
  the compose twin serves at http://127.0.0.1:9090/consoles/mlops.html: the current
  values rendered by Prometheus, the last half hour drawn in the browser by
  ``console_libraries/mlops.lib``.

    python monitoring/grafana/dashboard.py      # writes both files

A test regenerates both and compares with the committed files, so edit PANELS here,
never the outputs.
"""

from __future__ import annotations

import html
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from grafanalib._gen import DashboardEncoder
from grafanalib.core import Dashboard, GaugePanel, GridPos, Target, Threshold, TimeSeries

MONITORING = Path(__file__).resolve().parent.parent
GRAFANA_JSON = MONITORING / "grafana" / "dashboard.json"
CONSOLE_HTML = MONITORING / "prometheus" / "consoles" / "mlops.html"
DATASOURCE = "${DS_PROMETHEUS}"
TITLE = "mlops-shared-volume"
DESCRIPTION = "The served model and its data: requests, errors, latency, drift, freshness, live error."
HEIGHT = 8  # Grafana grid rows per panel


def latency(q: float) -> str:
    """A quantile of /predict's latency; none (not NaN) in a window without /predict traffic."""
    return (f'histogram_quantile({q}, sum by (le) '
            f'(rate(mlops_http_request_duration_seconds_bucket{{route="/predict"}}[5m]))) '
            f'and on() (sum(rate(mlops_http_requests_total{{route="/predict"}}[5m])) > 0)')


ZERO = "0 * sum(rate(mlops_http_requests_total[5m]))"


@dataclass(frozen=True)
class Panel:
    title: str
    exprs: dict[str, str]  # legend (Grafana's "{{label}}" format) -> PromQL
    unit: str = ""  # Grafana's unit: reqps, percentunit, s or none
    width: int = 12  # of Grafana's 24 columns
    gauge: bool = False  # one number (Grafana's gauge); the console draws it as a line too
    units: dict[str, str] = field(default_factory=dict)  # a legend's own unit, where not the panel's
    threshold: float | None = None  # the alert rule's line (rules.yml), drawn dashed

    def unit_of(self, legend: str) -> str:
        return self.units.get(legend, self.unit)


PANELS = (
    Panel("Request rate", {"{{route}} {{status}}": "sum by (route, status) (rate(mlops_http_requests_total[5m]))"},
          "reqps"),
    # "or" a zero where the service is scraped but has had no error yet: 0 %, not "no data"
    Panel("Error ratio (5xx)", {"5xx": f'(sum(rate(mlops_http_requests_total{{status=~"5.."}}[5m])) or {ZERO}) '
                                       "/ sum(rate(mlops_http_requests_total[5m]))",
                                "online store errors/s": f"sum(rate(mlops_online_lookup_errors_total[5m])) or {ZERO}"},
          "percentunit", units={"online store errors/s": "reqps"}),
    Panel("Latency /predict", {"p50": latency(0.5), "p99": latency(0.99)}, "s"),
    Panel("Model version", {"version": "max(mlops_model_version)"}, gauge=True),
    Panel("Drift per feature (PSI)", {"{{feature}} ({{source}})": "mlops_feature_psi"}, threshold=0.2),
    Panel("Drift per feature (KS)", {"{{feature}} ({{source}})": "mlops_feature_ks"}, threshold=0.1),
    Panel("Feature freshness", {"{{store}}": "mlops_feature_freshness_seconds"}, "s", threshold=86400),
    Panel("Live error", {"live RMSE": "max(mlops_live_rmse)", "live MAE": "max(mlops_live_mae)",
                         "training holdout RMSE": "max(mlops_training_holdout_rmse)"}),
    Panel("Prediction shift and quarantine", {"prediction PSI": "max(mlops_prediction_shift)",
                                              "quarantine ratio": "max(mlops_quarantine_ratio)"}, width=24),
)


def positions() -> list[GridPos]:
    """Left to right, a new row when a panel would pass Grafana's 24 columns."""
    x = y = 0
    out = []
    for p in PANELS:
        if x + p.width > 24:
            x, y = 0, y + HEIGHT
        out.append(GridPos(h=HEIGHT, w=p.width, x=x, y=y))
        x += p.width
    return out


def dashboard() -> Dashboard:
    panels = []
    for p, pos in zip(PANELS, positions()):
        if p.gauge:
            panels.append(GaugePanel(title=p.title, dataSource=DATASOURCE, gridPos=pos,
                                     targets=[Target(expr=e, refId=chr(ord("A") + i))
                                              for i, e in enumerate(p.exprs.values())]))
        else:
            overrides = [{"matcher": {"id": "byName", "options": legend},
                          "properties": [{"id": "unit", "value": unit}]} for legend, unit in p.units.items()]
            lines = {} if p.threshold is None else {
                "thresholdsStyleMode": "dashed",
                "thresholds": [Threshold("transparent", 0, 0.0), Threshold("red", 1, float(p.threshold))]}
            panels.append(TimeSeries(
                title=p.title, dataSource=DATASOURCE, unit=p.unit, gridPos=pos, overrides=overrides, **lines,
                targets=[Target(expr=expr, legendFormat=legend, refId=chr(ord("A") + i))
                         for i, (legend, expr) in enumerate(p.exprs.items())]))
    return Dashboard(title=TITLE, uid=TITLE, timezone="utc", refresh="30s", description=DESCRIPTION,
                     tags=["mlops"], panels=panels).auto_panel_ids()


def render() -> str:
    return json.dumps(dashboard().to_json_data(), cls=DashboardEncoder, indent=2, sort_keys=True) + "\n"


# Prometheus console templates are Go templates: a value is formatted by its unit,
# a Grafana legend "{{route}}" becomes the sample's label.
FORMAT = {"reqps": '{{ printf "%.3g/s" .Value }}', "percentunit": "{{ humanizePercentage .Value }}",
          "s": "{{ humanizeDuration .Value }}", "": '{{ printf "%.4g" .Value }}'}


def go_legend(legend: str) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", r"{{ .Labels.\1 }}", legend)


def js_legend(legend: str) -> str:
    """The browser's legend: "$route" for Grafana's "{{route}}" (no braces in the template)."""
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", r"$\1", legend)


def console_panel(p: Panel) -> str:
    series = json.dumps([[js_legend(legend), expr, p.unit_of(legend)] for legend, expr in p.exprs.items()])
    rows = "\n".join(
        f"      {{{{ range query `sort_desc({expr})` }}}}<tr><td>{go_legend(legend)}</td>"
        f"<td class=\"num\">{FORMAT[p.unit_of(legend)]}</td></tr>"
        f"{{{{ else }}}}<tr><td>{html.escape(legend if '{' not in legend else '')}</td>"
        f"<td class=\"nodata\">no data</td></tr>{{{{ end }}}}"
        for legend, expr in p.exprs.items())
    threshold = "" if p.threshold is None else f' data-threshold="{p.threshold:g}"'
    return (f'  <section class="panel w{p.width}" data-title="{html.escape(p.title)}" data-unit="{p.unit}"{threshold}\n'
            f'           data-series="{html.escape(series)}">\n'
            f"    <h2>{html.escape(p.title)}</h2>\n"
            f'    <svg class="chart" viewBox="0 0 {50 * p.width} 170" preserveAspectRatio="none"></svg>\n'
            f'    <div class="legend"></div>\n'
            f'    <table class="now">\n{rows}\n    </table>\n  </section>')


def render_console() -> str:
    body = "\n".join(console_panel(p) for p in PANELS)
    return ("{{/* Generated by monitoring/grafana/dashboard.py from the panels the Grafana dashboard has: "
            "edit that file. */}}\n"
            '{{ template "mlops.head" "' + TITLE + '" }}\n'
            f"<h1>{TITLE}</h1>\n"
            f'<p class="sub">{html.escape(DESCRIPTION)} Values now, lines for the last 30 minutes.</p>\n'
            '{{ template "mlops.alerts" . }}\n'
            f'<main class="grid">\n{body}\n</main>\n'
            '{{ template "mlops.tail" . }}\n')


def main() -> None:
    GRAFANA_JSON.write_text(render())
    CONSOLE_HTML.write_text(render_console())
    print(f"wrote {GRAFANA_JSON.relative_to(MONITORING.parent)} and {CONSOLE_HTML.relative_to(MONITORING.parent)}")


if __name__ == "__main__":
    sys.exit(main())
