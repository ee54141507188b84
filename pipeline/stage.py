"""What every stage shares: its input fingerprint, skip-or-do, its run record."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline.io import (RunRecord, fingerprint, pipeline_lock, read_record, utcnow, wait_for_record,
                         write_record)
from pipeline.settings import Settings

log = logging.getLogger(__name__)

# Whose run records each stage reads: it waits for them before taking the lock.
UPSTREAM: dict[str, tuple[str, ...]] = {
    "ingest": (),
    "features": ("ingest",),
    "feast": ("features", "ingest"),
    "train": ("feast", "features", "ingest"),
    "promote": ("train",),
}


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

    @classmethod
    def start(cls, stage: str, settings: Settings, inputs: dict[str, Any]) -> StageResult:
        return cls(stage, inputs, fingerprint(inputs), read_record(settings.runs_dir, stage),
                   run_id=settings.run_id or "")

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


def execute(name: str, settings: Settings, body: Callable[[Settings], StageResult],
            locked: bool = False) -> RunRecord:
    """Run one stage under the shared-folder lock and write its run record.

    ``locked``: the caller already holds the lock (``python -m pipeline run``
    holds it for the whole sequence, so no other run interleaves its stages).

    The record is written only when the stage finished, so it doubles as the
    "upstream is done" marker: a failed or killed stage leaves the previous
    record in place and downstream stages keep seeing a consistent state.
    """
    if not locked:
        for upstream in UPSTREAM.get(name, ()):  # outside the lock, so upstream can take it
            wait_for_record(settings.runs_dir, name, upstream, settings.wait_seconds, settings.run_id)
    with contextlib.ExitStack() as stack:
        if not locked:
            stack.enter_context(pipeline_lock(settings.shared, f"stage {name}",
                                              settings.lock_timeout_seconds))
        log.info("%s: starting", name)
        result = body(settings)
        record = result.record()
        write_record(settings.runs_dir, record)
    log.info("%s: %s (%.1fs)", name, record.message, record.seconds)
    return record
