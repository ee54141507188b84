"""Feast's Redis online-store layout, read and written without the SDK's per-row work.

Feast (``entity_key_serialization_version: 3``) keeps one Redis hash per
entity. Its key is ``serialize_entity_key(EntityKey) + project``; each feature
is a field named ``murmur3("<view>:<feature>")`` (4 bytes) holding a
``ValueProto``; the field ``_ts:<view>`` holds the event time as a protobuf
``Timestamp``. :class:`FeastRedisLayout` learns the byte layout from Feast's
own helpers when it is made and checks it against them, so a Feast release
that changes the layout fails loudly here instead of writing keys Feast
cannot read.

:class:`RedisOnlineReader` is what ``/predict`` uses: one HMGET per entity.
:func:`load_latest` is what the feast stage uses instead of ``feast
materialize`` on Redis: the latest row per entity from the features Parquet
file, written in pipelined batches. Tests hold both to Feast: the reader to
``get_online_features``, the loader to the bytes ``feast materialize`` writes.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import redis

from pipeline import schema
from pipeline.settings import FEAST_PROJECT, Settings

log = logging.getLogger(__name__)

KEY_SERIALIZATION_VERSION = 3
# Rows read from Parquet and entities sent to Redis per pipelined round trip.
LOAD_BATCH_ROWS = 20_000


def connect(settings: Settings, timeout_seconds: float):
    """A redis-py client for the online store: bounded socket timeouts, no retries,
    so an unreachable Redis is an error within ``timeout_seconds``."""
    host, port, db, password = settings.redis_parts()
    return redis.Redis(host=host, port=port, db=db, password=password, socket_timeout=timeout_seconds,
                       socket_connect_timeout=timeout_seconds, retry=None)


class LayoutChanged(RuntimeError):
    """Feast's helpers no longer produce the layout this module writes."""


class FeastRedisLayout:
    """Keys, field names and value bytes of one feature view, as Feast writes them."""

    def __init__(self, project: str = FEAST_PROJECT, view: str = schema.FEATURE_VIEW,
                 features: tuple[str, ...] = schema.FEATURE_NAMES) -> None:
        from feast.infra.online_stores.helpers import _mmh3, _redis_key
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey
        from feast.protos.feast.types.Value_pb2 import Value
        from google.protobuf.timestamp_pb2 import Timestamp

        self._redis_key, self._entity_key, self.value_proto, self._timestamp = (
            _redis_key, EntityKey, Value, Timestamp)
        self.project = project
        self.fields = [_mmh3(f"{view}:{name}") for name in features]
        self.ts_field = f"_ts:{view}".encode()
        # An int64 entity key is a fixed head, the id as 8 little-endian bytes,
        # then the project name; a double value is a tag byte and 8 such bytes.
        probe = self.feast_key(0)
        tail = len(project.encode())
        self.key_head, self.key_tail = probe[:-8 - tail], probe[-tail:]
        self.double_tag = Value(double_val=0.0).SerializeToString()[:1]
        self._check()

    def feast_key(self, entity_id: int) -> bytes:
        """The entity's Redis key, by Feast's own ``_redis_key`` (slow, exact)."""
        entity = self._entity_key(join_keys=[schema.JOIN_KEY],
                                  entity_values=[self.value_proto(int64_val=int(entity_id))])
        return self._redis_key(self.project, entity, entity_key_serialization_version=KEY_SERIALIZATION_VERSION)

    def keys(self, entity_ids: np.ndarray) -> list[bytes]:
        """Redis keys of many entities at once, byte for byte what Feast builds."""
        packed = np.ascontiguousarray(entity_ids, dtype="<i8").tobytes()
        head, tail = self.key_head, self.key_tail
        return [head + packed[i:i + 8] + tail for i in range(0, len(packed), 8)]

    def doubles(self, values: np.ndarray) -> list[bytes]:
        """``ValueProto(double_val=v).SerializeToString()`` for each value."""
        rows = np.empty(len(values), dtype=[("tag", "u1"), ("value", "<f8")])
        rows["tag"], rows["value"] = self.double_tag[0], values
        packed = rows.tobytes()
        return [packed[i:i + 9] for i in range(0, len(packed), 9)]

    def timestamp(self, micros: int) -> bytes:
        """The ``_ts`` field value: a protobuf Timestamp of the event time."""
        seconds, rest = divmod(int(micros), 1_000_000)
        return self._timestamp(seconds=seconds, nanos=rest * 1000).SerializeToString()

    def _check(self) -> None:
        ids = np.array([0, 1, 1001, -7, 2**40 + 3, schema.ENTITY_ID_MAX], dtype=np.int64)
        values = np.array([0.0, -0.0, 1.5, -1e300, float("inf"), float("nan")])
        same_keys = self.keys(ids) == [self.feast_key(i) for i in ids]
        same_values = self.doubles(values) == [self.value_proto(double_val=float(v)).SerializeToString()
                                               for v in values]
        if not (same_keys and same_values):
            raise LayoutChanged(
                "Feast's Redis key or value encoding is not the one pipeline/redis_layout.py writes "
                f"(keys match: {same_keys}, values match: {same_values}); pin the Feast version in "
                "constraints.txt or update FeastRedisLayout")


