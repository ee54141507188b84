"""Each service test gets metrics of its own.

Importing Feast (any test module may) sets ``PROMETHEUS_MULTIPROC_DIR`` and so
switches prometheus-client to its file-backed values, which metrics of the
same name share within a process: one test's counts would leak into the next
app's. A served process holds one app, so the tests keep values in memory.
"""

from __future__ import annotations

import pytest

from tests.service.fakes import metrics_in_memory


@pytest.fixture(autouse=True)
def _metrics_in_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    metrics_in_memory(monkeypatch)
