"""The data contract every stage shares: entity, event time, features, target.

A :class:`Schema` is made from a data set declaration (:mod:`pipeline.dataset`);
the generator, the validator, the Feast definitions, training and serving all
read its names. The built-in synthetic customers are one declaration among
others (``pipeline.dataset.CUSTOMERS_YAML``).
"""

from __future__ import annotations

from dataclasses import dataclass

# Entity keys are int64 in Feast: the largest integer key a request may name.
ENTITY_ID_MAX = 2**63 - 1
# The longest string key a request may name (bytes of UTF-8).
ENTITY_KEY_MAX_BYTES = 256


@dataclass(frozen=True)
class Feature:
    name: str
    low: float  # valid range, inclusive: values outside are quarantined
    high: float
    integer: bool = False
    description: str = ""


@dataclass(frozen=True)
class Schema:
    dataset: str  # the declaration's name
    entity: str  # Feast entity name
    join_key: str  # the entity key column
    key_type: str  # "int" (int64) or "string"
    timestamp: str  # the event-time column
    target: str
    features: tuple[Feature, ...]
    feature_view: str
    project: str  # Feast project
    version: str  # changes whenever the declaration's meaning does: stages re-run
    entity_description: str = ""

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.features)

    @property
    def raw_columns(self) -> tuple[str, ...]:
        """The columns of the raw CSV parts ingest writes, in order."""
        return (self.join_key, self.timestamp, *self.feature_names, self.target)

    @property
    def int_keys(self) -> bool:
        return self.key_type == "int"

    def feature_refs(self) -> list[str]:
        """Feast feature references, ``view:feature``, in model input order."""
        return [f"{self.feature_view}:{name}" for name in self.feature_names]
