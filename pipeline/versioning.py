"""DVC on the shared volume: ``dvc init --no-scm`` at the shared root, the raw
folder tracked by ``data/raw.dvc``, pushed to a local remote ``dvc-store/``, or,
with the lakehouse on, to the S3 remote ``lakehouse`` at
``s3://<bucket>/<prefix>lakehouse/dvc`` (no ``dvc-store/`` on the volume).

The S3 remote's URL, endpoint and region are in ``.dvc/config``; its keys never
are: they are handed to DVC in memory (``Repo(config=...)``), so a file on the
volume never holds them. A user's own ``dvc pull`` takes them from the
environment (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``).

Anyone can inspect it with DVC's own CLI: ``cd .shared && dvc status``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from pathlib import Path

import yaml

from pipeline.io import file_md5
from pipeline.settings import Settings

log = logging.getLogger(__name__)

REMOTE = "local"
LAKEHOUSE_REMOTE = "lakehouse"
RAW_TARGET = "data/raw"


def dvc_file(shared: Path) -> Path:
    return shared / f"{RAW_TARGET}.dvc"


def _repo(shared: Path, settings: Settings | None = None):
    """The DVC repo at the shared root (``dvc init`` on first use), its remote
    set for the settings: the local ``dvc-store/``, or the lakehouse's S3 remote
    (keys in memory only). Without settings, whatever remote is configured."""
    from dvc.repo import Repo

    if not (shared / ".dvc").is_dir():
        log.info("dvc init --no-scm in %s", shared)
        Repo.init(str(shared), no_scm=True)
    repo = Repo(str(shared))
    remotes = repo.config.get("remote", {})
    if settings is None and remotes:  # local work only (status): the remote as configured
        return repo
    wanted = LAKEHOUSE_REMOTE if settings is not None and settings.lakehouse_uri else REMOTE
    if wanted == REMOTE and remotes.get(REMOTE, {}).get("url") is None:
        with repo.config.edit() as conf:
            conf["remote"][REMOTE] = {"url": str(shared / "dvc-store")}
            conf["core"]["remote"] = REMOTE
            conf["core"]["analytics"] = False
    elif wanted == LAKEHOUSE_REMOTE:
        from pipeline.objectstore import dvc_remote

        remote = dvc_remote(settings, f"{settings.lakehouse_uri.split('/', 3)[3]}/dvc".lstrip("/"))
        public = {k: v for k, v in remote.items() if k not in ("access_key_id", "secret_access_key")}
        if remotes.get(LAKEHOUSE_REMOTE) != public or repo.config.get("core", {}).get("remote") != wanted:
            with repo.config.edit() as conf:
                conf["remote"][LAKEHOUSE_REMOTE] = public
                conf["remote"].pop(REMOTE, None)
                conf["core"]["remote"] = LAKEHOUSE_REMOTE
                conf["core"]["analytics"] = False
        repo.close()
        return Repo(str(shared), config={"remote": {LAKEHOUSE_REMOTE: remote}})
    repo.close()
    return Repo(str(shared))


def add_and_push(shared: Path, raw_dir: Path, settings: Settings | None = None) -> str:
    """``dvc add`` the raw folder and ``dvc push`` it; returns its DVC hash."""
    # DVC resolves stage paths against the working directory: work from the root.
    with contextlib.chdir(shared):
        repo = _repo(shared, settings)
        try:
            repo.add(str(raw_dir.relative_to(shared)))
            if settings is None and repo.config["core"].get("remote") == LAKEHOUSE_REMOTE:
                # no keys without the settings: the features stage pushes (push_to_lakehouse)
                log.info("dvc: the raw data goes to the lakehouse remote with the features stage")
            else:
                pushed = _push(repo, settings)
                log.info("dvc push: %d file(s) sent to the %s remote", pushed, repo.config["core"]["remote"])
        finally:
            repo.close()
    hash_ = recorded_hash(shared)
    assert hash_ is not None, "dvc add wrote no .dvc file"
    return hash_


def push_to_lakehouse(settings: Settings) -> int:
    """Make sure the versioned raw data is in the lakehouse's S3 remote (content
    addressed: what is there already is not sent again), make that remote the
    repo's, and drop the local remote ``dvc-store/`` from the volume."""
    shared = settings.shared
    with contextlib.chdir(shared):
        repo = _repo(shared, settings)
        try:
            pushed = _push(repo, settings)
        finally:
            repo.close()
    local = shared / "dvc-store"
    if local.is_dir():
        shutil.rmtree(local)
        log.info("dvc: the raw data is in %s/dvc; removed the local remote %s", settings.lakehouse_uri, local)
    return pushed


def _push(repo, settings: Settings | None) -> int:
    if settings is None or not settings.lakehouse_uri:
        return repo.push()
    from dvc.exceptions import DvcException

    from pipeline.errors import ObjectStoreError

    try:
        return repo.push()
    except DvcException as exc:
        raise ObjectStoreError(f"dvc push to {settings.lakehouse_uri}/dvc failed ({str(exc).splitlines()[0]}); "
                               "check that the object store runs and the identity may write, then re-run "
                               "ingest") from None


def recorded_hash(shared: Path) -> str | None:
    """The hash DVC recorded for the raw folder, or None when not versioned."""
    try:
        meta = yaml.safe_load(dvc_file(shared).read_text())
    except FileNotFoundError:
        return None
    return meta["outs"][0]["md5"]


def changed_files(shared: Path) -> list[str] | None:
    """Raw files that differ from the DVC record: ``[]`` when clean, ``None``
    when nothing is versioned yet. Asks DVC (``dvc status``), then names the
    files from the recorded directory manifest."""
    if recorded_hash(shared) is None or not (shared / ".dvc").is_dir():
        return None
    with contextlib.chdir(shared):
        repo = _repo(shared)
        try:
            status = repo.status(targets=[str(dvc_file(shared).relative_to(shared))])
        finally:
            repo.close()
    if not status:
        return []
    return _diff_manifest(shared) or [RAW_TARGET]


def _diff_manifest(shared: Path) -> list[str]:
    dir_hash = recorded_hash(shared)
    assert dir_hash is not None
    manifest_path = shared / ".dvc" / "cache" / "files" / "md5" / dir_hash[:2] / dir_hash[2:]
    try:
        manifest = json.loads(manifest_path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return []
    raw = shared / RAW_TARGET
    expected = {entry["relpath"]: entry["md5"] for entry in manifest}
    changed = []
    for relpath, md5 in sorted(expected.items()):
        path = raw / relpath
        if not path.is_file():
            changed.append(f"{RAW_TARGET}/{relpath} (missing)")
        elif file_md5(path) != md5:
            changed.append(f"{RAW_TARGET}/{relpath}")
    present = {p.name for p in raw.glob("*") if p.is_file()} if raw.is_dir() else set()
    changed.extend(f"{RAW_TARGET}/{name} (not versioned)" for name in sorted(present - set(expected)))
    return changed
