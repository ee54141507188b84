"""The lakehouse path beside the volume path: ``python -m pipeline run`` on the same
rows and seed, once with everything on the shared volume and once with
``MLOPS_LAKEHOUSE=true`` (the raw data's DVC remote, the features, the labels and
MLflow's artifacts in a real SeaweedFS, ``weed mini`` from the pinned wheel on
loopback), each on a fresh folder and its own Redis database. Wall time, peak
memory and each stage's seconds, measured as :mod:`benchmarks.end_to_end` measures
(one process per run, each stage's own high-water mark). The two runs go one after
the other in the same benchmark run, the volume's first (so the lakehouse run finds
the libraries in the page cache: a small favour): read the ratio, not the seconds."""

from __future__ import annotations

import tempfile
from pathlib import Path

from benchmarks.common import Run, log
from benchmarks.end_to_end import measure
from tests.support import seaweedfs

DATABASE = 7  # Redis databases 0-6 belong to the other sections
PATHS = ("volume", "lakehouse")


def rows(run: Run) -> int:
    return 2_000 if run.smoke else 1_000_000


def bench(run: Run, out: dict) -> None:
    n = rows(run)
    with tempfile.TemporaryDirectory(prefix="seaweedfs-", dir=run.work) as home, seaweedfs(Path(home)) as store:
        for i, path in enumerate(PATHS):
            shared = run.work / f"{path}-{n}"
            env = {**run.env, "MLOPS_SHARED_DIR": str(shared), "MLOPS_ROWS": str(n),
                   "MLOPS_REDIS_URL": run.redis_url_of(DATABASE + i), "MLOPS_ONLINE_TIMEOUT_SECONDS": "5"}
            if path == "lakehouse":
                env.update({**store.env("backup"), "MLOPS_LAKEHOUSE": "true"})
            log(f"lakehouse: {path} path, {n} rows")
            out[path] = measure(n, shared, env)
            log(f"lakehouse: {path} {out[path]}")
    out["rows"] = n
    out["wall_ratio"] = round(out["lakehouse"]["wall_s"] / out["volume"]["wall_s"], 2)
    out["peak_ratio"] = round(out["lakehouse"]["peak_mib"] / out["volume"]["peak_mib"], 2)


def markdown(results: dict) -> str:
    """The section's table: one row per path, the stages' seconds beside the total."""
    lake = results.get("lakehouse")
    if not lake or "volume" not in lake:
        return ""
    stages = list(lake["volume"]["stages_s"])
    lines = ["", f"Lakehouse beside the volume, {lake['rows']} rows (one SeaweedFS on 127.0.0.1, the same seed): "
             f"the lakehouse run takes {lake['wall_ratio']}x the volume run's time and {lake['peak_ratio']}x "
             "its peak memory.", "",
             "| path | wall s | peak MiB | " + " | ".join(f"{s} s" for s in stages) + " |",
             "|---|---|---|" + "---|" * len(stages)]
    for path in PATHS:
        r = lake[path]
        lines.append(f"| {path} | {r['wall_s']} | {r['peak_mib']} | "
                     + " | ".join(str(round(r["stages_s"][s], 2)) for s in stages) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict, out: Path) -> None:
    """lakehouse.png: each stage's seconds on the volume and in the lakehouse, stacked."""
    lake = results.get("lakehouse")
    if not lake or "volume" not in lake:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3.2))
    colors = dict(zip(lake["volume"]["stages_s"], plt.get_cmap("tab10").colors))
    for y, path in enumerate(PATHS):
        left = 0.0
        for stage, seconds in lake[path]["stages_s"].items():
            ax.barh(y, seconds, left=left, color=colors[stage], label=stage if y == 0 else None)
            left += seconds
        ax.text(left, y, f"  {lake[path]['wall_s']:.0f} s wall, {lake[path]['peak_mib']:.0f} MiB", va="center",
                fontsize=9)
    ax.set_yticks(range(len(PATHS)), PATHS)
    ax.invert_yaxis()
    ax.set_xlabel("seconds (stages; the wall time adds the process's start)")
    ax.set_xlim(0, max(lake[p]["wall_s"] for p in PATHS) * 1.35)
    ax.set_title(f"python -m pipeline run, {lake['rows']} rows: lakehouse {lake['wall_ratio']}x the volume's time",
                 fontsize=10)
    ax.legend(fontsize=8, ncol=4, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "lakehouse.png", dpi=100)
    plt.close(fig)
