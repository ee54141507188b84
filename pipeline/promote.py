"""Stage 5, promote: move the registry alias to the new version if it is not worse.

MLflow stages are deprecated; the alias (default ``production``) is what
serving follows. :func:`decide` is the pure rule.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

from pipeline.registry import alias_version, mlflow_session, set_alias, version_rmse
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
           current_rmse: float | None, tolerance: float) -> Decision:
    """Promote the first version, and any later one whose holdout RMSE is at
    most ``(1 + tolerance)`` times the current production version's."""
    def made(promote: bool, reason: str) -> Decision:
        return Decision(promote, reason, candidate_version, candidate_rmse, current_version, current_rmse)

    if current_version is None or current_rmse is None:
        return made(True, "no version holds the alias yet: the first one is promoted")
    if current_version == candidate_version:
        return made(False, f"version {candidate_version} already holds the alias")
    limit = current_rmse * (1.0 + tolerance)
    if candidate_rmse <= limit:
        return made(True, f"holdout RMSE {candidate_rmse:.4f} is within {tolerance:.0%} of the current "
                          f"{current_rmse:.4f} (version {current_version})")
    return made(False, f"holdout RMSE {candidate_rmse:.4f} is worse than the current {current_rmse:.4f} "
                       f"(version {current_version}) beyond the {tolerance:.0%} tolerance")


def run(ctx: StageContext) -> StageResult:
    settings, train = ctx.settings, ctx.upstream["train"]
    candidate = int(train.outputs["model_version"])
    inputs = {"model_name": settings.model_name, "alias": settings.model_alias,
              "candidate_version": candidate, "tolerance": settings.promote_tolerance}
    result = ctx.start(inputs)
    with mlflow_session(settings) as client:
        candidate_mv = client.get_model_version(settings.model_name, str(candidate))
        current_mv = alias_version(client, settings.model_name, settings.model_alias)
        decision = decide(
            candidate, version_rmse(client, candidate_mv),
            int(current_mv.version) if current_mv else None,
            version_rmse(client, current_mv) if current_mv else None,
            settings.promote_tolerance,
        )
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
