"""Restoring the shared volume from a snapshot (:mod:`pipeline.backup` takes them).

:func:`restore` brings a lost volume back onto an empty folder: every file of
the manifest, each checked against its sha256 as it streams in, the raw data
from DVC's remote, the local DVC remote, the lakehouse's part, and Feast's
online store loaded again from the restored features. :func:`verify` restores
into a temporary folder and checks everything, touching nothing on the volume.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import time
from pathlib import Path

from pipeline.backup import read_manifest, snapshot_ids
from pipeline.errors import ObjectStoreError
from pipeline.io import atomic_path, pipeline_lock
from pipeline.objectstore import client
from pipeline.settings import Settings
from pipeline.transfer import Phases as _Phases
from pipeline.transfer import call as _call
from pipeline.transfer import dvc_checkout, dvc_listing, dvc_object, dvc_objects, dvc_transfer
from pipeline.transfer import each as _each
from pipeline.transfer import key as _key
from pipeline.transfer import lakehouse_restore, lakehouse_verify

log = logging.getLogger(__name__)


def _pick(s3, settings: Settings, snapshot: str | None) -> dict:
    ids = snapshot_ids(s3, settings)
    if not ids:
        raise ObjectStoreError(f"no complete snapshot in {settings.s3_bucket}/{settings.s3_prefix or ''}; "
                               "take one with `python -m pipeline backup`")
    if snapshot is not None and snapshot not in ids:
        raise ObjectStoreError(f"no complete snapshot {snapshot}; `python -m pipeline backup --list` "
                               "shows the ones there are")
    return read_manifest(s3, settings, snapshot or ids[-1])


def _leftovers(root: Path) -> list[str]:
    """Files in ``root`` (empty folders and the lock do not count)."""
    if not root.exists():
        return []
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.is_file() and p.name != ".pipeline.lock")[:3]


def restore_files(s3, settings: Settings, manifest: dict, root: Path, phases: dict | None = None) -> int:
    """Write every file of ``manifest`` under ``root`` (atomically, checked against its
    sha256), then the raw data from DVC's remote. Returns the bytes written."""
    phases = _Phases() if phases is None else phases

    def fetch(key: str, target: Path, algorithm: str, expected: str | None, what: str) -> None:
        digest = hashlib.new(algorithm)  # hashed as it streams in: the file is not read twice
        body = s3.get_object(Bucket=settings.s3_bucket, Key=_key(settings, key))["Body"]
        with atomic_path(target) as tmp:
            with open(tmp, "wb") as out:
                while block := body.read(1 << 20):
                    digest.update(block)
                    out.write(block)
            if expected and digest.hexdigest() != expected:
                raise ObjectStoreError(f"{what} in snapshot {manifest['id']} does not match its hash; the "
                                       "store is damaged: restore an older snapshot (--snapshot)")

    _each(lambda e: _call(settings, f"read {e['path']}", fetch, f"objects/{e['sha256']}", root / e["path"],
                          "sha256", e["sha256"], e["path"]), manifest["files"])
    phases.done("files")
    _pull_raw(settings, root, fetch)
    phases.done("raw_data")
    return sum(entry["size"] for entry in manifest["files"])


def _pull_raw(settings: Settings, root: Path, fetch) -> None:
    """The raw data from DVC's remote: its objects fetched into DVC's cache like the other
    files (each checked against its md5), then ``dvc checkout``; ``dvc pull`` (a few
    times slower) when the record is not a DVC 3 folder."""
    listing = dvc_listing(root)
    if listing is None:
        dvc_transfer(root, settings, "pull", _key(settings, "dvc"))
        return
    key, path = dvc_object(root, listing)
    _call(settings, "read the raw data's DVC listing", fetch, f"dvc/{key}", path, "md5",
          listing.removesuffix(".dir"), "data/raw")
    objects = (dvc_objects(root, cached=False) or [])[1:]
    _each(lambda o: _call(settings, "read the raw data", fetch, f"dvc/{o[0]}", o[1], "md5",
                          o[0].removeprefix("files/md5/").replace("/", ""), "data/raw"), objects)
    dvc_checkout(root)


