"""Redis Cluster as the online store: the client, and the slot routing of packed commands.

With ``MLOPS_REDIS_CLUSTER`` the Redis URL names one node of a Redis Cluster.
redis-py's :class:`redis.cluster.RedisCluster` learns the slot map from it;
the commands :mod:`pipeline.redis_layout` packs (HSET to load, HMGET to read)
are then sent straight to the master that holds each key's slot, split by
node and pipelined on one connection per node, without the client's
per-command work. One entity is one hash key, so a single-entity lookup is one
HMGET to one node; a batch spans slots and goes to each node it touches, every
node sent to before any is read.

A redirection (``MOVED``/``ASK``, a slot moving or moved) is answered by
sending that command again through ``RedisCluster`` itself, which follows it
and updates its map. A node that cannot be reached, or a cluster that says it
is down (``CLUSTERDOWN``: no master for some slot yet), is a
``ConnectionError`` at once (no retries, as with one Redis: the
caller's back-off decides when to try again), and the next exchange first
asks the cluster for its slot map again, so once a replica has taken over its
failed master's slots the lookups find it by themselves.

Nothing here knows Feast's layout: it moves bytes. The connection helpers the
single-Redis path uses too live here, below both readers.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import redis
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import AskError, ClusterDownError, MovedError
from redis.retry import Retry

from pipeline.errors import ConfigError
from pipeline.settings import Settings

# Replies that name another node for the key (a slot moving or moved): the command is sent again
# through RedisCluster. CLUSTERDOWN (no master for some slot, as while a replica takes over) is
# the store being unreachable, not a redirection.
REDIRECTS = (MovedError, AskError)


def closed_while_idle(conn) -> bool:
    """An idle connection with something to read (or an EOF) is no longer usable."""
    try:
        return conn.can_read(timeout=0)
    except (redis.exceptions.ConnectionError, OSError):
        return True


def cluster_options(settings: Settings, timeout_seconds: float) -> dict:
    """``RedisCluster``'s arguments: the node the URL names, bounded socket timeouts, no retries."""
    host, port, db, password = settings.redis_parts()
    if db:
        raise ConfigError(f"MLOPS_REDIS_URL names database {db}, but a Redis Cluster has only "
                          "database 0; end the URL with /0 (or unset MLOPS_REDIS_CLUSTER for one Redis)")
    return dict(host=host, port=port, password=password, socket_timeout=timeout_seconds,
                socket_connect_timeout=timeout_seconds, retry=Retry(NoBackoff(), 0),
                **settings.redis_tls_options())


def connect_cluster(options: dict) -> redis.cluster.RedisCluster:
    """A ``RedisCluster`` that has read the slot map (it connects when made). A cluster
    that cannot be reached, or a node not in cluster mode, is a ``ConnectionError``
    saying so, as an unreachable single Redis is."""
    try:
        return redis.cluster.RedisCluster(**options)
    except redis.exceptions.RedisClusterException as exc:
        raise redis.exceptions.ConnectionError(
            f"no Redis Cluster answers at {options['host']}:{options['port']} ({exc}); start the cluster, "
            "or unset MLOPS_REDIS_CLUSTER if that address is a single Redis") from exc


def refresh(client) -> None:
    """Ask the cluster for its slot map again (after a node failed)."""
    try:
        client.nodes_manager.initialize()
    except redis.exceptions.RedisClusterException as exc:
        raise redis.exceptions.ConnectionError(f"the Redis Cluster's slot map: {exc}") from exc


def by_node(client, keys: Sequence[bytes]) -> dict[str, tuple[object, list[int]]]:
    """The positions of ``keys`` grouped by the master that holds their slot."""
    groups: dict[str, tuple[object, list[int]]] = {}
    # The map itself rather than get_node_from_slot (a lock and options per key): a refresh
    # replaces the whole dict, so the one read here is a consistent map.
    slots = client.nodes_manager.slots_cache
    for i, key in enumerate(keys):
        owners = slots.get(key_slot(key))
        if not owners:
            raise redis.exceptions.ConnectionError(f"the Redis Cluster's slot map has no node for {key!r}")
        groups.setdefault(owners[0].name, (owners[0], []))[1].append(i)
    return groups


