"""The feast stage's Redis loader: the latest features of every entity written in Feast's layout.

What ``feast materialize`` writes for a window holding every row, packed by
:class:`pipeline.redis_layout.FeastRedisLayout` (the one key and value encoder)
and pipelined in batches, to one Redis or to each master of a Redis Cluster
(:mod:`pipeline.redis_cluster`). Tests hold it to the bytes ``feast
materialize`` writes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import redis

from pipeline.errors import ConfigError
from pipeline.redis_cluster import NodeConnections, exchange
from pipeline.redis_layout import FeastRedisLayout, split_command
from pipeline.schema import Schema

log = logging.getLogger(__name__)

# Rows read from Parquet and entities sent to Redis per pipelined round trip.
LOAD_BATCH_ROWS = 20_000


def latest_rows(features_path: Path, schema: Schema) -> np.ndarray:
    """A mask over the file's rows: the latest event per entity (on a tie, the later row).

    Reads only the key and time columns (16 bytes a row), so the memory it
    needs is a small fraction of the file.
    """
    table = pq.read_table(features_path, columns=[schema.join_key, schema.timestamp])
    order = pc.sort_indices(table, sort_keys=[(schema.join_key, "ascending"),
                                              (schema.timestamp, "ascending")]).to_numpy()
    keys = table.column(schema.join_key).to_numpy()[order]
    del table
    last = np.ones(len(order), dtype=bool)
    last[:-1] = keys[1:] != keys[:-1]  # stable sort: the last of each run is the latest
    mask = np.zeros(len(order), dtype=bool)
    mask[order[last]] = True
    return mask


def load_latest(client, features_path: Path, schema: Schema,
                progress: Callable[[int, int], None] | None = None) -> int:
    """Write the latest features of every entity into Redis in Feast's layout.

    What ``feast materialize`` writes for a window holding every row: one HSET per
    entity (:meth:`FeastRedisLayout.hset`), pipelined in batches on one connection
    (a ``RedisCluster``: one per master, each HSET to its key's slot's master).
    Overwrites, so a re-run finishes an interrupted load. Returns the entities written.
    Integer keys only (fixed length: fast packing); string keys go to ``feast materialize``."""
    if not schema.int_keys:
        raise ValueError("load_latest packs integer entity keys only")
    layout = FeastRedisLayout(schema)
    wanted = latest_rows(features_path, schema)
    total, written, offset = int(wanted.sum()), 0, 0
    columns = [schema.join_key, schema.timestamp, *schema.feature_names]
    parquet = pq.ParquetFile(features_path)
    cluster = isinstance(client, redis.cluster.RedisCluster)
    conn = NodeConnections(client) if cluster else client.connection_pool.get_connection()
    try:
        for batch in parquet.iter_batches(batch_size=LOAD_BATCH_ROWS, columns=columns):
            take = wanted[offset:offset + batch.num_rows]
            offset += batch.num_rows
            if not take.any():
                continue
            batch = batch.filter(pa.array(take))
            ids = batch.column(schema.join_key).to_numpy()
            matrix = np.column_stack([batch.column(name).to_numpy() for name in schema.feature_names])
            commands = layout.hset(ids, batch.column(schema.timestamp).cast(pa.timestamp("us", tz="UTC"))
                                   .cast(pa.int64()).to_numpy(), matrix)
            if cluster:
                exchange(client, layout.keys(ids), lambda at: b"".join(commands[i] for i in at), conn,
                         lambda i: client.execute_command(*split_command(commands[i])))
            else:
                conn.send_packed_command([b"".join(commands)], check_health=False)
                for _ in commands:
                    conn.read_response()  # an error reply raises here
            written += len(commands)
            if progress:
                progress(written, total)
    except redis.exceptions.MovedError:
        conn.disconnect()
        raise ConfigError("MLOPS_REDIS_URL names a node of a Redis Cluster: set MLOPS_REDIS_CLUSTER=true") from None
    except BaseException:
        conn.disconnect()  # replies may be left unread
        raise
    finally:
        conn.release() if cluster else client.connection_pool.release(conn)
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
