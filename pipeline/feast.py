"""Stage 3, feast: the feature repository, ``apply`` and ``materialize``.

The repository is defined in code (:func:`definitions`) and its config built
from :class:`Settings` (:func:`repo_config`). The stage also writes
``<shared>/feast/feature_store.yaml`` so Feast's own CLI and SDK open the same
store with no glue: ``feast -c .shared/feast feature-views list``. With Redis,
the password is not written to the volume: the file reads
``${MLOPS_REDIS_PASSWORD}`` from the environment, as Feast expands variables.
"""

from __future__ import annotations

import logging
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pandas as pd
import yaml
from feast import Entity, FeatureStore, FeatureView, Field, FileSource, RepoConfig, ValueType
from feast.infra.registry.file import FileRegistryStore
from feast.types import Float64

from pipeline import lakehouse
from pipeline.errors import (ConfigError, OnlineStoreIncomplete, OnlineStoreUnavailable,
                             PublishedFeaturesChanged)
from pipeline.io import atomic_write_bytes
from pipeline.dataset import load
from pipeline.schema import Schema
from pipeline.settings import Settings
from pipeline.stage import StageContext, StageResult

log = logging.getLogger(__name__)

# Socket timeout while loading Redis: a pipelined batch is far bigger than a lookup.
LOAD_TIMEOUT_SECONDS = 60.0


class AtomicFileRegistryStore(FileRegistryStore):
    """Feast's file registry store, but written atomically.

    Feast's own store truncates ``registry.db`` and writes it in place, so a
    stage killed mid-write would leave a torn registry for the server to read.
    This one writes a temp file beside it, fsyncs and renames it over.
    """

    def _write_registry(self, registry_proto) -> None:
        registry_proto.version_id = str(uuid.uuid4())
        registry_proto.last_updated.FromDatetime(datetime.now(timezone.utc))
        atomic_write_bytes(Path(self._filepath), registry_proto.SerializeToString())


def definitions(features_path: Path | str, schema: Schema, s3_endpoint: str | None = None) -> list:
    """The entity and the feature view over the features Parquet file, or over
    the published Parquet dataset in the object store (``s3://...``, read by
    Feast's file offline store through ``s3_endpoint``)."""
    entity = Entity(name=schema.entity, join_keys=[schema.join_key],
                    value_type=ValueType.INT64 if schema.int_keys else ValueType.STRING,
                    description=schema.entity_description)
    source = FileSource(name=f"{schema.feature_view}_source", path=str(features_path),
                        timestamp_field=schema.timestamp,
                        s3_endpoint_override=s3_endpoint if str(features_path).startswith("s3://") else None)
    view = FeatureView(
        name=schema.feature_view,
        entities=[entity],
        ttl=timedelta(0),  # no expiry: the latest value per entity is always served
        schema=[Field(name=f.name, dtype=Float64, description=f.description) for f in schema.features],
        online=True,
        source=source,
        tags={"owner": "mlops-shared-volume", "dataset": schema.dataset},
    )
    return [entity, view]


def online_store_config(settings: Settings, password_placeholder: bool = False) -> dict:
    """Feast's online store section: Redis when ``MLOPS_REDIS_URL`` is set,
    Feast's SQLite store on the shared folder otherwise.

    The Redis client gets bounded socket timeouts and no retries, so an
    unreachable Redis turns into an error within ``online_timeout_seconds``
    instead of redis-py's default retries with back-off. With
    ``MLOPS_REDIS_CLUSTER``: ``redis_type: redis_cluster``, the URL's node as
    the one startup node (``RedisCluster`` finds the others), no ``db`` and
    no ``retry`` (a cluster refuses both as arguments; its own retries are
    set to none instead).
    """
    if not settings.redis_url:
        return {"type": "sqlite", "path": str(settings.feast_dir / "online_store.db")}
    host, port, db, password = settings.redis_parts()
    timeout = settings.online_timeout_seconds
    if settings.redis_cluster:
        from pipeline.redis_cluster import cluster_options

        cluster_options(settings, timeout)  # refuses a database other than 0, saying what to do
        parts = [f"{host}:{port}", f"socket_timeout={timeout}", f"socket_connect_timeout={timeout}",
                 "cluster_error_retry_attempts=0"]
    else:
        parts = [f"{host}:{port}", f"db={db}", f"socket_timeout={timeout}",
                 f"socket_connect_timeout={timeout}", "retry=null"]
    # Feast hands these to redis-py as they are (values parsed as JSON: true -> True)
    parts += [f"{key}={'true' if value is True else value}" for key, value in settings.redis_tls_options().items()]
    if password:
        if "," in password:
            raise ConfigError("the Redis password must not contain ',' (Feast's connection "
                              "string separator); choose another password")
        parts.append("password=${MLOPS_REDIS_PASSWORD}" if password_placeholder
                     else f"password={password}")
    if settings.redis_cluster:
        return {"type": "redis", "redis_type": "redis_cluster", "connection_string": ",".join(parts)}
    return {"type": "redis", "connection_string": ",".join(parts)}


