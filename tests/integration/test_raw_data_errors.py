"""Raw data a user got wrong: one line that says what is wrong, where, and what to
do, through the real CLI (DVC, the features stage), and nothing written."""

from __future__ import annotations

import pytest

from pipeline import versioning
from tests.support import clean_env, pipeline_cli

pytestmark = pytest.mark.integration


@pytest.fixture
def ingested(tmp_path):
    env = clean_env(MLOPS_SHARED_DIR=str(tmp_path), MLOPS_ROWS="300")
    pipeline_cli(["ingest"], env)
    return tmp_path, env, tmp_path / "data" / "raw" / "part-00000.csv"


def revision(shared, part, data: bytes) -> None:
    """Change the raw file and version the change, as a user running `dvc add` would."""
    part.write_bytes(data)
    versioning.add_and_push(shared, part.parent)


def test_a_latin1_byte_names_its_file_and_line(ingested):
    shared, env, part = ingested
    lines = part.read_bytes().split(b"\n")
    lines[3] = lines[3].replace(b",", b",Z\xe9", 1)  # one Latin-1 'é' on line 4 (the header is line 1)
    revision(shared, part, b"\n".join(lines))
    proc = pipeline_cli(["features"], env, check=False)
    assert proc.returncode == 4
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "part-00000.csv: line 4 is not UTF-8 text (byte 0xe9)" in err[0], proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (shared / "data" / "features" / "features.parquet").exists()


def test_a_header_only_file_says_there_are_no_rows(ingested):
    shared, env, part = ingested
    revision(shared, part, part.read_bytes().split(b"\n")[0] + b"\n")
    proc = pipeline_cli(["features"], env, check=False)
    assert proc.returncode == 4
    assert "holds no rows, only header lines (part-00000.csv" in proc.stderr, proc.stderr
    assert "every row was quarantined" not in proc.stderr


def test_changed_raw_data_names_the_folder_where_dvc_checkout_works(ingested):
    import subprocess
    import sys

    shared, env, part = ingested
    part.write_bytes(part.read_bytes() + b"1,2\n")
    proc = pipeline_cli(["features"], env, check=False)
    assert proc.returncode == 4
    command = proc.stderr.split("`")[1]  # the command the message gives, run as given
    assert command.startswith(f"cd {shared} && ")
    restored = subprocess.run(["bash", "-c", command.replace("dvc ", f"{sys.executable} -m dvc ", 1)],
                              capture_output=True, text=True, env=env)
    assert restored.returncode == 0, restored.stderr
    pipeline_cli(["features"], env)
