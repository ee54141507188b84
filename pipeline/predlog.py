"""The prediction log: what ``/predict`` served, on the shared volume, off the request path.

:meth:`PredictionLog.append` only puts a tuple on a bounded in-memory queue
(a ``collections.deque`` whose length is checked first: a few hundred
nanoseconds, no lock, never blocking). When the queue is full the entry is
dropped and counted in :attr:`PredictionLog.dropped`: serving must never wait
for the disk. A daemon thread drains the queue and writes Parquet files under
``<shared>/monitoring/predictions/``, rolled when a file reaches ``max_rows``
entries or its oldest entry is ``max_seconds`` old, each written whole through
:func:`pipeline.io.atomic_path`: a reader (the monitor) sees complete files or
none, and a kill -9 tears nothing.

"Acknowledged as written" means :meth:`PredictionLog.flush` returned (or
:attr:`PredictionLog.written` counts it): those entries are in renamed,
fsynced files. Entries still queued when the process dies are lost, which the
issue accepts: the log is an observation, not a ledger.

File names carry the first and last entry time (ms since the epoch), the
writer's pid and a sequence number, so several serving workers write side by
side and the monitor picks a time window by name without opening files.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.io import TMP_PREFIX, atomic_path

log = logging.getLogger(__name__)

FEATURE_PREFIX = "feature."
FILE_RE = re.compile(r"^pred-(\d+)-(\d+)-(?:[A-Za-z0-9_.]+-)?(\d+)-(\d+)\.parquet$")  # first, last, [host,] pid, seq
BASE_COLUMNS = ("time", "entity_key", "prediction", "model_version", "request_id")


STALE_TEMP_SECONDS = 3600.0  # far longer than writing one file takes: its writer is gone


def remove_old_temps(folder: Path, age_seconds: float) -> int:
    """Remove temp files a killed writer left behind (never another live writer's: only old ones)."""
    removed, cutoff = 0, time.time() - age_seconds
    for tmp in folder.glob(f"{TMP_PREFIX}pred-*"):
        with contextlib.suppress(FileNotFoundError):
            if tmp.stat().st_mtime < cutoff:
                tmp.unlink()
                removed += 1
    return removed


# This host's name, made safe for a file name (a serve pod's name on a cluster).
WRITER = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())[:40] or "host"


def predictions_dir(shared: Path) -> Path:
    return shared / "monitoring" / "predictions"


@dataclass(frozen=True)
class LogFile:
    path: Path
    first_ms: int
    last_ms: int


def log_files(folder: Path, since_ms: int | None = None) -> list[LogFile]:
    """Whole log files in ``folder`` (temp files skipped), oldest first; with
    ``since_ms``, only those holding an entry at or after it."""
    out = []
    if folder.is_dir():
        for path in folder.iterdir():
            m = FILE_RE.match(path.name)
            if m and (since_ms is None or int(m.group(2)) >= since_ms):
                out.append(LogFile(path, int(m.group(1)), int(m.group(2))))
    return sorted(out, key=lambda f: (f.first_ms, f.path.name))


class _Flush:
    """A marker in the queue: the writer sets ``done`` once everything before it is on disk."""

    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = threading.Event()


class PredictionLog:
    """A non-blocking, size/time-rolled Parquet log of served predictions."""

    def __init__(self, folder: Path, *, queue_size: int = 100_000, max_rows: int = 50_000,
                 max_seconds: float = 60.0, poll_seconds: float = 0.2, clock=time.time) -> None:
        self.folder = Path(folder)
        self.queue_size = queue_size
        self.max_rows = max_rows
        self.max_seconds = max_seconds
        self.poll_seconds = poll_seconds
        self.clock = clock
        self.dropped = 0  # entries refused because the queue was full
        self.written = 0  # entries in whole files on disk
        self.files = 0
        self.errors = 0  # files that could not be written (their entries are lost, and counted here)
        self._queue: collections.deque = collections.deque()
        self._wake = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._seq = 0
        self._start_lock = threading.Lock()
        # A forked worker (granian, gunicorn) inherits the queue but not the thread.
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._after_fork)

    # the request path -----------------------------------------------------
    def append(self, entity_key, features: dict, prediction: float, model_version: int | str,
               request_id: str, time: float | None = None) -> bool:
        """Queue one served prediction; False (and counted) when the queue is full."""
        if len(self._queue) >= self.queue_size or self._closed:
            self.dropped += 1
            return False
        self._queue.append((self.clock() if time is None else time, entity_key, features, prediction,
                            model_version, request_id))
        if self._thread is None:
            self._start()
        return True

    # control ---------------------------------------------------------------
    def flush(self, timeout: float = 30.0) -> bool:
        """Write everything queued so far; True once it is on disk (acknowledged)."""
        if self._thread is None:
            if not self._queue:
                return True
            self._start()
        marker = _Flush()
        self._queue.append(marker)
        self._wake.set()
        return marker.done.wait(timeout)

    def close(self, timeout: float = 30.0) -> None:
        """Flush and stop the writer; later appends are dropped (and counted)."""
        self.flush(timeout)
        self._closed = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def stats(self) -> dict[str, int]:
        return {"queued": len(self._queue), "dropped": self.dropped, "written": self.written,
                "files": self.files, "errors": self.errors}

    # the writer ------------------------------------------------------------
    def _after_fork(self) -> None:
        self._queue.clear()
        self._thread = None
        self._wake = threading.Event()
        self._start_lock = threading.Lock()

    def _start(self) -> None:
        with self._start_lock:
            if self._thread is None:
                self.folder.mkdir(parents=True, exist_ok=True)
                remove_old_temps(self.folder, STALE_TEMP_SECONDS)
                self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        rows: list[tuple] = []
        opened = 0.0
        while True:
            self._wake.wait(self.poll_seconds)
            self._wake.clear()
            markers = []
            while self._queue:
                item = self._queue.popleft()
                if isinstance(item, _Flush):
                    markers.append(item)
                    break  # write what came before the marker, then acknowledge it
                if not rows:
                    opened = time.monotonic()
                rows.append(item)
                if len(rows) >= self.max_rows:
                    self._write(rows)
                    rows = []
            if rows and (markers or self._closed or time.monotonic() - opened >= self.max_seconds):
                self._write(rows)
                rows = []
            for marker in markers:
                marker.done.set()
            if markers and self._queue:
                self._wake.set()  # more behind the marker: go round at once
            if self._closed and not self._queue:
                return

    def _write(self, rows: list[tuple]) -> None:
        try:
            table = to_table(rows)
            times = table.column("time")
            first = int(min(r[0] for r in rows) * 1000)  # threads may queue out of order
            last = int(max(r[0] for r in rows) * 1000)
            self._seq += 1
            # the host too: serve pods on one volume can share a pid
            path = self.folder / f"pred-{first:013d}-{last:013d}-{WRITER}-{os.getpid()}-{self._seq:06d}.parquet"
            with atomic_path(path) as tmp:
                pq.write_table(table, tmp, compression="zstd")
            self.written += len(times)
            self.files += 1
        except Exception:  # the disk is full or gone: count, log, keep serving
            self.errors += 1
            log.exception("prediction log: could not write %d entries to %s", len(rows), self.folder)


