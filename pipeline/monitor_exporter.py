"""The monitor's figures as Prometheus gauges, served on a port of their own.

    python -m pipeline.monitor_exporter [--report PATH] [--host 127.0.0.1] [--port 9108]

Why an exporter and not the Pushgateway: the figures are a *state* (the last
report), not the outcome of a batch job that ends before it can be scraped.
An exporter re-reads that state at every scrape, so Prometheus' own ``up``
says whether it is there, a deleted or stale report is visible at once
(``mlops_monitor_report_age_seconds``), and freshness is computed at scrape
time from the report's timestamps, so it keeps growing when the monitor stops
running (which is the stale-features alert's whole point). A pushed value
would freeze at what the last job saw, outlive a dead monitor forever (the
Pushgateway never expires series) and add a service to run and secure.

The report is read again only when its modification time or size changes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

DEFAULT_PORT = 9108


class ReportCollector(Collector):
    """Gauges from the monitor's ``report.json``, read again when it changes."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.clock = clock
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._report: dict | None = None
        self.reads = 0

    def report(self) -> dict | None:
        with self._lock:
            try:
                st = os.stat(self.path)
            except FileNotFoundError:
                self._stamp, self._report = None, None
                return None
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp != self._stamp:
                try:
                    self._report = json.loads(self.path.read_text())
                    self._stamp = stamp
                    self.reads += 1
                except (OSError, ValueError) as exc:  # atomic writes make this rare; keep the last
                    log.warning("monitor exporter: could not read %s: %s", self.path, exc)
            return self._report

    def collect(self) -> Iterator[GaugeMetricFamily]:
        report = self.report()
        present = GaugeMetricFamily("mlops_monitor_report_present", "1 when the monitor's report could be read.")
        present.add_metric([], 1.0 if report else 0.0)
        yield present
        if not report:
            return
        now = self.clock()
        age = GaugeMetricFamily("mlops_monitor_report_age_seconds", "Seconds since the monitor wrote its report.")
        age.add_metric([], max(0.0, now - float(report["generated_at_seconds"])))
        yield age

        def per_feature(name: str, doc: str, key: str) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=["feature", "source"])
            for source, features in (("predictions", report["features"]),
                                     ("features", report["offline_features"]["features"])):
                for feature, figures in sorted(features.items()):
                    if figures.get(key) is not None:
                        family.add_metric([feature, source], float(figures[key]))
            return family

        yield per_feature("mlops_feature_psi", "Population stability index of a feature against training "
                                               "(source: the prediction log, or the newest offline features).",
                          "psi")
        yield per_feature("mlops_feature_ks", "Two-sample Kolmogorov-Smirnov statistic of a feature against "
                                              "training.", "ks")
        fresh = GaugeMetricFamily("mlops_feature_freshness_seconds",
                                  "Seconds since the newest event time (store=offline) or since the end of "
                                  "the last materialization (store=online), at scrape time.", labels=["store"])
        for store, key in (("offline", "newest_event_time"), ("online", "materialized_end")):
            iso = report["freshness"].get(key)
            if iso:
                fresh.add_metric([store], max(0.0, now - pd.Timestamp(iso).timestamp()))
        yield fresh
        simple = (
            ("mlops_prediction_shift", "PSI of the served predictions against the model's on its training rows.",
             report["prediction"].get("psi")),
            ("mlops_quarantine_ratio", "Share of the last ingest's rows the features stage quarantined.",
             report["quarantine"].get("ratio")),
            ("mlops_live_rmse", "RMSE of logged predictions against labels that arrived later.",
             report["live"].get("rmse")),
            ("mlops_live_mae", "MAE of logged predictions against labels that arrived later.",
             report["live"].get("mae")),
            ("mlops_live_labelled_predictions", "Logged predictions matched with a later label.",
             report["live"].get("matched")),
            ("mlops_training_holdout_rmse", "Holdout RMSE train recorded for the monitored model.",
             report["live"].get("holdout_rmse")),
            ("mlops_predictions_logged", "Logged predictions in the monitor's window.",
             report.get("predictions_logged")),
            ("mlops_monitored_model_version", "Registry version of the model the report is about.",
             report["model"].get("version")),
        )
        for name, doc, value in simple:
            if value is not None:
                family = GaugeMetricFamily(name, doc)
                family.add_metric([], float(value))
                yield family


def registry_for(path: Path, clock: Callable[[], float] = time.time) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ReportCollector(path, clock))
    return registry


def serve(path: Path, host: str, port: int, clock: Callable[[], float] = time.time):
    """Start serving ``/metrics`` in a daemon thread; returns ``(server, thread)``.

    ``clock`` is what "now" is at scrape time (tests advance it to age the features)."""
    return start_http_server(port, addr=host, registry=registry_for(path, clock))


def main(argv: list[str] | None = None) -> int:
    from pipeline.settings import Settings

    parser = argparse.ArgumentParser(prog="python -m pipeline.monitor_exporter",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--report", type=Path, help="report.json (default <shared>/monitoring/report.json)")
    parser.add_argument("--host", default=None, help="bind address (default: MLOPS_HOST, 127.0.0.1)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings()
    path = args.report or settings.shared / "monitoring" / "report.json"
    server, thread = serve(path, args.host or settings.host, args.port)
    log.info("monitor exporter: serving %s on http://%s:%d/metrics", path, args.host or settings.host,
             server.server_port)
    try:
        thread.join()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
