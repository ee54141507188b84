"""Moving bytes between the shared volume and the object store: S3 calls whose
failures become one line, parallel sends and fetches, keys under the prefix, the
raw data's DVC remote (DVC's cache objects under the keys DVC gives them, and
``dvc push``/``dvc pull`` with the remote held in memory only), and the
lakehouse's part of a snapshot (copied inside the store, never through the volume)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pipeline.errors import ObjectStoreError
from pipeline.objectstore import describe, dvc_remote
from pipeline.settings import Settings

log = logging.getLogger(__name__)

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


def each(fn, items) -> list:
    """``fn`` on every item, WORKERS at a time, the results in order; the first failure
    stops the rest and is raised."""
    pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="objectstore")
    try:
        return list(pool.map(fn, items))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def call(settings: Settings, doing: str, fn, *args, **kwargs):
    """An S3 call, its failure as one :class:`ObjectStoreError` line."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return fn(*args, **kwargs)
    except (BotoCoreError, ClientError) as exc:
        raise describe(exc, settings, doing) from None


def list_objects(s3, settings: Settings, prefix: str) -> list[dict]:
    """Every object under ``prefix`` (below the settings' prefix): its Key, Size and ETag."""
    found, token = [], None
    while True:
        extra = {"ContinuationToken": token} if token else {}
        page = call(settings, "list the bucket", s3.list_objects_v2, Bucket=settings.s3_bucket,
                    Prefix=key(settings, prefix), **extra)
        found += page.get("Contents", [])
        if not page.get("IsTruncated"):
            return found
        token = page["NextContinuationToken"]


def list_keys(s3, settings: Settings, prefix: str) -> list[str]:
    return [item["Key"] for item in list_objects(s3, settings, prefix)]


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


# ------------------------------------------------------------ lakehouse
# With the lakehouse on, part of what a snapshot must hold is already in the store, under
# lakehouse/: the published features and labels (which the next two publishes prune) and
# MLflow's artifacts. A snapshot names a copy of each under objects/<sha256>, like the
# volume's files; restore copies back what is missing or changed, then the pointer.
LAKEHOUSE, POINTER = "lakehouse", "current.json"


def lakehouse_pointer(s3, settings: Settings) -> dict | None:
    """The lakehouse's published pointer (``current.json``), or None when nothing is published."""
    from botocore.exceptions import ClientError

    try:
        return json.loads(s3.get_object(Bucket=settings.s3_bucket,
                                        Key=key(settings, LAKEHOUSE, POINTER))["Body"].read())
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            return None
        raise describe(exc, settings, "read the lakehouse's pointer") from None


def _lakehouse_objects(s3, settings: Settings, folders: list[str]) -> dict[str, dict]:
    """Key under lakehouse/ -> {size, etag} of every object in ``folders``."""
    base = key(settings, LAKEHOUSE) + "/"
    return {o["Key"].removeprefix(base): {"size": o["Size"], "etag": o["ETag"].strip('"')}
            for folder in folders for o in list_objects(s3, settings, f"{LAKEHOUSE}/{folder}")}


def _sha256_of(s3, settings: Settings, object_key: str) -> str:
    def read() -> str:
        digest, body = hashlib.sha256(), s3.get_object(Bucket=settings.s3_bucket, Key=object_key)["Body"]
        while block := body.read(1 << 20):
            digest.update(block)
        return digest.hexdigest()
    return call(settings, f"read {object_key}", read)


# A single CopyObject stops at 5 GB on AWS S3 (SeaweedFS does not enforce it) and a month of
# features can pass that: above the threshold boto3's managed copy copies in parts
# (UploadPartCopy). One thread per copy: ``each`` already runs WORKERS copies at once, and
# botocore's pool holds 10 connections.
COPY_CONFIG = {"multipart_threshold": 256 << 20, "multipart_chunksize": 256 << 20}
# The sha256 a restore writes on each object it copies back: the copy's ETag is not the
# original's (a multipart upload's ``md5-N``), so the next backup and restore find the
# object by this instead of reading or copying it again.
SHA256 = "sha256"
_HEADERS = ("ContentType", "ContentEncoding", "ContentDisposition", "ContentLanguage", "CacheControl")


def _copy(s3, settings: Settings, source: str, target: str, sha256: str | None = None) -> None:
    """``source`` to ``target`` inside the bucket, in parts when large; with ``sha256``,
    the copy carries it as metadata (and the source's headers and metadata)."""
    from boto3.s3.transfer import TransferConfig, create_transfer_manager

    extra = {}
    if sha256:
        head = call(settings, f"read {source}", s3.head_object, Bucket=settings.s3_bucket, Key=source)
        extra = {"MetadataDirective": "REPLACE", "Metadata": {**head.get("Metadata", {}), SHA256: sha256},
                 **{name: head[name] for name in _HEADERS if head.get(name)}}
    config = TransferConfig(**COPY_CONFIG, use_threads=False, preferred_transfer_client="classic")

    def copy() -> None:
        with create_transfer_manager(s3, config) as manager:
            manager.copy({"Bucket": settings.s3_bucket, "Key": source}, settings.s3_bucket, target,
                         extra_args=extra).result()
    call(settings, "copy an object inside the store", copy)


