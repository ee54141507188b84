"""Retrain's verdict from the records, and the Alertmanager webhook that starts it."""

from __future__ import annotations

import threading

from werkzeug.test import Client

from pipeline.io import RunRecord
from pipeline.retrain import Outcome, outcome, training_stages, webhook_app
from tests.support import wait_until


def record(stage: str, **outputs) -> RunRecord:
    return RunRecord(stage=stage, status="ok", inputs={}, outputs=outputs, fingerprint="f", started_at="t")


def test_promoted_and_refused_are_told_apart_with_the_gate_reason():
    train = record("train", model_version=4)
    yes = outcome(train, record("promote", promote=True, reason="better", alias_version=4, alias="production"))
    no = outcome(train, record("promote", promote=False, reason="RMSE 3.1 is worse than 2.0", alias_version=3,
                               alias="production"))
    assert yes.promoted and yes.serving_version == 4
    assert not no.promoted and no.serving_version == 3 and "worse" in no.reason
    assert "not promoted (RMSE 3.1 is worse than 2.0); production is version 3" in no.line()
    assert not outcome(None, None).promoted


def test_retrain_runs_up_to_promote_only():
    stages = training_stages()
    assert stages[0] == "ingest" and stages[-1] == "promote" and "monitor" not in stages


def test_webhook_starts_one_retrain_for_firing_alerts():
    release, calls = threading.Event(), []

    def fake(settings):
        calls.append(settings)
        release.wait(10)
        return Outcome(False, "worse", 5, 4, "production")

    client = Client(webhook_app("settings", fake))
    resolved = {"alerts": [{"status": "resolved", "labels": {"alertname": "MlopsFeatureDrift"}}]}
    assert client.post("/alerts", json=resolved).json == {"started": False, "why": "no firing alerts"}
    firing = {"alerts": [{"status": "firing", "labels": {"alertname": "MlopsFeatureDrift"}}]}
    assert client.post("/alerts", json=firing).status_code == 202
    assert client.post("/alerts", json=firing).status_code == 409  # one at a time
    release.set()
    last = wait_until(lambda: client.get("/last").json["last"], 10, "the retrain to finish")
    assert last["promoted"] is False and last["reason"] == "worse" and len(calls) == 1
    assert client.post("/alerts", data="not json").status_code == 400
