"""Backup and restore: ``pipeline.backup`` and ``pipeline.restore`` against a plain parallel copy of the same files.

A pipeline run (Redis online store, as compose and the chart deploy it) makes the
volume; a real SeaweedFS (``weed mini`` from the pinned wheel, on loopback) is the
store. Side by side, one run each, on the same store:

* **backup**: ``pipeline.backup.backup`` (raw data through DVC's S3 remote, every
  other file content-addressed, the manifest last), then again on the unchanged volume;
* **restore**: ``pipeline.restore.restore`` onto an empty folder at the same path
  (files checked against their sha256, ``dvc pull``, the local DVC remote rebuilt,
  the online store loaded again), with its phases;
* **plain copy**: the same files (what backup covers, raw data included) copied
  with ``pyarrow.fs.copy_files`` to and from the same SeaweedFS, threaded like
  ``aws s3 sync``: no hashes, no manifest, no DVC, no online store.

Both sides run in this process (no interpreter start on either side)."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.common import Run, log, pipeline
from pipeline import backup, lakehouse, restore
from pipeline.objectstore import credentials
from tests.support import make_settings, seaweedfs

DATABASE = 6  # Redis databases 0-5 belong to the other sections


def rows(run: Run) -> int:
    return 1_000 if run.smoke else 1_000_000


def covered(shared: Path) -> list[Path]:
    """The files a backup covers (raw data too: it goes through DVC), as relative paths."""
    skip = backup.SKIP_DIRS - {"data/raw"}
    out = []
    for root, dirs, files in os.walk(shared):
        here = Path(root)
        rel_root = here.relative_to(shared).as_posix()
        dirs[:] = [d for d in dirs if (f"{rel_root}/{d}" if rel_root != "." else d) not in skip]
        out += [(here / f).relative_to(shared) for f in files if f not in (".pipeline.lock",)
                and (here / f).relative_to(shared).as_posix() not in backup.SKIP_FILES]
    return out


def s3fs_of(settings):
    """pyarrow's S3 filesystem on the same store with the same keys and the lakehouse's
    timeouts (a fresh SeaweedFS on a busy machine exceeded the SDK's 3 s, and
    ``copy_files`` dropped the upload with only a logged error)."""
    from pyarrow import fs

    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata probe on 169.254.169.254
    access, secret = credentials(settings)
    scheme, _, host = settings.s3_endpoint.partition("://")
    return fs.S3FileSystem(access_key=access, secret_key=secret, endpoint_override=host, scheme=scheme,
                           region=settings.s3_region, allow_bucket_creation=False,
                           connect_timeout=lakehouse.CONNECT_TIMEOUT_SECONDS,
                           request_timeout=lakehouse.REQUEST_TIMEOUT_SECONDS)


def plain_copy(settings, shared: Path, work: Path) -> dict:
    """Upload the covered files as a tree, then download it into an empty folder."""
    from pyarrow import fs

    tree = work / "plain-up"
    files = covered(shared)
    for rel in files:  # hard links: the same bytes, only the covered files
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        os.link(shared / rel, tree / rel)
    size = sum((tree / rel).stat().st_size for rel in files)
    s3, local = s3fs_of(settings), fs.LocalFileSystem()
    target = f"{settings.s3_bucket}/plain"
    s3.get_file_info(settings.s3_bucket)  # the AWS SDK's one-time start, outside the timing
    t0 = time.perf_counter()
    fs.copy_files(str(tree), target, source_filesystem=local, destination_filesystem=s3, use_threads=True)
    up = time.perf_counter() - t0
    down_dir = work / "plain-down"
    down_dir.mkdir()
    t0 = time.perf_counter()
    fs.copy_files(target, str(down_dir), source_filesystem=s3, destination_filesystem=local, use_threads=True)
    down = time.perf_counter() - t0
    got = sum(p.stat().st_size for p in down_dir.rglob("*") if p.is_file())
    if got != size:
        raise RuntimeError(f"plain copy came back with {got} bytes, sent {size}")
    shutil.rmtree(tree)
    shutil.rmtree(down_dir)
    return {"files": len(files), "bytes": size, "upload_s": round(up, 2), "download_s": round(down, 2)}


def mb_per_s(size: int, seconds: float) -> float:
    return round(size / 1e6 / seconds, 1) if seconds > 0 else 0.0


def bench(run: Run, out: dict) -> None:
    from benchmarks.__main__ import machine  # here: __main__ imports this module

    n = rows(run)
    with tempfile.TemporaryDirectory(prefix="seaweedfs-", dir=run.work) as home, seaweedfs(Path(home)) as store:
        shared = run.work / f"backup-{n}"
        env = {**run.env, **store.env("backup"), "MLOPS_SHARED_DIR": str(shared), "MLOPS_ROWS": str(n),
               "MLOPS_REDIS_URL": run.redis_url_of(DATABASE)}
        log(f"backup: pipeline run at {n} rows")
        # --smoke checks the code path on raw data and features only (no Feast, no MLflow: fast)
        for stage in (["ingest", "features"] if run.smoke else ["run"]):
            pipeline([stage], env)
        s = store.env("backup")
        settings = make_settings(shared, rows=n, redis_url=env["MLOPS_REDIS_URL"], s3_endpoint=s["MLOPS_S3_ENDPOINT"],
                                 s3_bucket=store.bucket, s3_prefix="snapshots-bench",
                                 s3_access_key_file=s["MLOPS_S3_ACCESS_KEY_FILE"],
                                 s3_secret_key_file=s["MLOPS_S3_SECRET_KEY_FILE"])
        plain = plain_copy(settings, shared, run.work)
        log(f"backup: plain copy {plain}")

        made = backup.backup(settings)
        again = backup.backup(settings)  # unchanged volume: nothing new to send
        lost = shared.with_name(shared.name + "-lost")
        shared.rename(lost)  # the disaster; restore writes to the same path
        back = restore.restore(settings)
        shutil.rmtree(lost)
        size = plain["bytes"]
        # the part of a restore a plain copy also does: the files and the raw data onto the volume
        copy_s = round(back["phases"].get("files", 0) + back["phases"].get("raw_data", 0), 2)
        out.update({
            "machine": machine(),
            "rows": n, "files": plain["files"], "bytes": size,
            "backup": {"seconds": made["seconds"], "again_seconds": again["seconds"],
                       "phases": made.get("phases", {}), "mb_per_s": mb_per_s(size, made["seconds"])},
            "restore": {"seconds": back["seconds"], "phases": back.get("phases", {}),
                        "mb_per_s": mb_per_s(size, back["seconds"]), "copy_s": copy_s,
                        "copy_mb_per_s": mb_per_s(size, copy_s)},
            "plain": {"upload_s": plain["upload_s"], "download_s": plain["download_s"],
                      "upload_mb_per_s": mb_per_s(size, plain["upload_s"]),
                      "download_mb_per_s": mb_per_s(size, plain["download_s"])},
            "ratios": {"backup_over_plain_upload": round(made["seconds"] / plain["upload_s"], 2),
                       "restore_over_plain_download": round(back["seconds"] / plain["download_s"], 2),
                       "restore_copy_over_plain_download": round(copy_s / plain["download_s"], 2)},
        })
        log(f"backup: {out}")
