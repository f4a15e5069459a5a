"""Generic adapter: an interactions CSV/TSV/Parquet plus an items CSV/TSV/Parquet, with a
column mapping. Reads ../shared/datasets/amazon-office with the defaults of `OFFICE`.

Typed columns (Parquet) are converted (pipeline/sources/columns.py): integer ids become
strings, datetime / date / ISO-8601 timestamps become unix seconds; a column of a type that
cannot hold its field is a SourceError naming the file, the column and the type.
"""

from __future__ import annotations

import csv
import io
import sys
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from pipeline.sources.base import (
    CONTROL_CHARS,
    RawSource,
    Report,
    SourceError,
    decode_text,
    is_blank,
    read_bytes,
    require_file,
    split_lines,
)
from pipeline.sources.columns import (
    drop_rows,
    id_expr,
    in_range,
    rating_expr,
    text_expr,
    timestamp_expr,
    ts_in_range,
)

csv.field_size_limit(sys.maxsize)  # a 100k-character description is one field, not an error


@dataclass
class ColumnMap:
    """Which source column holds which field (None: the source has no such column)."""

    user: str = "user_id"
    item: str = "item_id"  # item column in the interactions file
    ts: str | None = "timestamp"  # unix seconds (or milliseconds: detected and converted)
    rating: str | None = None
    item_key: str = "item_id"  # item column in the items file
    title: str | None = "title"
    text: str | None = None
    categories: str | None = None
    images: str | None = None  # one or more URIs/paths, separated by "|"
    # Ratings outside [rating_min, rating_max] are dropped (None: no bound on that side).
    rating_min: float | None = 0.0
    rating_max: float | None = None


OFFICE = ColumnMap(user="user_id", item="item_id", ts="timestamp", item_key="id", title="text")


def read_frame(path: Path, report: Report, what: str) -> pl.DataFrame:
    """Read CSV / TSV (optionally .gz) as all-string columns, Parquet with its types.

    Invalid UTF-8 is repaired and counted; rows with a wrong field count are dropped and
    counted (`ragged_<what>_line`). Blank lines are not rows.
    """
    path = require_file(Path(path), what)
    name = path.name.lower().removesuffix(".gz")
    if name.endswith(".parquet"):
        try:
            return pl.read_parquet(path)
        except Exception as e:  # polars raises several kinds for a file that is not Parquet
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SourceError(f"{path}: {what} is not a readable Parquet file ({first})") from None
    if not (name.endswith(".csv") or name.endswith(".tsv") or name.endswith(".txt")):
        raise SourceError(f"{path=}: {what} must be .csv, .tsv or .parquet")
    text = decode_text(read_bytes(path), "utf-8", report, what).removeprefix("\ufeff")
    first = text.split("\n", 1)[0]
    tsv = name.endswith(".tsv") or ("\t" in first and "," not in first)
    records = _tsv_records(text) if tsv else _csv_records(text, report, what)
    if not records:
        raise SourceError(f"{path}: {what} is empty (no header line)")
    header, rows = records[0][1], records[1:]
    if len(set(header)) != len(header):
        raise SourceError(f"{path}: {what} header repeats a column name: {header}")
    good = [fields for _, fields in rows if len(fields) == len(header)]
    ragged = [(n, fields) for n, fields in rows if len(fields) != len(header)]
    if ragged:
        n, fields = ragged[0]
        example = f"{what} line {n}: {len(fields)} fields, header has {len(header)}"
        report.add(f"ragged_{what}_line", "dropped", len(ragged), example)
    columns = list(zip(*good, strict=True)) if good else [() for _ in header]
    return pl.DataFrame(
        {h: list(col) for h, col in zip(header, columns, strict=True)},
        schema={h: pl.String for h in header},
    )


def _tsv_records(text: str) -> list[tuple[int, list[str]]]:
    """(line number, fields) of the non-blank lines; TSV has no quoting."""
    return [(n, ln.split("\t")) for n, ln in enumerate(split_lines(text), 1) if not is_blank(ln)]


