"""Generic adapter: an interactions CSV/TSV/Parquet plus an items CSV/TSV/Parquet, with a
column mapping. Reads ../shared/datasets/amazon-office with the defaults of `OFFICE`."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from pipeline.sources.base import (
    RawSource,
    Report,
    SourceError,
    decode_lines,
    read_bytes,
    require_file,
)


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


OFFICE = ColumnMap(user="user_id", item="item_id", ts="timestamp", item_key="id", title="text")


def read_frame(path: Path, report: Report, what: str) -> pl.DataFrame:
    """Read CSV / TSV (optionally .gz) / Parquet as all-string columns (Parquet keeps types).

    Invalid UTF-8 is repaired and counted; ragged rows are dropped and counted.
    """
    path = require_file(Path(path), what)
    name = path.name.lower().removesuffix(".gz")
    if name.endswith(".parquet"):
        return pl.read_parquet(path)
    if not (name.endswith(".csv") or name.endswith(".tsv") or name.endswith(".txt")):
        raise SourceError(f"{path=}: {what} must be .csv, .tsv or .parquet")
    lines = decode_lines(read_bytes(path), "utf-8", report, what)
    tsv = name.endswith(".tsv") or (lines and "\t" in lines[0] and "," not in lines[0])
    sep = "\t" if tsv else ","
    if not lines:
        raise SourceError(f"{path=}: {what} is empty")
    n_cols = len(lines[0].split(sep)) if tsv else None
    if tsv:
        ragged = [ln for ln in lines[1:] if ln.strip() and len(ln.split(sep)) != n_cols]
        report.add("ragged_line", "dropped", len(ragged), f"{what}: {ragged[0] if ragged else ''}")
        lines = [lines[0]] + [ln for ln in lines[1:] if ln.strip() and len(ln.split(sep)) == n_cols]
    buf = io.BytesIO("\n".join(lines).encode("utf-8"))
    return pl.read_csv(
        buf,
        separator=sep,
        quote_char=None if tsv else '"',
        infer_schema=False,
        truncate_ragged_lines=not tsv,
    )


def read_generic(
    interactions: Path, items: Path, dataset: str, cols: ColumnMap | None = None
) -> RawSource:
    cols = cols or ColumnMap()
    report = Report()
    inter = read_frame(interactions, report, "interactions")
    item_df = read_frame(items, report, "items")
    for c in [cols.user, cols.item] + ([cols.ts] if cols.ts else []) + ([cols.rating] if cols.rating else []):
        if c not in inter.columns:
            raise SourceError(f"interactions file {interactions} has no column {c!r}; has {inter.columns}")
    for c in [cols.item_key, cols.title, cols.text, cols.categories, cols.images]:
        if c and c not in item_df.columns:
            raise SourceError(f"items file {items} has no column {c!r}; has {item_df.columns}")

    inter = inter.with_row_index("row")
    ts = pl.col(cols.ts).cast(pl.String).str.strip_chars().cast(pl.Float64, strict=False) if cols.ts else pl.lit(None, pl.Float64)
    df = inter.select(
        pl.col(cols.user).cast(pl.String).str.strip_chars().alias("user_id"),
        pl.col(cols.item).cast(pl.String).str.strip_chars().alias("item_id"),
        ts.alias("ts"),
        (pl.col(cols.rating).cast(pl.Float32, strict=False) if cols.rating else pl.lit(None, pl.Float32)).alias("rating"),
        pl.col("row").cast(pl.Int64),
    )
    bad = df.filter(pl.any_horizontal(pl.col("user_id", "item_id").is_null() | (pl.col("user_id", "item_id") == "")) | (pl.col("ts").is_null() if cols.ts else pl.lit(False)))
    if bad.height:
        report.add("unparseable_interaction", "dropped", bad.height, f"row {bad['row'][0] + 1}")
    df = df.join(bad.select("row"), on="row", how="anti")
    # Milliseconds (Amazon 2023) -> seconds.
    if cols.ts and df.height and df["ts"].max() > 1e11:
        df = df.with_columns(pl.col("ts") / 1000)
    df = df.with_columns(pl.col("ts").fill_null(0).cast(pl.Int64))

    items_out = item_df.select(
        pl.col(cols.item_key).cast(pl.String).str.strip_chars().alias("item_id"),
        (pl.col(cols.title).cast(pl.String) if cols.title else pl.lit("")).alias("title"),
        (pl.col(cols.text).cast(pl.String) if cols.text else pl.lit("")).alias("text"),
        (pl.col(cols.categories).cast(pl.String) if cols.categories else pl.lit("")).alias("categories"),
    )
    images = pl.DataFrame(schema={"item_id": pl.String, "image_idx": pl.Int32, "uri": pl.String})
    if cols.images:
        images = (
            item_df.select(
                pl.col(cols.item_key).cast(pl.String).str.strip_chars().alias("item_id"),
                pl.col(cols.images).cast(pl.String).str.split("|").alias("uri"),
            )
            .explode("uri")
            .filter(pl.col("uri").is_not_null() & (pl.col("uri").str.strip_chars() != ""))
            .with_columns(pl.col("uri").str.strip_chars(), pl.int_range(pl.len()).over("item_id").cast(pl.Int32).alias("image_idx"))
            .select("item_id", "image_idx", "uri")
        )
    origin = f"{Path(interactions).resolve()} + {Path(items).resolve()}"
    return RawSource(dataset, items_out, df, images, report, origin=origin)
