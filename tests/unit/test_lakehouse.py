"""The lakehouse's pure parts: where things go, the month a row lands in, the
keys in the environment for one block only (the store itself:
tests/integration/test_lakehouse.py)."""

from __future__ import annotations

import os

import pyarrow as pa
import pytest
from pydantic import ValidationError

from pipeline import lakehouse
from tests.support import make_settings


def lake(tmp_path, **extra):
    access, secret = tmp_path / "access", tmp_path / "secret"
    access.write_text("AKIA-unit\n")
    secret.write_text("s3cr3t-unit\n")
    return make_settings(tmp_path / "shared", s3_endpoint="http://127.0.0.1:9", lakehouse=True,
                         s3_access_key_file=access, s3_secret_key_file=secret, **extra)


def test_everything_goes_under_the_prefix_and_mlflow_artifacts_too(tmp_path):
    settings = lake(tmp_path, s3_bucket="data", s3_prefix="/team-a/prod/")
    assert settings.lakehouse_uri == "s3://data/team-a/prod/lakehouse"
    assert settings.artifact_location == "s3://data/team-a/prod/lakehouse/mlflow"
    assert lakehouse.root(settings) == "data/team-a/prod/lakehouse"
    assert lakehouse.dvc_remote_url(settings) == "s3://data/team-a/prod/lakehouse/dvc"
    off = make_settings(tmp_path / "shared", s3_endpoint="http://127.0.0.1:9")
    assert off.lakehouse_uri is None and off.artifact_location.startswith("file://")


def test_the_lakehouse_without_an_endpoint_is_refused(tmp_path):
    with pytest.raises(ValidationError, match="MLOPS_S3_ENDPOINT is unset"):
        make_settings(tmp_path, lakehouse=True, s3_endpoint=None)


def test_a_row_lands_in_the_month_of_its_utc_event_time():
    times = pa.array([1769903999_000000, 1769904000_000000], pa.timestamp("us", tz="UTC"))  # 2026-01-31T23:59:59Z, 02-01
    batch = pa.RecordBatch.from_arrays([pa.array([1, 2]), times], names=["id", "ts"])
    out = lakehouse._with_event_month(batch, "ts")
    assert out.column(lakehouse.PARTITION).to_pylist() == ["2026-01", "2026-02"]
    assert out.schema.names[:2] == ["id", "ts"]


def test_the_keys_are_in_the_environment_for_the_block_only(tmp_path, monkeypatch):
    settings = lake(tmp_path)
    monkeypatch.setenv("AWS_REGION", "eu-north-1")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    with lakehouse.s3_environment(settings):
        assert os.environ["AWS_ACCESS_KEY_ID"] == "AKIA-unit"
        assert os.environ["MLFLOW_S3_ENDPOINT_URL"] == "http://127.0.0.1:9"
    assert "AWS_ACCESS_KEY_ID" not in os.environ and "MLFLOW_S3_ENDPOINT_URL" not in os.environ
    assert os.environ["AWS_REGION"] == "eu-north-1"
    with lakehouse.s3_environment(make_settings(tmp_path / "off")):  # off: nothing set
        assert "AWS_ACCESS_KEY_ID" not in os.environ