def restore(settings: Settings, snapshot: str | None = None) -> dict:
    """Bring a lost volume back from a snapshot: files, raw data (DVC), the
    local DVC remote, and Feast's online store loaded from the restored features."""
    from pipeline import versioning
    from pipeline.stage import execute

    s3, shared = client(settings), settings.shared
    if leftovers := _leftovers(shared):
        raise ObjectStoreError(f"restore needs an empty volume; {shared} holds {', '.join(leftovers)}...; "
                               "point MLOPS_SHARED_DIR at an empty folder or empty this one first")
    t0 = time.monotonic()
    manifest = _pick(s3, settings, snapshot)
    lake = manifest.get("lakehouse")
    if lake and not settings.lakehouse_uri:
        raise ObjectStoreError(f"snapshot {manifest['id']} was taken with the lakehouse on: restore it with "
                               "MLOPS_LAKEHOUSE=true and the same MLOPS_S3_BUCKET and MLOPS_S3_PREFIX")
    with pipeline_lock(shared, f"restore {manifest['id']}", settings.lock_timeout_seconds):
        phases = _Phases()
        written = restore_files(s3, settings, manifest, shared, phases)
        if manifest["raw_dvc"]:
            for folder in settings.layout():  # with the lakehouse, DVC's remote is the store's, not dvc-store/
                if not (settings.lakehouse_uri and folder == settings.dvc_remote_dir):
                    folder.mkdir(parents=True, exist_ok=True)
            versioning.add_and_push(shared, settings.raw_dir, settings)  # the configured remote again
        phases.done("dvc_store")
        if lake:  # the published features and MLflow's artifacts as the snapshot has them, then the pointer
            log.info("restore %s: lakehouse version %s, %d object(s) copied back", manifest["id"],
                     (lake["pointer"] or {}).get("version"), lakehouse_restore(s3, settings, lake))
            phases.done("lakehouse")
        feast_record = settings.runs_dir / "feast" / "latest.json"
        if feast_record.is_file():
            # The online store is not in the snapshot: without its latest record
            # (the history keeps a copy) the feast stage applies and loads again.
            feast_record.unlink()
            if settings.lakehouse_uri and not lake:  # a snapshot without the lakehouse's part:
                execute("features", settings, locked=True)  # publish from the restored raw data
            execute("feast", settings, locked=True)
        phases.done("online_store")
    seconds = round(time.monotonic() - t0, 2)
    log.info("restore %s: %d file(s), %.1f MB in %.1fs into %s", manifest["id"], len(manifest["files"]),
             written / 1e6, seconds, shared)
    return {"id": manifest["id"], "files": len(manifest["files"]), "bytes": written, "seconds": seconds,
            "phases": dict(phases)}


def verify(settings: Settings, snapshot: str | None = None) -> dict:
    """Restore a snapshot into a temporary folder: every file must match its
    hash and the raw data its DVC record. Touches nothing on the volume."""
    from pipeline import versioning

    s3 = client(settings)
    manifest = _pick(s3, settings, snapshot)
    with tempfile.TemporaryDirectory(prefix="mlops-verify-") as tmp:
        root = Path(tmp)
        written = restore_files(s3, settings, manifest, root)
        changed = versioning.changed_files(root) if manifest["raw_dvc"] else []
        if manifest.get("lakehouse"):
            changed += lakehouse_verify(s3, settings, manifest["lakehouse"])
        if changed:
            raise ObjectStoreError(f"snapshot {manifest['id']}: raw data or lakehouse objects restored do "
                                   f"not match their record ({', '.join(changed[:3])}); take a new backup")
    log.info("verify %s: %d file(s), %.1f MB restored and matched", manifest["id"], len(manifest["files"]),
             written / 1e6)
    return {"id": manifest["id"], "files": len(manifest["files"]), "bytes": written}
