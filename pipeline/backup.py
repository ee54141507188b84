"""Snapshots of the shared volume in the object store: taking them, listing them, retention.

Layout in the bucket (under ``MLOPS_S3_PREFIX``)::

    dvc/                    DVC's S3 remote: the raw data, content-addressed (DVC's own keys)
    objects/<sha256>        every other file of the volume, content-addressed
    snapshots/<ID>.json     a snapshot's manifest: path, size, sha256 of every file

A snapshot exists only through its manifest, written last, after every object
it names is stored: a failed or killed backup leaves objects nobody names (the
next backup's retention deletes them), never a snapshot that looks complete.
Both incremental: an unchanged file is one object, sent once.

With the lakehouse on, a snapshot also holds the pointer and copies (made inside the
store) of the published features and labels and of MLflow's artifacts: a later publish
or a lost ``lakehouse/`` does not break it (:func:`pipeline.transfer.lakehouse_snapshot`).

Taken under the pipeline lock, so no stage writes meanwhile; SQLite files (the
MLflow store, whether the CLI's or the tracking server's) are copied with
SQLite's backup API, consistent even while a server holds them open. Not
copied: DVC's cache and local remote (restore rebuilds them), Feast's
online store (restore loads it again from the restored features), the lock,
temp files. Restoring and verifying a snapshot: :mod:`pipeline.restore`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sqlite3
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from pipeline.io import TMP_PREFIX, pipeline_lock
from pipeline.objectstore import client
from pipeline.transfer import Phases as _Phases
from pipeline.transfer import call as _call
from pipeline.transfer import dvc_objects, dvc_transfer
from pipeline.transfer import each as _each
from pipeline.transfer import key as _key
from pipeline.transfer import lakehouse_snapshot
from pipeline.transfer import list_keys as _list_keys
from pipeline.transfer import put as _put
from pipeline.settings import Settings

log = logging.getLogger(__name__)

FORMAT = 1
# Relative to the volume root: what a backup leaves out (rebuilt on restore).
SKIP_DIRS = {".dvc/cache", ".dvc/tmp", "dvc-store", "data/raw"}
SKIP_FILES = {".pipeline.lock", "feast/online_store.db"}
SQLITE_MAGIC = b"SQLite format 3\x00"


@dataclass(frozen=True)
class Entry:
    path: str
    size: int
    sha256: str


# ------------------------------------------------------------------ keys
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------- collect
def _collect(shared: Path, staging: Path) -> list[tuple[Entry, Path]]:
    """Every file to back up with the path to read it from (SQLite files: a
    consistent copy in ``staging``)."""
    found = []
    for root, dirs, files in os.walk(shared):
        here = Path(root)
        rel_root = here.relative_to(shared).as_posix()
        dirs[:] = sorted(d for d in dirs if (f"{rel_root}/{d}" if rel_root != "." else d) not in SKIP_DIRS
                         and not d.startswith(TMP_PREFIX))  # a killed stage's scratch folder
        for name in sorted(files):
            rel = (here / name).relative_to(shared).as_posix()
            if rel in SKIP_FILES or name.startswith(TMP_PREFIX) or name.endswith(("-wal", "-shm", "-journal")):
                continue
            source = here / name
            with open(source, "rb") as fh:
                is_sqlite = fh.read(len(SQLITE_MAGIC)) == SQLITE_MAGIC
            if is_sqlite:
                copy = staging / rel
                copy.parent.mkdir(parents=True, exist_ok=True)
                with contextlib.closing(sqlite3.connect(f"file:{source}?mode=ro", uri=True)) as src, \
                        contextlib.closing(sqlite3.connect(copy)) as dst:
                    src.backup(dst)
                source = copy
            found.append((Entry(rel, source.stat().st_size, _sha256(source)), source))
    return found


# ---------------------------------------------------------------- backup
def _push_raw(s3, settings: Settings, shared: Path) -> int:
    """The raw data into DVC's S3 remote (``dvc/``): the objects of DVC's cache that the
    raw record names, under the keys DVC gives them in a remote, sent like every other file
    (those not there yet). ``dvc push`` sent them at a quarter of the speed (its s3fs path:
    docs/performance.md); it still does when the cache lacks one. ``dvc pull`` reads them too."""
    objects = dvc_objects(shared)
    if objects is None:
        return dvc_transfer(shared, settings, "push", _key(settings, "dvc"))
    stored = set(_list_keys(s3, settings, "dvc/files/md5/"))
    todo = [(key, path) for key, path in objects if _key(settings, "dvc", key) not in stored]
    _each(lambda item: _put(s3, settings, _key(settings, "dvc", item[0]), item[1]), todo)
    return len(todo)


def new_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")


def backup(settings: Settings) -> dict:
    """Take a snapshot of the volume under the pipeline lock; apply retention."""
    s3 = client(settings)
    shared = settings.shared
    with pipeline_lock(shared, "backup", settings.lock_timeout_seconds), \
            tempfile.TemporaryDirectory(prefix="mlops-backup-") as staging:
        snapshot, t0, phases = new_id(), time.monotonic(), _Phases()
        pushed = _push_raw(s3, settings, shared)
        phases.done("raw_data")
        entries = _collect(shared, Path(staging))
        phases.done("collect")
        stored = {k.rsplit("/", 1)[-1] for k in _list_keys(s3, settings, "objects/")}
        todo = {e.sha256: src for e, src in entries if e.sha256 not in stored}
        log.info("backup %s: %d file(s), %d new object(s) to send; raw data: %d DVC object(s) pushed",
                 snapshot, len(entries), len(todo), pushed)
        _each(lambda item: _put(s3, settings, _key(settings, "objects", item[0]), item[1]), todo.items())
        phases.done("send")
        lake = None
        if settings.lakehouse_uri:
            ids = snapshot_ids(s3, settings)
            previous = read_manifest(s3, settings, ids[-1]).get("lakehouse") if ids else None
            lake, copied = lakehouse_snapshot(s3, settings, previous, stored | set(todo))
            log.info("backup %s: lakehouse version %s and %d MLflow artifact(s): %d new object(s) copied",
                     snapshot, (lake["pointer"] or {}).get("version", "(none published)"),
                     sum(f["key"].startswith("mlflow/") for f in lake["files"]), copied)
            phases.done("lakehouse")
        dvc_file = shared / "data" / "raw.dvc"
        manifest = {"format": FORMAT, "id": snapshot, "created_at": datetime.now(timezone.utc).isoformat(),
                    "shared": str(shared), "raw_dvc": dvc_file.is_file(),
                    "files": [e.__dict__ for e, _ in entries], "lakehouse": lake,
                    "bytes": sum(e.size for e, _ in entries), "sent_bytes": sum(
                        os.path.getsize(s) for s in todo.values())}
        # Last: only now does the snapshot exist.
        _call(settings, "write the manifest", s3.put_object, Bucket=settings.s3_bucket,
              Key=_key(settings, "snapshots", f"{snapshot}.json"),
              Body=json.dumps(manifest, indent=1).encode(), ContentType="application/json")
        removed = retain(s3, settings)
        phases.done("manifest_and_retention")
        manifest.update(seconds=round(time.monotonic() - t0, 2), phases=dict(phases))
    log.info("backup %s complete: %d file(s), %.1f MB (%.1f MB sent) in %.1fs; removed %d old snapshot(s)",
             snapshot, len(entries), manifest["bytes"] / 1e6, manifest["sent_bytes"] / 1e6,
             manifest["seconds"], removed)
    return manifest


def retain(s3, settings: Settings) -> int:
    """Keep the newest ``backup_keep`` snapshots; delete the objects no kept
    snapshot names (also what killed backups left). Runs under the lock."""
    ids = snapshot_ids(s3, settings)
    old = ids[:-settings.backup_keep]
    for snapshot in old:
        _call(settings, "delete an old snapshot", s3.delete_object, Bucket=settings.s3_bucket,
              Key=_key(settings, "snapshots", f"{snapshot}.json"))
    wanted = set()
    for snapshot in ids[-settings.backup_keep:]:
        manifest = read_manifest(s3, settings, snapshot)
        wanted |= {f["sha256"] for f in manifest["files"] + (manifest.get("lakehouse") or {}).get("files", [])}
    for key in _list_keys(s3, settings, "objects/"):
        if key.rsplit("/", 1)[-1] not in wanted:
            _call(settings, "delete an unused object", s3.delete_object, Bucket=settings.s3_bucket, Key=key)
    return len(old)


def snapshot_ids(s3, settings: Settings) -> list[str]:
    """Complete snapshots, oldest first (IDs sort by time)."""
    names = (k.rsplit("/", 1)[-1] for k in _list_keys(s3, settings, "snapshots/"))
    return sorted(n.removesuffix(".json") for n in names if n.endswith(".json"))


def read_manifest(s3, settings: Settings, snapshot: str) -> dict:
    body = _call(settings, f"read snapshot {snapshot}", s3.get_object, Bucket=settings.s3_bucket,
                 Key=_key(settings, "snapshots", f"{snapshot}.json"))["Body"]
    return json.loads(body.read())


def list_snapshots(settings: Settings) -> list[dict]:
    s3 = client(settings)
    out = []
    for snapshot in snapshot_ids(s3, settings):
        m = read_manifest(s3, settings, snapshot)
        out.append({"id": snapshot, "created_at": m["created_at"], "files": len(m["files"]), "bytes": m["bytes"]})
    return out
