"""Run a command as a child; print its wall seconds, peak RSS and exit code as JSON.

    python -m benchmarks.peak CMD [ARGS...]

A process of its own, so the peak memory is the command's alone (RUSAGE_CHILDREN
of a process that has only this one child), not the benchmark driver's.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time


def main(argv: list[str]) -> int:
    started = time.monotonic()
    code = subprocess.run(argv).returncode
    print(json.dumps({"seconds": time.monotonic() - started,
                      "peak_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "returncode": code}))
    return code


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
