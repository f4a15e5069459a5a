"""PAPER.md section 5 preprocessing: >= 5 interactions per user, duplicate (user, item) pairs keep
the last, stable time order (ties broken by source row). Every drop is counted in the report."""

from __future__ import annotations

import re
from dataclasses import dataclass

import polars as pl

from pipeline.sentences import repair_mojibake
from pipeline.sources.base import CONTROL_CHARS, RawSource, Report, printable

TEXT_FIELDS = ("title", "text", "categories")
# Latin-1 / cp1252 renderings of UTF-8 lead bytes: a cheap pre-filter for repair_mojibake.
_MOJIBAKE_HINT = "[\u00c2-\u00f4]"


@dataclass
class PreprocessConfig:
    min_user_interactions: int = 5  # PAPER.md: keep users with >= 5 interactions


def repair_text(items: pl.DataFrame, report: Report) -> pl.DataFrame:
    """Mojibake (UTF-8 read as latin-1 / cp1252: "CafÃ©") decoded back, control characters
    replaced by spaces, in title, text and categories; each repair is a report row."""
    for field in TEXT_FIELDS:
        col = pl.col(field)
        for check, hint, fix in (
            (f"{field}_mojibake_repaired", _MOJIBAKE_HINT, repair_mojibake),
            (f"{field}_control_chars_removed", CONTROL_CHARS, _without_controls),
        ):
            hits = items.filter(col.str.contains(hint).fill_null(False))[field].unique()
            changed = {v: f for v in hits.to_list() if (f := fix(v)) is not None and f != v}
            if not changed:
                continue
            n = items.select(col.is_in(list(changed)).sum()).item()
            report.add(check, "repaired", n, printable(next(iter(changed))))
            items = items.with_columns(col.replace(list(changed), list(changed.values())))
    return items


def _without_controls(value: str) -> str:
    return re.sub(CONTROL_CHARS, " ", value).strip()


def clean_items(items: pl.DataFrame, report: Report) -> pl.DataFrame:
    """Trim text, repair mojibake and control characters, drop rows without an id, keep the
    first of duplicate ids."""
    items = items.with_columns(
        pl.col("item_id").str.strip_chars(),
        *(pl.col(c).fill_null("").str.strip_chars() for c in TEXT_FIELDS),
    )
    no_id = items.filter(pl.col("item_id").is_null() | (pl.col("item_id") == ""))
    report.add("item_without_id", "dropped", no_id.height, no_id.row(0) if no_id.height else "")
    items = items.filter(pl.col("item_id").is_not_null() & (pl.col("item_id") != ""))
    dup = items.filter(pl.col("item_id").is_duplicated())
    first = items.unique("item_id", keep="first", maintain_order=True)
    report.add(
        "duplicate_item_id",
        "dropped",
        items.height - first.height,
        dup["item_id"][0] if dup.height else "",
    )
    first = repair_text(first, report)
    empty = first.filter(
        (pl.col("title") == "") & (pl.col("text") == "") & (pl.col("categories") == "")
    )
    report.add(
        "item_with_empty_text", "kept", empty.height, empty["item_id"][0] if empty.height else ""
    )
    repaired = first.filter(
        pl.concat_str("title", "text", "categories").str.contains("\ufffd", literal=True)
    )
    report.add(
        "item_text_with_replaced_bytes",
        "repaired",
        repaired.height,
        repaired["item_id"][0] if repaired.height else "",
    )
    return first


def clean_interactions(
    inter: pl.DataFrame, item_ids: pl.Series, report: Report, cfg: PreprocessConfig
) -> pl.DataFrame:
    """Unknown items out, duplicates keep the last, users below the threshold out; add `seq`."""
    known = inter.filter(pl.col("item_id").is_in(item_ids.implode()))
    unknown = inter.height - known.height
    if unknown:
        ex = inter.filter(~pl.col("item_id").is_in(item_ids.implode()))["item_id"][0]
        report.add("interaction_with_unknown_item", "dropped", unknown, ex)
    ordered = known.sort(["user_id", "ts", "row"])
    dedup = ordered.unique(["user_id", "item_id"], keep="last", maintain_order=True)
    if dedup.height < ordered.height:
        dup = ordered.filter(pl.struct("user_id", "item_id").is_duplicated()).row(0)
        report.add("duplicate_interaction", "dropped", ordered.height - dedup.height, dup)
    counts = dedup.group_by("user_id").len()
    low = counts.filter(pl.col("len") < cfg.min_user_interactions)
    if low.height:
        report.add(
            f"user_below_{cfg.min_user_interactions}_interactions",
            "dropped",
            int(low["len"].sum()),
            f"{low.height} users, e.g. user {low['user_id'][0]}",
        )
    kept = dedup.join(low.select("user_id"), on="user_id", how="anti")
    return kept.sort(["user_id", "ts", "row"]).with_columns(
        pl.int_range(pl.len()).over("user_id").cast(pl.Int32).alias("seq")
    )


def preprocess(
    raw: RawSource, cfg: PreprocessConfig | None = None
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(items, interactions) ready for the contract (minus n_images / dataset columns)."""
    cfg = cfg or PreprocessConfig()
    items = clean_items(raw.items, raw.report)
    inter = clean_interactions(raw.interactions, items["item_id"], raw.report, cfg)
    return items, inter
