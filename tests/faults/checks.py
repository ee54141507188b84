"""What "consistent" means for the shared volume after a fault: every file a
reader could open is whole, and every store opens with its own tool."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from pipeline.io import TMP_PREFIX


def assert_consistent(shared: Path) -> dict[str, int]:
    """Open everything a stage or a user could read; return what was checked."""
    checked = {"json": 0, "parquet": 0, "csv": 0, "sqlite": 0, "feast_registry": 0}
    for path in shared.rglob("*"):
        if not path.is_file() or path.name.startswith(TMP_PREFIX) or ".dvc/" in str(path):
            continue
        if path.suffix == ".json" and "runs" in path.parts:
            json.loads(path.read_text())
            checked["json"] += 1
        elif path.suffix == ".parquet":
            pq.read_table(path)
            checked["parquet"] += 1
        elif path.suffix == ".csv" and "dvc-store" not in path.parts:
            pd.read_csv(path, dtype=str, keep_default_na=False)
            checked["csv"] += 1
        elif path.suffix == ".db" and path.name != "registry.db":
            # opened as a reader would: SQLite rolls back a killed writer's journal
            with sqlite3.connect(path) as conn:
                assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok", path
            checked["sqlite"] += 1
    registry = shared / "feast" / "registry.db"
    if registry.exists():
        from feast.protos.feast.core.Registry_pb2 import Registry

        Registry().ParseFromString(registry.read_bytes())
        checked["feast_registry"] += 1
    return checked
