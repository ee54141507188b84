import json
import multiprocessing
import time

import pytest

from pipeline.errors import LockBusy, UpstreamMissing
from pipeline.io import (RunRecord, atomic_path, atomic_write_json, pipeline_lock, read_record,
                         remove_stale_temps, wait_for_record, write_record)


def test_atomic_path_leaves_the_target_whole_when_the_writer_fails(tmp_path):
    target = tmp_path / "data.json"
    atomic_write_json(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text('{"v": 2, "tor')
            raise RuntimeError("killed half-way")
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["data.json"]


def test_stale_temp_files_are_removed(tmp_path):
    (tmp_path / ".tmp-part-00000.csv.123").write_text("half")
    (tmp_path / "part-00000.csv").write_text("whole")
    assert remove_stale_temps(tmp_path) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["part-00000.csv"]


def test_run_record_round_trip_and_history(tmp_path):
    rec = RunRecord(stage="ingest", status="ok", inputs={"rows": 1}, outputs={"x": 2},
                    fingerprint="abc", started_at="2026-01-01T00:00:00.000+00:00",
                    finished_at="2026-01-01T00:00:01.000+00:00")
    write_record(tmp_path, rec)
    assert read_record(tmp_path, "ingest") == rec
    assert len(list((tmp_path / "ingest").glob("*-ok.json"))) == 1


def test_missing_upstream_says_what_to_run(tmp_path):
    with pytest.raises(UpstreamMissing) as err:
        wait_for_record(tmp_path / "runs", "features", "ingest", wait_seconds=0)
    assert "python -m pipeline ingest" in str(err.value)


def _hold(shared, ready, release):
    with pipeline_lock(shared, "holder", timeout=5):
        ready.set()
        release.wait(10)


def test_second_run_waits_then_refuses_with_a_clear_message(tmp_path):
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(tmp_path, ready, release))
    holder.start()
    try:
        assert ready.wait(10)
        started = time.monotonic()
        with pytest.raises(LockBusy) as err:
            with pipeline_lock(tmp_path, "second", timeout=0.5):
                pass
        assert time.monotonic() - started >= 0.5
        assert "holder" in str(err.value) and "MLOPS_LOCK_TIMEOUT_SECONDS" in str(err.value)
    finally:
        release.set()
        holder.join(10)
    with pipeline_lock(tmp_path, "third", timeout=1):  # free again once the holder is gone
        pass


def test_with_a_run_id_only_the_same_rollouts_record_counts(tmp_path):
    old = RunRecord(stage="ingest", status="ok", inputs={}, outputs={}, fingerprint="a",
                    started_at="t0", finished_at="2026-01-01T00:00:01.000+00:00", run_id="rollout-1")
    write_record(tmp_path, old)
    assert wait_for_record(tmp_path, "features", "ingest", 0, run_id="rollout-1") == old
    assert wait_for_record(tmp_path, "features", "ingest", 0) == old  # no id: any record
    with pytest.raises(UpstreamMissing):
        wait_for_record(tmp_path, "features", "ingest", 0.3, run_id="rollout-2", poll=0.1)


def test_atomic_path_without_replace_publishes_once_and_keeps_the_first(tmp_path):
    target = tmp_path / "store.db"
    with atomic_path(target, replace=False) as tmp:
        tmp.write_bytes(b"first")
    with atomic_path(target, replace=False) as tmp:  # another process's, made meanwhile
        tmp.write_bytes(b"second")
    assert target.read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["store.db"]  # no temp left
