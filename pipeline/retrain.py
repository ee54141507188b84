"""Retrain: ingest-to-promote for the newest data, and what the promotion gate decided.

:func:`retrain` runs every declared stage from ingest to promote through
:func:`pipeline.cli.run_stages` (under the shared-folder lock, so it never
interleaves with another run) and reads the promote stage's record: the gate
still decides, and :class:`Outcome` says whether it promoted the new version
and why (promote's own reason). ``python -m pipeline retrain`` (the CLI), the
retrain CronJob and the Alertmanager webhook (:func:`webhook_app`) all call it.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import asdict, dataclass

from pipeline.io import RunRecord, read_record
from pipeline.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    promoted: bool
    reason: str
    candidate_version: int | None
    serving_version: int | None  # what the alias points at afterwards
    alias: str | None

    def line(self) -> str:
        verdict = "promoted" if self.promoted else "not promoted"
        return (f"retrain: version {self.candidate_version} {verdict} ({self.reason}); "
                f"{self.alias} is version {self.serving_version}")


def outcome(train: RunRecord | None, promote: RunRecord | None) -> Outcome:
    """What the last train and promote records say about the candidate."""
    if train is None or promote is None:
        return Outcome(False, "train or promote left no record", None, None, None)
    out = promote.outputs
    candidate = int(train.outputs["model_version"])
    return Outcome(bool(out.get("promote")) and out.get("alias_version") == candidate,
                   str(out.get("reason", "")), candidate, out.get("alias_version"), out.get("alias"))


def training_stages() -> tuple[str, ...]:
    """Every declared stage up to and including promote (serve and monitor are not retraining)."""
    from pipeline.dag import STAGE_NAMES

    return STAGE_NAMES[: STAGE_NAMES.index("promote") + 1]


def retrain(settings: Settings) -> Outcome:
    from pipeline.cli import run_stages

    run_stages(settings, training_stages())
    result = outcome(read_record(settings.runs_dir, "train"), read_record(settings.runs_dir, "promote"))
    log.info("%s", result.line())
    return result


def webhook_app(settings: Settings, retrain_fn=retrain):
    """A WSGI app for Alertmanager's webhook: ``POST /alerts`` with firing alerts starts one
    retrain in the background (202), or answers 409 while one runs; ``GET /last`` tells the outcome."""
    import json

    from werkzeug.wrappers import Request, Response

    state: dict = {"running": False, "last": None, "error": None}
    lock = threading.Lock()

    def work() -> None:
        try:
            state["last"], state["error"] = asdict(retrain_fn(settings)), None
        except Exception as exc:  # the next alert tries again; the reason is kept for /last
            log.exception("retrain failed")
            state["error"] = str(exc)
        finally:
            with lock:
                state["running"] = False

    @Request.application
    def app(request: Request) -> Response:
        def reply(body: dict, status: int = 200) -> Response:
            return Response(json.dumps(body), status=status, mimetype="application/json")
        if request.path == "/last" and request.method == "GET":
            return reply({k: state[k] for k in ("running", "last", "error")})
        if request.path != "/alerts" or request.method != "POST":
            return reply({"error": "POST /alerts (Alertmanager webhook) or GET /last"}, 404)
        try:
            firing = [a for a in (request.get_json(force=True) or {}).get("alerts", [])
                      if a.get("status") == "firing"]
        except Exception:
            return reply({"error": "the body is not Alertmanager's webhook JSON"}, 400)
        if not firing:
            return reply({"started": False, "why": "no firing alerts"})
        with lock:
            if state["running"]:
                return reply({"started": False, "why": "a retrain is already running"}, 409)
            state["running"] = True
        names = sorted({a.get("labels", {}).get("alertname", "?") for a in firing})
        log.info("retrain: started by %s", ", ".join(names))
        threading.Thread(target=work, name="retrain", daemon=True).start()
        return reply({"started": True, "alerts": names}, 202)

    return app
