"""What every stage shares: its input fingerprint, skip-or-do, its run record.

:func:`execute` runs one declared stage (:mod:`pipeline.dag`): it waits for
the upstream records the declaration names, takes the shared-folder lock,
hands the stage body a :class:`StageContext` holding those records, and
writes the body's run record. A stage body never touches the runs folder.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline.dag import StageSpec, spec
from pipeline.dataset import Dataset, load, schema_for
from pipeline.io import (RunRecord, fingerprint, pipeline_lock, read_record, utcnow, wait_for_record,
                         write_record)
from pipeline.schema import Schema
from pipeline.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class StageResult:
    """A stage run in progress, then its outcome."""

    stage: str
    inputs: dict[str, Any]
    fingerprint: str
    previous: RunRecord | None
    started_at: str = field(default_factory=utcnow)
    t0: float = field(default_factory=time.monotonic)
    status: str = "running"
    outputs: dict[str, Any] = field(default_factory=dict)
    message: str = ""
    run_id: str = ""


    def unchanged(self) -> bool:
        """True when the last run of this stage succeeded on the same inputs."""
        return (self.previous is not None and self.previous.fingerprint == self.fingerprint
                and self.previous.status in ("ok", "skipped"))

    def skip(self, message: str, outputs: dict[str, Any]) -> StageResult:
        self.status, self.outputs, self.message = "skipped", dict(outputs), f"up to date: {message}"
        return self

    def done(self, outputs: dict[str, Any], message: str) -> StageResult:
        self.status, self.outputs, self.message = "ok", outputs, message
        return self

    def record(self) -> RunRecord:
        return RunRecord(
            stage=self.stage, status=self.status, inputs=self.inputs, outputs=self.outputs,
            fingerprint=self.fingerprint, started_at=self.started_at, finished_at=utcnow(),
            seconds=round(time.monotonic() - self.t0, 3), message=self.message, run_id=self.run_id,
        )


@dataclass(frozen=True)
class StageContext:
    """What a stage body gets: its declaration, the settings, its upstream records."""

    spec: StageSpec
    settings: Settings
    upstream: dict[str, RunRecord]

    @property
    def dataset(self) -> Dataset:
        return load(self.settings.dataset)

    @property
    def schema(self) -> Schema:
        """The data set's schema; the entity key's type as ingest found it, where not declared."""
        return schema_for(self.settings.dataset, self.upstream.get("ingest"))

    def start(self, inputs: dict[str, Any]) -> StageResult:
        """Begin this stage's run on ``inputs`` (fingerprinted, beside its last record)."""
        return StageResult(self.spec.name, inputs, fingerprint(inputs),
                           read_record(self.settings.runs_dir, self.spec.name),
                           run_id=self.settings.run_id or "")


def body_of(name: str) -> Callable[[StageContext], StageResult]:
    """The stage body: ``run`` of the module named like the stage."""
    import importlib

    return importlib.import_module(spec(name).module).run


# glibc's mallopt parameter for MALLOC_ARENA_MAX, and the arenas the stages run with
M_ARENA_MAX, MALLOC_ARENAS = -8, 2


def limit_malloc_arenas() -> None:
    """Cap glibc's malloc at two arenas, as ``MALLOC_ARENA_MAX=2`` would (unless the user
    set that, or ``glibc.malloc.arena_max`` in ``GLIBC_TUNABLES``). glibc gives threads
    that allocate arenas of their own, up to eight per core, and each keeps what it
    freed: with DuckDB's and Arrow's threads joining train's 40 buckets at 10^7 rows,
    the run's peak crept to 1.3 GiB over the buckets against about 1.05 GiB with two
    arenas (side by side on two cores, about 1 s more or less on 30 s, within the
    noise). Arenas made before the call stay; the stages' threads start after it."""
    import ctypes
    import os

    if "MALLOC_ARENA_MAX" not in os.environ and "arena_max" not in os.environ.get("GLIBC_TUNABLES", ""):
        with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to cap
            ctypes.CDLL("libc.so.6").mallopt(M_ARENA_MAX, MALLOC_ARENAS)


def release_freed_memory() -> None:
    """Hand the memory a finished stage freed back to the system, so the next stage of the
    same process (``python -m pipeline run``) starts from what is live, not from the last
    stage's high-water mark. Two heaps keep freed memory: Arrow's pool (jemalloc) and
    glibc's malloc; DuckDB, in train, has a heap of its own and cannot reuse what they
    keep. (No ``gc.collect()``: with Feast and MLflow loaded, a full pass takes up to
    half a second.)"""
    import ctypes

    import pyarrow as pa

    pa.default_memory_pool().release_unused()
    with contextlib.suppress(OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def upstream_records(stage: StageSpec, settings: Settings, wait: bool) -> dict[str, RunRecord]:
    """The latest record of every stage ``stage`` needs; waits for them when ``wait``."""
    return {name: wait_for_record(settings.runs_dir, stage.name, name,
                                  settings.wait_seconds if wait else 0.0, settings.run_id)
            for name in stage.needs}


def execute(name: str, settings: Settings, body: Callable[[StageContext], StageResult] | None = None,
            locked: bool = False) -> RunRecord:
    """Run one declared stage under the shared-folder lock and write its run record.

    ``locked``: the caller already holds the lock (``python -m pipeline run``
    holds it for the whole sequence, so no other run interleaves its stages).
    ``body`` defaults to the stage module's ``run``.

    Upstream records are awaited outside the lock (so upstream can take it),
    then read again under it: the body sees the records as they are while it
    runs. The record is written only when the stage finished, so it doubles
    as the "upstream is done" marker: a failed or killed stage leaves the
    previous record in place and downstream stages keep seeing a consistent
    state.
    """
    stage = spec(name)
    body = body or body_of(name)
    if not locked:
        upstream_records(stage, settings, wait=True)
    with contextlib.ExitStack() as stack:
        if not locked:
            stack.enter_context(pipeline_lock(settings.shared, f"stage {name}",
                                              settings.lock_timeout_seconds))
        log.info("%s: starting", name)
        result = body(StageContext(stage, settings, upstream_records(stage, settings, wait=False)))
        missing = [key for key in stage.promises if key not in result.outputs]
        if missing:
            raise RuntimeError(f"stage {name} did not record {missing}, which pipeline/dag.py "
                               "promises to the stages after it")
        record = result.record()
        write_record(settings.runs_dir, record)
    log.info("%s: %s (%.1fs)", name, record.message, record.seconds)
    return record
