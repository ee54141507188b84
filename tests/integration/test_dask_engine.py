"""Dask as the engine: the features stage on a local cluster of separate worker
processes writes exactly what the single-process stage writes, and a scheduler
that does not answer is one line."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.cli import run_stages
from pipeline.io import read_record
from tests.support import clean_env, free_port, make_settings, pipeline_cli, stop

pytestmark = pytest.mark.integration

ROWS = 230_000  # three raw parts: the cluster runs one task per part

# what the records may differ in: when and how long
TIMING = {"seconds", "started_at", "finished_at", "duration_seconds"}


@pytest.fixture(scope="module")
def cluster():
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as local:
        yield local.scheduler_address


def _outputs(settings) -> dict:
    outputs = read_record(settings.runs_dir, "features").outputs
    return {k: v for k, v in outputs.items() if k not in TIMING}


def test_features_on_dask_equal_the_single_process_files(tmp_path, cluster):
    single = make_settings(tmp_path / "shared", rows=ROWS)
    run_stages(single, ["ingest", "features"])
    assert len(read_record(single.runs_dir, "ingest").outputs["parts"]) == 3
    kept = tmp_path / "single"
    kept.mkdir()
    for path in (single.features_path, single.labels_path, single.quarantine_dir / "rejected.csv"):
        shutil.copy(path, kept / path.name)
    expected = _outputs(single)
    single.features_path.unlink()  # the stage re-runs: its output is gone

    on_dask = make_settings(tmp_path / "shared", rows=ROWS, dask_scheduler=cluster)
    run_stages(on_dask, ["features"])

    for name in ("features.parquet", "labels.parquet"):
        ours, theirs = pq.read_table(on_dask.features_dir / name), pq.read_table(kept / name)
        assert ours.schema == theirs.schema
        assert ours.equals(theirs), f"{name}: the Dask run's rows differ from the single process's"
    rejected = (on_dask.quarantine_dir / "rejected.csv").read_bytes()
    assert rejected == (kept / "rejected.csv").read_bytes()
    assert rejected.count(b"\n") > 100  # the generator's bad rows were quarantined on the workers
    assert _outputs(on_dask) == expected
    assert not list(on_dask.features_dir.glob(".tmp-dask-*")), "the workers' scratch pieces were left behind"


def test_a_scheduler_that_does_not_answer_is_one_line(tmp_path):
    env = clean_env(MLOPS_SHARED_DIR=str(tmp_path / "shared"), MLOPS_ROWS="500")
    pipeline_cli(["ingest", "-q"], env)
    address = f"tcp://127.0.0.1:{free_port()}"
    proc = pipeline_cli(["features"], {**env, "MLOPS_DASK_SCHEDULER": address}, check=False)
    assert proc.returncode == 12, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr
    assert any(f"cannot reach the Dask scheduler at {address}" in line and "MLOPS_DASK_SCHEDULER" in line
               for line in lines), proc.stderr
    assert not (tmp_path / "shared" / "data" / "features" / "features.parquet").exists()
    assert os.listdir(tmp_path / "shared" / "data" / "features") == []


def _feast_instrumented() -> bool:
    import feast

    return "typeguard" in feast.FeatureView.__init__.__code__.co_names


def test_the_local_cluster_s_workers_leave_feast_uninstrumented(tmp_path):
    """Each worker imports Feast for train's bucket joins: without typeguard's instrumentation,
    as the command line does (2.7 s less per worker process)."""
    from pipeline.dask_engine import open_client

    with open_client(make_settings(tmp_path, dask_scheduler="local")) as client:
        assert set(client.run(_feast_instrumented).values()) == {False}


@pytest.mark.parametrize("preload", [True, False], ids=["preloaded", "as-is"])
def test_a_users_own_workers_leave_feast_uninstrumented_with_the_preload(tmp_path, preload):
    """``dask worker --preload pipeline.dask_preload`` on a cluster the user starts with Dask's
    own command: its workers skip the instrumentation; without the preload they keep it (the
    owner's choice)."""
    from distributed import Client

    dask = str(Path(sys.executable).parent / "dask")
    address = f"tcp://127.0.0.1:{free_port()}"
    root = Path(__file__).resolve().parents[2]
    env = clean_env(PYTHONPATH=str(root))  # the test's own helpers, sent to the worker by reference
    procs = [subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1],
                               "--no-dashboard"], env=env, cwd=tmp_path, stderr=subprocess.DEVNULL)]
    try:
        procs.append(subprocess.Popen(
            [dask, "worker", address, "--nworkers", "1", "--nthreads", "1", "--no-dashboard",
             "--host", "127.0.0.1", *(["--preload", "pipeline.dask_preload"] if preload else [])],
            env=env, cwd=tmp_path, stderr=subprocess.DEVNULL))
        with Client(address, timeout=30) as client:
            client.wait_for_workers(1, timeout=60)
            assert set(client.run(_feast_instrumented).values()) == {not preload}
    finally:
        for proc in reversed(procs):
            stop(proc)