def exchange(client, keys: Sequence[bytes], pack: Callable[[list[int]], bytes],
             connection: Callable[[object], object], resend: Callable[[int], object]) -> list:
    """Send the commands on ``keys`` to the nodes holding them and return the replies in order.

    ``pack(positions)`` gives the RESP of those commands, ``connection(node)`` a
    connected redis-py ``Connection`` to a node, ``resend(position)`` runs one
    command through ``RedisCluster`` (for a redirected one). Every node is
    sent to before any is read. A connection or timeout error propagates:
    the connections it used are then in an unknown state (the caller drops them).
    """
    groups = list(by_node(client, keys).values())
    sent = []
    for node, positions in groups:
        conn = connection(node)
        conn.send_packed_command([pack(positions)], check_health=False)
        sent.append((conn, positions))
    replies: list = [None] * len(keys)
    redirected, failure = [], None
    for conn, positions in sent:
        for i in positions:
            try:
                replies[i] = conn.read_response()
            except REDIRECTS:
                redirected.append(i)  # the reply was read whole: the connection stays in step
            except ClusterDownError as exc:
                failure = failure or redis.exceptions.ConnectionError(f"the Redis Cluster is down: {exc}")
            except redis.exceptions.ResponseError as exc:
                failure = failure or exc
    if failure is not None:
        raise failure
    for i in redirected:
        replies[i] = resend(i)
    return replies


class ClusterRoutes:
    """Slot routing for a reader that serves many threads: one ``RedisCluster``
    (made on first use, so a server starts while the cluster is down) and, per
    thread, one connection per node. After a failed exchange the next one
    reads the slot map again and every thread starts on fresh connections."""

    def __init__(self, options: dict) -> None:
        self.options = options
        self._client = None
        self._lock = threading.Lock()
        self._local = threading.local()
        self._epoch = 0  # slot maps read so far; a thread's connections belong to one
        self._stale = False

    @property
    def client(self):
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = connect_cluster(self.options)
        return self._client

    def _connections(self) -> dict:
        if self._stale:
            with self._lock:
                if self._stale:
                    refresh(self.client)
                    self._epoch += 1
                    self._stale = False
        local = self._local
        if getattr(local, "epoch", None) != self._epoch:
            for conn in getattr(local, "conns", {}).values():
                conn.disconnect()
            local.conns, local.epoch = {}, self._epoch
        return local.conns

    def roundtrip(self, keys: Sequence[bytes], pack: Callable[[list[bytes]], bytes],
                  resend_args: Callable[[bytes], list]) -> list:
        """The replies to ``pack([key])`` per key, each sent to the node holding the key.
        ``resend_args(key)``: the command as arguments, for a redirected one."""
        client = self.client
        conns = self._connections()

        def connection(node):
            conn = conns.get(node.name)
            if conn is None:
                conn = conns[node.name] = client.get_redis_connection(node).connection_pool.make_connection()
            elif closed_while_idle(conn):
                conn.disconnect()  # the node closed it (its `timeout`, a restart): reconnect before sending
            conn.connect()  # at once when connected; else connect and AUTH, each bounded by the timeout
            return conn

        try:
            return exchange(client, keys, lambda at: pack([keys[i] for i in at]), connection,
                            lambda i: client.execute_command(*resend_args(keys[i])))
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError):
            for conn in conns.values():
                conn.disconnect()
            conns.clear()
            self._stale = True  # a node failed: read the slot map again before the next exchange
            raise


class NodeConnections:
    """One pooled connection per master for a bulk write (the loader), as ``exchange``'s
    ``connection``; :meth:`disconnect` after a failure, :meth:`release` at the end."""

    def __init__(self, client) -> None:
        self.client, self.held = client, {}

    def __call__(self, node):
        if node.name not in self.held:
            pool = self.client.get_redis_connection(node).connection_pool
            self.held[node.name] = (pool, pool.get_connection())
        return self.held[node.name][1]

    def disconnect(self) -> None:
        for _, conn in self.held.values():
            conn.disconnect()

    def release(self) -> None:
        for pool, conn in self.held.values():
            pool.release(conn)
        self.held.clear()