# Feast's DuckDB offline store: the point-in-time join in DuckDB, out of core (about 4x
# faster than the file store's pandas join at 10^6 rows, and the same rows). It reads
# local files; s3:// paths would need DuckDB's httpfs extension, which DuckDB downloads
# on first use, so the lakehouse's registered view keeps the file store (train's buckets
# are local files, so they are joined in DuckDB there too).
LOCAL_OFFLINE_STORE = {"type": "duckdb"}


def offline_store_config(settings: Settings) -> dict:
    """The registered offline store: DuckDB over the volume's Parquet, the file store
    (Dask, with ``s3_endpoint_override``) over the lakehouse's."""
    return {"type": "file"} if settings.lakehouse else dict(LOCAL_OFFLINE_STORE)


def _config_dict(settings: Settings, password_placeholder: bool = False) -> dict:
    return {
        "project": load(settings.dataset).schema().project,
        "provider": "local",
        "registry": {"registry_type": "file", "path": str(settings.feast_dir / "registry.db"),
                     "registry_store_type": f"{__name__}.AtomicFileRegistryStore",
                     "cache_ttl_seconds": 60},
        "online_store": online_store_config(settings, password_placeholder),
        "offline_store": offline_store_config(settings),
        "entity_key_serialization_version": 3,
    }


def repo_config(settings: Settings) -> RepoConfig:
    return RepoConfig(repo_path=settings.feast_dir, **_config_dict(settings))


def open_store(settings: Settings) -> FeatureStore:
    settings.feast_dir.mkdir(parents=True, exist_ok=True)
    return FeatureStore(config=repo_config(settings))


def write_feature_store_yaml(settings: Settings) -> Path:
    path = settings.feast_dir / "feature_store.yaml"
    text = ("# Written by `python -m pipeline feast`; open with `feast -c " f"{settings.feast_dir}`.\n"
            + yaml.safe_dump(_config_dict(settings, password_placeholder=True), sort_keys=False))
    atomic_write_bytes(path, text.encode())
    return path


def online_features(store: FeatureStore, schema: Schema, entity_ids: list) -> dict[str, list]:
    """Feature values for the entities, in schema order (None where unknown)."""
    rows = [{schema.join_key: int(e) if schema.int_keys else str(e)} for e in entity_ids]
    return store.get_online_features(features=schema.feature_refs(), entity_rows=rows).to_dict()


def _mark_loaded(settings: Settings, schema: Schema, features_md5: str) -> None:
    """Set the marker that says the whole view is in Redis (written last: a load cut short has none)."""
    import redis

    from pipeline.redis_layout import connect, loaded_marker

    try:
        connect(settings, LOAD_TIMEOUT_SECONDS).set(loaded_marker(schema), features_md5)
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        raise OnlineStoreUnavailable(exc) from exc


def _holds(store: FeatureStore, schema: Schema, entity) -> bool:
    """Whether the online store answers for ``entity``; a store whose file or
    tables are gone (a restored or wiped volume, a Redis restart) does not."""
    try:
        return online_features(store, schema, [entity])[schema.feature_names[0]][0] is not None
    except Exception as exc:  # e.g. sqlite3 "no such table", a registry that lost the view
        log.info("feast: the online store cannot answer (%s: %s)", type(exc).__name__, exc)
        return False


