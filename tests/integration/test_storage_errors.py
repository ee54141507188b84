"""A shared folder that is a file, read-only, or full: one line that says what to
do, a distinct exit code, nothing torn, and a re-run that finishes the job once
the operator fixed it. The volumes are real (a small tmpfs mounted for the test)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.support import clean_env, pipeline_cli

pytestmark = pytest.mark.integration


@pytest.fixture
def tmpfs(tmp_path):
    mounted: list[Path] = []

    def mount(size: str, *options: str) -> Path:
        point = tmp_path / f"disk{len(mounted)}"
        point.mkdir()
        opts = ",".join((f"size={size}", *options))
        if subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(point)],
                          capture_output=True).returncode:
            pytest.skip("mounting a tmpfs needs root (CI runs as root)")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def one_line(proc: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


def test_a_shared_folder_that_is_a_file(tmp_path):
    shared = tmp_path / "shared"
    shared.write_text("not a folder")
    proc = pipeline_cli(["ingest"], clean_env(MLOPS_SHARED_DIR=str(shared), MLOPS_ROWS="100"), check=False)
    assert proc.returncode == 8
    assert "is a file, not a folder" in one_line(proc)
    assert shared.read_text() == "not a folder"


def test_a_read_only_shared_folder(tmpfs):
    disk = tmpfs("4M", "ro")
    proc = pipeline_cli(["ingest"], clean_env(MLOPS_SHARED_DIR=str(disk / "shared"), MLOPS_ROWS="100"),
                        check=False)
    assert proc.returncode == 9
    assert "make" in one_line(proc) and "writable" in one_line(proc)


def test_a_full_disk_stops_cleanly_and_a_rerun_after_growing_it_finishes(tmpfs):
    disk = tmpfs("3M")
    shared = disk / "shared"
    env = clean_env(MLOPS_SHARED_DIR=str(shared), MLOPS_ROWS="60000")  # about 7 MB of CSV
    proc = pipeline_cli(["run"], env, check=False)
    assert proc.returncode == 10
    assert "no space left on the device holding" in one_line(proc)
    assert not list(shared.rglob(".tmp-*")), "a temp file of an unfinished write was left behind"
    assert not (shared / "runs" / "ingest" / "latest.json").exists()
    subprocess.run(["mount", "-o", "remount,size=400M", str(disk)], check=True)
    pipeline_cli(["run"], env)
    summary = pipeline_cli(["summary"], env).stdout
    assert "promote   ok" in summary and "rows generated    60000" in summary
