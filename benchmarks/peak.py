"""Run a command as a child; print its wall seconds, peak RSS and exit code as JSON.

    python -m benchmarks.peak [--stages RUNS_DIR STAGE,STAGE,...] CMD [ARGS...]

A process of its own, so the peak memory is the command's alone (RUSAGE_CHILDREN
of a process that has only this one child), not the benchmark driver's.

With ``--stages`` (for ``python -m pipeline run``, every stage in one process),
each stage's own peak too: when a stage's run record appears under RUNS_DIR,
the child's high-water mark (``VmHWM`` in ``/proc/<pid>/status``) is read and
reset (``clear_refs`` 5, Linux), so the next stage starts from its present
size. A stage that ends within one poll of the next, or the last one as the
process exits, may share or miss a reading (``null``).
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

POLL_SECONDS = 0.02


def high_water_kib(pid: int, reset: bool) -> int | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        if reset:
            Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:  # the process has ended, or this is not Linux
        return None
    return next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")), None)


def main(argv: list[str]) -> int:
    runs, stages = None, []
    if argv[:1] == ["--stages"]:
        runs, stages, argv = Path(argv[1]), argv[2].split(","), argv[3:]
    started = time.monotonic()
    child = subprocess.Popen(argv)
    stage_peaks: dict[str, float | None] = {}
    while child.poll() is None:
        time.sleep(POLL_SECONDS)
        for stage in stages:
            if stage not in stage_peaks and (runs / stage / "latest.json").exists():
                kib = high_water_kib(child.pid, reset=True)
                stage_peaks[stage] = round(kib / 1024, 1) if kib else None
    out = {"seconds": time.monotonic() - started,
           "peak_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "returncode": child.returncode}
    if stages:
        out["stage_peak_mib"] = {stage: stage_peaks.get(stage) for stage in stages}
    print(json.dumps(out))
    return child.returncode


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