def run(ctx: StageContext) -> StageResult:
    settings, features, schema = ctx.settings, ctx.upstream["features"], ctx.schema
    sample = features.outputs["sample_entity"]
    online = online_store_config(settings, password_placeholder=True)
    inputs = {
        "features_md5": features.outputs["features_md5"],
        "feature_refs": schema.feature_refs(),
        "dataset": schema.version,
        "entity_type": schema.key_type,
        "online_store": online,
    }
    if settings.lakehouse_uri:  # a new version is a new path in the registry: apply it
        inputs["features_uri"] = lakehouse.table_uri(settings, "features")
    result = ctx.start(inputs)
    with lakehouse.s3_environment(settings):
        return _apply_and_load(settings, schema, features, inputs, result, online, sample)


def _apply_and_load(settings: Settings, schema: Schema, features, inputs: dict, result: StageResult,
                    online: dict, sample) -> StageResult:
    if settings.lakehouse_uri:  # the pointer may have moved since the features stage published
        published = lakehouse.table_md5(settings, "features")
        if published != inputs["features_md5"]:
            raise PublishedFeaturesChanged(published, inputs["features_md5"])
    store = open_store(settings)
    if result.unchanged() and lakehouse.table_md5(settings, "features") == inputs["features_md5"]:
        if _holds(store, schema, sample):
            if settings.redis_url:
                _mark_loaded(settings, schema, inputs["features_md5"])  # stores loaded before the marker existed
            return result.skip("registry applied and online store holds the latest features",
                               result.previous.outputs)
        log.info("feast: online store lost its data (sample entity %s missing); materializing again",
                 sample)

    log.info("feast: apply (registry %s)", settings.feast_dir / "registry.db")
    store.apply(definitions(lakehouse.table_uri(settings, "features"), schema, settings.s3_endpoint))
    yaml_path = write_feature_store_yaml(settings)
    start = pd.Timestamp(features.outputs["event_time_min"]).to_pydatetime()
    end = (pd.Timestamp(features.outputs["event_time_max"]) + pd.Timedelta(seconds=1)).to_pydatetime()
    if settings.redis_url and schema.int_keys:
        # Feast's layout, written by our loader: what `feast materialize` writes
        # for this window, several times faster (tests compare the bytes).
        import redis

        from pipeline.redis_layout import connect
        from pipeline.redis_loader import load_latest, log_progress

        log.info("feast: loading the latest features per entity into Redis (Feast's layout)")
        try:
            client = connect(settings, LOAD_TIMEOUT_SECONDS)
            with lakehouse.local_copy(settings, "features") as features_file:
                loaded = load_latest(client, features_file, schema, progress=log_progress())
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            raise OnlineStoreUnavailable(exc) from exc
        store.registry.apply_materialization(store.get_feature_view(schema.feature_view), schema.project,
                                             start, end)
        how = f"loaded {loaded} entities into redis in Feast's layout"
    else:
        log.info("feast: materialize %s .. %s into %s", start, end, online["type"])
        store.materialize(start_date=start, end_date=end, feature_views=[schema.feature_view])
        how = f"materialized into {online['type']}"
    values = online_features(store, schema, [sample])
    if values[schema.feature_names[0]][0] is None:
        raise OnlineStoreIncomplete(how, sample)
    if settings.redis_url:
        _mark_loaded(settings, schema, inputs["features_md5"])
    outputs = {
        "project": schema.project,
        "feature_view": schema.feature_view,
        "entity_type": schema.key_type,
        "registry": str(settings.feast_dir / "registry.db"),
        "feature_store_yaml": str(yaml_path),
        "online_store": online["type"],
        "feature_refs": schema.feature_refs(),
        "materialized": {"start": start.isoformat(), "end": end.isoformat()},
        "sample_entity": sample,
        "sample_features": {name: values[name][0] for name in schema.feature_names},
    }
    return result.done(outputs, f"applied {schema.feature_view}, {how}")
