"""Run the benchmarks (see :mod:`benchmarks`) and write results.json, results.md and the plots.

    python -m benchmarks [--smoke] [--only SECTION] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from benchmarks import backup, end_to_end, features, lakehouse, loading, monitor, serving
from benchmarks.common import Run
from benchmarks.report import write
from tests.support import ROOT, redis_server, redis_url

# section name -> (module, needs Redis)
SECTIONS = {"features": (features, False), "loading": (loading, True), "serving": (serving, True),
            "end_to_end": (end_to_end, True), "monitor": (monitor, False)}
SECTIONS["backup"] = (backup, True)  # pipeline.backup beside a plain copy to the same SeaweedFS
SECTIONS["lakehouse"] = (lakehouse, True)  # the lakehouse path beside the volume path, same rows


def machine() -> str:
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{platform.node()}: {os.cpu_count()} cores, {memory:.0f} GiB, Python {platform.python_version()}, "
            f"{time.strftime('%Y-%m-%d')}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes, written to .reports/bench-smoke: checks the suite still works")
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results)")
    parser.add_argument("--only", action="append", choices=list(SECTIONS),
                        help="measure only these sections (repeatable); the others keep their last results")
    args = parser.parse_args(argv)
    out = args.out or (ROOT / ".reports" / "bench-smoke" if args.smoke else ROOT / "benchmarks" / "results")
    out.mkdir(parents=True, exist_ok=True)
    sections = args.only or list(SECTIONS)
    previous = out / "results.json"
    results: dict = json.loads(previous.read_text()) if args.only and previous.is_file() else {}
    results.update({"machine": machine(), "smoke": args.smoke})

    with tempfile.TemporaryDirectory(prefix="mlops-bench-") as work, contextlib.ExitStack() as stack:
        url_of = None
        if any(SECTIONS[name][1] for name in sections):
            container, password = stack.enter_context(redis_server())
            url_of = lambda db: redis_url(container, password, db)  # noqa: E731
        run = Run(smoke=args.smoke, work=Path(work), redis_url_of=url_of)
        for name in sections:
            results[name] = {}
            SECTIONS[name][0].bench(run, results[name])
    print(write(results, out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
