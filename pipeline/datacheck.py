"""A declaration held to its data, and a starting declaration inferred from a table.

``python -m pipeline dataset check FILE`` reads the declared source once with
the features stage's own checks (:func:`pipeline.validate.validate_chunk`) and
reports rows, columns, nulls, the entity key's type and what would be
quarantined. What makes the declaration itself wrong (nulls in the entity key,
a feature column where no value is a number) is a :class:`DatasetError`
naming the field; ingest runs the same check before it writes anything.

``python -m pipeline dataset infer DATA`` writes a starting declaration: the
key, the event time, the target and the features with their types and
observed ranges, the way schema-inference tools do.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import yaml

from pipeline import source
from pipeline.dataset import Dataset, DatasetError, source_files
from pipeline.validate import validate_chunk

# Distinct keys are counted exactly up to this many, then reported as "more than".
DISTINCT_LIMIT = 5_000_000


@dataclass
class Column:
    name: str
    role: str
    empty: int = 0
    numbers: int = 0  # non-empty values that parse as numbers
    wholes: int = 0  # of those, whole numbers
    low: float = float("inf")
    high: float = float("-inf")
    example_bad: str = ""


@dataclass
class Report:
    dataset: str
    files: list[Path]
    rows: int = 0
    columns: dict[str, Column] = field(default_factory=dict)
    quarantined: Counter = field(default_factory=Counter)
    keys: set = field(default_factory=set)
    all_digit_keys: bool = True

    @property
    def entity_type(self) -> str:
        return "int" if self.all_digit_keys else "string"

    def render(self) -> str:
        lines = [f"data set {self.dataset!r}: {self.rows} rows in {len(self.files)} file(s)",
                 *(f"  {f}" for f in self.files[:10]),
                 *([f"  ... and {len(self.files) - 10} more"] if len(self.files) > 10 else []), "",
                 f"  {'column':<24} {'role':<10} {'empty':>8} {'numbers':>9} {'min':>12} {'max':>12}"]
        for c in self.columns.values():
            span = (f"{c.low:>12.6g} {c.high:>12.6g}" if c.numbers else f"{'-':>12} {'-':>12}")
            lines.append(f"  {c.name:<24} {c.role:<10} {c.empty:>8} {c.numbers:>9} {span}")
        distinct = (f"{len(self.keys)}" if len(self.keys) < DISTINCT_LIMIT else f"more than {DISTINCT_LIMIT}")
        lines += ["", f"  entity key: {self.entity_type}, {distinct} distinct",
                  f"  would be quarantined: {sum(self.quarantined.values())} row(s)"]
        lines += [f"    {count:>8}  {why}" for why, count in self.quarantined.most_common(12)]
        return "\n".join(lines)


def check(dataset: Dataset) -> Report:
    """Read the source once; raise :class:`DatasetError` where the declaration cannot fit the data."""
    d = dataset.declaration
    roles = {d.entity.column: "entity", **({d.timestamp.column: "timestamp"} if d.timestamp else {}),
             **dict.fromkeys(d.features, "feature"), d.target: "target"}
    report = Report(dataset.name, dataset.files())
    report.columns = {name: Column(name, role) for name, role in roles.items()}
    for _, batch in source.batches(dataset):
        report.rows += batch.num_rows
        for name, col in report.columns.items():
            text = pc.ascii_trim_whitespace(batch.column(name))
            empty = pc.equal(text, "").to_numpy(zero_copy_only=False)
            col.empty += int(empty.sum())
            if col.role in ("feature", "target"):
                numbers = _parse_numbers(text)
                ok = ~np.isnan(numbers)
                col.numbers += int(ok.sum())
                col.wholes += int((ok & (numbers == np.floor(numbers))).sum())
                if ok.any():
                    col.low, col.high = min(col.low, float(numbers[ok].min())), max(col.high, float(numbers[ok].max()))
                bad = np.flatnonzero(~ok & ~empty)
                if len(bad) and not col.example_bad:
                    col.example_bad = str(text[int(bad[0])].as_py())[:40]
        keys = pc.ascii_trim_whitespace(batch.column(d.entity.column))
        if report.all_digit_keys:
            filled = pc.if_else(pc.equal(keys, ""), "0", keys)
            report.all_digit_keys = bool(pc.all(pc.match_substring_regex(filled, r"^[0-9]{1,18}$")).as_py())
        if len(report.keys) < DISTINCT_LIMIT:
            report.keys.update(pc.unique(keys).to_pylist())
        _, rejected = validate_chunk(pa.Table.from_batches([batch]),
                                     dataset.schema(d.entity.type or report.entity_type))
        report.quarantined.update(rejected.column("reason").to_pylist())
    _refuse(dataset, report)
    return report


def _parse_numbers(text: pa.Array) -> np.ndarray:
    """Each value as a float, NaN where it is empty or not a number (Arrow's cast, value by value only
    where it fails)."""
    try:
        return pc.cast(pc.if_else(pc.equal(text, ""), None, text), pa.float64()).to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        out = np.full(len(text), np.nan)
        for i, value in enumerate(text.to_pylist()):
            try:
                out[i] = float(value) if value else np.nan
            except ValueError:
                pass
        return out


def _refuse(dataset: Dataset, report: Report) -> None:
    """The declaration errors only the data can show, as one line naming the field."""
    d = dataset.declaration
    if report.rows == 0:
        raise DatasetError(f"source.path: the files of {dataset.name} hold no rows; point it at your data")
    key = report.columns[d.entity.column]
    if key.empty:
        raise DatasetError(f"entity.column: {key.empty} row(s) have no {d.entity.column!r}; every row needs its "
                           "key: fill them or drop those rows")
    if d.timestamp is None and len(report.keys) < min(report.rows, DISTINCT_LIMIT):
        raise DatasetError(f"timestamp: {d.entity.column!r} repeats ({len(report.keys)} keys in {report.rows} "
                           "rows) and no timestamp.column is declared, so every row of a key would get the same "
                           "event time and the point-in-time join could not tell them apart; declare "
                           "timestamp.column, or make the key unique")
    if d.entity.type == "int" and not report.all_digit_keys:
        raise DatasetError(f"entity.type: {d.entity.column!r} holds keys that are not whole numbers; declare "
                           "type: string (or leave the type out to read it from the data)")
    for col in report.columns.values():
        present = report.rows - col.empty
        field_name = "target" if col.role == "target" else f"features.{col.name}"
        if col.role in ("feature", "target") and present and col.numbers == 0:
            raise DatasetError(f"{field_name}: no value of {col.name!r} is a number (e.g. {col.example_bad!r}); "
                               "a linear model needs numbers: drop the column or encode it")
        spec = d.features.get(col.name)
        if spec is not None and spec.type == "int" and col.numbers and col.wholes < col.numbers / 2:
            raise DatasetError(f"features.{col.name}: declared int, but most values are not whole numbers; "
                               "declare type: float")


def infer(data: str | Path, name: str | None = None, rows: int = 100_000, relative_to: Path | None = None) -> str:
    """A starting declaration (YAML) for the table at ``data``: a file, a folder or a glob;
    its source path is written relative to ``relative_to`` (where the declaration will live)."""
    from pipeline.dataset import Declaration, Source

    path = Path(data)
    probe = Declaration.model_construct(source=Source.model_construct(path=str(path), synthetic=None))
    files = source_files(probe, Path.cwd())
    try:
        table = _sample(files[0], rows)
    except (pa.ArrowInvalid, OSError, IndexError) as exc:
        raise DatasetError(f"{files[0].name} cannot be read as a table ({str(exc).splitlines()[0]}); give a "
                           "CSV file with a header row or a Parquet file") from None
    numeric = [f.name for f in table.schema if pa.types.is_integer(f.type) or pa.types.is_floating(f.type)]
    stamps = [f.name for f in table.schema if pa.types.is_timestamp(f.type) or pa.types.is_date(f.type)]
    idish = [c for c in table.column_names if c.lower() == "id" or c.lower().endswith(("_id", "id"))]
    entity = idish[0] if idish else table.column_names[0]
    rest = [c for c in numeric if c != entity]
    if not rest:
        raise DatasetError(f"{files[0].name}: no numeric column besides {entity!r} to learn from")
    target, features = rest[-1], rest[:-1]
    described = {}
    for column in features:
        values = table.column(column)
        lo, hi = pc.min(values).as_py(), pc.max(values).as_py()
        kind = "int" if pa.types.is_integer(values.type) else "float"
        described[column] = {"type": kind, **({"min": lo, "max": hi} if lo is not None else {})}
    declaration = {
        "name": name or _name_of(files[0]),
        "source": {"path": _relative(Path(data), relative_to)},
        "entity": {"column": entity},
        **({"timestamp": {"column": stamps[0]}} if stamps else {}),
        "target": target,
        "features": described,
        "holdout": 0.2,
    }
    head = (f"# Inferred from {len(table)} rows of {files[0].name} by `python -m pipeline dataset infer`.\n"
            "# Check the entity, the target and the ranges (observed, not known limits: values outside a\n"
            "# range are quarantined), then `python -m pipeline dataset check` this file.\n")
    return head + yaml.safe_dump(declaration, sort_keys=False, default_flow_style=None)


def _relative(data: Path, base: Path | None) -> str:
    import os

    if base is None:
        return str(data)
    return os.path.relpath(data.resolve(), base.resolve())


def _sample(path: Path, rows: int) -> pa.Table:
    import pyarrow.csv as pa_csv
    import pyarrow.parquet as pq

    if path.suffix.lower() == ".csv":
        reader = pa_csv.open_csv(path)
        batches, seen = [], 0
        for batch in reader:
            batches.append(batch)
            seen += batch.num_rows
            if seen >= rows:
                break
        return pa.Table.from_batches(batches, schema=reader.schema).slice(0, rows)
    return pq.ParquetFile(path).read_row_groups([0]).slice(0, rows)


def _name_of(path: Path) -> str:
    import re

    stem = re.sub(r"[^A-Za-z0-9_]", "_", path.stem).strip("_") or "data"
    return stem if stem[0].isalpha() else f"d_{stem}"
