"""The online store as ``/predict`` reads it: feature lookups, with a back-off.

Two readers, one interface (``read(entity_ids)``, ``reachable()``):

- :class:`RedisOnlineReader`: straight from Redis in Feast's layout (the
  bytes come from :mod:`pipeline.redis_layout`): one HMGET per entity,
  bounded socket timeouts, no retries; on a Redis Cluster each HMGET goes to
  the master of its key's slot (:mod:`pipeline.redis_cluster`);
- :class:`FeastSqliteReader`: Feast's SQLite online store, through Feast's SDK.

:class:`OnlineFeatures` wraps either and decides when the store counts as down.
A failure to connect (refused, reset, no route: the store is gone, or says
so) makes lookups fail fast (503, no wait) for ``online_backoff_seconds`` at once; then
the next lookup tries the store again. A late read (the command was sent, no
answer within the socket timeout; a connect or AUTH without an answer in time
too) is not enough on its own: on a busy machine
a healthy Redis answers late now and then. That request gets its 503, and so
do the requests that were already waiting behind it (they would otherwise wait
out another timeout); the store is declared down for everyone only after
``online_failures_before_backoff`` lookups in a row found it unreachable. A
frozen store thus costs one socket timeout per back-off, not one per request,
and one slow answer costs one request, not a back-off of them. The back-off
runs on a clock the caller gives (``time.monotonic`` by default), so tests can
move time themselves.

Answers to clients say what is wrong in words; addresses, paths and exception
texts go to the log only.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from pipeline.errors import OnlineStoreUnavailable, PipelineError, UnknownEntity
from pipeline.redis_cluster import closed_while_idle
from pipeline.schema import Schema
from pipeline.settings import Settings

log = logging.getLogger(__name__)


class StoreUnreachable(Exception):
    """A lookup that found the store unreachable: ``late`` when a command was sent and
    no answer came in time, else the store could not be reached at all. ``why`` is
    the public wording; ``cause`` (with addresses) is for the log."""

    def __init__(self, why: str, cause: BaseException | None = None, *, late: bool = False) -> None:
        super().__init__(why)
        self.why, self.cause, self.late = why, cause, late


class StoreDown(OnlineStoreUnavailable):
    """The 503 a client gets: what is wrong in words, no address or exception text."""

    def __init__(self, why: str) -> None:
        PipelineError.__init__(self, f"online store unreachable ({why}); retry shortly")


class Reader(Protocol):
    def read(self, entity_ids: Sequence[int]) -> list[list[float] | None]:
        """Feature values per entity, in schema order; None for an unknown entity."""

    def reachable(self) -> tuple[bool, str]:
        """Whether the store answers now, and a word on which store it is."""


def _said(message: str, *args) -> None:
    """Log a readiness problem once, not on every probe (a probe comes every few seconds)."""
    if _said.last != message:
        _said.last = message
        log.warning(message, *args)


_said.last = None


class RedisOnlineReader:
    """The feature view read straight from Redis, in Feast's own layout.

    One HMGET per entity (pipelined for a batch), without the SDK's per-call
    registry and response work: the floor of a lookup. Each thread keeps one
    redis-py ``Connection`` and sends the command the layout packed, skipping
    the client's per-command layers (pool checkout, retry and observability
    hooks: about half of a lookup's CPU here); a connection that fails is
    dropped, and the next lookup opens a fresh one. A test holds the reader
    equal to ``get_online_features``. With ``routes`` (a Redis Cluster) the
    HMGETs go by slot, one connection per node and thread, and ``client`` is unused.
    """

    def __init__(self, client, schema: Schema, routes=None) -> None:
        from pipeline.redis_layout import FeastRedisLayout

        self.client, self.routes = client, routes
        self.layout = FeastRedisLayout(schema)
        self._local = threading.local()

    def _roundtrip(self, keys: list[bytes]) -> list[list[bytes | None]]:
        import redis

        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self.client.connection_pool.make_connection()
        elif closed_while_idle(conn):
            # The server closed it (its `timeout`, a restart, a proxy). Reconnect
            # before sending, as redis-py's pool does, so a request never pays
            # for a dead connection nor retries after a send.
            conn.disconnect()
        try:
            try:
                conn.connect()  # at once when connected; else connect and AUTH, each bounded by the timeout
            except (redis.exceptions.TimeoutError, TimeoutError) as exc:
                # no answer in time (to the handshake, or to AUTH): as late as a late read
                raise StoreUnreachable("no answer in time", exc, late=True) from exc
            except (redis.exceptions.ConnectionError, OSError) as exc:  # refused, reset, no route
                raise StoreUnreachable("cannot connect", exc) from exc
            try:
                conn.send_packed_command([self.layout.hmget(keys)], check_health=False)
                return [conn.read_response() for _ in keys]
            except (redis.exceptions.TimeoutError, TimeoutError) as exc:
                raise StoreUnreachable("no answer in time", exc, late=True) from exc
            except (redis.exceptions.ConnectionError, ConnectionError) as exc:
                raise StoreUnreachable("connection lost", exc) from exc
        except BaseException:
            conn.disconnect()  # unknown state (timeout, half-read replies): start afresh next time
            self._local.conn = None
            raise

    def read(self, entity_ids: Sequence) -> list[list[float] | None]:
        """Feature values per entity, in schema order; None for an unknown entity."""
        keys = self.layout.keys(entity_ids)
        if self.routes is None:
            rows = self._roundtrip(keys)
        else:  # errors are redis-py's: unreachable() below tells a late answer from a refusal
            rows = self.routes.roundtrip(keys, self.layout.hmget, lambda key: ["HMGET", key, *self.layout.fields])
        return [self.layout.decode(raw) for raw in rows]

    def reachable(self) -> tuple[bool, str]:
        """Redis answers and holds the feature view: the feast stage's marker is there
        (a Redis that restarted empty answers PING but would 404 every entity)."""
        from pipeline.redis_layout import loaded_marker

        try:
            client = self.client if self.routes is None else self.routes.client
            loaded = client.exists(loaded_marker(self.layout.schema))
        except Exception as exc:
            _said("serve: the online store (redis) does not answer: %s: %s", type(exc).__name__, exc)
            return False, "redis: unreachable (see the server log)"
        if not loaded:
            _said("serve: redis answers but holds no %s features (no marker from the feast stage)",
                  self.layout.schema.feature_view)
            return False, "redis: reachable but holds no features for this feature view; run the feast stage"
        _said.last = None
        return True, "redis: reachable, features loaded"


class FeastSqliteReader:
    """Feast's SQLite online store, through Feast's SDK.

    The store is reopened when its file was replaced (another inode: the
    pipeline rebuilt it, or it was deleted and made again); without that, the
    open SQLite connection would keep reading the deleted file for ever. While
    the file is missing, lookups fail (503) and ``reachable()`` says so.
    """

    def __init__(self, settings: Settings, schema: Schema) -> None:
        self.settings = settings
        self.schema = schema
        self.path = settings.feast_dir / "online_store.db"
        self._lock = threading.Lock()
        self.store, self._identity = None, None
        self._open()

    def _file_identity(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return st.st_dev, st.st_ino

    def _open(self) -> None:
        from pipeline.feast import open_store

        self._identity = self._file_identity()
        self.store = open_store(self.settings)

    def _current_store(self):
        identity = self._file_identity()
        if identity is None:
            raise StoreUnreachable("the online store's file is missing; run the pipeline (feast stage)")
        if identity != self._identity:
            with self._lock:
                if identity != self._identity:
                    log.info("serve: %s was replaced; reopening Feast's online store", self.path)
                    self._open()
        return self.store

    def read(self, entity_ids: Sequence[int]) -> list[list[float] | None]:
        from pipeline.feast import online_features

        values = online_features(self._current_store(), self.schema, list(entity_ids))
        columns = [values[name] for name in self.schema.feature_names]
        return [None if any(col[i] is None for col in columns) else [col[i] for col in columns]
                for i in range(len(entity_ids))]

    def reachable(self) -> tuple[bool, str]:
        if self._file_identity() is None:
            _said("serve: the online store file %s is missing", self.path)
            return False, "sqlite: the online store's file is missing; run the pipeline (feast stage)"
        _said.last = None
        return True, "sqlite: present"


def unreachable(exc: BaseException) -> StoreUnreachable | None:
    """The failure as a :class:`StoreUnreachable` when it means the store cannot be
    reached (as opposed to a bug), else None."""
    import redis

    if isinstance(exc, StoreUnreachable):
        return exc
    if isinstance(exc, (redis.exceptions.TimeoutError, TimeoutError)):
        return StoreUnreachable("no answer in time", exc, late=True)
    if isinstance(exc, (redis.exceptions.ConnectionError, ConnectionError)):
        return StoreUnreachable("cannot connect", exc)
    return None


class OnlineFeatures:
    """Lookups through a reader, failing fast for a while once the store is down.

    ``on_read(seconds)`` is told how long each read of the store took;
    ``on_unreachable()`` each lookup that failed because the store is
    unreachable (a fast-failed one included).
    """

    def __init__(self, reader: Reader, schema: Schema, backoff_seconds: float, *,
                 failures_before_backoff: int = 2,
                 clock: Callable[[], float] = time.monotonic,
                 on_read: Callable[[float], None] | None = None,
                 on_unreachable: Callable[[], None] | None = None) -> None:
        self.reader = reader
        self.schema = schema
        self._names = schema.feature_names
        self.backoff_seconds = backoff_seconds
        self.failures_before_backoff = failures_before_backoff
        self.clock = clock
        self._on_read = on_read or (lambda seconds: None)
        self._on_unreachable = on_unreachable or (lambda: None)
        self._lock = threading.Lock()
        self._down_until = float("-inf")  # clock time until which lookups fail fast
        self._down_why = "recently unreachable"
        self._failures = 0  # lookups in a row that found the store unreachable
        self._late_at = float("-inf")  # when the last late read gave up

    def lookup(self, entity_ids: list, arrived: float | None = None) -> tuple[np.ndarray, list[dict[str, float]]]:
        """Features of each entity, as a matrix in model order and as dicts.

        ``arrived``: when the request came in (on this object's clock); a request
        that waited while a late read gave up fails at once instead of waiting
        out another timeout."""
        now = self.clock()
        if now < self._down_until:
            self._on_unreachable()
            raise StoreDown(self._down_why)
        if self._failures and arrived is not None and arrived < self._late_at:
            self._on_unreachable()
            raise StoreDown("no answer in time")
        started = time.perf_counter()
        try:
            rows = self.reader.read(entity_ids)
        except Exception as exc:
            failure = unreachable(exc)
            if failure is None:
                raise
            self._failed(failure)
            self._on_unreachable()
            raise StoreDown(failure.why) from exc
        finally:
            self._on_read(time.perf_counter() - started)
        if self._failures:
            with self._lock:
                self._failures = 0
            log.info("serve: the online store answers again")
        unknown = [e for e, row in zip(entity_ids, rows) if row is None]
        if unknown:
            raise UnknownEntity(self.schema.join_key, unknown)
        names = self._names
        matrix = np.asarray(rows, dtype=np.float64).reshape(len(rows), len(names))
        return matrix, [dict(zip(names, row)) for row in rows]

    def _failed(self, failure: StoreUnreachable) -> None:
        cause = failure.cause or failure
        with self._lock:
            now = self.clock()
            self._failures += 1
            if failure.late:
                self._late_at = now
            if failure.late and self._failures < self.failures_before_backoff:
                log.warning("serve: a late answer from the online store (%d of %d before backing off): %s: %s",
                            self._failures, self.failures_before_backoff, type(cause).__name__, cause)
                return
            self._down_until, self._down_why = now + self.backoff_seconds, failure.why
        log.warning("serve: the online store is unreachable (%s: %s); answering 503 for %.2fs, then trying again",
                    type(cause).__name__, cause, self.backoff_seconds)

    def reachable(self) -> tuple[bool, str]:
        return self.reader.reachable()


def open_online(settings: Settings, schema: Schema, **options) -> OnlineFeatures:
    """The configured store: Redis when ``MLOPS_REDIS_URL`` is set, Feast's SQLite
    store otherwise. ``options`` go to :class:`OnlineFeatures`."""
    if settings.redis_url and settings.redis_cluster:
        from pipeline.redis_cluster import ClusterRoutes, cluster_options

        routes = ClusterRoutes(cluster_options(settings, settings.online_timeout_seconds))
        reader: Reader = RedisOnlineReader(None, schema, routes)
    elif settings.redis_url:
        from pipeline.redis_layout import connect

        reader = RedisOnlineReader(connect(settings, settings.online_timeout_seconds), schema)
    else:
        reader = FeastSqliteReader(settings, schema)
    return OnlineFeatures(reader, schema, settings.online_backoff_seconds,
                          failures_before_backoff=settings.online_failures_before_backoff, **options)
