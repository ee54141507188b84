"""Data set declarations: the shape users write, and one line for each mistake,
naming the field and what to do."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from pipeline import datacheck
from pipeline.dataset import CUSTOMERS, DatasetError, load, parse

GOOD = """\
name: housing
source:
  path: data/housing.csv
entity:
  column: house_id
timestamp:
  column: observed_at
target: price
features: [rooms, area, age]
holdout: 0.2
"""


def test_the_shape_users_write_by_hand_is_accepted():
    d = parse(GOOD, "housing.yaml")
    assert list(d.features) == ["rooms", "area", "age"] and d.holdout == 0.2
    assert d.entity.column == "house_id" and d.timestamp.column == "observed_at"


def test_the_builtin_customers_are_one_declaration_among_others():
    assert CUSTOMERS.join_key == "customer_id" and CUSTOMERS.project == "mlops"
    assert CUSTOMERS.feature_view == "customer_features" and load(None).model_name == "mlops-linear"
    assert CUSTOMERS.features[0].integer and CUSTOMERS.features[0].high == 100


@pytest.mark.parametrize("change, field, words", [
    (("target: price", "target: rooms"), "declaration", "also a feature"),
    (("features: [rooms, area, age]", "features: [rooms, area, rooms]"), "features", "more than once"),
    (("holdout: 0.2", "holdout: 1.5"), "holdout", "less than 1"),
    (("name: housing", "name: housing\nname: other"), "line 2", "given twice"),
    (("holdout: 0.2", "holdout: 0.2\ncolour: blue"), "colour", "unknown key"),
    (("target: price\n", ""), "target", "required"),
    (("  column: house_id", "  column: house id"), "entity.column", "should match"),
    (("features: [rooms, area, age]", "features: {rooms: {type: int, min: 9, max: 1}}"),
     "features.rooms", "above max"),
    (("source:\n  path: data/housing.csv", "source:\n  path: a.csv\n  synthetic: {}"), "source", "exactly one"),
])
def test_each_declaration_mistake_is_one_line_naming_the_field(change, field, words):
    old, new = change
    with pytest.raises(DatasetError) as caught:
        parse(GOOD.replace(old, new), "housing.yaml")
    message = str(caught.value)
    assert "\n" not in message and message.startswith("housing.yaml") and field in message, message
    assert words in message, message


def declared(tmp_path, csv: str, extra: str = "", features: str = "[rooms, area]"):
    (tmp_path / "h.csv").write_text(textwrap.dedent(csv))
    (tmp_path / "h.yaml").write_text(f"name: h\nsource: {{path: h.csv}}\nentity: {{column: house_id}}\n"
                                     f"target: price\nfeatures: {features}\n{extra}")
    return tmp_path / "h.yaml"


@pytest.mark.parametrize("csv, features, field, words", [
    ("house_id,rooms,area,price\nA,1,2,3\n", "[rooms, area, colour]", "features.colour",
     "is not in h.csv"),
    ("house_id,rooms,area,price\nA,1,2,3\n,2,3,4\n", "[rooms, area]", "entity.column", "have no 'house_id'"),
    ("house_id,rooms,area,price\nA,big,2,3\nB,small,3,4\n", "[rooms, area]", "features.rooms",
     "no value of 'rooms' is a number"),
    ("house_id,rooms,area,price\nA,1.5,2,3\nB,2.5,3,4\n", "{rooms: {type: int}, area: {}}", "features.rooms",
     "declare type: float"),
])
def test_what_only_the_data_can_show_is_refused_before_anything_is_written(tmp_path, csv, features,
                                                                          field, words):
    path = declared(tmp_path, csv, features=features)
    with pytest.raises(DatasetError, match=words) as caught:
        datacheck.check(load(path))
    assert str(caught.value).startswith(field)
    shared = tmp_path / "shared"
    proc = subprocess.run([sys.executable, "-m", "pipeline", "run", "--shared-dir", str(shared)],
                          env={"MLOPS_DATASET": str(path), "PATH": "/usr/bin:/bin"}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and words in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (shared / "data").exists() and not (shared / "runs").exists()


def test_a_missing_source_or_declaration_file(tmp_path):
    (tmp_path / "x.yaml").write_text(GOOD)
    with pytest.raises(DatasetError, match="source.path: .* does not exist"):
        load(tmp_path / "x.yaml").files()
    with pytest.raises(DatasetError, match="MLOPS_DATASET=.*nope.yaml: No such file"):
        load(tmp_path / "nope.yaml")


def test_infer_writes_a_declaration_that_checks(tmp_path):
    (tmp_path / "t.csv").write_text("shop_id,day,visits,spend,revenue\n1,2026-01-01,3,4.5,10\n"
                                    "2,2026-01-02,5,1.5,12\n3,2026-01-03,7,2.5,20\n")
    text = datacheck.infer(tmp_path / "t.csv", relative_to=tmp_path)
    (tmp_path / "t.yaml").write_text(text)
    d = load(tmp_path / "t.yaml")
    assert d.declaration.entity.column == "shop_id" and d.declaration.target == "revenue"
    assert d.declaration.timestamp.column == "day"
    assert d.declaration.features["visits"].type == "int" and d.declaration.features["spend"].max == 4.5
    assert datacheck.check(d).rows == 3


def test_repeated_keys_without_a_timestamp_are_refused(tmp_path):
    path = declared(tmp_path, "house_id,rooms,area,price\nA,1,2,3\nA,2,3,4\nB,1,1,1\n")
    with pytest.raises(DatasetError, match="declare timestamp.column"):
        datacheck.check(load(path))


def test_infer_on_an_unreadable_table_is_one_line(tmp_path):
    (tmp_path / "bad.csv").write_text("a,b\n1,2,3\n")
    with pytest.raises(DatasetError, match="cannot be read as a table"):
        datacheck.infer(tmp_path / "bad.csv")


def test_a_folder_source_leaves_hidden_folders_out(tmp_path):
    (tmp_path / "data" / ".ipynb_checkpoints").mkdir(parents=True)
    for where in ("data/h.csv", "data/.ipynb_checkpoints/h-checkpoint.csv"):
        (tmp_path / where).write_text("house_id,rooms,area,price\nA,1,2,3\n")
    (tmp_path / "h.yaml").write_text("name: h\nsource: {path: data}\nentity: {column: house_id}\n"
                                     "target: price\nfeatures: [rooms, area]\n")
    assert [f.name for f in load(tmp_path / "h.yaml").files()] == ["h.csv"]
