from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.dataset import CUSTOMERS as schema
from pipeline.errors import SchemaError
from pipeline.features import check_header, transform
from pipeline.validate import validate_chunk
from pipeline.synthetic import generate_chunk


def raw_row(**changes) -> dict:
    row = {schema.join_key: "1001", schema.timestamp: "2026-01-02T03:04:05.000000Z",
           "age": "40", "tenure_months": "12", "monthly_spend": "99.5", "support_calls": "1",
           "sessions_per_week": "3.5", "discount_rate": "0.1", "late_payments": "0",
           "satisfaction": "4.2", schema.target: "123.4"}
    row.update(changes)
    return row


@pytest.mark.parametrize("changes, reason", [
    ({"age": ""}, "age: missing"),
    ({"monthly_spend": "n/a"}, "monthly_spend: not a number"),
    ({"age": "40.5"}, "age: not an integer"),
    ({"discount_rate": "1.5"}, "discount_rate: out of range [0, 1]"),
    ({"satisfaction": "inf"}, "satisfaction: not finite"),
    ({schema.join_key: "abc"}, f"{schema.join_key}: not a non-negative integer"),
    ({schema.timestamp: "yesterday"}, f"{schema.timestamp}: not an ISO 8601 timestamp"),
    ({schema.target: ""}, f"{schema.target}: missing"),
    ({"age": "nan"}, "age: not a number"),
    ({"monthly_spend": "1e400"}, "monthly_spend: not finite"),
    ({schema.join_key: "-5"}, f"{schema.join_key}: not a non-negative integer"),
    # the right shape but not a value: found by Arrow's cast, not by the shape screen
    ({schema.join_key: "9223372036854775808"}, f"{schema.join_key}: not a non-negative integer"),
    ({schema.timestamp: "2026-13-02T03:04:05Z"}, f"{schema.timestamp}: not an ISO 8601 timestamp"),
    # a real date that pandas, Feast's retrieval and training cannot hold
    ({schema.timestamp: "0001-01-02T03:04:05Z"},
     f"{schema.timestamp}: out of range [1677-09-22, 2262-04-11] (what pandas and Feast hold)"),
    ({"age": "\u0661\u0668"}, "age: not a number"),  # Arabic-Indic digits: not ASCII, not a number here
    # the first failing column, in schema order, names the row
    ({"age": "", "satisfaction": "9"}, "age: missing"),
])
def test_bad_rows_are_rejected_with_a_reason(changes, reason):
    good, rejected = validate_chunk(pa.Table.from_pylist([raw_row(), raw_row(**changes)]), schema)
    assert good.num_rows == 1
    assert rejected.column("reason").to_pylist() == [reason]
    # the rejected row keeps its original text, so nothing is lost
    for key, value in changes.items():
        assert rejected.column(key)[0].as_py() == value


def test_good_rows_are_typed():
    good, rejected = validate_chunk(pa.Table.from_pylist([raw_row()]), schema)
    assert rejected.num_rows == 0
    frame = good.to_pandas()
    assert frame[schema.join_key].dtype == "int64"
    assert str(frame[schema.timestamp].dt.tz) == "UTC"
    assert frame["monthly_spend"].iloc[0] == 99.5
    assert frame[schema.timestamp].iloc[0] == pd.Timestamp("2026-01-02T03:04:05Z")


def test_spellings_of_the_same_values_give_the_same_typed_row():
    spellings = [raw_row(age=" 40 ", monthly_spend="+9.95e1"),
                 raw_row(**{schema.timestamp: "2026-01-02 04:04:05+01:00"}),
                 raw_row(**{schema.timestamp: "2026-01-02T03:04:05"}),  # no offset: taken as UTC
                 raw_row(**{schema.join_key: "0001001"}),
                 raw_row(**{schema.join_key: "1001.0"}),  # how pandas writes an int column with gaps
                 raw_row(**{schema.timestamp: "2026-01-02T03:04:05.000000000Z"})]  # nanoseconds
    good, rejected = validate_chunk(pa.Table.from_pylist([raw_row(), *spellings]), schema)
    assert rejected.num_rows == 0
    rows = good.to_pylist()
    assert all(row == rows[0] for row in rows[1:])


