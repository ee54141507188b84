"""End to end: wall time and peak memory of ``python -m pipeline run`` by rows, with
the Redis online store (as compose and the chart deploy it)."""

from __future__ import annotations

import sys

from benchmarks.common import Run, child_peak, log
from pipeline.dag import STAGE_NAMES
from pipeline.io import read_record
from tests.support import make_settings

FIRST_DATABASE = 3  # Redis databases 0-2 belong to the serving and loading benchmarks


def sizes(run: Run) -> list[int]:
    return [2_000, 10_000] if run.smoke else [10_000, 100_000, 1_000_000]


def bench(run: Run, out: dict) -> None:
    for i, rows in enumerate(sizes(run)):
        shared = run.work / f"e2e-{rows}"
        env = {**run.env, "MLOPS_SHARED_DIR": str(shared), "MLOPS_ROWS": str(rows),
               "MLOPS_REDIS_URL": run.redis_url_of(FIRST_DATABASE + i)}
        wall, rss = child_peak([sys.executable, "-m", "pipeline", "run", "-q"], env)
        runs = make_settings(shared).runs_dir
        stages = {stage: read_record(runs, stage).seconds for stage in STAGE_NAMES}
        out[str(rows)] = {"wall_s": wall, "peak_mib": rss, "stages_s": stages}
        log(f"end to end {rows}: {out[str(rows)]}")
