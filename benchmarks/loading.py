"""Loading the online store: ``feast materialize`` against this project's loader
(Feast's layout), same features file, same Redis, one child process per run
(:mod:`benchmarks.load_child`), alternating."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

from benchmarks.common import Run, log, median, prepare_features
from tests.support import ROOT, make_settings

# which Redis database each loader writes (the serving and end-to-end benchmarks use others)
DATABASES = {"feast_materialize": ("materialize", 1), "project_loader": ("loader", 2)}


def rows_for(run: Run) -> int:
    return 10_000 if run.smoke else 1_000_000


def bench(run: Run, out: dict) -> None:
    rows, reps = rows_for(run), (1 if run.smoke else 3)
    shared = run.work / f"loading-{rows}"
    log(f"loading: preparing {rows} rows of features")
    prepare_features(shared, rows, run.env)
    features = make_settings(shared).features_path
    runs: dict[str, list[dict]] = {name: [] for name in DATABASES}
    for i in range(reps):
        for name, (how, db) in DATABASES.items():
            log(f"loading: {name}, {rows} rows, run {i + 1}/{reps}")
            proc = subprocess.run([sys.executable, "-m", "benchmarks.load_child", how, str(features),
                                   str(run.work / f"load-{how}"), run.redis_url_of(db)],
                                  env=run.env, cwd=ROOT, capture_output=True, text=True, timeout=3600)
            if proc.returncode != 0:
                raise RuntimeError(f"loading with {how} failed: {proc.stderr[-2000:]}")
            runs[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    keys = {name: {r["keys"] for r in rs} for name, rs in runs.items()}
    if keys["feast_materialize"] != keys["project_loader"] or len(keys["project_loader"]) != 1:
        raise RuntimeError(f"the two loaders wrote different numbers of entities: {keys}")
    for name, rs in runs.items():
        seconds = statistics.median(r["seconds"] for r in rs)
        out[name] = {"rows": rows, "entities": rs[0]["keys"], "seconds": round(seconds, 2),
                     "rows_per_s": round(rows / seconds), "peak_mib": round(max(r["peak_mib"] for r in rs), 1)}
    out["ratio"] = median([b["seconds"] / a["seconds"] for a, b in
                           zip(runs["project_loader"], runs["feast_materialize"])])
    log(f"loading: {out}")
