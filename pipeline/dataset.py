"""A data set, declared in one file: where the rows are, the entity key, the event
time, the target and the features. Every stage follows it.

``MLOPS_DATASET`` names a YAML file; unset, the built-in synthetic customers
(:data:`CUSTOMERS_YAML`) are used. The shape users write by hand::

    name: housing                 # Feast project and feature view, MLflow model name (unless overridden)
    source:
      path: data/housing.csv      # CSV or Parquet: a file, a folder of them, or a glob; relative to this file
    entity:
      column: house_id            # join key: integer or string
    timestamp:
      column: observed_at         # optional: without it every row gets the ingestion time
    target: price
    features: [rooms, area, age]  # or a mapping: {rooms: {type: int, min: 0, max: 50}, ...}
    holdout: 0.2                  # 0: fit on every row (metrics are then in-sample)

A declaration that cannot be right (a target that is also a feature, duplicate
names, unknown keys, a missing source) is refused here with one line naming
the field; what needs the data (unknown columns, nulls in the key, a type that
cannot hold the values) is checked by :mod:`pipeline.datacheck` before
anything is written.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import math
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import ConfigError
from pipeline.schema import Feature, Schema

NAME = r"^[A-Za-z][A-Za-z0-9_]*$"
INGESTED_AT = "event_timestamp"  # the event-time column ingest adds when none is declared

CUSTOMERS_YAML = """\
# The built-in data set: synthetic customers with a known truth (the generator's
# coefficients), so training can be checked against it.
name: customers
source:
  synthetic: {}
entity:
  column: customer_id
  name: customer
  type: int
  description: a customer, keyed by customer_id
timestamp:
  column: event_timestamp
target: next_month_spend
features:
  age: {type: int, min: 18, max: 100, description: "customer age in years"}
  tenure_months: {type: int, min: 0, max: 600, description: "months since sign-up"}
  monthly_spend: {min: 0, max: 10000, description: "spend over the last month"}
  support_calls: {type: int, min: 0, max: 100, description: "support calls, last 90 days"}
  sessions_per_week: {min: 0, max: 500, description: "app sessions per week"}
  discount_rate: {min: 0, max: 1, description: "share of spend on discount"}
  late_payments: {type: int, min: 0, max: 120, description: "late payments ever"}
  satisfaction: {min: 1, max: 5, description: "last survey score, 1 to 5"}
holdout: 0.2
feast:
  project: mlops
  feature_view: customer_features
model:
  name: mlops-linear
"""


class DatasetError(ConfigError):
    """A declaration that cannot be right, or does not fit its source."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FeatureSpec(_Strict):
    type: Literal["float", "int"] = "float"
    min: float | None = None
    max: float | None = None
    description: str = ""

    @model_validator(mode="after")
    def _range(self) -> FeatureSpec:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min:g} is above max {self.max:g}")
        return self


class Synthetic(_Strict):
    rows: int | None = Field(None, ge=10, description="unset: MLOPS_ROWS")
    seed: int | None = Field(None, ge=0, description="unset: MLOPS_SEED")


class Source(_Strict):
    path: str | None = None
    synthetic: Synthetic | None = None

    @model_validator(mode="after")
    def _one(self) -> Source:
        if (self.path is None) == (self.synthetic is None):
            raise ValueError("give exactly one of path (your CSV or Parquet data) or synthetic")
        return self


class EntitySpec(_Strict):
    column: str = Field(pattern=NAME)
    name: str | None = Field(None, pattern=NAME)
    type: Literal["int", "string"] | None = None  # unset: read from the data
    description: str = ""


class TimestampSpec(_Strict):
    column: str = Field(pattern=NAME)


class FeastSpec(_Strict):
    project: str | None = Field(None, pattern=NAME)
    feature_view: str | None = Field(None, pattern=NAME)


