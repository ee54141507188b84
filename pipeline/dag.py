"""The pipeline, declared once: every stage, what it reads and what it promises.

Everything that needs the stage graph takes it from :data:`PIPELINE`: the CLI
(subcommands and their help), :func:`pipeline.stage.execute` (which upstream
records to wait for and hand to the stage body), the summary, the benchmarks
and the tests. Tests hold compose.yaml's ``depends_on`` chain and the Helm
chart's Jobs and sync waves to it, so a stage added here without its compose
service or its Job fails a test that names what is missing.

A stage named ``x`` lives in the module ``pipeline.x``, whose ``run(ctx)`` is
its body (:class:`pipeline.stage.StageContext`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StageSpec:
    name: str
    summary: str  # one line: the CLI's help, the docs
    needs: tuple[str, ...] = ()  # upstream stages whose run records the body reads
    promises: tuple[str, ...] = ()  # keys of its record's outputs that others read
    data_flags: bool = False  # takes --rows/--seed on the command line
    always_runs: bool = False  # a check of the present (time is an input): never "up to date"

    @property
    def module(self) -> str:
        return f"pipeline.{self.name}"


PIPELINE: tuple[StageSpec, ...] = (
    StageSpec("ingest", "copy the data set's source (or generate the synthetic customers) into <shared>/data/raw "
                        "and version it with DVC",
              promises=("parts", "rows", "entity_type", "sample_entity", "bad_rows_injected", "dvc_hash", "truth"),
              data_flags=True),
    StageSpec("features", "check raw data against DVC, validate, quarantine bad rows, write Parquet "
                          "features",
              needs=("ingest",),
              promises=("rows_out", "rows_quarantined", "quarantine_path", "features_md5", "labels_md5",
                        "raw_dvc_hash", "event_time_min", "event_time_max", "sample_entity")),
    StageSpec("feast", "apply the Feast feature repository and materialize into the online store",
              needs=("features", "ingest"),
              promises=("feature_refs", "registry", "sample_entity")),
    StageSpec("train", "train linear regression on Feast historical features; log and register in "
                       "MLflow",
              needs=("feast", "features", "ingest"),
              promises=("model_name", "model_version", "run_id", "metrics"),
              data_flags=True),
    StageSpec("promote", "move the registry alias to the new version if it is not worse",
              needs=("train",),
              promises=("alias", "alias_version", "reason")),
    StageSpec("monitor", "compare recent predictions and the newest features with training: drift, "
                         "freshness, quarantine rate, live error; write reports",
              needs=("features", "feast", "train", "promote"),
              promises=("report", "drifted_features"), always_runs=True),
)

STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in PIPELINE)
# The stages a re-run on unchanged inputs skips (all but the checks of the present).
IDEMPOTENT: tuple[str, ...] = tuple(s.name for s in PIPELINE if not s.always_runs)
_BY_NAME = {s.name: s for s in PIPELINE}


def spec(name: str) -> StageSpec:
    """The declaration of one stage (KeyError for a name that is not a stage)."""
    return _BY_NAME[name]


def check(pipeline: tuple[StageSpec, ...] = PIPELINE) -> None:
    """The declaration is a DAG in its own order: every need names an earlier stage."""
    seen: set[str] = set()
    for stage in pipeline:
        if stage.name in seen:
            raise ValueError(f"stage {stage.name!r} is declared twice")
        late = [n for n in stage.needs if n not in seen]
        if late:
            raise ValueError(f"stage {stage.name!r} needs {late}, which are not declared before it")
        seen.add(stage.name)
