"""kill -9 while the prediction log rolls: every entry acknowledged as written
(flush returned) is in a whole Parquet file afterwards, and no file is torn."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pyarrow.parquet as pq
import pytest

from pipeline.predlog import log_files, read_log
from tests.support import ROOT, clean_env

pytestmark = pytest.mark.faults

CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from pipeline.predlog import PredictionLog
    log = PredictionLog(Path(sys.argv[1]), max_rows=200, max_seconds=0.05, poll_seconds=0.01)
    i = 0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for _ in range(500):
            log.append(i, {"a": float(i), "b": 1.0}, float(i), 1, f"r{i}")
            i += 1
        if i % 5000 == 0:
            assert log.flush(10)
            print(i, flush=True)  # acknowledged: entries 0 .. i-1 are written
""")


@pytest.mark.parametrize("after_acks", [1, 4, 9])
def test_acknowledged_entries_survive_kill_9(tmp_path, after_acks):
    folder = tmp_path / "predictions"
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(folder)], stdout=subprocess.PIPE, text=True,
                            env=clean_env(), cwd=ROOT)
    acked = 0
    try:
        for _ in range(after_acks):
            line = proc.stdout.readline()
            assert line, "the child stopped before acknowledging"
            acked = int(line)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        proc.stdout.close()
    files = log_files(folder)
    assert files
    for f in files:
        pq.read_metadata(f.path)  # a torn file has no footer: this raises
    table = read_log(folder)
    ids = set(table.column("request_id").to_pylist())
    missing = [i for i in range(acked) if f"r{i}" not in ids]
    assert not missing, f"{len(missing)} acknowledged entries lost, first {missing[:5]}"
    assert table.num_rows == len(ids)  # nothing written twice
