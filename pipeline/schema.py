"""The data contract every stage shares: entity, features, target, valid ranges.

Bend the blueprint to your own data here first: the generator, the validator,
the Feast definitions, training and serving all read these names.
"""

from __future__ import annotations

from dataclasses import dataclass

ENTITY = "customer"
JOIN_KEY = "customer_id"
TIMESTAMP = "event_timestamp"
TARGET = "next_month_spend"
FEATURE_VIEW = "customer_features"
# Entity keys are int64 in Feast: the largest one a request may name.
ENTITY_ID_MAX = 2**63 - 1
# The longest string key a request may name (bytes of UTF-8).
ENTITY_KEY_MAX_BYTES = 256
# Bump when the generator or the feature transforms change meaning: stages
# include it in their input fingerprints, so old outputs are not reused.
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Feature:
    name: str
    low: float  # valid range, inclusive: values outside are quarantined
    high: float
    integer: bool = False
    description: str = ""


FEATURES: tuple[Feature, ...] = (
    Feature("age", 18, 100, integer=True, description="customer age in years"),
    Feature("tenure_months", 0, 600, integer=True, description="months since sign-up"),
    Feature("monthly_spend", 0, 10_000, description="spend over the last month"),
    Feature("support_calls", 0, 100, integer=True, description="support calls, last 90 days"),
    Feature("sessions_per_week", 0, 500, description="app sessions per week"),
    Feature("discount_rate", 0, 1, description="share of spend on discount"),
    Feature("late_payments", 0, 120, integer=True, description="late payments ever"),
    Feature("satisfaction", 1, 5, description="last survey score, 1 to 5"),
)
FEATURE_NAMES: tuple[str, ...] = tuple(f.name for f in FEATURES)
RAW_COLUMNS: tuple[str, ...] = (JOIN_KEY, TIMESTAMP, *FEATURE_NAMES, TARGET)


def feature_refs() -> list[str]:
    """Feast feature references, ``view:feature``, in model input order."""
    return [f"{FEATURE_VIEW}:{name}" for name in FEATURE_NAMES]


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
