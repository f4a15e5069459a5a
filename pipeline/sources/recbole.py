"""RecBole atomic files, in and out: `<name>.inter` (+ optional `<name>.item`), tab-separated,
with a `field:type` header (types token, token_seq, float, float_seq).

In: `read_recbole(folder)` reads `<name>.inter` (user, item, optional timestamp and rating) and
`<name>.item` (title / text / categories when present) into a RawSource; preprocessing then
applies the usual rules (>= N interactions per user, repeated pairs keep the last, time order).
Out: `export_recbole(dataset, folder)` writes the warehouse's preprocessed dataset so that
RecBole reads exactly the interactions the trainer reads, in the same per-user order.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from features import store
from features.store import WarehouseConfig
from pipeline.sources.base import RawSource, Report, SourceError, decode_lines, require_file

FIELD_TYPES = ("token", "token_seq", "float", "float_seq")
INTER_HEADER = "user_id:token\titem_id:token\ttimestamp:float"

# Usual RecBole field names of the item columns we keep (first present wins).
TITLE_FIELDS = ("title", "movie_title", "name", "item_name")
TEXT_FIELDS = ("text", "description", "desc")
CATEGORY_FIELDS = ("categories", "category", "genre", "genres")


@dataclass
class AtomicFields:
    """Which RecBole field holds which column (None: the usual names, or absent)."""

    user: str = "user_id"
    item: str = "item_id"
    ts: str | None = "timestamp"  # optional in the file: without it, file order is time order
    rating: str | None = "rating"  # optional in the file
    title: str | None = None  # None: the first of TITLE_FIELDS in the .item file
    text: str | None = None  # None: the first of TEXT_FIELDS
    categories: str | None = None  # None: the first of CATEGORY_FIELDS


# --------------------------------------------------------------------------- reading


def parse_header(line: str, path: Path) -> list[str]:
    """Field names of a `name:type` header line; a clear error for a malformed field."""
    names: list[str] = []
    for field in line.rstrip("\r\n").split("\t"):
        name, sep, typ = field.strip().rpartition(":")
        if not sep or not name or typ not in FIELD_TYPES:
            raise SourceError(
                f"{path}: header field {field!r} is not name:type with a type in {FIELD_TYPES}"
            )
        names.append(name)
    if len(set(names)) != len(names):
        raise SourceError(f"{path}: header repeats a field name: {names}")
    return names


def read_atomic(path: Path, report: Report, what: str) -> pl.DataFrame:
    """One atomic file as all-string columns named without their `:type` (lines with the wrong
    number of fields are dropped and counted; invalid UTF-8 is repaired and counted)."""
    lines = decode_lines(require_file(path, what).read_bytes(), "utf-8", report, what)
    if not lines:
        raise SourceError(f"{path}: {what} is empty (a RecBole atomic file starts with a header)")
    names = parse_header(lines[0], path)
    body = [ln.rstrip("\r") for ln in lines[1:] if ln.strip()]
    ragged = [ln for ln in body if ln.count("\t") != len(names) - 1]
    report.add("ragged_line", "dropped", len(ragged), f"{what}: {ragged[0] if ragged else ''}")
    if ragged:
        body = [ln for ln in body if ln.count("\t") == len(names) - 1]
    if not body:
        return pl.DataFrame(schema={n: pl.String for n in names})
    return pl.read_csv(
        io.BytesIO("\n".join(body).encode("utf-8")),
        separator="\t",
        has_header=False,
        new_columns=names,
        quote_char=None,
        infer_schema=False,
    )


def atomic_name(folder: Path, name: str | None, suffix: str) -> str:
    """The file stem of `<folder>/<name><suffix>`: the folder's own name, else the only one."""
    if name:
        return name
    if (folder / f"{folder.name}{suffix}").is_file():
        return folder.name
    found = sorted(p.name.removesuffix(suffix) for p in folder.glob(f"*{suffix}"))
    if len(found) != 1:
        raise SourceError(
            f"{folder}: expected one <name>{suffix} file, found {found or 'none'}; pass the name"
        )
    return found[0]


def _first(columns: list[str], given: str | None, usual: tuple[str, ...], path: Path) -> str | None:
    if given:
        if given not in columns:
            raise SourceError(f"{path} has no field {given!r}; has {columns}")
        return given
    return next((c for c in usual if c in columns), None)


