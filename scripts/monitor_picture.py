"""Make docs/images/monitor-report.png: the monitor's HTML report after a drifted batch, in headless Chromium.

    python scripts/monitor_picture.py [--out docs/images/monitor-report.png] [--rows 20000] [--keep]

What it runs, on a fresh shared folder (a real local run, nothing stubbed):

1. ``python -m pipeline run``: batch 0 of the synthetic customers, ingest to
   promote, so the alias serves a model trained on batch 0.
2. ``python -m pipeline ingest|features|feast --batch 1 --drift ...``: the
   next 90 days of the same customers with some features shifted (ingest's
   synthetic drift); train and promote are not run, as when the data moves
   and no retrain has happened yet.
3. What ``/predict`` would have logged for batch 1: the served model's
   predictions on a sample of its rows, written through the prediction log
   (``pipeline.predlog.PredictionLog``) an hour before each row's label time,
   so the labels that arrived since give a live error.
4. ``python -m pipeline monitor`` with a window that reaches back over batch 1.
5. Chromium screenshots ``<shared>/monitoring/report.html``.

Needs chromium (Debian: apt-get install chromium). Takes a minute or two.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DRIFT = "monthly_spend=0.8,support_calls=0.5,satisfaction=-0.15"
LOGGED = 4000  # predictions logged for batch 1
WIDTH, HEIGHT = 1200, 1560


def pipeline(args: list[str], env: dict[str, str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "pipeline", *args, "-q"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        sys.exit(f"python -m pipeline {' '.join(args)} failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")


def log_predictions(shared: Path) -> float:
    """Batch 1's sampled rows as the served model scores them, logged before their labels; returns the
    oldest entry's time."""
    sys.path.insert(0, str(ROOT))
    import numpy as np
    import pandas as pd

    from pipeline.io import read_record
    from pipeline.predlog import PredictionLog, predictions_dir

    train = read_record(shared / "runs", "train").outputs
    names = list(train["coefficients"])
    features = pd.read_parquet(shared / "data" / "features" / "features.parquet")
    rows = features.sample(n=min(LOGGED, len(features)), random_state=7)
    key = next(c for c in rows.columns if c not in names and not pd.api.types.is_datetime64_any_dtype(rows[c]))
    stamp = next(c for c in rows.columns if pd.api.types.is_datetime64_any_dtype(rows[c]))
    predicted = train["intercept"] + rows[names].to_numpy(float) @ np.array([train["coefficients"][n] for n in names])
    times = pd.to_datetime(rows[stamp], utc=True).map(pd.Timestamp.timestamp).to_numpy() - 3600.0
    plog = PredictionLog(predictions_dir(shared), max_rows=1000)
    for k, values, p, t in zip(rows[key], rows[names].to_dict("records"), predicted, times):
        plog.append(k, values, float(p), train["model_version"], "picture", time=float(t))
    if not plog.flush() or plog.dropped:
        sys.exit("the prediction log did not take every entry")
    plog.close()
    return float(times.min())


def screenshot(html: Path, out: Path, work: Path) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        sys.exit("chromium is not installed (Debian: apt-get install chromium)")
    out.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           "--hide-scrollbars", f"--user-data-dir={work / 'chromium-profile'}",
                           f"--screenshot={out}", f"--window-size={WIDTH},{HEIGHT}", html.as_uri()],
                          capture_output=True, text=True, timeout=120)
    if not out.is_file():
        sys.exit(f"chromium made no screenshot:\n{proc.stderr[-2000:]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "monitor-report.png")
    parser.add_argument("--rows", type=int, default=20_000, help="synthetic rows per batch")
    parser.add_argument("--keep", action="store_true", help="keep the shared folder (its path is printed)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="mlops-picture-"))
    try:
        shared = work / "shared"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLOPS_", "MLFLOW_"))}
        env["MLOPS_SHARED_DIR"] = str(shared)
        rows = ["--rows", str(args.rows)]
        pipeline(["run", *rows], env)
        for stage in ("ingest", "features", "feast"):
            pipeline([stage, *rows, "--batch", "1", "--drift", DRIFT] if stage == "ingest" else [stage], env)
        oldest = log_predictions(shared)
        import time

        env["MLOPS_MONITOR_WINDOW_SECONDS"] = str(int(time.time() - oldest) + 3600)
        pipeline(["monitor"], env)
        screenshot(shared / "monitoring" / "report.html", args.out, work)
        report = json.loads((shared / "monitoring" / "report.json").read_text())
        print(f"{args.out}: drifted {', '.join(report['drifted_features']) or 'none'}; "
              f"{report['predictions_logged']} logged predictions, live RMSE {report['live']['rmse']}")
    finally:
        if args.keep:
            print(f"shared folder kept: {work / 'shared'}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