def _closed_while_idle(conn) -> bool:
    """An idle connection with something to read (or an EOF) is no longer usable."""
    try:
        return conn.can_read(timeout=0)
    except (redis.exceptions.ConnectionError, OSError):
        return True


class RedisOnlineReader:
    """The feature view read straight from Redis, in Feast's own layout.

    One HMGET per entity (pipelined for a batch), without the SDK's per-call
    registry and response work: the floor of a lookup. Each thread keeps one
    redis-py ``Connection`` and sends the command it packed itself, skipping
    the client's per-command layers (pool checkout, retry and observability
    hooks: about half of a lookup's CPU here); a connection that fails is
    dropped, and the next lookup opens a fresh one. Doubles are decoded
    straight from the ``ValueProto`` bytes when they have the layout
    :class:`FeastRedisLayout` checked, by protobuf otherwise. A test holds the
    reader equal to ``get_online_features``.
    """

    def __init__(self, client, project: str = FEAST_PROJECT) -> None:
        self.client = client
        self.layout = FeastRedisLayout(project)
        self._fields = self.layout.fields
        self._parse = self.layout.value_proto.FromString
        n = len(self._fields)
        # RESP for HMGET <key> <fields...>: the key is the only part that changes.
        self._command_head = b"*%d\r\n$5\r\nHMGET\r\n" % (n + 2)
        self._command_tail = b"".join(b"$%d\r\n%s\r\n" % (len(f), f) for f in self._fields)
        self._doubles = struct.Struct("<" + "xd" * n)  # n x (tag byte, little-endian double)
        self._tags = self.layout.double_tag * n
        self._local = threading.local()

    def _command(self, key: bytes) -> bytes:
        return b"%s$%d\r\n%s\r\n%s" % (self._command_head, len(key), key, self._command_tail)

    def _roundtrip(self, keys: list[bytes]) -> list[list[bytes | None]]:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self.client.connection_pool.make_connection()
        elif _closed_while_idle(conn):
            # The server closed it (its `timeout`, a restart, a proxy). Reconnect
            # before sending, as redis-py's pool does, so a request never pays
            # for a dead connection nor retries after a send.
            conn.disconnect()
        try:
            conn.send_packed_command([b"".join(self._command(key) for key in keys)], check_health=False)
            return [conn.read_response() for _ in keys]
        except BaseException:
            conn.disconnect()  # unknown state (timeout, half-read replies): start afresh next time
            self._local.conn = None
            raise

    def _row(self, raw: list[bytes | None]) -> list[float] | None:
        if any(v is None for v in raw):
            return None
        joined = b"".join(raw)
        if len(joined) == self._doubles.size and joined[::9] == self._tags:
            return list(self._doubles.unpack(joined))
        return [self._parse(v).double_val for v in raw]

    def read(self, entity_ids: list[int]) -> list[list[float] | None]:
        """Feature values per entity, in schema order; None for an unknown entity."""
        rows = self._roundtrip(self.layout.keys(np.array(entity_ids, dtype=np.int64)))
        return [self._row(raw) for raw in rows]


def latest_rows(features_path: Path) -> np.ndarray:
    """A mask over the file's rows: the latest event per entity (on a tie, the later row).

    Reads only the key and time columns (16 bytes a row), so the memory it
    needs is a small fraction of the file.
    """
    table = pq.read_table(features_path, columns=[schema.JOIN_KEY, schema.TIMESTAMP])
    order = pc.sort_indices(table, sort_keys=[(schema.JOIN_KEY, "ascending"),
                                              (schema.TIMESTAMP, "ascending")]).to_numpy()
    keys = table.column(schema.JOIN_KEY).to_numpy()[order]
    del table
    last = np.ones(len(order), dtype=bool)
    last[:-1] = keys[1:] != keys[:-1]  # stable sort: the last of each run is the latest
    mask = np.zeros(len(order), dtype=bool)
    mask[order[last]] = True
    return mask


