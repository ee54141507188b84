"""Following the registry alias in a serving worker: poll, load, check, swap.

:class:`ModelWatcher` holds the model ``/predict`` uses; it talks to MLflow only
through :mod:`pipeline.registry` and :mod:`pipeline.model_loading`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

from mlflow.tracking import MlflowClient

from pipeline.model_loading import LoadedModel, ModelLoadFailed, ModelRefused, load_model_version
from pipeline.registry import alias_version, dispose, open_client, sqlite_path
from pipeline.settings import Settings

log = logging.getLogger(__name__)


class ModelWatcher:
    """Follows the registry alias; swaps models only once the new one loaded.

    ``resolve()`` gives the version the alias points at (None: no alias yet),
    ``loader`` loads one, ``on_load(outcome, version)`` hears of every attempt
    ("ok", "failed" or "refused"). ``wait(stop, seconds)`` is the poll's pause: it
    returns True once ``stop`` is set; ``clock()`` the time the retry back-off is
    counted on; tests give both, driven by their own clock.

    A version that failed to load is tried again after ``retry_seconds``, doubling
    up to ``retry_max_seconds``: its artifacts may come back. A refused version
    (not this project's format) is not tried again. ``last_error`` says, in words,
    why the version the alias names is not the one served; it is cleared as soon
    as it no longer applies (the alias moved on, or the version loaded).

    With a local SQLite registry, a replaced file (another inode: deleted and
    rebuilt) is noticed and reopened; while the file is missing ``store_error``
    says so and /readyz fails, and no empty store is created in its place.
    """

    def __init__(self, settings: Settings, *, resolve: Callable[[], int | None] | None = None,
                 loader: Callable[[str, int, str, str], LoadedModel] | None = None,
                 on_load: Callable[[str, int], None] | None = None,
                 wait: Callable[[Any, float], bool] | None = None,
                 clock: Callable[[], float] | None = None,
                 feature_names: Sequence[str] | None = None,
                 retry_seconds: float | None = None, retry_max_seconds: float = 300.0) -> None:
        import threading
        import time

        self.settings = settings
        self.feature_names = feature_names  # what the online store serves, in model order
        self.resolve = resolve or self._alias_target
        # the settings reach the loader: with the lakehouse the artifacts are in the object store,
        # whose endpoint and keys the settings hold (no AWS_* variables needed in the environment)
        self.loader = loader or functools.partial(load_model_version, settings=settings)
        self._on_load = on_load or (lambda outcome, version: None)
        self._wait = wait or (lambda stop, seconds: stop.wait(seconds))
        self.clock = clock or time.monotonic
        self.retry_seconds = retry_seconds if retry_seconds is not None else settings.model_poll_seconds
        self.retry_max_seconds = retry_max_seconds
        self.current: LoadedModel | None = None
        self.failed_version: int | None = None
        self.refused: set[int] = set()
        self.last_error: str | None = None
        self.store_error: str | None = None
        self._attempts = 0  # failed loads of failed_version so far
        self._retry_at = float("-inf")
        self._refresh_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client: MlflowClient | None = None  # made once it can be, reused by every poll
        self._store_identity: tuple[int, int] | None = None
        self._reload = False  # the store was replaced: load the aliased version even if its number is served

    def _alias_target(self) -> int | None:
        path = sqlite_path(self.settings.tracking_uri)
        if path is not None:
            try:
                st = path.stat()
            except FileNotFoundError:
                log.error("serve: the registry's store %s is missing; still serving %s", path,
                          self.current.version if self.current else "nothing")
                self.store_error = "the model registry's store is missing; run the pipeline (train)"
                return None
            identity = (st.st_dev, st.st_ino)
            if self._store_identity is not None and identity != self._store_identity:
                log.info("serve: the registry's store %s was replaced; reopening it", path)
                if self._client is not None:
                    dispose(self._client)
                self._client = None
                # a rebuilt store numbers its versions afresh: its version 1 is another model, and
                # what was learnt of the old store's versions (refused, failed) no longer holds
                self._reload, self.refused, self.failed_version, self._attempts = True, set(), None, 0
            self._store_identity = identity
        self.store_error = None
        if self._client is None:
            self._client = open_client(self.settings.tracking_uri)
        mv = alias_version(self._client, self.settings.model_name, self.settings.model_alias)
        return int(mv.version) if mv else None

    def refresh(self) -> bool:
        """Check the alias once; returns True when a new model was swapped in."""
        with self._refresh_lock:
            target = self.resolve()
            served = self.current is not None and self.current.version == target and not self._reload
            if target is None or served:
                # nothing (else) to load: an error about another version no longer applies
                self.failed_version, self.last_error, self._attempts = None, None, 0
                return False
            if target in self.refused:
                return False
            if target == self.failed_version and self.clock() < self._retry_at:
                return False
            if target != self.failed_version:
                self._attempts = 0
            s = self.settings
            try:
                model = self.loader(s.model_name, target, s.model_alias, s.tracking_uri)
                names = list(getattr(model.python_model, "feature_names", []))
                if self.feature_names is not None and names != list(self.feature_names):
                    log.error("serve: version %s expects features %s, the store serves %s", target, names,
                              list(self.feature_names))
                    raise ModelLoadFailed(f"version {target} expects other features than the online store "
                                          "serves")
            except ModelRefused as exc:
                self.refused.add(target)
                self.failed_version, self.last_error = None, str(exc)
                self._on_load("refused", target)
                log.error("serve: version %s of %s refused, still serving %s", target, s.model_name,
                          self.current.version if self.current else "nothing")
                return False
            except Exception as exc:  # keep serving the previous model, say why, try again later
                self._attempts += 1
                delay = min(self.retry_seconds * 2 ** (self._attempts - 1), self.retry_max_seconds)
                self.failed_version, self._retry_at = target, self.clock() + delay
                public = str(exc) if isinstance(exc, ModelLoadFailed) else f"version {target} could not be loaded"
                self.last_error = f"{public}; still serving {self.current.version if self.current else 'nothing'}"
                self._on_load("failed", target)
                log.error("serve: version %s of %s failed to load (attempt %d, next in %.0fs), still serving %s: "
                          "%s: %s", target, s.model_name, self._attempts, delay,
                          self.current.version if self.current else "nothing", type(exc).__name__, exc)
                return False
            previous = self.current
            self.current = model  # one reference assignment: requests see old or new, whole
            self.failed_version, self.last_error, self._attempts, self._reload = None, None, 0, False
            self._on_load("ok", target)
            log.info("serve: now serving %s version %d (was %s)", model.name, target,
                     previous.version if previous else "nothing")
            return True

    def _loop(self) -> None:
        while not self._wait(self._stop, self.settings.model_poll_seconds):
            try:
                self.refresh()
            except Exception as exc:  # registry unreachable: keep the current model
                log.warning("serve: could not check the model alias: %s", exc)

    def start(self) -> None:
        import threading

        try:
            self.refresh()
        except Exception as exc:
            log.warning("serve: could not check the model alias at start: %s", exc)
        self._thread = threading.Thread(target=self._loop, name="model-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
