from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipeline import schema
from pipeline.errors import SchemaError
from pipeline.features import check_header, transform, validate_chunk
from pipeline.ingest import generate_chunk


def raw_row(**changes) -> dict:
    row = {schema.JOIN_KEY: "1001", schema.TIMESTAMP: "2026-01-02T03:04:05.000000Z",
           "age": "40", "tenure_months": "12", "monthly_spend": "99.5", "support_calls": "1",
           "sessions_per_week": "3.5", "discount_rate": "0.1", "late_payments": "0",
           "satisfaction": "4.2", schema.TARGET: "123.4"}
    row.update(changes)
    return row


@pytest.mark.parametrize("changes, reason", [
    ({"age": ""}, "age: missing"),
    ({"monthly_spend": "n/a"}, "monthly_spend: not a number"),
    ({"age": "40.5"}, "age: not an integer"),
    ({"discount_rate": "1.5"}, "discount_rate: out of range [0, 1]"),
    ({"satisfaction": "inf"}, "satisfaction: not finite"),
    ({schema.JOIN_KEY: "abc"}, f"{schema.JOIN_KEY}: not a non-negative integer"),
    ({schema.TIMESTAMP: "yesterday"}, f"{schema.TIMESTAMP}: not an ISO 8601 timestamp"),
    ({schema.TARGET: ""}, f"{schema.TARGET}: missing"),
])
def test_bad_rows_are_rejected_with_a_reason(changes, reason):
    good, rejected = validate_chunk(pd.DataFrame([raw_row(), raw_row(**changes)]))
    assert len(good) == 1
    assert rejected["reason"].tolist() == [reason]
    # the rejected row keeps its original text, so nothing is lost
    for key, value in changes.items():
        assert rejected[key].iloc[0] == value


def test_good_rows_are_typed():
    good, rejected = validate_chunk(pd.DataFrame([raw_row()]))
    assert rejected.empty
    assert good[schema.JOIN_KEY].dtype == "int64"
    assert str(good[schema.TIMESTAMP].dt.tz) == "UTC"
    assert good["monthly_spend"].iloc[0] == 99.5
    assert good[schema.TIMESTAMP].iloc[0] == pd.Timestamp("2026-01-02T03:04:05Z")


def test_header_mismatch_names_the_columns_and_the_fix():
    columns = [c for c in schema.RAW_COLUMNS if c != "age"] + ["colour"]
    with pytest.raises(SchemaError) as err:
        check_header(columns, "part-00000.csv")
    message = str(err.value)
    assert "part-00000.csv" in message and "'age'" in message and "'colour'" in message
    assert "pipeline/schema.py" in message


def _write_parts(folder: Path, rows: int) -> list[Path]:
    frame, injected = generate_chunk(rows, seed=21, index=0, bad_fraction=0.02)
    part = folder / "part-00000.csv"
    frame.to_csv(part, index=False)
    return [part], sum(injected.values())


def test_transform_streams_to_the_same_result_whatever_the_chunk_size(tmp_path):
    parts, injected = _write_parts(tmp_path, 5000)
    outputs = {}
    for chunk_rows in (333, 5000):
        out = tmp_path / str(chunk_rows)
        out.mkdir()
        stats = transform(parts, out / "f.parquet", out / "l.parquet", out / "r.csv", chunk_rows=chunk_rows)
        assert stats["rows_in"] == 5000
        assert stats["rows_quarantined"] == injected
        assert stats["rows_out"] == 5000 - injected
        outputs[chunk_rows] = (pq.read_table(out / "f.parquet").to_pandas(),
                               pd.read_csv(out / "r.csv"))
    pd.testing.assert_frame_equal(outputs[333][0], outputs[5000][0])
    pd.testing.assert_frame_equal(outputs[333][1], outputs[5000][1])
    assert len(outputs[333][1]) == injected