def to_table(rows: list[tuple]) -> pa.Table:
    """The Parquet layout of a batch of log entries: one column per feature (``feature.<name>``)."""
    names: dict[str, None] = {}
    for r in rows:
        for k in r[2]:
            names.setdefault(k, None)
    columns = {
        "time": pa.array([int(r[0] * 1_000_000) for r in rows], pa.int64()).cast(pa.timestamp("us", "UTC")),
        "entity_key": pa.array([str(r[1]) for r in rows], pa.string()),
        "prediction": pa.array([float(r[3]) for r in rows], pa.float64()),
        "model_version": pa.array([str(r[4]) for r in rows], pa.string()),
        "request_id": pa.array([str(r[5]) for r in rows], pa.string()),
    }
    for name in names:
        columns[FEATURE_PREFIX + name] = pa.array([_number(r[2].get(name)) for r in rows], pa.float64())
    return pa.table(columns)


def _number(value) -> float | None:
    if value is None:
        return None
    with contextlib.suppress(TypeError, ValueError):
        return float(value)
    return None


def read_log(folder: Path, since: float | None = None, until: float | None = None,
             columns: list[str] | None = None) -> pa.Table | None:
    """The log's entries with ``since <= time <= until`` (epoch seconds, either open), or None.

    Temp files (a writer's file in progress, or one a killed writer left) are not read."""
    since_ms = int(since * 1000) if since is not None else None
    until_ms = int(until * 1000) if until is not None else None
    tables = []
    for f in log_files(folder, since_ms):
        if until_ms is not None and f.first_ms > until_ms:
            continue
        table = pq.read_table(f.path, columns=columns)
        if since_ms is not None and f.first_ms < since_ms:
            table = table.filter(pc.greater_equal(table.column("time"), _ts(since)))
        if until_ms is not None and f.last_ms >= until_ms:
            table = table.filter(pc.less_equal(table.column("time"), _ts(until)))
        tables.append(table)
    if not tables:
        return None
    return pa.concat_tables(tables, promote_options="default")


def column_type(name: str) -> pa.DataType:
    """A log column's type, as :func:`to_table` writes it."""
    if name.startswith(FEATURE_PREFIX) or name == "prediction":
        return pa.float64()
    return pa.timestamp("us", "UTC") if name == "time" else pa.string()


def scan_log(folder: Path, since: float | None, until: float | None, columns: list[str],
             batch_rows: int = 65_536) -> Iterator[pa.RecordBatch]:
    """The entries with ``since <= time <= until``, ``columns`` only, batch by batch.

    Files wholly outside the window are skipped by their names; the others are
    read through one ``pyarrow.dataset`` scan with the column projection and the
    time filter pushed down, so memory holds a few batches whatever the log's
    size. A column a file lacks (a feature added since) comes back null."""
    since_ms = int(since * 1000) if since is not None else None
    until_ms = int(until * 1000) if until is not None else None
    paths = [str(f.path) for f in log_files(folder, since_ms) if until_ms is None or f.first_ms <= until_ms]
    if not paths:
        return
    import pyarrow.dataset as ds

    schema = pa.schema([(name, column_type(name)) for name in dict.fromkeys(["time", *columns])])
    dataset = ds.dataset(paths, schema=schema, format="parquet")
    window = None
    if since is not None:
        window = ds.field("time") >= _ts(since)
    if until is not None:
        cut = ds.field("time") <= _ts(until)
        window = cut if window is None else window & cut
    yield from dataset.to_batches(columns=list(columns), filter=window, batch_size=batch_rows,
                                  batch_readahead=2, fragment_readahead=2)


def _ts(seconds: float) -> pa.Scalar:
    return pa.scalar(int(seconds * 1_000_000), pa.timestamp("us", "UTC"))
