"""The monitoring workload's costs: ``PredictionLog.append`` on the request path
(must stay a few microseconds), and the monitor's drift pass over 10^6 logged
predictions (wall time and peak memory, in a child process of its own).

    python -m benchmarks.monitor FOLDER REFERENCE   # the child: the monitor's drift pass over the log

The child imports only what the drift pass needs (not the benchmark harness),
and takes the training reference from a JSON file, as the monitor takes it
from train's run record.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

FEATURES = ("age", "tenure_months", "monthly_spend", "support_calls", "sessions_per_week", "discount_rate",
            "late_payments", "satisfaction")


def append_cost(count: int) -> dict:
    """Microseconds per append: into a running log (the writer drains), and with the queue full (dropped)."""
    import tempfile

    from pipeline.predlog import PredictionLog

    values = {name: float(i) for i, name in enumerate(FEATURES)}
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        plog = PredictionLog(Path(tmp), queue_size=count + 1, max_rows=50_000)
        started = time.perf_counter()
        for i in range(count):
            plog.append(i, values, 1.0, 3, "req")
        out["append_us"] = round((time.perf_counter() - started) / count * 1e6, 3)
        assert plog.flush(120)
        full = PredictionLog(Path(tmp) / "full", queue_size=0)
        started = time.perf_counter()
        for i in range(count):
            full.append(i, values, 1.0, 3, "req")
        out["dropped_append_us"] = round((time.perf_counter() - started) / count * 1e6, 3)
        plog.close()
    out["n"] = count
    return out


def write_log(folder: Path, rows: int, per_file: int = 50_000) -> None:
    """``rows`` logged predictions in files of ``per_file``, as the writer lays them out."""
    import pyarrow.parquet as pq

    from pipeline.predlog import to_table

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.time() - 3600
    for start in range(0, rows, per_file):
        n = min(per_file, rows - start)
        x = rng.normal(size=(n, len(FEATURES)))
        entries = [(t0 + (start + i) * 1e-3, start + i, dict(zip(FEATURES, x[i])), float(x[i].sum()), 3, "r")
                   for i in range(n)]
        table = to_table(entries)
        first, last = int(entries[0][0] * 1000), int(entries[-1][0] * 1000)
        pq.write_table(table, folder / f"pred-{first:013d}-{last:013d}-1-{start // per_file:06d}.parquet",
                       compression="zstd")


def reference(path: Path) -> None:
    """A training reference for ``FEATURES`` and the predictions, as train records it."""
    from pipeline.drift import describe

    rng = np.random.default_rng(1)
    path.write_text(json.dumps({"features": {name: describe(rng.normal(size=100_000)) for name in FEATURES},
                                "prediction": describe(rng.normal(size=100_000))}))


def drift_pass(folder: Path, reference_path: Path) -> None:
    """What the monitor does with the log: scan the window (projected columns, time filter, files outside
    it skipped by name), tally PSI and KS per feature and for the predictions."""
    from pipeline.drift import Thresholds, log_drift
    from pipeline.predlog import scan_log

    ref = json.loads(reference_path.read_text())
    since, until = time.time() - 2 * 3600, time.time()
    _, prediction, rows = log_drift(lambda columns: scan_log(folder, since, until, columns), ref, FEATURES,
                                    Thresholds())
    assert rows > 0 and prediction["psi"] is not None, "the drift pass read nothing"


def bench(run, results: dict) -> None:
    from benchmarks.common import child_peak, log

    count = 20_000 if run.smoke else 1_000_000
    results["append"] = append_cost(count)
    log(f"monitor: append {results['append']['append_us']} us, dropped {results['append']['dropped_append_us']} us")
    rows = 20_000 if run.smoke else 1_000_000
    folder = run.work / "monitor-log"
    write_log(folder, rows)
    ref = run.work / "monitor-reference.json"
    reference(ref)
    seconds, peak = child_peak([sys.executable, "-m", "benchmarks.monitor", str(folder), str(ref)], run.env)
    results["drift_pass"] = {"rows": rows, "seconds": seconds, "peak_mib": peak}
    log(f"monitor: drift pass over {rows} logged predictions: {seconds}s, peak {peak} MiB")


if __name__ == "__main__":
    drift_pass(Path(sys.argv[1]), Path(sys.argv[2]))
