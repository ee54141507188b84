"""End to end, the scaling section: wall time and peak memory of ``python -m pipeline
run`` as rows grow (10^5, 10^6, 10^7), in total and per stage, with the Redis
online store (as compose and the chart deploy it). The stages run in one process,
as the command runs them; :mod:`benchmarks.peak` reads and resets the process's
high-water mark as each stage's run record appears, so each stage's peak is its own."""

from __future__ import annotations

import json
import subprocess
import sys

from benchmarks.common import Run, log
from pipeline.dag import STAGE_NAMES
from pipeline.io import read_record
from tests.support import ROOT, make_settings

FIRST_DATABASE = 3  # Redis databases 0-2 belong to the serving and loading benchmarks


def sizes(run: Run) -> list[int]:
    return [2_000, 10_000] if run.smoke else [100_000, 1_000_000, 10_000_000]


def measure(rows: int, shared, env: dict[str, str]) -> dict:
    """One ``python -m pipeline run`` of ``rows`` rows on a fresh ``shared`` folder."""
    runs = make_settings(shared).runs_dir
    cmd = [sys.executable, "-m", "benchmarks.peak", "--stages", str(runs), ",".join(STAGE_NAMES),
           sys.executable, "-m", "pipeline", "run", "-q"]
    proc = subprocess.run(cmd, check=False, env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=3 * 3600)
    if proc.returncode != 0:
        raise RuntimeError(f"pipeline run of {rows} rows failed: {proc.stderr[-2000:]}")
    measured = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"wall_s": round(measured["seconds"], 2), "peak_mib": round(measured["peak_kib"] / 1024, 1),
            "stages_s": {stage: read_record(runs, stage).seconds for stage in STAGE_NAMES},
            "stages_peak_mib": measured["stage_peak_mib"],
            "train_chunks": read_record(runs, "train").outputs.get("train_chunks")}


def bench(run: Run, out: dict) -> None:
    for i, rows in enumerate(sizes(run)):
        shared = run.work / f"e2e-{rows}"
        # MLOPS_ONLINE_TIMEOUT_SECONDS: the feast stage reads one entity back right after
        # loading millions; a busy Redis (its background save) can take longer than a
        # lookup's 50 ms there, which failed a 10^7 run on a loaded machine
        env = {**run.env, "MLOPS_SHARED_DIR": str(shared), "MLOPS_ROWS": str(rows),
               "MLOPS_REDIS_URL": run.redis_url_of(FIRST_DATABASE + i), "MLOPS_ONLINE_TIMEOUT_SECONDS": "5"}
        out[str(rows)] = measure(rows, shared, env)
        log(f"end to end {rows}: {out[str(rows)]}")
