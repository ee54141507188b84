"""The one command line: ``python -m pipeline <stage>``.

Settings come from ``MLOPS_*`` environment variables (see
:mod:`pipeline.settings`); the flags below override the common ones.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from pipeline.dag import PIPELINE, STAGE_NAMES, spec
from pipeline.errors import ConfigError, PipelineError, storage_error
from pipeline.settings import Settings

log = logging.getLogger("pipeline")

# The commands that are not stages; the stages' help comes from their declaration.
COMMANDS = {
    "init": "create the shared folder's layout (compose and Kubernetes run it first)",
    "run": "run every stage, in order, then print a summary",
    "serve": "serve /predict, /metrics, /healthz, /readyz with granian",
    "summary": "print the summary of the last run from the run records",
    "dataset": "check a data set declaration against its data, or infer one from a table",
    "retrain": "run ingest to promote on the newest data; the promotion gate decides (--webhook: "
               "Alertmanager's receiver)",
    "backup": "snapshot the shared volume to the object store (MLOPS_S3_*); --list, --verify",
    "restore": "bring an empty shared volume back from a snapshot in the object store",
}


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--shared-dir", help="shared volume root (MLOPS_SHARED_DIR, default ./.shared)")
    common.add_argument("--redis-url", help="Redis online store, redis://[:password@]host:port/db "
                                            "(MLOPS_REDIS_URL; unset: Feast's SQLite online store)")
    common.add_argument("--wait", type=float, dest="wait_seconds", metavar="SECONDS",
                        help="wait this long for upstream run records (MLOPS_WAIT_SECONDS)")
    common.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    data = argparse.ArgumentParser(add_help=False)
    data.add_argument("--rows", type=int, help="synthetic rows (MLOPS_ROWS, default 10000)")
    data.add_argument("--seed", type=int, help="generator and split seed (MLOPS_SEED, default 42)")
    data.add_argument("--batch", type=int, dest="synthetic_batch", metavar="N",
                      help="synthetic batch: event times after batch N-1's (MLOPS_SYNTHETIC_BATCH, default 0)")
    data.add_argument("--drift", dest="synthetic_drift", metavar="FEATURE=SHIFT[,...]",
                      help="shift synthetic features by SHIFT standard deviations (MLOPS_SYNTHETIC_DRIFT)")

    top = argparse.ArgumentParser(
        prog="python -m pipeline",
        description="Run one stage of the mlops-shared-volume pipeline, or all of them, on the "
                    "shared folder. `python -m pipeline <stage> --help` tells more.",
        epilog="Settings come from MLOPS_* environment variables (and MLFLOW_TRACKING_URI); "
               "docs/configuration.md lists them. Flags override the common ones.")
    sub = top.add_subparsers(dest="command", required=True, metavar="<stage>")
    helps = {"init": COMMANDS["init"], **{s.name: s.summary for s in PIPELINE},
             **{k: v for k, v in COMMANDS.items() if k != "init"}}
    for name, text in helps.items():
        data_flags = name in ("run", "retrain") or (name in STAGE_NAMES and spec(name).data_flags)
        parents = [common] + ([data] if data_flags else [])
        p = sub.add_parser(name, parents=parents, help=text, description=text)
        if name == "serve":
            p.add_argument("--host", help="bind address (MLOPS_HOST, default 127.0.0.1)")
            p.add_argument("--port", type=int, help="port (MLOPS_PORT, default 8000)")
            p.add_argument("--workers", type=int, help="server worker processes (MLOPS_WORKERS, default 2)")
        if name == "backup":
            what = p.add_mutually_exclusive_group()
            what.add_argument("--list", action="store_true", help="list the complete snapshots")
            what.add_argument("--verify", action="store_true", help="restore a snapshot into a temporary "
                                                                     "folder and check every file")
            p.add_argument("--snapshot", help="the snapshot --verify checks (default: the newest)")
        if name == "restore":
            p.add_argument("--snapshot", help="snapshot id from `backup --list` (default: the newest)")
        if name == "retrain":
            p.add_argument("--webhook", type=int, metavar="PORT",
                           help="serve Alertmanager's webhook (POST /alerts starts one retrain) on PORT")
        if name == "dataset":
            action = p.add_subparsers(dest="dataset_action", required=True, metavar="check|infer")
            check = action.add_parser("check", help="validate a declaration against its source and report "
                                                    "rows, columns, nulls and what would be quarantined")
            check.add_argument("file", type=Path, help="the declaration (YAML)")
            infer = action.add_parser("infer", help="write a starting declaration for a table (CSV or "
                                                    "Parquet: a file, a folder or a glob)")
            infer.add_argument("data", help="the table")
            infer.add_argument("--name", help="the data set's name (default: from the file name)")
            infer.add_argument("--out", type=Path, help="write the declaration here instead of stdout")
    return top


def dataset_command(args: argparse.Namespace) -> None:
    """``python -m pipeline dataset check|infer``: touches nothing but what it reads (and --out)."""
    from pipeline import datacheck
    from pipeline.dataset import load

    if args.dataset_action == "check":
        print(datacheck.check(load(args.file)).render())
        print(f"ok: {args.file} fits its data; run it with MLOPS_DATASET={args.file}")
        return
    text = datacheck.infer(args.data, args.name, relative_to=args.out.parent if args.out else Path.cwd())
    if args.out:
        args.out.write_text(text)
        print(f"wrote {args.out}; check it with `python -m pipeline dataset check {args.out}`")
    else:
        print(text, end="")


def backup_command(settings: Settings, args: argparse.Namespace) -> None:
    """``python -m pipeline backup [--list|--verify]`` and ``restore [--snapshot ID]``."""
    from pipeline import backup

    if args.command == "restore":
        done = backup.restore(settings, args.snapshot)
        print(f"restored snapshot {done['id']}: {done['files']} file(s), {done['bytes'] / 1e6:.1f} MB "
              f"into {settings.shared} in {done['seconds']:.1f}s; serve with `python -m pipeline serve`")
    elif args.list:
        for snap in backup.list_snapshots(settings):
            print(f"{snap['id']}  {snap['created_at']}  {snap['files']:>5} file(s)  {snap['bytes'] / 1e6:8.1f} MB")
    elif args.verify:
        done = backup.verify(settings, args.snapshot)
        print(f"ok: snapshot {done['id']} restores ({done['files']} file(s), {done['bytes'] / 1e6:.1f} MB matched)")
    else:
        done = backup.backup(settings)
        print(f"snapshot {done['id']}: {len(done['files'])} file(s), {done['bytes'] / 1e6:.1f} MB "
              f"({done['sent_bytes'] / 1e6:.1f} MB sent) in {done['seconds']:.1f}s")


def build_settings(args: argparse.Namespace) -> Settings:
    overrides = {key: value for key in ("shared_dir", "redis_url", "wait_seconds", "rows", "seed",
                                        "synthetic_batch", "synthetic_drift", "host", "port", "workers")
                 if (value := getattr(args, key, None)) is not None}
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}"
                             for e in exc.errors())
        raise ConfigError(f"invalid settings ({problems}); see `python -m pipeline --help` "
                          "and the MLOPS_* variables in docs/configuration.md") from None


def configure_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, stream=sys.stdout,
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", force=True)
    for noisy in ("feast", "dvc", "mlflow", "alembic", "urllib3", "matplotlib", "numexpr",
                  "botocore", "_granian", "granian.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not quiet:
        logging.getLogger("_granian").setLevel(logging.INFO)
    # Library warnings (SQLAlchemy deprecations inside MLflow, and so on) are not
    # the user's to act on; route them to logging, shown only with PYTHONWARNINGS.
    logging.captureWarnings(True)
    if not sys.warnoptions:
        logging.getLogger("py.warnings").setLevel(logging.ERROR)


def run_stages(settings: Settings, names: Sequence[str]) -> None:
    """Run the stages in order. Several stages hold the shared-folder lock for the
    whole sequence, so a concurrent run cannot slip its stages in between."""
    from pipeline.io import pipeline_lock
    from pipeline.stage import execute, limit_malloc_arenas, release_freed_memory

    limit_malloc_arenas()
    if len(names) == 1:
        execute(names[0], settings)
        return
    with pipeline_lock(settings.shared, f"run ({', '.join(names)})", settings.lock_timeout_seconds):
        for name in names:
            execute(name, settings, locked=True)
            release_freed_memory()


# What the serve command hands granian's worker processes, as one serialized value in
# one environment variable (workers are new processes: they inherit only the environment):
# the settings it built, prometheus-client's folder, and where "ready" is said once.
WORKER_HANDOVER = "_MLOPS_SERVE_WORKER"


def worker_app():
    """The app factory each granian worker calls, with what the serve command handed on."""
    import json

    from pipeline.front import rsgi_app
    from pipeline.serve import create_app

    handed = json.loads(os.environ[WORKER_HANDOVER])
    settings = Settings.model_validate(handed["settings"])
    app = create_app(settings, multiprocess_dir=handed["multiprocess_dir"])
    threading.Thread(target=announce_when_ready, args=(app, settings, handed["ready_marker"]),
                     name="announce", daemon=True).start()
    front = rsgi_app(app, settings)
    # Everything imported and built so far (MLflow, Feast, pandas: about a million
    # objects) lives as long as the worker: keep it out of the garbage collector's
    # full passes, which otherwise stalled a worker for 200-300 ms now and then
    # (seen as slow 503s in tests/faults/test_redis_outage.py).
    import gc

    gc.collect()
    gc.freeze()
    return front


def announce_when_ready(app, settings: Settings, marker: str, *, limit_seconds: float = 600.0,
                        every_seconds: float = 0.25) -> None:
    """Log ``serving: curl http://HOST:PORT/predict`` once the app is ready (what
    ``/readyz`` checks: a model loaded, the online store reachable), so "serving"
    is never said before the server answers. Of all workers, the first one ready
    says it (it creates ``marker``); a warning if not ready within ``limit_seconds``."""
    import time

    pause = threading.Event()  # never set: a pause that is not a bare sleep
    deadline = time.monotonic() + limit_seconds
    while time.monotonic() < deadline:
        if app.is_ready():
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
    """
    import json
    import shutil
    import tempfile

    from granian.constants import Interfaces
    from granian.http import HTTP1Settings
    from granian.log import LogLevels
    from granian.server import Server

    runtime = Path(tempfile.mkdtemp(prefix="mlops-serve-"))
    multiprocess_dir = None
    if settings.workers > 1:
        # prometheus-client picks its storage when first imported (in each worker): set this first.
        multiprocess_dir = str(runtime / "prometheus")
        os.mkdir(multiprocess_dir)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = multiprocess_dir
    os.environ[WORKER_HANDOVER] = json.dumps({
        "settings": settings.model_dump(mode="json"), "multiprocess_dir": multiprocess_dir,
        "ready_marker": str(runtime / "ready")})
    log.info("serve: starting on http://%s:%d (%d worker(s) x %d thread(s))", settings.host,
             settings.port, settings.workers, settings.threads)
    quiet = logging.getLogger().getEffectiveLevel() > logging.INFO  # `-q`
    try:
        Server(
            target=target, factory=True, interface=Interfaces.RSGI,
            address=settings.host, port=settings.port, workers=settings.workers,
            websockets=False, respawn_failed_workers=True,
            # headers that do not arrive in time: hyper closes the connection (no Python work waits)
            http1_settings=HTTP1Settings(header_read_timeout=int(settings.body_timeout_seconds * 1000)),
            workers_kill_timeout=20, log_access=False,
            log_level=LogLevels.warning if quiet else LogLevels.info,
        ).serve()
    finally:
        shutil.rmtree(runtime, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    configure_logging(args.quiet)
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    settings = None
    try:
        if args.command == "dataset":
            dataset_command(args)
            return 0
        settings = build_settings(args)
        if args.command == "init":
            for folder in settings.layout():
                folder.mkdir(parents=True, exist_ok=True)
            log.info("init: shared folder %s is laid out", settings.shared)
        elif args.command in STAGE_NAMES:
            run_stages(settings, [args.command])
        elif args.command == "run":
            run_stages(settings, STAGE_NAMES)
            from pipeline.summary import render

            print(render(settings))
        elif args.command == "retrain":
            from pipeline import retrain

            if args.webhook:
                from werkzeug.serving import run_simple

                log.info("retrain: Alertmanager webhook on http://%s:%d/alerts", settings.host, args.webhook)
                run_simple(settings.host, args.webhook, retrain.webhook_app(settings), threaded=True)
            else:
                print(retrain.retrain(settings).line())
        elif args.command == "summary":
            from pipeline.summary import render

            print(render(settings))
        elif args.command == "serve":
            serve(settings)
        elif args.command in ("backup", "restore"):
            backup_command(settings, args)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to finish the job", file=sys.stderr)
        return 130
    except Exception as exc:
        # A full disk, a read-only volume, a file where the shared folder should be:
        # they surface from DVC, pyarrow, SQLite or MLflow in their own wrappers.
        known = storage_error(exc, settings.shared) if settings else None
        if known is None:
            raise
        log.debug("storage failure", exc_info=True)
        print(f"error: {known}", file=sys.stderr)
        return known.exit_code
    return 0