def _hset_commands(layout: FeastRedisLayout, ids: np.ndarray, micros: np.ndarray,
                   matrix: np.ndarray) -> list[bytes]:
    """One RESP ``HSET key _ts:<view> <ts> <field> <value> ...`` per row, packed here.

    Everything but the timestamp has a fixed length (keys, the 4-byte field
    names, 9-byte doubles), so it is laid out for all rows at once in numpy;
    only the timestamp proto is made row by row.
    """
    n, n_features = matrix.shape
    key_len = len(layout.key_head) + 8 + len(layout.key_tail)
    head = b"*%d\r\n$4\r\nHSET\r\n$%d\r\n" % (2 + 2 * (1 + n_features), key_len)
    key_part = np.empty((n, len(head) + key_len + 2), dtype=np.uint8)
    key_part[:] = np.frombuffer(head + layout.key_head + bytes(8) + layout.key_tail + b"\r\n", dtype=np.uint8)
    at = len(head) + len(layout.key_head)
    key_part[:, at:at + 8] = np.ascontiguousarray(ids, dtype="<i8").view(np.uint8).reshape(n, 8)
    # per feature: $4 CRLF <field> CRLF $9 CRLF <tag><double> CRLF = 25 bytes
    values = np.empty((n, n_features, 25), dtype=np.uint8)
    for j, field in enumerate(layout.fields):
        values[:, j, :] = np.frombuffer(b"$4\r\n%s\r\n$9\r\n%s%s\r\n" % (field, layout.double_tag, bytes(8)),
                                        dtype=np.uint8)
    values[:, :, 15:23] = np.ascontiguousarray(matrix, dtype="<f8").view(np.uint8).reshape(n, n_features, 8)
    keys, rest = key_part.tobytes(), values.tobytes()
    k, r = key_part.shape[1], 25 * n_features
    ts_field = b"$%d\r\n%s\r\n" % (len(layout.ts_field), layout.ts_field)
    out = []
    for i in range(n):
        ts = layout.timestamp(micros[i])
        out.append(b"%s%s$%d\r\n%s\r\n%s" % (keys[i * k:(i + 1) * k], ts_field, len(ts), ts,
                                                 rest[i * r:(i + 1) * r]))
    return out


def load_latest(client, features_path: Path, project: str = FEAST_PROJECT,
                progress: Callable[[int, int], None] | None = None) -> int:
    """Write the latest features of every entity into Redis in Feast's layout.

    What ``feast materialize`` writes for a window holding every row: one HSET
    per entity, packed here and pipelined in batches on one redis-py
    connection. Overwrites, so a re-run after an interruption finishes the
    job. Returns the number of entities written.
    """
    layout = FeastRedisLayout(project)
    if any(len(field) != 4 for field in layout.fields):
        raise LayoutChanged("Feast's field names are no longer 4-byte murmur3 hashes")
    wanted = latest_rows(features_path)
    total, written, offset = int(wanted.sum()), 0, 0
    columns = [schema.JOIN_KEY, schema.TIMESTAMP, *schema.FEATURE_NAMES]
    parquet = pq.ParquetFile(features_path)
    conn = client.connection_pool.get_connection()
    try:
        for batch in parquet.iter_batches(batch_size=LOAD_BATCH_ROWS, columns=columns):
            take = wanted[offset:offset + batch.num_rows]
            offset += batch.num_rows
            if not take.any():
                continue
            batch = batch.filter(pa.array(take))
            matrix = np.column_stack([batch.column(name).to_numpy() for name in schema.FEATURE_NAMES])
            commands = _hset_commands(layout, batch.column(schema.JOIN_KEY).to_numpy(),
                                      batch.column(schema.TIMESTAMP).cast(pa.timestamp("us", tz="UTC"))
                                      .cast(pa.int64()).to_numpy(), matrix)
            conn.send_packed_command([b"".join(commands)], check_health=False)
            for _ in commands:
                conn.read_response()  # an error reply raises here
            written += len(commands)
            if progress:
                progress(written, total)
    except BaseException:
        conn.disconnect()  # replies may be left unread
        raise
    finally:
        client.connection_pool.release(conn)
    return written


def log_progress(every_seconds: float = 2.0) -> Callable[[int, int], None]:
    """A progress callback that logs at most every ``every_seconds``, and at the end."""
    started = last = time.monotonic()

    def report(done: int, total: int) -> None:
        nonlocal last
        now = time.monotonic()
        if done == total or now - last >= every_seconds:
            last = now
            log.info("feast: %d/%d entities written to Redis (%.0f/s)", done, total,
                     done / max(now - started, 1e-9))
    return report

