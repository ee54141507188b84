"""Features: rows/s and peak memory of the features stage against a bare
pyarrow CSV-to-Parquet pass over the same raw data (:mod:`benchmarks.pyarrow_pass`)."""

from __future__ import annotations

import sys

from benchmarks.common import Run, child_peak, log, pipeline
from pipeline.io import record_path
from tests.support import make_settings


def sizes(run: Run) -> list[int]:
    return [10_000] if run.smoke else [100_000, 1_000_000, 10_000_000]


def bench(run: Run, out: dict) -> None:
    for rows in sizes(run):
        shared = run.work / f"features-{rows}"
        env = {**run.env, "MLOPS_SHARED_DIR": str(shared), "MLOPS_ROWS": str(rows)}
        pipeline(["ingest"], env)
        timings = []
        for _ in range(2):
            # without its record the stage does its work again instead of skipping
            record_path(make_settings(shared).runs_dir, "features").unlink(missing_ok=True)
            timings.append(child_peak([sys.executable, "-m", "pipeline", "features", "-q"], env))
        wall, rss = min(timings)
        bare = [child_peak([sys.executable, "-m", "benchmarks.pyarrow_pass", str(shared / "data" / "raw"),
                            str(run.work / f"bare-{rows}.parquet")], env) for _ in range(2)]
        bare_wall, bare_rss = min(bare)
        out[str(rows)] = {"features_rows_per_s": round(rows / wall), "features_peak_mib": rss,
                          "pyarrow_rows_per_s": round(rows / bare_wall), "pyarrow_peak_mib": bare_rss,
                          "ratio_to_pyarrow": round(bare_wall / wall, 3)}
        log(f"features {rows}: {out[str(rows)]}")