def read_recbole(
    folder: Path,
    dataset: str | None = None,
    name: str | None = None,
    fields: AtomicFields | None = None,
) -> RawSource:
    """Read RecBole atomic files `<folder>/<name>.inter` and optional `<folder>/<name>.item`.

    `name` defaults to the folder's name (RecBole's layout) or the folder's only .inter file;
    `dataset` (the warehouse name) defaults to `name`. Timestamps are floats in seconds; ties
    keep the file order. An interaction without a user, an item or a parseable timestamp is
    dropped and counted.
    """
    folder = Path(folder)
    if folder.is_file() and folder.suffix == ".inter":
        folder, name = folder.parent, folder.stem
    if not folder.is_dir():
        raise SourceError(f"{folder=} is not a folder holding RecBole atomic files (<name>.inter)")
    fields = fields or AtomicFields()
    name = atomic_name(folder, name, ".inter")
    report = Report()
    inter_path = folder / f"{name}.inter"
    inter = read_atomic(inter_path, report, f"{name}.inter")
    for f in (fields.user, fields.item):
        if f not in inter.columns:
            raise SourceError(f"{inter_path} has no field {f!r}; has {inter.columns}")
    ts = fields.ts if fields.ts in inter.columns else None
    rating = fields.rating if fields.rating in inter.columns else None
    df = inter.with_row_index("file_row").select(
        pl.col(fields.user).str.strip_chars().alias("user_id"),
        pl.col(fields.item).str.strip_chars().alias("item_id"),
        (pl.col(ts).str.strip_chars().cast(pl.Float64, strict=False) if ts else pl.lit(0.0)).alias(
            "t"
        ),
        (
            pl.col(rating).cast(pl.Float32, strict=False) if rating else pl.lit(None, pl.Float32)
        ).alias("rating"),
        "file_row",
    )
    bad = df.filter(
        pl.col("user_id").is_null()
        | (pl.col("user_id") == "")
        | pl.col("item_id").is_null()
        | (pl.col("item_id") == "")
        | pl.col("t").is_null()
        | pl.col("t").is_nan()
    )
    if bad.height:
        report.add(
            "unparseable_interaction", "dropped", bad.height, f"line {bad['file_row'][0] + 2}"
        )
        df = df.join(bad.select("file_row"), on="file_row", how="anti")
    # `row` follows the float time (file order on ties), so whole seconds lose no order.
    df = df.sort("t", "file_row").with_row_index("row")
    interactions = df.select(
        "user_id",
        "item_id",
        pl.col("t").floor().cast(pl.Int64).alias("ts"),
        "rating",
        pl.col("row").cast(pl.Int64),
    )
    items = _read_items(folder / f"{name}.item", fields, report, name)
    if items is None:  # no .item file: the items are the ids of the interactions, without text
        ids = interactions["item_id"].unique(maintain_order=True)
        items = pl.DataFrame({"item_id": ids}).with_columns(
            pl.lit("").alias("title"), pl.lit("").alias("text"), pl.lit("").alias("categories")
        )
        report.add("no_item_file", "info", 1, f"{folder / (name + '.item')}: items have no text")
    images = pl.DataFrame(schema={"item_id": pl.String, "image_idx": pl.Int32, "uri": pl.String})
    origin = str(inter_path.resolve())
    return RawSource(dataset or name, items, interactions, images, report, origin=origin)


def _read_items(path: Path, fields: AtomicFields, report: Report, name: str) -> pl.DataFrame | None:
    if not path.is_file():
        return None
    df = read_atomic(path, report, f"{name}.item")
    if fields.item not in df.columns:
        raise SourceError(f"{path} has no field {fields.item!r}; has {df.columns}")
    cols = {
        "title": _first(df.columns, fields.title, TITLE_FIELDS, path),
        "text": _first(df.columns, fields.text, TEXT_FIELDS, path),
        "categories": _first(df.columns, fields.categories, CATEGORY_FIELDS, path),
    }
    return df.select(
        pl.col(fields.item).str.strip_chars().alias("item_id"),
        *((pl.col(c) if c else pl.lit("")).alias(k) for k, c in cols.items()),
    )


# --------------------------------------------------------------------------- writing


