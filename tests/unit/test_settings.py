import pytest

from pipeline.feast import online_store_config
from pipeline.errors import ConfigError
from pipeline.settings import Settings, mask_url


def test_defaults_put_everything_under_the_shared_folder(tmp_path):
    s = Settings(shared_dir=tmp_path)
    assert s.tracking_uri == f"sqlite:///{tmp_path}/mlflow/mlflow.db"
    assert online_store_config(s) == {"type": "sqlite", "path": str(tmp_path / "feast/online_store.db")}


def test_environment_variables_are_read(monkeypatch, tmp_path):
    monkeypatch.setenv("MLOPS_SHARED_DIR", str(tmp_path))
    monkeypatch.setenv("MLOPS_ROWS", "1234")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    monkeypatch.setenv("MLOPS_REDIS_URL", "")
    s = Settings()
    assert s.shared == tmp_path and s.rows == 1234
    assert s.tracking_uri == "http://mlflow:5000" and s.artifact_location is None
    assert s.redis_url is None


def test_redis_url_becomes_a_bounded_feast_connection_string():
    s = Settings(redis_url="redis://:s3cret@redis:6380/2", online_timeout_seconds=0.1)
    assert s.redis_parts() == ("redis", 6380, 2, "s3cret")
    conn = online_store_config(s)["connection_string"]
    assert conn.startswith("redis:6380,db=2,")
    assert "socket_timeout=0.1" in conn and "retry=null" in conn and "password=s3cret" in conn
    # the copy written to the volume never holds the password
    written = online_store_config(s, password_placeholder=True)["connection_string"]
    assert "s3cret" not in written and "password=${MLOPS_REDIS_PASSWORD}" in written


def test_password_from_its_own_variable_wins():
    s = Settings(redis_url="redis://redis:6379/0", redis_password="from-secret")
    assert s.redis_parts()[3] == "from-secret"


def test_a_bad_redis_url_says_what_to_do():
    with pytest.raises(ValueError, match="unset it to use Feast's SQLite"):
        Settings(redis_url="localhost:6379")


@pytest.mark.parametrize("url", ["redis://:s3cret-pw@redis:6379/zero", "redis://:s3cret-pw@redis:port/0",
                                 "http://:s3cret-pw@redis:6379/0"])
def test_a_malformed_redis_url_is_one_line_that_hides_the_password(url):
    with pytest.raises(ValueError, match="numeric port and database") as caught:
        Settings(redis_url=url)
    message = caught.value.errors()[0]["msg"]  # what the CLI prints (pydantic's repr adds the input)
    assert "s3cret-pw" not in message and "***" in message


def test_the_cli_turns_a_bad_setting_into_one_line_and_exit_code_2(monkeypatch, capsys, tmp_path):
    from pipeline.cli import main

    monkeypatch.setenv("MLOPS_REDIS_URL", "redis://:s3cret-pw@redis:6379/zero")
    assert main(["summary", "--shared-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: invalid settings") and "s3cret-pw" not in err


def test_mask_url_hides_only_the_password():
    assert mask_url("redis://:pw@host:6380/1") == "redis://:***@host:6380/1"
    assert mask_url("rediss://user:pw@[::1]:6380/0") == "rediss://user:***@[::1]:6380/0"
    assert mask_url("redis://host:6379/0") == "redis://host:6379/0"


def test_password_from_a_secret_file(tmp_path):
    secret = tmp_path / "redis_password"
    secret.write_text("from-file\n")
    s = Settings(redis_url="redis://:in-url@redis:6379/0", redis_password_file=secret)
    assert s.redis_parts()[3] == "from-file"
    missing = Settings(redis_url="redis://redis:6379/0", redis_password_file=tmp_path / "nope")
    with pytest.raises(ConfigError, match="mount the secret there"):
        missing.redis_parts()


def test_the_offline_store_is_duckdb_on_the_volume_and_the_file_store_on_the_lakehouse(tmp_path):
    """DuckDB reads s3:// only through an extension it downloads on first use: the lakehouse's
    registered view keeps Feast's file store (train splits it onto the volume for DuckDB)."""
    from pipeline.feast import offline_store_config

    volume = Settings(shared_dir=tmp_path)
    assert offline_store_config(volume) == {"type": "duckdb"}
    lakehouse = volume.model_copy(update={"lakehouse": True})
    assert offline_store_config(lakehouse) == {"type": "file"}
