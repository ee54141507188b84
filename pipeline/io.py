"""The I/O layer of the shared volume: atomic writes, run records, the lock.

Every write on the volume goes through :func:`atomic_path` (temp file in the same
folder, fsync, rename, fsync of the folder), so a killed stage never leaves a
torn file that a reader could take for a whole one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import shutil
import logging
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline.errors import LockBusy, UpstreamMissing

log = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"
# Parquet options of scratch files read once soon after (train's buckets and spill): no
# dictionary pages, which cost about as much as the rest of writing float columns.
SCRATCH_PARQUET = {"use_dictionary": False}


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(target: Path, *, replace: bool = True) -> Iterator[Path]:
    """Yield a temp path beside ``target``; on success fsync it and rename it
    over ``target``. On any error the temp file is removed and ``target`` is
    untouched. With ``replace=False`` it is published as a hard link only if
    no ``target`` is there yet; one that is (another process's) stays."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{TMP_PREFIX}{target.name}.{os.getpid()}")
    # one with this process's id is a killed process's (ids repeat, a container's first
    # process is 1 each time): a half-written file to start from, never to reuse
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        if replace:
            os.replace(tmp, target)
        else:
            with contextlib.suppress(FileExistsError):
                os.link(tmp, target)
        fsync_dir(target.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write_bytes(target: Path, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(target: Path, obj: Any) -> None:
    atomic_write_bytes(target, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def remove_stale_temps(folder: Path) -> int:
    """Remove temp files and scratch folders a killed writer left behind; returns how many.
    Call it holding the pipeline lock: no live writer's temps are in the folder then."""
    removed = 0
    if folder.is_dir():
        for tmp in folder.glob(f"{TMP_PREFIX}*"):
            with contextlib.suppress(FileNotFoundError):
                if tmp.is_dir() and not tmp.is_symlink():
                    shutil.rmtree(tmp)
                else:
                    tmp.unlink()
                removed += 1
    return removed


def file_md5(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(obj: Any) -> str:
    """A stable hash of a JSON-able object: a stage's inputs."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def utcnow() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


# --------------------------------------------------------------- run records
@dataclass
class RunRecord:
    """What a stage read and wrote: lineage, and the "upstream is done" marker."""

    stage: str
    status: str  # "ok" (did work) or "skipped" (inputs unchanged)
    inputs: dict[str, Any]
    outputs: dict[str, Any]
    fingerprint: str
    started_at: str
    finished_at: str = ""
    seconds: float = 0.0
    host: str = field(default_factory=socket.gethostname)
    message: str = ""
    run_id: str = ""  # MLOPS_RUN_ID of the rollout that wrote it (Kubernetes), or ""


def record_path(runs_dir: Path, stage: str) -> Path:
    return runs_dir / stage / "latest.json"


def write_record(runs_dir: Path, record: RunRecord) -> Path:
    """Write the record to its history and to ``latest.json``, each atomically."""
    stamp = record.finished_at.replace(":", "").replace("-", "").replace("+0000", "Z")
    history = runs_dir / record.stage / f"{stamp}-{record.status}.json"
    data = asdict(record)
    atomic_write_json(history, data)
    latest = record_path(runs_dir, record.stage)
    atomic_write_json(latest, data)
    return latest


def read_record(runs_dir: Path, stage: str) -> RunRecord | None:
    path = record_path(runs_dir, stage)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    return RunRecord(**data)


def wait_for_record(runs_dir: Path, stage: str, upstream: str, wait_seconds: float,
                    run_id: str | None = None, poll: float = 1.0) -> RunRecord:
    """Return the upstream's latest record, waiting up to ``wait_seconds`` for it
    to appear (so stages can start together under any orchestrator).

    With a ``run_id`` (``MLOPS_RUN_ID``, set by the Helm chart per rollout), only
    a record written in the same rollout counts, so a stage started beside its
    upstream never reads the previous rollout's outputs."""
    deadline = time.monotonic() + wait_seconds
    announced = False
    while True:
        record = read_record(runs_dir, upstream)
        if record is not None and (not run_id or record.run_id == run_id):
            return record
        if time.monotonic() >= deadline:
            raise UpstreamMissing(stage, upstream, runs_dir.parent, wait_seconds)
        if not announced:
            log.info("%s: waiting up to %.0fs for '%s' to finish", stage, wait_seconds, upstream)
            announced = True
        time.sleep(poll)


# ---------------------------------------------------------------------- lock
@contextlib.contextmanager
def pipeline_lock(shared: Path, owner: str, timeout: float) -> Iterator[None]:
    """Hold an exclusive lock on the shared folder for one stage.

    Two runs on the same folder take turns; one that cannot get the lock within
    ``timeout`` seconds stops with :class:`LockBusy` and changes nothing. The
    kernel drops a killed holder's lock, so it never goes stale.
    """
    shared.mkdir(parents=True, exist_ok=True)
    path = shared / ".pipeline.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout
        announced = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() >= deadline:
                    raise LockBusy(path, _lock_holder(path), timeout) from None
                if not announced:
                    log.info("waiting for another run (%s) to release %s", _lock_holder(path), path)
                    announced = True
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{owner} pid={os.getpid()} host={socket.gethostname()} since={utcnow()}".encode(), 0)
        yield
    finally:
        os.close(fd)


def _lock_holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "unknown holder"
    except OSError:
        return "unknown holder"
