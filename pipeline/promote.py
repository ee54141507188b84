"""Stage 5, promote: move the registry alias to the new version if it is not worse.

Scores compare only between versions of one data set measured the same way
(holdout or in-sample); a version of another data set never keeps the alias
over one trained on what is declared now.

MLflow stages are deprecated; the alias (default ``production``) is what
serving follows. :func:`decide` is the pure rule.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

from pipeline.registry import alias_version, mlflow_session, set_alias, version_score
from pipeline.stage import StageContext, StageResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    candidate_version: int
    candidate_rmse: float
    current_version: int | None
    current_rmse: float | None


def decide(candidate_version: int, candidate_rmse: float, current_version: int | None,
           current_rmse: float | None, tolerance: float, not_comparable: str | None = None) -> Decision:
    """Promote the first version, and any later one whose RMSE is at most
    ``(1 + tolerance)`` times the current version's. ``not_comparable`` names why
    the two scores cannot be compared (another data set, another evaluation):
    then the candidate, trained on what is declared now, is promoted."""
    def made(promote: bool, reason: str) -> Decision:
        return Decision(promote, reason, candidate_version, candidate_rmse, current_version, current_rmse)

    if current_version is None or current_rmse is None:
        return made(True, "no version holds the alias yet: the first one is promoted")
    if current_version == candidate_version:
        return made(False, f"version {candidate_version} already holds the alias")
    if not_comparable:
        return made(True, f"version {current_version} {not_comparable}: its score does not compare; the version "
                          "trained on the declared data set is promoted")
    limit = current_rmse * (1.0 + tolerance)
    if candidate_rmse <= limit:
        return made(True, f"RMSE {candidate_rmse:.4f} is within {tolerance:.0%} of the current "
                          f"{current_rmse:.4f} (version {current_version})")
    return made(False, f"RMSE {candidate_rmse:.4f} is worse than the current {current_rmse:.4f} "
                       f"(version {current_version}) beyond the {tolerance:.0%} tolerance")


def run(ctx: StageContext) -> StageResult:
    settings, train, schema = ctx.settings, ctx.upstream["train"], ctx.schema
    candidate = int(train.outputs["model_version"])
    inputs = {"model_name": settings.model_name, "alias": settings.model_alias,
              "candidate_version": candidate, "tolerance": settings.promote_tolerance}
    result = ctx.start(inputs)
    with mlflow_session(settings, schema) as client:
        candidate_rmse, scored_on, _ = version_score(client.get_model_version(settings.model_name, str(candidate)))
        current_mv = alias_version(client, settings.model_name, settings.model_alias)
        current_rmse, current_scored_on, current_dataset = version_score(current_mv) if current_mv else (
            None, "", None)
        not_comparable = None
        current_refs = current_mv.tags.get("mlops.feature_refs") if current_mv else None
        target = current_mv.tags.get("mlops.target") if current_mv else None
        if current_mv and current_dataset not in (None, schema.dataset):
            not_comparable = f"was trained on the data set {current_dataset!r}"
        elif current_refs is not None and current_refs != ",".join(schema.feature_refs()):
            # the declaration changed its features under the same name: the old model cannot
            # even read what the online store now serves
            not_comparable = "takes other features than the data set now declares"
        elif target is not None and target != schema.target:
            not_comparable = f"predicts {target!r}, not {schema.target!r}"
        elif current_mv and current_scored_on != scored_on:
            not_comparable = f"was scored on the {current_scored_on}, this one on the {scored_on}"
        decision = decide(candidate, candidate_rmse, int(current_mv.version) if current_mv else None,
                          current_rmse, settings.promote_tolerance, not_comparable)
        if decision.promote:
            set_alias(client, settings.model_name, settings.model_alias, candidate)
        served = alias_version(client, settings.model_name, settings.model_alias)
    outputs = {**asdict(decision), "alias": settings.model_alias,
               "alias_version": int(served.version) if served else None}
    verb = f"moved '{settings.model_alias}' to version {candidate}" if decision.promote else \
        f"kept '{settings.model_alias}' on version {decision.current_version}"
    message = f"{verb}: {decision.reason}"
    if result.unchanged() and not decision.promote:
        return result.skip(message, outputs)
    return result.done(outputs, message)
