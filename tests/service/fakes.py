"""In-memory stand-ins for the service's collaborators, so the WSGI app is tested
in milliseconds with no pipeline run, no Feast and no MLflow store.

The app gets the real :class:`~pipeline.online.OnlineFeatures` (back-off and
all) over a :class:`FakeReader`, and the real
:class:`~pipeline.watcher.ModelWatcher` (checks and swap) over a
:class:`FakeRegistry`; only the stores behind them are replaced. A
:class:`FakeClock` moves time when the test says so.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.dataset import CUSTOMERS as schema
from pipeline.online import OnlineFeatures
from pipeline.model_loading import LoadedModel, check_model
from pipeline.watcher import ModelWatcher
from pipeline.metrics import Metrics
from pipeline.serve import PredictionService, create_app
from pipeline.settings import Settings

SAMPLE = 1000
ENTITIES = range(SAMPLE, SAMPLE + 600)  # what a 3000-row run ingests: 600 customers, ids from 1000


def feature_table(seed: int = 7) -> dict[int, list[float]]:
    """Fixed features for every known entity, in schema order."""
    rng = np.random.default_rng(seed)
    values = rng.normal(50.0, 20.0, size=(len(ENTITIES), len(schema.feature_names)))
    return {entity: [float(v) for v in row] for entity, row in zip(ENTITIES, values)}


class TinyModel:
    """The interface of pipeline/mlflow_model.py's LinearModel, with fixed weights."""

    def __init__(self, intercept: float = 3.0, coefficients: Sequence[float] | None = None,
                 feature_names: Sequence[str] = schema.feature_names) -> None:
        self.feature_names = list(feature_names)
        self.intercept = intercept
        self.coefficients = np.asarray(coefficients if coefficients is not None
                                       else np.linspace(-1.0, 2.0, len(self.feature_names)))

    def predict_array(self, features: np.ndarray) -> np.ndarray:
        return self.intercept + features @ self.coefficients


class FakeRegistry:
    """Model versions and one alias, in memory; counts the alias checks and the loads."""

    def __init__(self, versions: dict[int, TinyModel] | None = None, alias: int | None = None) -> None:
        self.versions = dict(versions or {})
        self.alias = alias
        self.resolves = self.loads = 0

    def resolve(self) -> int | None:
        self.resolves += 1
        return self.alias

    def load(self, name: str, version: int, alias: str, tracking_uri: str) -> LoadedModel:
        self.loads += 1
        return check_model(name, version, alias, self.versions[version])


class FakeReader:
    """An online store: fixed rows; ``failure`` set makes every read raise it."""

    def __init__(self, rows: dict[int, list[float]]) -> None:
        self.rows = rows
        self.failure: BaseException | None = None
        self.reads = 0

    def read(self, entity_ids: Sequence[int]) -> list[list[float] | None]:
        self.reads += 1
        if self.failure is not None:
            raise self.failure
        return [self.rows.get(int(e)) for e in entity_ids]

    def reachable(self) -> tuple[bool, str]:
        if self.failure is not None:  # worded as the real readers word it: no address, no exception text
            return False, "fake: unreachable (see the server log)"
        return True, "fake: reachable"


class FakeClock:
    """Monotonic time that moves only when :meth:`advance` is called; its
    :meth:`wait` is the model watcher's poll pause on this time."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.waiting = 0  # threads inside wait()
        self._cond = threading.Condition()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        with self._cond:
            self.now += seconds
            self._cond.notify_all()

    def wait(self, stop: threading.Event, seconds: float) -> bool:
        with self._cond:
            deadline = self.now + seconds
            self.waiting += 1
            self._cond.notify_all()
            try:
                # `stop` is not this condition: look at it again every few ms
                while self.now < deadline and not stop.is_set():
                    self._cond.wait(0.01)
            finally:
                self.waiting -= 1
            return stop.is_set()

    def until(self, condition, timeout: float = 5.0) -> None:
        """Wait (in real time, bounded) until ``condition()`` holds: another thread's work."""
        with self._cond:
            if not self._cond.wait_for(condition, timeout):  # re-checked on every wait() entry too
                raise AssertionError(f"condition not met within {timeout}s")


class Fakes:
    """One app over fakes, and the fakes, for a test to drive."""

    def __init__(self, settings: Settings, *, alias: int | None = 1, watch: bool = False) -> None:
        self.settings = settings
        self.clock = FakeClock()
        self.metrics = Metrics()
        self.reader = FakeReader(feature_table())
        self.registry = FakeRegistry({1: TinyModel()}, alias=alias)
        self.online = OnlineFeatures(self.reader, schema, settings.online_backoff_seconds, clock=self.clock,
                                     on_read=self.metrics.looked_up,
                                     on_unreachable=self.metrics.lookup_errors.inc)
        self.watcher = ModelWatcher(settings, resolve=self.registry.resolve, loader=self.registry.load,
                                    on_load=self.metrics.model_loaded, wait=self.clock.wait, clock=self.clock,
                                    feature_names=schema.feature_names)
        if watch:
            self.watcher.start()
        else:
            self.watcher.refresh()
        self.app: PredictionService = create_app(settings, schema=schema, online=self.online, watcher=self.watcher,
                                                 metrics=self.metrics, sample_entity=SAMPLE)

    def expected(self, entity: int, version: int = 1) -> float:
        """The prediction computed independently of the app."""
        model = self.registry.versions[version]
        return model.intercept + sum(f * c for f, c in zip(self.reader.rows[entity], model.coefficients))


def metrics_in_memory(monkeypatch) -> None:
    """Keep metric values in memory for this test (see tests/service/conftest.py)."""
    from prometheus_client import values

    monkeypatch.setattr(values, "ValueClass", values.MutexValue)


def documented_families() -> set[str]:
    """The metric families pipeline/metrics.py's docstring lists, as exposed (counters with _total)."""
    import pipeline.metrics

    text = Path(pipeline.metrics.__file__).read_text()
    doc = text.split('"""')[1]
    return set(re.findall(r"^- ``(mlops_[a-z_]+)", doc, flags=re.MULTILINE))


def exposed_families(exposition: str) -> set[str]:
    """Family names in a Prometheus text exposition, counters with their _total."""
    from prometheus_client.parser import text_string_to_metric_families

    return {f"{f.name}_total" if f.type == "counter" else f.name
            for f in text_string_to_metric_families(exposition)}
