"""DVC on the shared volume: ``dvc init --no-scm`` at the shared root, the raw
folder tracked by ``data/raw.dvc``, pushed to a local remote ``dvc-store/``.

Anyone can inspect it with DVC's own CLI: ``cd .shared && dvc status``.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import yaml

from pipeline.io import file_md5

log = logging.getLogger(__name__)

REMOTE = "local"
RAW_TARGET = "data/raw"


def dvc_file(shared: Path) -> Path:
    return shared / f"{RAW_TARGET}.dvc"


def _repo(shared: Path):
    from dvc.repo import Repo

    if not (shared / ".dvc").is_dir():
        log.info("dvc init --no-scm in %s", shared)
        Repo.init(str(shared), no_scm=True)
    repo = Repo(str(shared))
    remote_url = str(shared / "dvc-store")
    if repo.config.get("remote", {}).get(REMOTE, {}).get("url") is None:
        with repo.config.edit() as conf:
            conf["remote"][REMOTE] = {"url": remote_url}
            conf["core"]["remote"] = REMOTE
            conf["core"]["analytics"] = False
        repo = Repo(str(shared))
    return repo


def add_and_push(shared: Path, raw_dir: Path) -> str:
    """``dvc add`` the raw folder and ``dvc push`` it; returns its DVC hash."""
    # DVC resolves stage paths against the working directory: work from the root.
    with contextlib.chdir(shared):
        repo = _repo(shared)
        try:
            repo.add(str(raw_dir.relative_to(shared)))
            pushed = repo.push()
            log.info("dvc push: %d file(s) sent to the local remote", pushed)
        finally:
            repo.close()
    hash_ = recorded_hash(shared)
    assert hash_ is not None, "dvc add wrote no .dvc file"
    return hash_


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
