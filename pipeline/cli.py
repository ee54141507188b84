"""The one command line: ``python -m pipeline <stage>``.

Settings come from ``MLOPS_*`` environment variables (see
:mod:`pipeline.settings`); the flags below override the common ones.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from pydantic import ValidationError

from pipeline import skip_feast_typechecks
from pipeline.dag import PIPELINE, STAGE_NAMES, spec
from pipeline.errors import ConfigError, PipelineError, storage_error
from pipeline.settings import Settings

log = logging.getLogger("pipeline")

# How long train waits for the MLflow store made ahead (tracking_store_ahead) before going on
STORE_AHEAD_SECONDS = 120

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
    from pipeline import backup, restore

    if args.command == "restore":
        done = restore.restore(settings, args.snapshot)
        print(f"restored snapshot {done['id']}: {done['files']} file(s), {done['bytes'] / 1e6:.1f} MB "
              f"into {settings.shared} in {done['seconds']:.1f}s; serve with `python -m pipeline serve`")
    elif args.list:
        for snap in backup.list_snapshots(settings):
            print(f"{snap['id']}  {snap['created_at']}  {snap['files']:>5} file(s)  {snap['bytes'] / 1e6:8.1f} MB")
    elif args.verify:
        done = restore.verify(settings, args.snapshot)
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
    with pipeline_lock(settings.shared, f"run ({', '.join(names)})", settings.lock_timeout_seconds), \
            tracking_store_ahead(settings, names) as store_ready:
        for name in names:
            if name == "train":
                store_ready()
            execute(name, settings, locked=True)
            release_freed_memory()


@contextlib.contextmanager
def tracking_store_ahead(settings: Settings, names: Sequence[str]) -> Iterator[Callable[[], None]]:
    """Create a new shared folder's MLflow SQLite store in another process while
    the stages before train run; the callable yielded waits for it.

    MLflow builds its tables through some fifty migrations, about 2 s here, on
    the way to train's first result; on the second core they overlap ingest,
    features and feast. The store is built in a temp file and published only
    if no store is there yet (:func:`pipeline.registry.init_sqlite_store`), and
    train waits for that process before it opens the store. If the process
    failed, a warning says why and train creates the store itself; if a stage
    before train fails, the process is interrupted at once.
    """
    from pipeline.registry import sqlite_path

    db = sqlite_path(settings.tracking_uri) if "train" in names[1:] else None
    if db is None or db.exists():
        yield lambda: None
        return
    errors = tempfile.TemporaryFile()
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; "
         "from pipeline.registry import init_sqlite_store; init_sqlite_store(Path(sys.argv[1]))", str(db)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errors)

    def stop(timeout: float) -> None:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)  # Python unwinds: its temp file is removed
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def ready() -> None:
        stop(STORE_AHEAD_SECONDS)
        if proc.returncode:
            errors.seek(0)
            said = errors.read().decode(errors="replace").strip().splitlines()
            log.warning("mlflow: the tracking store made ahead failed (exit %s: %s); train creates it",
                        proc.returncode, said[-1] if said else "no message")

    try:
        yield ready
    except BaseException:
        stop(0)  # a stage failed or was interrupted: not worth waiting for
        raise
    else:
        ready()  # never left behind to publish a store later
    finally:
        errors.close()


def main(argv: Sequence[str] | None = None) -> int:
    skip_feast_typechecks()
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
            from pipeline.launcher import serve

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