class ModelSpec(_Strict):
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class Declaration(_Strict):
    name: str = Field(pattern=NAME)
    source: Source
    entity: EntitySpec
    timestamp: TimestampSpec | None = None
    target: str = Field(pattern=NAME)
    features: dict[str, FeatureSpec]
    holdout: float = Field(0.2, ge=0, lt=1)
    feast: FeastSpec = FeastSpec()
    model: ModelSpec = ModelSpec()

    @field_validator("features", mode="before")
    @classmethod
    def _list_or_mapping(cls, value):
        if isinstance(value, list):
            names = [str(v) for v in value]
            duplicates = sorted({n for n in names if names.count(n) > 1})
            if duplicates:
                raise ValueError(f"{duplicates} listed more than once")
            return {name: {} for name in names}
        if isinstance(value, dict):
            return {k: (v if v is not None else {}) for k, v in value.items()}
        raise ValueError("give a list of column names or a mapping of name to {type, min, max}")

    @field_validator("features")
    @classmethod
    def _feature_names(cls, value: dict[str, FeatureSpec]) -> dict[str, FeatureSpec]:
        if not value:
            raise ValueError("declare at least one feature")
        bad = [name for name in value if not re.match(NAME, name)]
        if bad:
            raise ValueError(f"{bad} are not plain column names (letters, digits, _; a letter first)")
        return value

    @model_validator(mode="after")
    def _distinct_columns(self) -> Declaration:
        if self.target in self.features:
            raise ValueError(f"target {self.target!r} is also a feature: a model would read its own answer; "
                             "remove it from features")
        if self.entity.column == self.target or self.entity.column in self.features:
            raise ValueError(f"the entity column {self.entity.column!r} is also the target or a feature")
        if self.timestamp and self.timestamp.column in (self.target, self.entity.column, *self.features):
            raise ValueError(f"the timestamp column {self.timestamp.column!r} is also another column")
        return self


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys silently; a declaration must not."""


def _mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"the key {key!r} is given twice", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def parse(text: str, origin: str) -> Declaration:
    """A declaration from YAML text; one-line :class:`DatasetError` for anything wrong."""
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[-1]
        raise DatasetError(f"{origin}{line}: not valid YAML ({problem}); fix the file") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{origin}: a data set declaration is a YAML mapping (name, source, entity, "
                           "target, features); see docs/datasets.md")
    try:
        return Declaration.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "declaration"
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            message = "unknown key; see docs/datasets.md for the keys a declaration takes"
        elif first["type"] == "missing":
            message = "required; see docs/datasets.md"
        more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
        raise DatasetError(f"{origin}: {field}: {message}{more}") from None


def source_files(declaration: Declaration, base: Path) -> list[Path]:
    """The CSV or Parquet files a declared path names (a file, a folder, a glob), sorted."""
    raw = declaration.source.path or ""
    path = Path(raw) if Path(raw).is_absolute() else base / raw
    if any(ch in raw for ch in "*?["):
        files = [Path(p) for p in sorted(glob.glob(str(path), recursive=True))]
    elif path.is_dir():  # hidden folders (.ipynb_checkpoints, .git) hold copies, not data
        files = sorted(p for p in path.rglob("*")
                       if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
    elif path.is_file():
        files = [path]
    else:
        raise DatasetError(f"source.path: {path} does not exist; give a CSV or Parquet file, a folder of "
                           "them or a glob, relative to the declaration")
    files = [f for f in files if f.suffix.lower() in (".csv", ".parquet", ".pq") and not f.name.startswith(".")]
    if not files:
        raise DatasetError(f"source.path: no .csv or .parquet files in {path}")
    kinds = {f.suffix.lower() == ".csv" for f in files}
    if len(kinds) > 1:
        raise DatasetError(f"source.path: {path} mixes CSV and Parquet files; keep one format")
    return files


class Dataset:
    """A loaded declaration: its schema for the stages, its source, its identity."""

    def __init__(self, declaration: Declaration, origin: Path | None) -> None:
        self.declaration = declaration
        self.origin = origin  # None: the built-in customers
        self.base = origin.parent if origin else Path(".")
        # what the declaration says, not how it is written: comments and spacing change nothing
        self.digest = hashlib.sha256(declaration.model_dump_json().encode()).hexdigest()[:16]

    @property
    def synthetic(self) -> bool:
        return self.declaration.source.synthetic is not None

    @property
    def name(self) -> str:
        return self.declaration.name

    @property
    def model_name(self) -> str:
        return self.declaration.model.name or self.declaration.name

    def files(self) -> list[Path]:
        return source_files(self.declaration, self.base)

    def schema(self, entity_type: str | None = None) -> Schema:
        """The stages' schema; ``entity_type`` is what ingest found when the declaration left it open."""
        d = self.declaration
        features = tuple(
            Feature(name, -math.inf if spec.min is None else spec.min,
                    math.inf if spec.max is None else spec.max, integer=spec.type == "int",
                    description=spec.description)
            for name, spec in d.features.items())
        column = d.entity.column
        entity = d.entity.name or (column[:-3] if column.endswith("_id") and len(column) > 3 else d.name)
        return Schema(
            dataset=d.name, entity=entity, join_key=column,
            key_type=d.entity.type or entity_type or "int",
            entity_description=d.entity.description or f"a {entity}, keyed by {column}",
            timestamp=d.timestamp.column if d.timestamp else INGESTED_AT,
            target=d.target, features=features,
            feature_view=d.feast.feature_view or d.name, project=d.feast.project or d.name,
            version=self.digest)


@functools.lru_cache(maxsize=8)
def _load(path: str | None, mtime_ns: int) -> Dataset:
    if path is None:
        return Dataset(parse(CUSTOMERS_YAML, "built-in customers"), None)
    file = Path(path)
    try:
        text = file.read_text()
    except OSError as exc:
        raise DatasetError(f"MLOPS_DATASET={path}: {exc.strerror}; give the path of a data set declaration "
                           "(YAML), or unset it for the built-in synthetic customers") from None
    return Dataset(parse(text, file.name), file.resolve())


def schema_for(path: Path | None, ingest_record=None) -> Schema:
    """The schema of the data set ``path`` declares, with the entity key's type as the
    ingest run record found it where the declaration leaves it open."""
    return load(path).schema(ingest_record.outputs.get("entity_type") if ingest_record else None)


def load(path: Path | None) -> Dataset:
    """The data set a ``MLOPS_DATASET`` value names (None: the built-in customers)."""
    if path is None:
        return _load(None, 0)
    try:
        mtime = path.stat().st_mtime_ns
    except OSError:
        mtime = -1
    return _load(str(path), mtime)


# The built-in synthetic customers' schema (the generator's columns, the tests' default).
CUSTOMERS = load(None).schema()
