"""Moving bytes between the shared volume and the object store: S3 calls whose
failures become one line, parallel sends and fetches, keys under the prefix, and
the raw data's DVC remote (DVC's cache objects under the keys DVC gives them, and
``dvc push``/``dvc pull`` with the remote held in memory only)."""

from __future__ import annotations

import contextlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pipeline.errors import ObjectStoreError
from pipeline.objectstore import describe, dvc_remote
from pipeline.settings import Settings

WORKERS = 8  # files sent or fetched at once (botocore's connection pool holds 10)


def key(settings: Settings, *parts: str) -> str:
    prefix = (settings.s3_prefix or "").strip("/")
    return "/".join([prefix, *parts] if prefix else parts)


class Phases(dict):
    """Seconds per phase, in order (the log and the benchmark show them)."""

    def __init__(self) -> None:
        super().__init__()
        self.mark = time.monotonic()

    def done(self, name: str) -> None:
        now = time.monotonic()
        self[name], self.mark = round(now - self.mark, 2), now


def each(fn, items) -> None:
    """``fn`` on every item, WORKERS at a time; the first failure stops the rest and is raised."""
    pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="objectstore")
    try:
        for _ in pool.map(fn, items):
            pass
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def call(settings: Settings, doing: str, fn, *args, **kwargs):
    """An S3 call, its failure as one :class:`ObjectStoreError` line."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return fn(*args, **kwargs)
    except (BotoCoreError, ClientError) as exc:
        raise describe(exc, settings, doing) from None


def list_keys(s3, settings: Settings, prefix: str) -> list[str]:
    keys, token = [], None
    while True:
        extra = {"ContinuationToken": token} if token else {}
        page = call(settings, "list the bucket", s3.list_objects_v2, Bucket=settings.s3_bucket,
                     Prefix=key(settings, prefix), **extra)
        keys += [item["Key"] for item in page.get("Contents", [])]
        if not page.get("IsTruncated"):
            return keys
        token = page["NextContinuationToken"]



def put(s3, settings: Settings, key: str, path: Path) -> None:
    with open(path, "rb") as body:
        call(settings, "store a file", s3.put_object, Bucket=settings.s3_bucket, Key=key, Body=body)



DVC_REMOTE = "objectstore"


def dvc_transfer(root: Path, settings: Settings, action: str, prefix: str) -> int:
    """``dvc push`` to / ``dvc pull`` from the S3 remote under ``prefix`` (the remote
    exists only in memory: ``.dvc/config`` and its credentials are never touched)."""
    from dvc.repo import Repo

    if not (root / "data" / "raw.dvc").is_file():
        return 0
    with contextlib.chdir(root):
        repo = Repo(str(root), config={"remote": {DVC_REMOTE: dvc_remote(settings, prefix)}})
        try:
            if action == "push":
                return repo.push(remote=DVC_REMOTE)
            return len(repo.pull(remote=DVC_REMOTE).get("added", []))
        except Exception as exc:
            raise _dvc_error(exc, settings, action) from None
        finally:
            repo.close()


def dvc_object(root: Path, md5: str) -> tuple[str, Path]:
    """An object's key in a DVC remote (``files/md5/ab/cdef...``) and its path in DVC's cache."""
    key = f"files/md5/{md5[:2]}/{md5[2:]}"
    return key, root / ".dvc" / "cache" / key


def dvc_listing(root: Path) -> str | None:
    """The md5 of the raw folder's ``.dir`` listing in its DVC 3 record, else None."""
    import yaml

    try:
        out = yaml.safe_load((root / "data" / "raw.dvc").read_text())["outs"][0]
    except (FileNotFoundError, KeyError, IndexError, TypeError):
        return None
    md5 = str(out.get("md5", ""))
    return md5 if out.get("hash") == "md5" and md5.endswith(".dir") else None


def dvc_objects(root: Path, cached: bool = True) -> list[tuple[str, Path]] | None:
    """The versioned raw folder's objects (the ``.dir`` listing, then each file) as
    :func:`dvc_object` names them; None when the record is not a DVC 3 folder, the
    listing is not in the cache, or (``cached``) a file object is not either."""
    listing = dvc_listing(root)
    if listing is None or not dvc_object(root, listing)[1].is_file():
        return None
    found = [dvc_object(root, listing), *(dvc_object(root, item["md5"])
                                          for item in json.loads(dvc_object(root, listing)[1].read_text()))]
    return found if not cached or all(path.is_file() for _, path in found) else None


def dvc_checkout(root: Path) -> None:
    """The raw folder from DVC's cache into the workspace, as its record says."""
    from dvc.repo import Repo

    with contextlib.chdir(root):
        repo = Repo(str(root))
        try:
            repo.checkout(targets=["data/raw.dvc"])
        except Exception as exc:
            raise ObjectStoreError(f"dvc checkout of the restored raw data failed ({type(exc).__name__}); "
                                   "restore an older snapshot (--snapshot)") from None
        finally:
            repo.close()


def _dvc_error(exc: BaseException, settings: Settings, action: str) -> ObjectStoreError:
    """DVC wraps the S3 failure (s3fs turns AccessDenied into PermissionError)."""
    seen: BaseException | None = exc
    for _ in range(10):
        if seen is None:
            break
        if isinstance(seen, PermissionError) or "AccessDenied" in str(seen):
            return describe(_Denied(), settings, f"dvc {action}")
        seen = seen.__cause__ or seen.__context__
    return ObjectStoreError(f"dvc {action} with the object store at {settings.s3_endpoint} failed "
                            f"({type(exc).__name__}); check MLOPS_S3_* and that the store answers, then re-run")


class _Denied(Exception):
    response = {"Error": {"Code": "AccessDenied"}}