def test_header_mismatch_names_the_columns_and_the_fix():
    columns = [c for c in schema.raw_columns if c != "age"] + ["colour"]
    with pytest.raises(SchemaError) as err:
        check_header(columns, "part-00000.csv", schema)
    message = str(err.value)
    assert "part-00000.csv" in message and "'age'" in message and "'colour'" in message
    assert "MLOPS_DATASET" in message and "customers" in message


def _write_parts(folder: Path, rows: int) -> list[Path]:
    frame, injected = generate_chunk(rows, seed=21, index=0, bad_fraction=0.02)
    part = folder / "part-00000.csv"
    frame.to_csv(part, index=False)
    return [part], sum(injected.values())


def test_transform_streams_to_the_same_result_whatever_the_block_size(tmp_path):
    parts, injected = _write_parts(tmp_path, 5000)
    outputs = {}
    for block_bytes in (40_000, 8 << 20):
        out = tmp_path / str(block_bytes)
        out.mkdir()
        stats = transform(parts, out / "f.parquet", out / "l.parquet", out / "r.csv", schema,
                          block_bytes=block_bytes)
        assert stats["rows_in"] == 5000
        assert stats["rows_quarantined"] == injected
        assert stats["rows_out"] == 5000 - injected
        # small blocks really stream: one Parquet row group per block
        groups = pq.ParquetFile(out / "f.parquet").num_row_groups
        assert groups > 1 if block_bytes < 1e6 else groups == 1
        outputs[block_bytes] = (pq.read_table(out / "f.parquet").to_pandas(),
                                pd.read_csv(out / "r.csv"))
    small, large = outputs.values()
    pd.testing.assert_frame_equal(small[0], large[0])
    pd.testing.assert_frame_equal(small[1], large[1])
    assert len(small[1]) == injected


def test_a_row_with_the_wrong_number_of_fields_is_quarantined_not_fatal(tmp_path):
    header = ",".join(schema.raw_columns)
    good = ",".join(raw_row().values())
    part = tmp_path / "part-00000.csv"
    part.write_text(f"{header}\n{good}\n1002,2026-01-02T03:04:05Z,40\n{good}\n")
    stats = transform([part], tmp_path / "f.parquet", tmp_path / "l.parquet", tmp_path / "r.csv", schema)
    assert (stats["rows_in"], stats["rows_out"], stats["rows_quarantined"]) == (3, 2, 1)
    rejected = pd.read_csv(tmp_path / "r.csv", dtype=str, keep_default_na=False)
    assert rejected["reason"].tolist() == ["row: expected 11 fields, got 3: 1002,2026-01-02T03:04:05Z,40"]
    assert rejected["source"].tolist() == ["part-00000.csv"]


def test_a_file_that_is_not_csv_names_the_file_and_the_fix(tmp_path):
    part = tmp_path / "part-00003.csv"
    part.write_text("")
    with pytest.raises(SchemaError, match="part-00003.csv.*dvc checkout"):
        transform([part], tmp_path / "f.parquet", tmp_path / "l.parquet", tmp_path / "r.csv", schema)


@pytest.mark.parametrize("chunk", [3, 7, 1 << 20])
def test_first_non_utf8_finds_the_line_across_read_boundaries(tmp_path, chunk):
    from pipeline.features import first_non_utf8

    path = tmp_path / "part.csv"
    path.write_bytes("a,b\nçà,1\n€uro,2\n".encode() + b"x,\xe9\n" + b"y,3\n")
    assert first_non_utf8(path, chunk) == (4, 0xE9)
    path.write_bytes("a,b\nçà,1\n€uro,2\n".encode())
    assert first_non_utf8(path, chunk) is None