def _clean(col: str) -> pl.Expr:
    """Text for a token_seq field: no tabs or line breaks (they would break the row)."""
    return pl.col(col).fill_null("").str.replace_all(r"[\t\r\n]+", " ").str.strip_chars()


def _write(df: pl.DataFrame, header: str, path: Path) -> None:
    """Write header + tab-separated rows to `path` atomically (a temp file, then a rename)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.write(header + "\n")
        df.write_csv(f, separator="\t", include_header=False, quote_style="never")
    os.replace(tmp, path)


def export_recbole(
    dataset: str,
    folder: Path,
    wh: WarehouseConfig | None = None,
    snapshot: int | None = None,
    name: str | None = None,
) -> Path:
    """Write `dataset`'s preprocessed interactions (and item titles) as RecBole atomic files.

    Writes `<folder>/<name>/<name>.inter` (header `user_id:token  item_id:token  timestamp:float`)
    and `<name>.item` (`item_id:token  title:token_seq`, plus `categories:token_seq` /
    `text:token_seq` when some item has them), `name` defaulting to `dataset`. Returns
    `<folder>/<name>`: RecBole's `data_path` is its parent and its `dataset` is `name`.

    The rows are exactly what the trainer reads (`interactions` of the dataset at `snapshot`,
    default the latest), each user's items in `seq` order. The timestamp is the real one made
    strictly increasing per user, t_i = max(ts_i, t_{i-1} + 1) along `seq` (ML-1M has many
    same-second ratings), and rows are written in `seq` order: RecBole's time ordering then
    reproduces the per-user order exactly, even though it sorts float32 copies of the timestamps
    (Unix seconds rounded to ~64 s; its stable sort keeps the file's order on those ties,
    bench/recbole_ml1m_order.py), and the values stay within seconds of the real ones. `.item`
    lists only items that occur in the interactions, so RecBole ranks the same items as the
    trainer.
    """
    name = name or dataset
    if not name or any(c in name for c in "/\\\t\n"):
        raise ValueError(f"{name=} cannot be a RecBole dataset name (a folder and a file stem)")
    with store.connect(wh, create=False, read_only=True) as con:
        snap = snapshot if snapshot is not None else store.snapshot_id(con)
        at = f" AT (VERSION => {int(snap)})"
        inter = pl.from_arrow(
            store.query(
                con,
                f"SELECT user_id, item_id, ts, seq FROM interactions{at} WHERE dataset = ? "
                "ORDER BY user_id, seq, item_id",
                [dataset],
            )
        )
        if inter.height == 0:
            known = [
                r[0]
                for r in con.execute(f"SELECT DISTINCT dataset FROM interactions{at}").fetchall()
            ]
            raise ValueError(
                f"no interactions for dataset={dataset!r} at snapshot {snap}; datasets: {sorted(known)}"
            )
        items = pl.from_arrow(
            store.query(
                con,
                f"SELECT item_id, title, text, categories FROM items{at} WHERE dataset = ?",
                [dataset],
            )
        )
    bad = inter.filter(
        pl.col("user_id").str.contains(r"[\t\r\n]") | pl.col("item_id").str.contains(r"[\t\r\n]")
    )
    if bad.height:
        raise ValueError(f"a RecBole token cannot hold a tab or line break: {bad.row(0)[:2]}")
    inter = inter.with_columns(pl.int_range(pl.len()).over("user_id").alias("pos"))
    inter = inter.with_columns(
        ((pl.col("ts") - pl.col("pos")).cum_max().over("user_id") + pl.col("pos")).alias(
            "timestamp"
        )
    )
    out = Path(folder) / name
    out.mkdir(parents=True, exist_ok=True)
    _write(inter.select("user_id", "item_id", "timestamp"), INTER_HEADER, out / f"{name}.inter")
    used = inter.select("item_id").unique()
    items = used.join(items, on="item_id", how="left").sort("item_id")
    items = items.select("item_id", *(_clean(c).alias(c) for c in ("title", "categories", "text")))
    keep = ["item_id", "title"] + [c for c in ("categories", "text") if (items[c] != "").any()]
    header = "\t".join(f"{c}:token" if c == "item_id" else f"{c}:token_seq" for c in keep)
    _write(items.select(keep), header, out / f"{name}.item")
    return out