def _csv_records(text: str, report: Report, what: str) -> list[tuple[int, list[str]]]:
    """(first line number, fields) of each CSV record; records spanning lines are reported."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=False)
    out: list[tuple[int, list[str]]] = []
    spans: list[int] = []
    line = 0
    for fields in reader:
        start, line = line + 1, reader.line_num
        if not fields:  # an empty line; a line of spaces is a (ragged) record
            continue
        if line > start:
            spans.append(start)
        out.append((start, fields))
    if spans:
        report.add(f"multiline_{what}_record", "kept", len(spans), f"{what} line {spans[0]}")
    return out


def read_generic(
    interactions: Path, items: Path, dataset: str, cols: ColumnMap | None = None
) -> RawSource:
    cols = cols or ColumnMap()
    report = Report()
    inter = read_frame(interactions, report, "interactions")
    item_df = read_frame(items, report, "items")
    for c in (
        [cols.user, cols.item]
        + ([cols.ts] if cols.ts else [])
        + ([cols.rating] if cols.rating else [])
    ):
        if c not in inter.columns:
            raise SourceError(
                f"interactions file {interactions} has no column {c!r}; has {inter.columns}"
            )
    for c in [cols.item_key, cols.title, cols.text, cols.categories, cols.images]:
        if c and c not in item_df.columns:
            raise SourceError(f"items file {items} has no column {c!r}; has {item_df.columns}")
    df = _interactions(inter, Path(interactions).name, cols, report)
    items_out, images = _items(item_df, Path(items).name, cols, report)
    origin = f"{Path(interactions).resolve()} + {Path(items).resolve()}"
    return RawSource(
        dataset,
        items_out,
        df,
        images,
        report,
        origin=origin,
        n_read_interactions=inter.height + report.count("ragged_interactions_line"),
        n_read_items=item_df.height + report.count("ragged_items_line"),
    )


def _interactions(inter: pl.DataFrame, file: str, cols: ColumnMap, report: Report) -> pl.DataFrame:
    """user_id, item_id, ts, rating, row; every dropped row is counted by what was wrong."""
    raw = inter.with_row_index("row").with_columns(pl.col("row").cast(pl.Int64))
    null_ts, null_rating = pl.lit(None, pl.Float64), pl.lit(None, pl.Float64)
    df = raw.with_columns(
        id_expr(raw, cols.user, file).alias("_user"),
        id_expr(raw, cols.item, file).alias("_item"),
        (timestamp_expr(raw, cols.ts, file) if cols.ts else null_ts).alias("_ts"),
        (rating_expr(raw, cols.rating, file) if cols.rating else null_rating).alias("_rating"),
    )

    def where(column: str) -> pl.Expr:
        kind = str(raw.schema[column])
        return pl.format(
            f"row {{}}: column '{column}' ({kind}) value {{}}",
            pl.col("row") + 1,
            pl.col(column).cast(pl.String),
        )

    control = pl.col("_user").str.contains(CONTROL_CHARS) | pl.col("_item").str.contains(
        CONTROL_CHARS
    )
    df = drop_rows(df, control, report, "interaction_id_with_control_chars", where(cols.user))
    missing = pl.col("_user").is_null() | pl.col("_item").is_null()
    df = drop_rows(df, missing, report, "unparseable_interaction", where(cols.user))
    if cols.ts:
        df = drop_rows(df, pl.col("_ts").is_null(), report, "unparseable_timestamp", where(cols.ts))
        df = drop_rows(
            df, ~ts_in_range(pl.col("_ts")), report, "timestamp_out_of_range", where(cols.ts)
        )
    if cols.rating:
        given = pl.col(cols.rating).cast(pl.String).str.strip_chars().fill_null("") != ""
        unparseable = pl.col("_rating").is_null() & given
        df = drop_rows(df, unparseable, report, "unparseable_rating", where(cols.rating))
        bad = ~in_range(pl.col("_rating"), cols.rating_min, cols.rating_max)
        df = drop_rows(df, bad, report, "rating_out_of_range", where(cols.rating))
        n_missing = df.filter(pl.col("_rating").is_null()).height
        report.add("interaction_without_rating", "kept", n_missing)
    return df.select(
        pl.col("_user").alias("user_id"),
        pl.col("_item").alias("item_id"),
        pl.col("_ts").fill_null(0).cast(pl.Int64).alias("ts"),
        pl.col("_rating").cast(pl.Float32).alias("rating"),
        "row",
    )


def _items(
    item_df: pl.DataFrame, file: str, cols: ColumnMap, report: Report
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(items, images) of the items file; ids with control characters are dropped."""

    def text(column: str | None, joiner: str = " ") -> pl.Expr:
        return text_expr(item_df, column, file, joiner) if column else pl.lit("")

    df = item_df.with_columns(id_expr(item_df, cols.item_key, file).alias("_key"))
    bad = pl.col("_key").str.contains(CONTROL_CHARS)
    df = drop_rows(df, bad, report, "item_id_with_control_chars", pl.col("_key"))
    items_out = df.select(
        pl.col("_key").alias("item_id"),
        text(cols.title).alias("title"),
        text(cols.text).alias("text"),
        text(cols.categories, ", ").alias("categories"),
    )
    images = pl.DataFrame(schema={"item_id": pl.String, "image_idx": pl.Int32, "uri": pl.String})
    if cols.images:
        images = (
            df.select(
                pl.col("_key").alias("item_id"), text(cols.images, "|").str.split("|").alias("uri")
            )
            .filter(pl.col("item_id").is_not_null())
            .explode("uri")
            .filter(pl.col("uri").is_not_null() & (pl.col("uri").str.strip_chars() != ""))
            .with_columns(
                pl.col("uri").str.strip_chars(),
                pl.int_range(pl.len()).over("item_id").cast(pl.Int32).alias("image_idx"),
            )
            .select("item_id", "image_idx", "uri")
        )
    return items_out, images
