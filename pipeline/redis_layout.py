"""Feast's Redis online-store layout: the bytes, written and read without the SDK's per-row work.

Feast (``entity_key_serialization_version: 3``) keeps one Redis hash per
entity. Its key is ``serialize_entity_key(EntityKey) + project``; each feature
is a field named ``murmur3("<view>:<feature>")`` holding a ``ValueProto``; the
field ``_ts:<view>`` holds the event time as a protobuf ``Timestamp``.

Each fact is written once here: :func:`bulk` / :func:`frame` pack the Redis
protocol (RESP) for every command sent; :class:`FeastRedisLayout` holds the one
key encoder, the one value encoder (:meth:`~FeastRedisLayout.encode_doubles`)
and the one value decoder (:meth:`~FeastRedisLayout.decode`), and packs both
commands that use them: the HMGET that ``/predict`` reads with
(:mod:`pipeline.online`) and the HSET that :mod:`pipeline.redis_loader` writes
with (the feast stage, instead of ``feast materialize`` on Redis). When it is
made it runs that very packing and decoding on probe values and compares them
with Feast's own helpers and protos, so a Feast release that changes the layout
fails loudly here. Tests hold the loader to the bytes ``feast materialize``
writes (on one Redis and on a Redis Cluster) and the reader to Feast's SDK.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy as np
import redis

from pipeline.errors import LayoutChanged
from pipeline.redis_cluster import cluster_options, connect_cluster
from pipeline.schema import ENTITY_ID_MAX, Schema
from pipeline.settings import Settings

KEY_SERIALIZATION_VERSION = 3
# Up to this many integer keys are packed one by one (struct), more at once (numpy).
FEW_KEYS = 16


def connect(settings: Settings, timeout_seconds: float):
    """A redis-py client for the online store (a ``RedisCluster`` with ``MLOPS_REDIS_CLUSTER``): bounded
    socket timeouts, no retries, so an unreachable Redis is an error within ``timeout_seconds``."""
    if settings.redis_cluster:
        return connect_cluster(cluster_options(settings, timeout_seconds))
    host, port, db, password = settings.redis_parts()
    return redis.Redis(host=host, port=port, db=db, password=password, socket_timeout=timeout_seconds,
                       socket_connect_timeout=timeout_seconds, retry=None, **settings.redis_tls_options())


# ---------------------------------------------------------------- RESP
def bulk(part: bytes) -> bytes:
    """One RESP bulk string: ``$<length> CRLF <bytes> CRLF``."""
    return b"$%d\r\n%s\r\n" % (len(part), part)


def frame(parts: Sequence[bytes], count: int | None = None) -> tuple[bytes, list[int]]:
    """A command as RESP (an array of bulk strings), and where each part's bytes start.

    ``count`` is the array's length when more parts follow, appended later with
    :func:`bulk`. The offsets let fixed-length parts (keys, values) be filled in
    for many rows at once with numpy.
    """
    out, starts = [b"*%d\r\n" % (len(parts) if count is None else count)], []
    at = len(out[0])
    for part in parts:
        head = b"$%d\r\n" % len(part)
        starts.append(at + len(head))
        out.append(head + part + b"\r\n")
        at += len(out[-1])
    return b"".join(out), starts


def split_command(packed: bytes) -> list[bytes]:
    """The parts of one RESP command: the inverse of :func:`frame`, for the start-up check."""
    count, _, rest = packed.partition(b"\r\n")
    parts = []
    for _ in range(int(count[1:])):
        length, _, rest = rest.partition(b"\r\n")
        size = int(length[1:])
        parts.append(rest[:size])
        rest = rest[size + 2:]
    if rest:
        raise ValueError(f"{len(rest)} bytes after the command")
    return parts


# ------------------------------------------------------------- the layout
class FeastRedisLayout:
    """Keys, field names and value bytes of one feature view, as Feast writes them,
    and the two commands that use them (HMGET to read, HSET to write)."""

    def __init__(self, schema: Schema) -> None:
        from feast.infra.online_stores.helpers import _mmh3, _redis_key
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey
        from feast.protos.feast.types.Value_pb2 import Value
        from google.protobuf.timestamp_pb2 import Timestamp

        self._redis_key, self._entity_key, self.value_proto, self._timestamp = (
            _redis_key, EntityKey, Value, Timestamp)
        self.schema = schema
        self.project = project = schema.project
        self.fields = [_mmh3(f"{schema.feature_view}:{name}") for name in schema.feature_names]
        self.ts_field = f"_ts:{schema.feature_view}".encode()
        # An int64 entity key is a fixed head, the id as 8 little-endian bytes,
        # then the project name; a double value is a tag byte and 8 such bytes.
        # (String keys have no fixed length: they are built by Feast's helper.)
        probe = self._int_key(0)
        tail = len(project.encode())
        self.key_head, self.key_tail = probe[:-8 - tail], probe[-tail:]
        self.key_len = len(probe)
        self._int64 = struct.Struct("<q")
        self.double_tag = Value(double_val=0.0).SerializeToString()[:1]
        self._width = len(self.double_tag) + 8  # bytes of one encoded double
        n = len(self.fields)
        self._doubles = struct.Struct("<" + "xd" * n)  # n x (tag byte, little-endian double)
        self._tags = self.double_tag * n
        # HMGET <key> <fields...>: the key is the only part that changes.
        self._hmget_head = frame([b"HMGET"], count=n + 2)[0]
        self._hmget_tail = b"".join(map(bulk, self.fields))
        # HSET <key> <field> <value> ... _ts:<view> <time>: every part but the
        # time has a fixed length, so the template is filled for all rows at once.
        parts = [b"HSET", bytes(self.key_len)]
        for field in self.fields:
            parts += [field, bytes(self._width)]
        parts.append(self.ts_field)
        self._hset_template, starts = frame(parts, count=len(parts) + 1)
        self._hset_key_at, self._hset_value_at = starts[1], starts[3:2 + 2 * n:2]
        self._check()

    # keys -------------------------------------------------------------------
    def _int_key(self, entity_id: int) -> bytes:
        entity = self._entity_key(join_keys=[self.schema.join_key],
                                  entity_values=[self.value_proto(int64_val=int(entity_id))])
        return self._redis_key(self.project, entity, entity_key_serialization_version=KEY_SERIALIZATION_VERSION)

    def feast_key(self, entity_id) -> bytes:
        """The entity's Redis key, by Feast's own ``_redis_key`` (slow, exact)."""
        if self.schema.int_keys:
            return self._int_key(entity_id)
        entity = self._entity_key(join_keys=[self.schema.join_key],
                                  entity_values=[self.value_proto(string_val=str(entity_id))])
        return self._redis_key(self.project, entity, entity_key_serialization_version=KEY_SERIALIZATION_VERSION)

    def key_array(self, entity_ids: np.ndarray) -> np.ndarray:
        """The Redis keys of many entities, one row of bytes each (the one key encoder)."""
        ids = np.ascontiguousarray(entity_ids, dtype="<i8")
        out = np.empty((len(ids), self.key_len), dtype=np.uint8)
        out[:] = np.frombuffer(self.key_head + bytes(8) + self.key_tail, dtype=np.uint8)
        at = len(self.key_head)
        out[:, at:at + 8] = ids.view(np.uint8).reshape(len(ids), 8)
        return out

    def keys(self, entity_ids) -> list[bytes]:
        """Redis keys of many entities at once, byte for byte what Feast builds."""
        if not self.schema.int_keys:
            return [self.feast_key(e) for e in entity_ids]
        if len(entity_ids) <= FEW_KEYS:
            # a request's few keys: the same bytes as key_array's, without numpy's per-call setup
            head, tail, pack = self.key_head, self.key_tail, self._int64.pack
            return [head + pack(int(e)) + tail for e in entity_ids]
        entity_ids = np.asarray(entity_ids, dtype=np.int64)
        packed, size = self.key_array(entity_ids).tobytes(), self.key_len
        return [packed[i:i + size] for i in range(0, len(packed), size)]

    # values -----------------------------------------------------------------
    def encode_doubles(self, matrix: np.ndarray) -> np.ndarray:
        """``ValueProto(double_val=v).SerializeToString()`` of every value, as a
        ``matrix.shape + (9,)`` byte array (the one value encoder)."""
        values = np.asarray(matrix, dtype=np.float64)
        rows = np.empty(values.shape, dtype=[("tag", "u1"), ("value", "<f8")])
        rows["tag"], rows["value"] = self.double_tag[0], values
        return rows.view(np.uint8).reshape(*values.shape, self._width)

    def decode(self, raw: Sequence[bytes | None]) -> list[float] | None:
        """One entity's feature values from its HMGET reply; None when it has none
        (the one value decoder). Straight from the bytes when they have the checked
        layout, by protobuf otherwise (a value Feast wrote in another form)."""
        if any(v is None for v in raw):
            return None
        joined = b"".join(raw)
        if len(joined) == self._doubles.size and joined[::self._width] == self._tags:
            return list(self._doubles.unpack(joined))
        return [self.value_proto.FromString(v).double_val for v in raw]

    def timestamp(self, micros: int) -> bytes:
        """The ``_ts`` field value: a protobuf Timestamp of the event time."""
        seconds, rest = divmod(int(micros), 1_000_000)
        return self._timestamp(seconds=seconds, nanos=rest * 1000).SerializeToString()

    # commands ---------------------------------------------------------------
    def hmget(self, keys: Sequence[bytes]) -> bytes:
        """RESP for one ``HMGET <key> <feature fields...>`` per key, pipelined."""
        head, tail = self._hmget_head, self._hmget_tail
        return b"".join(head + bulk(key) + tail for key in keys)

    def hset(self, ids: np.ndarray, micros: np.ndarray, matrix: np.ndarray) -> list[bytes]:
        """RESP for one ``HSET key <field> <value> ... _ts:<view> <time>`` per row."""
        n, template = len(ids), self._hset_template
        rows = np.empty((n, len(template)), dtype=np.uint8)
        rows[:] = np.frombuffer(template, dtype=np.uint8)
        rows[:, self._hset_key_at:self._hset_key_at + self.key_len] = self.key_array(ids)
        values = self.encode_doubles(matrix)
        for j, at in enumerate(self._hset_value_at):
            rows[:, at:at + self._width] = values[:, j, :]
        fixed, size = rows.tobytes(), len(template)
        return [fixed[i * size:(i + 1) * size] + bulk(self.timestamp(micros[i])) for i in range(n)]

    def _check(self) -> None:
        """Run the real HSET and HMGET packing and the real decoder on probe
        values and compare them with what Feast's own helpers and protos give."""
        from datetime import datetime, timedelta, timezone

        ids = np.array([0, 1, 1001, -7, 2**40 + 3, ENTITY_ID_MAX], dtype=np.int64)
        probes = [0.0, -0.0, 1.5, -1e300, float("inf"), float("nan"), 5e-324]
        matrix = np.resize(np.array(probes), (len(ids), len(self.fields)))
        micros = np.array([0, 1, 999_999, 1_700_000_000_123_456, 2**50, 86_400_000_000], dtype=np.int64)
        feast_keys = [self._int_key(i) for i in ids]
        # a request's few keys, then many at once (string keys are Feast's own helper's: nothing to compare)
        same_keys = not self.schema.int_keys or (self.keys(list(ids)) == feast_keys
                                                 and self.keys(np.resize(ids, FEW_KEYS + 1))[:len(ids)] == feast_keys)
        feast_values = [[self.value_proto(double_val=float(v)).SerializeToString() for v in row]
                        for row in matrix]
        feast_times = []
        for m in micros:
            stamp = self._timestamp()
            stamp.FromDatetime(datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(microseconds=int(m)))
            feast_times.append(stamp.SerializeToString())
        expected = [[b"HSET", key, *(p for pair in zip(self.fields, values) for p in pair), self.ts_field, ts]
                    for key, values, ts in zip(feast_keys, feast_values, feast_times)]
        written = [split_command(c) for c in self.hset(ids, micros, matrix)]
        same_writes = written == expected
        asked = self.hmget(self.key_array(ids).tobytes()[i * self.key_len:(i + 1) * self.key_len]
                           for i in range(len(ids)))
        same_reads = asked == b"".join(frame([b"HMGET", key, *self.fields])[0] for key in feast_keys)
        decoded = np.array([self.decode(values) for values in feast_values], dtype=np.float64)
        same_values = decoded.tobytes() == matrix.tobytes()  # bit for bit: -0.0 and NaN too
        if not (same_keys and same_writes and same_reads and same_values):
            raise LayoutChanged(
                "Feast's Redis key or value encoding is not the one pipeline/redis_layout.py writes "
                f"(keys match: {same_keys}, HSET matches: {same_writes}, HMGET matches: {same_reads}, values decode: "
                f"{same_values}); pin the Feast version in constraints.txt or update FeastRedisLayout")


def loaded_marker(schema: Schema) -> bytes:
    """The key the feast stage sets once the whole feature view is in Redis (its value: the
    features file's md5). A Redis that restarted empty has no marker, so /readyz can tell
    "reachable" from "holds the features"."""
    return f"mlops:loaded:{schema.project}:{schema.feature_view}".encode()