def _recorded_sha256(s3, settings: Settings, object_key: str) -> str | None:
    """The sha256 a restore wrote on the object (:data:`SHA256`), else None."""
    head = call(settings, f"read {object_key}", s3.head_object, Bucket=settings.s3_bucket, Key=object_key)
    return head.get("Metadata", {}).get(SHA256)


def lakehouse_snapshot(s3, settings: Settings, previous: dict | None, stored: set[str]) -> tuple[dict, int]:
    """The lakehouse's part of a snapshot: the pointer, and the published version's files
    and MLflow's artifacts, each copied to ``objects/<sha256>`` (inside the store) unless
    ``stored`` has it. An object the ``previous`` section names with the same ETag and
    size, or that a restore marked with its sha256, is not read again. Returns the
    section and how many objects were copied."""
    pointer = lakehouse_pointer(s3, settings)
    tables = {} if pointer is None else {f"{name}/{pointer['version']}/{f['path']}": name
                                         for name, table in pointer["tables"].items() for f in table["files"]}
    folders = sorted({"/".join(k.split("/")[:2]) + "/" for k in tables}) + ["mlflow/"]
    found = _lakehouse_objects(s3, settings, folders)
    if missing := sorted(set(tables) - set(found)):
        raise ObjectStoreError(f"the lakehouse's published version {pointer['version']} lacks {missing[0]}; "
                               "re-run the features stage (`python -m pipeline features`), then back up")
    wanted = sorted(k for k in found if k in tables or k.startswith("mlflow/"))
    known = {(f["key"], f["etag"], f["size"]): f["sha256"] for f in (previous or {}).get("files", [])}

    def entry(name: str) -> dict:
        info, where = found[name], key(settings, LAKEHOUSE, name)
        sha = (known.get((name, info["etag"], info["size"])) or _recorded_sha256(s3, settings, where)
               or _sha256_of(s3, settings, where))
        return {"key": name, **info, "sha256": sha}

    files = each(entry, wanted)
    todo = {f["sha256"]: f["key"] for f in files if f["sha256"] not in stored}
    each(lambda item: _copy(s3, settings, key(settings, LAKEHOUSE, item[1]), key(settings, "objects", item[0])),
         todo.items())
    return {"pointer": pointer, "files": files}, len(todo)


def lakehouse_restore(s3, settings: Settings, section: dict) -> int:
    """Copy back every object of the snapshot's lakehouse section that is missing or
    differs (size, then ETag or the sha256 an earlier restore marked it with), then (last,
    as a publish does) the snapshot's pointer, or, when the snapshot has none, remove the
    bucket's. Returns the objects copied back (the pointer not counted)."""
    files = section["files"]
    found = _lakehouse_objects(s3, settings, sorted({f["key"].split("/", 1)[0] + "/" for f in files}))

    def differs(f: dict) -> bool:
        there = found.get(f["key"])
        if there is None or there["size"] != f["size"]:
            return True
        return there["etag"] != f["etag"] and _recorded_sha256(
            s3, settings, key(settings, LAKEHOUSE, f["key"])) != f["sha256"]

    todo = [f for f, stale in zip(files, each(differs, files)) if stale]
    each(lambda f: _copy(s3, settings, key(settings, "objects", f["sha256"]), key(settings, LAKEHOUSE, f["key"]),
                         f["sha256"]), todo)
    pointer, now = section["pointer"], lakehouse_pointer(s3, settings)
    if pointer is None and now is not None:
        # Nothing was published when the snapshot was taken, so nothing is published after
        # restoring it: a later version left in place would have the feast stage and serve
        # read features newer than the restored volume and model. Only the pointer goes
        # (the version's files stay until the next publishes prune them), as writing the
        # snapshot's pointer replaces a newer one below.
        log.warning("restore: the snapshot has no published lakehouse version; removing the pointer "
                    "to version %s", now.get("version"))
        call(settings, "remove the lakehouse's pointer", s3.delete_object, Bucket=settings.s3_bucket,
             Key=key(settings, LAKEHOUSE, POINTER))
    elif pointer is not None and now != pointer:
        call(settings, "write the lakehouse's pointer", s3.put_object, Bucket=settings.s3_bucket,
             Key=key(settings, LAKEHOUSE, POINTER), ContentType="application/json",
             Body=json.dumps(pointer, indent=2, sort_keys=True).encode())
    return len(todo)


def lakehouse_verify(s3, settings: Settings, section: dict) -> list[str]:
    """The lakehouse objects of a snapshot whose copy does not match its sha256."""
    return [f["key"] for f in section["files"]
            if _sha256_of(s3, settings, key(settings, "objects", f["sha256"])) != f["sha256"]]
