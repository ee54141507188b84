"""The online store as ``/predict`` reads it: feature lookups, with a back-off.

Two readers, one interface (``read(entity_ids)``, ``reachable()``):

- :class:`RedisOnlineReader`: straight from Redis in Feast's layout (the
  bytes come from :mod:`pipeline.redis_layout`): one HMGET per entity,
  bounded socket timeouts, no retries;
- :class:`FeastSqliteReader`: Feast's SQLite online store, through Feast's SDK.

:class:`OnlineFeatures` wraps either: once a lookup finds the store
unreachable, lookups fail fast (503, no wait) for ``online_backoff_seconds``;
then the next one tries the store again. So a hung Redis costs one socket
timeout per back-off, not one per request, and requests do not queue behind
each other's timeouts. The back-off runs on a clock the caller gives
(``time.monotonic`` by default), so tests can move time themselves.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from pipeline.errors import OnlineStoreUnavailable, UnknownEntity
from pipeline.schema import Schema
from pipeline.settings import Settings


class Reader(Protocol):
    def read(self, entity_ids: Sequence[int]) -> list[list[float] | None]:
        """Feature values per entity, in schema order; None for an unknown entity."""

    def reachable(self) -> tuple[bool, str]:
        """Whether the store answers now, and a word on which store it is."""


def _closed_while_idle(conn) -> bool:
    """An idle connection with something to read (or an EOF) is no longer usable."""
    import redis

    try:
        return conn.can_read(timeout=0)
    except (redis.exceptions.ConnectionError, OSError):
        return True


class RedisOnlineReader:
    """The feature view read straight from Redis, in Feast's own layout.

    One HMGET per entity (pipelined for a batch), without the SDK's per-call
    registry and response work: the floor of a lookup. Each thread keeps one
    redis-py ``Connection`` and sends the command the layout packed, skipping
    the client's per-command layers (pool checkout, retry and observability
    hooks: about half of a lookup's CPU here); a connection that fails is
    dropped, and the next lookup opens a fresh one. A test holds the reader
    equal to ``get_online_features``.
    """

    def __init__(self, client, schema: Schema) -> None:
        from pipeline.redis_layout import FeastRedisLayout

        self.client = client
        self.layout = FeastRedisLayout(schema)
        self._local = threading.local()

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
            conn.send_packed_command([self.layout.hmget(keys)], check_health=False)
            return [conn.read_response() for _ in keys]
        except BaseException:
            conn.disconnect()  # unknown state (timeout, half-read replies): start afresh next time
            self._local.conn = None
            raise

    def read(self, entity_ids: Sequence) -> list[list[float] | None]:
        """Feature values per entity, in schema order; None for an unknown entity."""
        rows = self._roundtrip(self.layout.keys(entity_ids))
        return [self.layout.decode(raw) for raw in rows]

    def reachable(self) -> tuple[bool, str]:
        try:
            self.client.ping()
            return True, "redis"
        except Exception as exc:
            return False, f"redis: {type(exc).__name__}: {exc}"


class FeastSqliteReader:
    """Feast's SQLite online store, through Feast's SDK."""

    def __init__(self, settings: Settings, schema: Schema) -> None:
        from pipeline.feast import open_store

        self.schema = schema
        self.store = open_store(settings)
        self.path = settings.feast_dir / "online_store.db"

    def read(self, entity_ids: Sequence[int]) -> list[list[float] | None]:
        from pipeline.feast import online_features

        values = online_features(self.store, self.schema, list(entity_ids))
        columns = [values[name] for name in self.schema.feature_names]
        return [None if any(col[i] is None for col in columns) else [col[i] for col in columns]
                for i in range(len(entity_ids))]

    def reachable(self) -> tuple[bool, str]:
        return self.path.is_file(), f"sqlite {self.path}"


def is_unreachable(exc: BaseException) -> bool:
    """A failure that means the store cannot be reached (as opposed to a bug)."""
    import redis

    return isinstance(exc, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
                            ConnectionError, TimeoutError))


class OnlineFeatures:
    """Lookups through a reader, failing fast for a while once the store is unreachable.

    ``on_read(seconds)`` is told how long each read of the store took;
    ``on_unreachable()`` each lookup that failed because the store is
    unreachable (a fast-failed one included).
    """

    def __init__(self, reader: Reader, schema: Schema, backoff_seconds: float, *,
                 clock: Callable[[], float] = time.monotonic,
                 on_read: Callable[[float], None] | None = None,
                 on_unreachable: Callable[[], None] | None = None) -> None:
        self.reader = reader
        self.schema = schema
        self.backoff_seconds = backoff_seconds
        self.clock = clock
        self._on_read = on_read or (lambda seconds: None)
        self._on_unreachable = on_unreachable or (lambda: None)
        self._down_until = float("-inf")  # clock time until which lookups fail fast
        self._last_error: BaseException | None = None

    def lookup(self, entity_ids: list[int]) -> tuple[np.ndarray, list[dict[str, float]]]:
        """Features of each entity, as a matrix in model order and as dicts."""
        if self.clock() < self._down_until:
            self._on_unreachable()
            raise OnlineStoreUnavailable(self._last_error or ConnectionError("store unreachable"))
        started = time.perf_counter()
        try:
            rows = self.reader.read(entity_ids)
        except Exception as exc:
            if is_unreachable(exc):
                self._last_error = exc
                self._down_until = self.clock() + self.backoff_seconds
                self._on_unreachable()
                raise OnlineStoreUnavailable(exc) from exc
            raise
        finally:
            self._on_read(time.perf_counter() - started)
        unknown = [e for e, row in zip(entity_ids, rows) if row is None]
        if unknown:
            raise UnknownEntity(self.schema.join_key, unknown)
        names = self.schema.feature_names
        matrix = np.asarray(rows, dtype=np.float64).reshape(len(rows), len(names))
        return matrix, [dict(zip(names, row)) for row in rows]

    def reachable(self) -> tuple[bool, str]:
        return self.reader.reachable()


def open_online(settings: Settings, schema: Schema, **options) -> OnlineFeatures:
    """The configured store: Redis when ``MLOPS_REDIS_URL`` is set, Feast's SQLite
    store otherwise. ``options`` go to :class:`OnlineFeatures`."""
    if settings.redis_url:
        from pipeline.redis_layout import connect

        reader: Reader = RedisOnlineReader(connect(settings, settings.online_timeout_seconds), schema)
    else:
        reader = FeastSqliteReader(settings, schema)
    return OnlineFeatures(reader, schema, settings.online_backoff_seconds, **options)
