"""``python -m pipeline serve``: granian's worker processes around the app.

The serve command hands each worker its settings through the environment
(workers are new processes), each worker builds the app behind the RSGI front
(:func:`worker_app`), and once every worker is ready one of them says where it
serves. With several workers, each is a granian server of its own on the port,
under :func:`supervise` (run as ``python -m pipeline.launcher``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from pathlib import Path

from pipeline.settings import Settings

log = logging.getLogger("pipeline")


# What the serve command hands granian's worker processes, as one serialized value in
# one environment variable (workers are new processes: they inherit only the environment):
# the settings it built, prometheus-client's folder, and where "ready" is said once.
WORKER_HANDOVER = "_MLOPS_SERVE_WORKER"


def worker_app():
    """The app factory each granian worker calls, with what the serve command handed on."""
    import json

    from pipeline import skip_feast_typechecks

    skip_feast_typechecks()
    from pipeline.front import rsgi_app
    from pipeline.serve import create_app

    handed = json.loads(os.environ[WORKER_HANDOVER])
    settings = Settings.model_validate(handed["settings"])
    app = create_app(settings, multiprocess_dir=handed["multiprocess_dir"])
    watch_readiness(app, settings, handed)
    front = rsgi_app(app, settings)
    # Everything imported and built so far (MLflow, Feast, pandas: about a million
    # objects) lives as long as the worker: keep it out of the garbage collector's
    # full passes, which otherwise stalled a worker for 200-300 ms now and then
    # (seen as slow 503s in tests/faults/test_redis_outage.py).
    import gc

    gc.collect()
    gc.freeze()
    return front


class WorkerMarkers:
    """Which of the serve command's workers are ready: each one, once ready, leaves a
    file named after its process id in one folder; a file whose process is gone (a
    worker that died and is being respawned) does not count."""

    def __init__(self, folder: str, expected: int) -> None:
        self.folder, self.expected = Path(folder), expected

    def mark(self) -> None:
        (self.folder / str(os.getpid())).touch()

    def check(self) -> tuple[bool, str]:
        """``(every worker ready, "N of M ready")``, what ``/readyz`` adds."""
        ready = 0
        for entry in os.scandir(self.folder):
            try:
                os.kill(int(entry.name), 0)
                ready += 1
            except PermissionError:
                ready += 1
            except (ValueError, ProcessLookupError):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
        return ready >= self.expected, f"{ready} of {self.expected} ready"


def watch_readiness(app, settings: Settings, handed: dict) -> None:
    """With several workers, the app's ``/readyz`` also waits for every other worker
    (each is a server of its own on the port: a connection may reach one still
    starting or being respawned); and a thread says "serving" once all are ready."""
    markers = WorkerMarkers(handed["workers_dir"], settings.workers) if handed.get("workers_dir") else None
    app.peers_ready = markers.check if markers else None
    threading.Thread(target=announce_when_ready, args=(app, settings, handed["ready_marker"], markers),
                     name="announce", daemon=True).start()


def announce_when_ready(app, settings: Settings, marker: str, markers: WorkerMarkers | None = None, *,
                        limit_seconds: float = 600.0, every_seconds: float = 0.25) -> None:
    """Log ``serving: curl http://HOST:PORT/predict`` once the app is ready (what
    ``/readyz`` checks: a model loaded, the online store reachable, every worker
    ready), so "serving" is never said before the server answers. This worker,
    once ready, marks itself in ``markers``; of all workers, the first to see
    every one ready says it (it creates ``marker``); a warning if not ready
    within ``limit_seconds``."""
    import time

    pause = threading.Event()  # never set: a pause that is not a bare sleep
    deadline = time.monotonic() + limit_seconds
    marked = False
    while time.monotonic() < deadline:
        if not marked and app.is_ready():
            if markers is not None:
                markers.mark()
            marked = True
        if marked and (markers is None or markers.check()[0]):
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return  # another worker said it
            log.info("serving: curl http://%s:%d/predict", settings.host, settings.port)
            return
        pause.wait(every_seconds)
    log.warning("serve: not ready after %.0fs; /readyz says why (curl http://%s:%d/readyz)",
                limit_seconds, settings.host, settings.port)


def serve(settings: Settings, target: str = f"{__name__}:worker_app") -> None:
    """Serve with granian: ``settings.workers`` worker processes, each running
    the app on ``settings.threads`` threads behind granian's RSGI interface
    (:class:`pipeline.front.RSGIFront`: request bodies are read on the event
    loop, bounded in size and time, never on an app thread). ``target`` is the
    worker's app factory (tests serve the app over in-memory fakes).

    granian parses HTTP in Rust, so a request costs the Python workers only the
    app itself: in the benchmark (benchmarks/results) that more than halves
    the CPU per request against gunicorn's Python HTTP parsing. It respawns a
    worker that dies, and drains in-flight requests on SIGTERM (what
    Kubernetes and compose send). With several workers, prometheus-client keeps
    its values in files under ``PROMETHEUS_MULTIPROC_DIR``, so ``/metrics``
    adds up every worker.

    Each worker is a granian server of its own on the same port
    (:func:`supervise`), not one server with several workers: granian 2.5's
    workers share one listening socket, and the kernel hands a burst of new
    connections to whichever worker waited last, so a client with a few
    keep-alive connections (a proxy, a load generator) had all of them on one
    worker while the other idled: in 5 of 6 runs of wrk with 8 connections
    against two workers here. granian binds with ``SO_REUSEPORT``, so
    servers of their own each get a listening socket, and the kernel spreads
    connections over them by address.
    """
    import json
    import shutil
    import tempfile

    runtime = Path(tempfile.mkdtemp(prefix="mlops-serve-"))
    multiprocess_dir = None
    workers_dir = None
    if settings.workers > 1:
        # prometheus-client picks its storage when first imported (in each worker): set this first.
        multiprocess_dir = str(runtime / "prometheus")
        os.mkdir(multiprocess_dir)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = multiprocess_dir
        workers_dir = str(runtime / "workers")  # WorkerMarkers
        os.mkdir(workers_dir)
    quiet = logging.getLogger().getEffectiveLevel() > logging.INFO  # `-q`
    os.environ[WORKER_HANDOVER] = json.dumps({
        "settings": settings.model_dump(mode="json"), "multiprocess_dir": multiprocess_dir,
        "ready_marker": str(runtime / "ready"), "workers_dir": workers_dir, "target": target, "quiet": quiet})
    log.info("serve: starting on http://%s:%d (%d worker(s) x %d thread(s))", settings.host,
             settings.port, settings.workers, settings.threads)
    try:
        if settings.workers == 1:
            granian_server(settings, target, quiet)
        else:
            code = supervise(settings.workers)
            if code:
                raise SystemExit(code)
    finally:
        shutil.rmtree(runtime, ignore_errors=True)


def granian_server(settings: Settings, target: str, quiet: bool) -> None:
    """One granian server with one worker process, in this process, until it is stopped."""
    from granian.constants import Interfaces
    from granian.http import HTTP1Settings
    from granian.log import LogLevels
    from granian.server import Server

    Server(
        target=target, factory=True, interface=Interfaces.RSGI,
        address=settings.host, port=settings.port, workers=1,
        websockets=False, respawn_failed_workers=True,
        # headers that do not arrive in time: hyper closes the connection (no Python work waits)
        http1_settings=HTTP1Settings(header_read_timeout=int(settings.body_timeout_seconds * 1000)),
        workers_kill_timeout=20, log_access=False,
        log_level=LogLevels.warning if quiet else LogLevels.info,
    ).serve()


# How long the servers have to drain and stop once asked, before they are killed
STOP_SECONDS = 30.0


def supervise(servers: int) -> int:
    """Run ``servers`` granian servers of one worker each (``python -m
    pipeline.launcher``, with what :func:`serve` handed on in the environment)
    until they stop; returns the exit code.

    SIGTERM and SIGINT are passed on to every server, which drains its requests
    and stops; one still running ``STOP_SECONDS`` later is killed. Each server
    and its worker are a process group of their own, so a Ctrl-C in the
    terminal reaches them once, through here, and a worker whose server was
    killed is stopped with its group. Were this process killed outright, the
    kernel sends the servers SIGTERM (``PR_SET_PDEATHSIG``): none outlives it
    holding the port. A server that stops by itself (granian respawns a worker
    that dies, so this means the server itself failed, e.g. its port taken)
    stops the others and the exit code is non-zero: the container's restart
    policy, or the user, starts the whole thing again."""
    import signal
    import subprocess
    import sys
    import time

    procs: list[subprocess.Popen] = []
    stopping: list[int] = []  # the signals received
    failed: list[int] = []  # the exit code of a server that stopped by itself

    def stop(signum, _frame=None) -> None:
        stopping.append(signum)
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    pause = threading.Event()  # never set: a pause that is not a bare sleep
    env = {**os.environ, SUPERVISOR: str(os.getpid())}
    deadline = None
    try:
        while len(procs) < servers and not stopping:
            procs.append(subprocess.Popen([sys.executable, "-m", __name__], env=env, process_group=0))
        while running := [p for p in procs if p.poll() is None]:
            if len(running) < len(procs) and not stopping and not failed:
                gone = next(p for p in procs if p.returncode is not None)
                log.error("serve: a server process exited by itself (code %s); stopping the others",
                          gone.returncode)
                failed.append(gone.returncode if gone.returncode > 0 else 1)  # a signal: 1
                stop(signal.SIGTERM)
            if stopping and deadline is None:
                deadline = time.monotonic() + STOP_SECONDS
            if deadline is not None and time.monotonic() > deadline:
                log.warning("serve: %d server(s) still running %.0f s after the stop; killing them",
                            len(running), STOP_SECONDS)
                for proc in running:
                    signal_group(proc.pid, signal.SIGKILL)
                deadline = float("inf")
            pause.wait(0.2)
        if procs and not stopping and not failed:  # every server stopped by itself, at once
            codes = [p.returncode for p in procs]
            log.error("serve: the server processes exited by themselves (codes %s)", codes)
            failed.append(next((c for c in codes if c > 0), 1))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for proc in procs:  # what is left of each group: a worker whose server was killed
            if proc.poll() is None:
                proc.kill()
            signal_group(proc.pid, signal.SIGTERM)
        ends = time.monotonic() + 5
        while any(group_alive(p.pid) for p in procs) and time.monotonic() < ends:
            pause.wait(0.1)
        for proc in procs:
            signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
    return failed[0] if failed else 0


def signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# The supervisor's process id, handed to its servers
SUPERVISOR = "_MLOPS_SERVE_SUPERVISOR"


def stop_with_supervisor() -> None:
    """Have the kernel send this process SIGTERM when the supervisor dies (Linux's
    ``prctl(PR_SET_PDEATHSIG)``), and stop now if it is already gone."""
    import ctypes
    import signal
    import sys

    with contextlib.suppress(OSError, AttributeError):  # not Linux's libc: no such guard
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != int(os.environ.get(SUPERVISOR, os.getppid())):
        sys.exit(0)


if __name__ == "__main__":  # one of supervise()'s servers
    import json

    from pipeline.cli import configure_logging

    stop_with_supervisor()
    handed = json.loads(os.environ[WORKER_HANDOVER])
    configure_logging(quiet=handed["quiet"])
    granian_server(Settings.model_validate(handed["settings"]), handed["target"], handed["quiet"])
