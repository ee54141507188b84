"""Rows of text to typed values, and the checks that send a row to quarantine.

:func:`validate_chunk` is the pure core of the features stage (and of
``python -m pipeline dataset check``): a table of text columns in, typed good
rows and rejected rows (with the reason naming the first failing column) out.
Values are screened by their bytes in numpy and cast by Arrow in one go; only
odd values are parsed one by one.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.schema import ENTITY_ID_MAX, ENTITY_KEY_MAX_BYTES, Feature, Schema


# Most values are screened by their bytes alone (fast, in numpy) and cast by
# Arrow in one go; the few others (an exponent, "inf", "n/a") are
# parsed one by one ("inf" is then named by the finite check, "nan" is not a number).
# Byte ranges of plain values: "+,-./0-9" for numbers (a stray "," or "/"
# fails the cast and is found then), "0-9" for entity keys.
NUMBER_BYTES = (ord("+"), ord("9"))
DIGIT_BYTES = (ord("0"), ord("9"))
HAS_OFFSET = r"[+-]\d{2}:?\d{2}$"
UTC_US = pa.timestamp("us", tz="UTC")
# pandas' nanosecond timestamps (Feast's retrieval and training use them) hold these, in us.
STAMP_MIN_US, STAMP_MAX_US = -(2**63 // 1000) + 1, 2**63 // 1000 - 1
# Below this many values a failed cast is retried value by value.
SMALL_CAST = 256


def _cast_or_null(text: pa.Array, to: pa.DataType) -> pa.Array:
    """``text`` cast to ``to``, null where a value does not parse.

    One vectorised cast when every value parses (the usual case, since values
    are screened first); otherwise the failing values are found by halving,
    so a few odd values (month 13, an int64 overflow) cost a few extra casts.
    """
    try:
        return pc.cast(text, to)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        if len(text) == 1:
            return pa.nulls(1, to)
        if len(text) <= SMALL_CAST:
            pieces = [text[i:i + 1] for i in range(len(text))]
        else:
            pieces = [text[:len(text) // 2], text[len(text) // 2:]]
        return pa.concat_arrays([_cast_or_null(piece, to) for piece in pieces])


def _only_bytes(text: pa.Array, allowed: tuple[int, int]) -> np.ndarray:
    """Per value: is it non-empty and made only of bytes in the ``allowed`` range?

    Works on the string array's buffers in numpy (two passes over the bytes,
    no Python loop); the rare values with other bytes are located by offset.
    """
    _, offsets_buf, data_buf = text.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=np.int32)[text.offset:text.offset + len(text) + 1]
    data = (np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None
            else np.zeros(0, dtype=np.uint8))[offsets[0]:offsets[-1]]
    starts, ends = offsets[:-1] - offsets[0], offsets[1:] - offsets[0]
    ok = ends > starts
    low, high = allowed
    stray = np.flatnonzero((data - np.uint8(low)) > np.uint8(high - low))  # few: only in odd values
    if len(stray):
        ok[np.searchsorted(ends, stray, side="right")] = False
    return ok


def _float_or_nan(text: str) -> float:
    try:
        # Python's float() would also take "1_000" and non-ASCII digits
        return float(text) if "_" not in text and text.isascii() else np.nan
    except ValueError:
        return np.nan


def _whole_or_none(text: str) -> int | None:
    """A non-negative int64 written as digits with an optional zero fraction, else None."""
    digits, _, fraction = text.partition(".")
    if digits.isascii() and digits.isdigit() and fraction.strip("0") == "" \
            and int(digits) <= ENTITY_ID_MAX:
        return int(digits)
    return None


def _parse(text: pa.Array, allowed: tuple[int, int], to: pa.DataType) -> tuple[np.ndarray, np.ndarray]:
    """Values of ``text`` cast to ``to``, and where they parsed, as numpy arrays.

    Plain values (only bytes in ``allowed``) are cast by Arrow in one go; the
    few others (an exponent, "inf", "n/a"; a key written "1001.0") are parsed
    one by one.
    """
    plain = _only_bytes(text, allowed)
    odd = np.flatnonzero(~plain)
    main = _cast_or_null(text if not len(odd) else pc.if_else(pa.array(plain), text, "0"), to)
    values = (main.fill_null(0) if main.null_count else main).to_numpy(zero_copy_only=False, writable=True)
    parsed = plain.copy()
    if len(odd) and pa.types.is_floating(to):
        values[odd] = [_float_or_nan(value) for value in text.take(odd).to_pylist()]
        parsed[odd] = ~np.isnan(values[odd])
    elif len(odd):  # entity keys: "1001.0" (pandas writes integer columns with gaps so) is 1001
        keys = [_whole_or_none(value) for value in text.take(odd).to_pylist()]
        parsed[odd] = [key is not None for key in keys]
        values[odd] = [key or 0 for key in keys]
    if main.null_count:  # plain-looking values Arrow would not take ("1-2", an int64 overflow)
        parsed &= main.is_valid().to_numpy(zero_copy_only=False)
    return values, parsed


def _stamps(text: pa.Array, tz: str | None) -> pa.Array:
    """Cast to microseconds; values Arrow refuses at that unit (7 to 9 fractional
    digits) are tried at nanoseconds and truncated."""
    stamps = _cast_or_null(text, pa.timestamp("us", tz=tz))
    if not stamps.null_count:
        return stamps
    retry = np.flatnonzero(stamps.is_null().to_numpy(zero_copy_only=False))
    finer = _cast_or_null(text.take(retry), pa.timestamp("ns", tz=tz)).cast(pa.timestamp("us", tz=tz), safe=False)
    if not finer.null_count < len(retry):
        return stamps
    micros = stamps.cast(pa.int64()).fill_null(0).to_numpy(zero_copy_only=False, writable=True)
    valid = stamps.is_valid().to_numpy(zero_copy_only=False)
    micros[retry] = finer.cast(pa.int64()).fill_null(0).to_numpy(zero_copy_only=False)
    valid[retry] = finer.is_valid().to_numpy(zero_copy_only=False)
    return pa.array(micros, type=pa.int64(), mask=~valid).cast(pa.timestamp("us", tz=tz))


def _timestamps(text: pa.Array) -> pa.Array:
    """ISO 8601 text as UTC microseconds, null where not one; no offset is taken as UTC."""
    zoned = pc.ends_with(text, "Z").to_numpy(zero_copy_only=False)
    rest = np.flatnonzero(~zoned)
    if len(rest):
        zoned[rest] = pc.match_substring_regex(text.take(rest), HAS_OFFSET).to_numpy(zero_copy_only=False)
    if zoned.all():
        return _stamps(text, "UTC")
    mask = pa.array(zoned)
    with_zone = _stamps(pc.if_else(mask, text, "1970-01-01T00:00:00Z"), "UTC")
    naive = _stamps(pc.if_else(mask, "1970-01-01T00:00:00", text), None)
    return pc.if_else(mask, with_zone, pc.cast(naive, UTC_US))


Checks = list[tuple[np.ndarray, str]]

def _numeric(schema: Schema) -> dict[str, Feature]:
    return {f.name: f for f in (*schema.features, Feature(schema.target, -np.inf, np.inf))}


def _empty(text: pa.Array) -> np.ndarray:
    return pc.equal(text, "").to_numpy(zero_copy_only=False)


def _check_column(raw: pa.Table, name: str, schema: Schema) -> tuple[pa.Array, Checks]:
    """One column typed, and its checks in order: (rows failing, reason)."""
    column = pc.cast(raw.column(name).combine_chunks(), pa.string())
    if column.null_count:  # fill_null costs a copy even without nulls: only when needed
        column = pc.fill_null(column, "")
    text = pc.ascii_trim_whitespace(column)
    if name == schema.join_key and not schema.int_keys:
        size = pc.binary_length(text).to_numpy(zero_copy_only=False)
        return text, [(_empty(text), f"{name}: missing"),
                      (size > ENTITY_KEY_MAX_BYTES, f"{name}: longer than {ENTITY_KEY_MAX_BYTES} bytes")]
    if name == schema.join_key:
        keys, parsed = _parse(text, DIGIT_BYTES, pa.int64())
        return pa.array(keys, type=pa.int64()), [
            (_empty(text), f"{name}: missing"),
            (~parsed | (keys < 0), f"{name}: not a non-negative integer")]
    if name == schema.timestamp:
        stamps = _timestamps(text)
        micros = stamps.cast(pa.int64())
        micros = (micros.fill_null(0) if micros.null_count else micros).to_numpy(zero_copy_only=False)
        return stamps, [(_empty(text), f"{name}: missing"),
                        (stamps.is_null().to_numpy(zero_copy_only=False),
                         f"{name}: not an ISO 8601 timestamp"),
                        ((micros < STAMP_MIN_US) | (micros > STAMP_MAX_US),
                         f"{name}: out of range [1677-09-22, 2262-04-11] (what pandas and Feast hold)")]
    feature = _numeric(schema)[name]
    numbers, parsed = _parse(text, NUMBER_BYTES, pa.float64())
    numbers[~parsed] = np.nan
    with np.errstate(invalid="ignore"):
        checks = [(_empty(text), f"{name}: missing"),
                  (np.isnan(numbers), f"{name}: not a number"),
                  (~np.isfinite(numbers), f"{name}: not finite")]
        if feature.integer:
            checks.append((numbers != np.floor(numbers), f"{name}: not an integer"))
        checks.append(((numbers < feature.low) | (numbers > feature.high),
                       f"{name}: out of range [{feature.low:g}, {feature.high:g}]"))
    return pa.array(numbers, type=pa.float64()), checks


def validate_chunk(raw: pa.Table, schema: Schema) -> tuple[pa.Table, pa.Table]:
    """Split a table of text rows into typed good rows and rejected rows.

    ``raw`` holds every column of ``schema.raw_columns`` as text. A row is
    rejected for a missing value, a value that is not a number (or not a
    timestamp), a non-integer where an integer is expected, or a value outside
    the feature's range. Good rows come back typed (the key int64 or string,
    the event time UTC, the rest float64); rejected rows keep their
    original text and gain a ``reason`` naming the first failing column.
    """
    columns = [_check_column(raw, name, schema) for name in schema.raw_columns]
    # The first failing check of each row, in schema then check order, as an int code.
    code = np.zeros(raw.num_rows, dtype=np.int16)
    reasons: list[str] = []
    for _, checks in columns:
        for failing, why in checks:
            reasons.append(why)
            code[(code == 0) & failing] = len(reasons)
    bad = code != 0
    good = pa.table(dict(zip(schema.raw_columns, (typed for typed, _ in columns)))).filter(pa.array(~bad))
    rejected = raw.select(list(schema.raw_columns)).filter(pa.array(bad))
    why = np.array(reasons, dtype=object)[code[bad] - 1]
    return good, rejected.append_column("reason", pa.array(why, type=pa.string()))
