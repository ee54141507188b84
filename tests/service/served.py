"""The app over the in-memory fakes (tests/service/fakes.py), served by granian as
``python -m pipeline serve`` serves the real one (:func:`pipeline.launcher.serve`:
same interface, threads and limits), for tests over real sockets without a
pipeline run:

    python -m tests.service.served SHARED_DIR PORT [WORKERS]

:func:`serving` starts it on a free loopback port and yields its URL.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

from tests.support import LOOPBACK, ROOT, clean_env, free_port, started


def worker_app():
    """granian's app factory in each worker: the fakes' app behind the real front."""
    import json
    import os

    from prometheus_client import values

    from pipeline.launcher import WORKER_HANDOVER, watch_readiness
    from pipeline.front import rsgi_app
    from pipeline.settings import Settings
    from tests.service.fakes import Fakes

    values.ValueClass = values.MutexValue  # one process, one app: values in memory
    handed = json.loads(os.environ[WORKER_HANDOVER])
    settings = Settings.model_validate(handed["settings"])
    app = Fakes(settings).app
    watch_readiness(app, settings, handed)  # /readyz waits for every worker, as the real one does
    return rsgi_app(app, settings)


@contextlib.contextmanager
def serving(shared: Path, workers: int = 1, **env: str) -> Iterator[str]:
    """The fakes' app under granian on a free loopback port, ready; yields its URL.
    ``env``: MLOPS_* settings for it."""
    port = free_port()
    base = f"http://{LOOPBACK}:{port}"
    argv = [sys.executable, "-m", "tests.service.served", str(shared), str(port), str(workers)]
    with started(argv, f"{base}/readyz", clean_env(**env), cwd=ROOT, timeout=60):
        yield base


if __name__ == "__main__":
    from pipeline.cli import configure_logging
    from pipeline.launcher import serve
    from tests.support import make_settings

    configure_logging(quiet=True)
    shared, port, workers = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 1
    overrides = {}
    import os

    from pipeline.settings import Settings, env_name

    for name in Settings.model_fields:  # the MLOPS_* the test gave, as make_settings ignores the env
        if (value := os.environ.get(env_name(name))) is not None and name != "mlflow_tracking_uri":
            overrides[name] = value
    settings = make_settings(shared, host=LOOPBACK, port=port, workers=workers, **overrides)
    serve(settings, target="tests.service.served:worker_app")
