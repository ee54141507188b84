"""One load of the Redis online store, in a process of its own (its peak memory is
the loader's): ``feast materialize`` or this project's loader, same file.

    python -m benchmarks.load_child materialize|loader FEATURES.parquet SHARED REDIS_URL

Prints seconds, peak MiB and the number of keys written, as JSON.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.dataset import CUSTOMERS as schema
from pipeline.feast import definitions, open_store
from pipeline.redis_layout import connect
from pipeline.redis_loader import load_latest
from pipeline.settings import Settings

HOW = ("materialize", "loader")


def load(how: str, features: Path, shared: Path, url: str) -> dict:
    settings = Settings(shared_dir=shared, redis_url=url, mlflow_tracking_uri=None)
    store = open_store(settings)
    store.apply(definitions(features, schema))
    client = connect(settings, 60)
    client.flushdb()
    span = pc.min_max(pq.read_table(features, columns=[schema.timestamp]).column(schema.timestamp))
    started = time.monotonic()
    if how == "materialize":
        store.materialize(start_date=span["min"].as_py(), end_date=span["max"].as_py(),
                          feature_views=[schema.feature_view])
    else:
        load_latest(client, features, schema)
    return {"seconds": time.monotonic() - started,
            "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "keys": client.dbsize()}


if __name__ == "__main__":
    how, features, shared, url = sys.argv[1:5]
    if how not in HOW:
        raise SystemExit(f"usage: python -m benchmarks.load_child {'|'.join(HOW)} FEATURES SHARED REDIS_URL")
    print(json.dumps(load(how, Path(features), Path(shared), url)))
