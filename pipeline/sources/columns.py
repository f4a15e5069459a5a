"""Typed source columns -> the contract's types, value by value.

A column whose type cannot hold the field at all (a list of user ids, a struct timestamp)
is a SourceError naming the file, the column and its type. A value that does not convert
(a timestamp "abc", a rating of 99) drops its row, counted in the report with the file, the
column and an example, so nothing disappears without a word.
"""

from __future__ import annotations

import polars as pl

from pipeline.sources.base import MAX_TS, Report, SourceError, printable

# Date and time layouts tried, in order, on timestamp strings that are not numbers.
DATETIME_FORMATS = (
    "%Y-%m-%dT%H:%M:%S%.f%z",
    "%Y-%m-%d %H:%M:%S%.f%z",
    "%Y-%m-%dT%H:%M:%S%.f",
    "%Y-%m-%d %H:%M:%S%.f",
    "%Y-%m-%dT%H:%M:%S%z",
    "%Y-%m-%d %H:%M:%S%z",
    "%Y-%m-%dT%H:%M:%S",
    "%Y-%m-%d %H:%M:%S",
    "%Y-%m-%dT%H:%M",
    "%Y-%m-%d %H:%M",
    "%Y-%m-%d",
)
_STRINGS = (pl.String, pl.Categorical, pl.Enum)


def _type_error(file: str, column: str, dtype: pl.DataType, expected: str) -> SourceError:
    return SourceError(f"{file}: column {column!r} has type {dtype}; expected {expected}")


def _is(dtype: pl.DataType, *kinds: type) -> bool:
    return any(dtype == k or isinstance(dtype, k) for k in kinds)


def id_expr(df: pl.DataFrame, column: str, file: str) -> pl.Expr:
    """Ids as trimmed strings: strings as they are, integers in decimal, integral floats as
    integers; other floats, empty strings and nulls become null (the caller drops them)."""
    dtype = df.schema[column]
    col = pl.col(column)
    if _is(dtype, *_STRINGS):
        out = col.cast(pl.String).str.strip_chars()
    elif dtype.is_integer():
        out = col.cast(pl.String)
    elif dtype.is_float() or dtype.is_decimal():
        f = col.cast(pl.Float64)
        out = pl.when(f.is_finite() & (f == f.round(0)) & (f.abs() < 2**63)).then(
            f.cast(pl.Int64, strict=False).cast(pl.String)
        )
    else:
        raise _type_error(file, column, dtype, "string or integer ids")
    return pl.when(out != "").then(out)


def text_expr(df: pl.DataFrame, column: str, file: str, joiner: str = " ") -> pl.Expr:
    """Text fields: strings as they are, numbers as text, lists of strings joined."""
    dtype = df.schema[column]
    col = pl.col(column)
    if _is(dtype, *_STRINGS) or dtype.is_numeric() or _is(dtype, pl.Boolean, pl.Null):
        return col.cast(pl.String)
    if _is(dtype, pl.List, pl.Array):
        inner = dtype.inner  # type: ignore[union-attr]
        if _is(inner, *_STRINGS) or inner.is_numeric():
            return col.cast(pl.List(pl.String)).list.join(joiner)
    raise _type_error(file, column, dtype, "text (string, number or list of strings)")


def timestamp_expr(df: pl.DataFrame, column: str, file: str) -> pl.Expr:
    """Unix seconds as Float64: numbers (milliseconds above 1e11 are divided by 1000), datetimes
    and dates (naive ones read as UTC), numeric or ISO-8601 strings; null where none fits."""
    dtype = df.schema[column]
    col = pl.col(column)
    if dtype.is_numeric() and not _is(dtype, pl.Boolean):
        return _unix_seconds(col.cast(pl.Float64))
    if _is(dtype, pl.Datetime, pl.Date):
        return col.dt.epoch("ms").cast(pl.Float64) / 1000
    if _is(dtype, pl.Null):
        return col.cast(pl.Float64)
    if not _is(dtype, *_STRINGS):
        raise _type_error(file, column, dtype, "unix seconds, a datetime or a date")
    s = col.cast(pl.String).str.strip_chars()
    parsed = [
        s.str.to_datetime(fmt, strict=False, time_zone="UTC" if "%z" in fmt else None)
        .dt.epoch("ms")
        .cast(pl.Float64)
        / 1000
        for fmt in DATETIME_FORMATS
    ]
    return pl.coalesce(_unix_seconds(s.cast(pl.Float64, strict=False)), *parsed)


def _unix_seconds(number: pl.Expr) -> pl.Expr:
    """Finite numbers as seconds; above 1e11 they are milliseconds (Amazon 2023)."""
    number = pl.when(number.is_finite()).then(number)
    return pl.when(number.abs() > 1e11).then(number / 1000).otherwise(number)


def rating_expr(df: pl.DataFrame, column: str, file: str) -> pl.Expr:
    """Ratings as Float64 (numbers or numeric strings); null where the value is not a number."""
    dtype = df.schema[column]
    col = pl.col(column)
    if dtype.is_numeric() and not _is(dtype, pl.Boolean):
        value = col.cast(pl.Float64)
    elif _is(dtype, *_STRINGS):
        value = col.cast(pl.String).str.strip_chars().cast(pl.Float64, strict=False)
    elif _is(dtype, pl.Null):
        value = col.cast(pl.Float64)
    else:
        raise _type_error(file, column, dtype, "a number")
    return pl.when(value.is_finite()).then(value)


def drop_rows(
    df: pl.DataFrame,
    bad: pl.Expr,
    report: Report,
    check: str,
    describe: pl.Expr,
) -> pl.DataFrame:
    """Rows where `bad` holds go, counted under `check` with the first one described."""
    mask = df.select(bad.fill_null(False).alias("_bad"))["_bad"]
    n = int(mask.sum())
    if n:
        example = df.filter(mask).select(describe.alias("_ex"))["_ex"][0]
        report.add(check, "dropped", n, printable(example))
        df = df.filter(~mask)
    return df


def in_range(value: pl.Expr, low: float | None, high: float | None) -> pl.Expr:
    ok = pl.lit(True)
    if low is not None:
        ok = ok & (value >= low)
    if high is not None:
        ok = ok & (value <= high)
    return ok


def ts_in_range(ts: pl.Expr) -> pl.Expr:
    return in_range(ts, 0, MAX_TS)
