"""Amazon review data: 2014/2018 (`reviews_*.json(.gz)` + `meta_*.json(.gz)`) and 2023
(`<Category>.jsonl(.gz)` reviews + `meta_<Category>.jsonl(.gz)`).

2014 meta files are Python dict literals, not JSON; both are read. Image URLs: `imUrl` (2014),
`imageURLHighRes` / `imageURL` (2018), `images[].hi_res|large` (2023).
"""

from __future__ import annotations

import ast
import json
import math
import re
from pathlib import Path
from typing import Any

import polars as pl

from pipeline.sources.base import (
    MAX_TS,
    RawSource,
    Report,
    SourceError,
    decode_lines,
    has_control_bytes,
    is_blank,
    printable,
    read_bytes,
)

_TAG = re.compile(r"<[^>]+>")
# Amazon's star ratings.
RATING_MIN, RATING_MAX = 1.0, 5.0


def _records(path: Path, report: Report, what: str) -> tuple[list[tuple[int, dict[str, Any]]], int]:
    """((line number, record) of every line that is a JSON / Python-literal object, lines read)."""
    out: list[tuple[int, dict[str, Any]]] = []
    bad: list[str] = []
    n_read = 0
    for n, line in enumerate(decode_lines(read_bytes(path), "utf-8", report, what), 1):
        if is_blank(line):
            continue
        n_read += 1
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            try:
                rec = ast.literal_eval(line)  # 2014 meta: Python literals
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                rec = None
        if isinstance(rec, dict):
            out.append((n, rec))
        else:
            bad.append(f"line {n}: {line[:200]}")
    report.add(f"unparseable_{what}_line", "dropped", len(bad), printable(bad[0]) if bad else "")
    return out, n_read


def _text(value: Any) -> str:
    """Flatten a str / number / list of those (2018, 2023 descriptions); strip HTML tags."""
    if value is None or isinstance(value, (dict, bool)):
        return ""
    if isinstance(value, (list, tuple)):
        return " ".join(t for t in (_text(v) for v in value) if t)
    return " ".join(_TAG.sub(" ", str(value)).split())


def _strings(value: Any) -> list[str]:
    """A str or a (nested) list of str as a flat list of non-empty strings."""
    if isinstance(value, str):
        return [value] if value.strip() else []
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _strings(v)]
    return []


def _categories(rec: dict[str, Any]) -> str:
    cats = rec.get("categories") or rec.get("category") or []
    if isinstance(cats, list) and cats and isinstance(cats[0], list):  # 2014: [["Office", ...]]
        cats = cats[0]
    parts = [_text(c) for c in _strings(cats)]
    brand = _text(rec.get("brand") or rec.get("store") or "")
    if brand:
        parts.append(brand)
    return ", ".join(dict.fromkeys(p for p in parts if p))


def _images(rec: dict[str, Any]) -> list[str]:
    for key in ("imUrl", "imageURLHighRes", "imageURL"):
        if _strings(rec.get(key)):
            return [u.strip() for u in _strings(rec.get(key))]
    urls = []
    images = rec.get("images") or []
    for im in images if isinstance(images, list) else [images]:
        if isinstance(im, dict):
            url = next((im[k] for k in ("hi_res", "large", "thumb") if _strings(im.get(k))), None)
            if isinstance(url, str):
                urls.append(url.strip())
        elif isinstance(im, str) and im.strip():
            urls.append(im.strip())
    return urls


def _key(value: Any) -> str | None:
    """An id: a non-empty string or an integer; anything else (list, dict, bool) is no id."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None
    text = str(value).strip()
    return text or None


def _number(value: Any) -> float | None:
    """A finite number from a number or a numeric string; None otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        number = float(value)
    except (ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def _review(rec: dict[str, Any]) -> tuple[str, tuple | None]:
    """("", (user, item, ts, rating)) or (the check that drops the review, None)."""
    user = _key(rec.get("reviewerID", rec.get("user_id")))
    item = _key(rec.get("parent_asin") or rec.get("asin"))
    if "unixReviewTime" in rec:
        ts = _number(rec["unixReviewTime"])
    else:
        ts = _number(rec.get("timestamp"))
        ts = ts / 1000 if ts is not None else None  # 2023: milliseconds
    if not user or not item or ts is None:
        return "review_without_user_item_or_time", None
    if has_control_bytes(user) or has_control_bytes(item):
        return "interaction_id_with_control_chars", None
    if not 0 <= ts <= MAX_TS:
        return "timestamp_out_of_range", None
    raw_rating = rec.get("overall", rec.get("rating"))
    rating = _number(raw_rating)
    if raw_rating is not None and rating is None:
        return "unparseable_rating", None
    if rating is not None and not RATING_MIN <= rating <= RATING_MAX:
        return "rating_out_of_range", None
    return "", (user, item, int(ts), rating)


def read_amazon(reviews: Path, meta: Path, dataset: str) -> RawSource:
    """Read one Amazon category (any of the 2014, 2018, 2023 layouts)."""
    reviews, meta = Path(reviews), Path(meta)
    for p in (reviews, meta):
        if not p.is_file():
            raise SourceError(f"Amazon file not found: {p}")
    report = Report()
    revs, n_reviews = _records(reviews, report, "review")
    inter: dict[str, list] = {"user_id": [], "item_id": [], "ts": [], "rating": [], "row": []}
    drops: dict[str, list[int]] = {}
    for line, r in revs:
        check, row = _review(r)
        if row is None:
            drops.setdefault(check, []).append(line)
            continue
        for k, v in zip(("user_id", "item_id", "ts", "rating"), row, strict=True):
            inter[k].append(v)
        inter["row"].append(line)
    for check, lines in drops.items():
        report.add(check, "dropped", len(lines), f"review line {lines[0]}")

    items: dict[str, list] = {"item_id": [], "title": [], "text": [], "categories": []}
    images: dict[str, list] = {"item_id": [], "image_idx": [], "uri": []}
    metas, n_meta = _records(meta, report, "meta")
    no_id: list[int] = []
    for line, m in metas:
        item = _key(m.get("parent_asin") or m.get("asin"))
        if not item:
            no_id.append(line)
            continue
        items["item_id"].append(item)
        items["title"].append(_text(m.get("title")))
        desc = _text(m.get("description"))
        feats = _text(m.get("features") or m.get("feature"))
        items["text"].append(" ".join(x for x in (desc, feats) if x))
        items["categories"].append(_categories(m))
        for i, url in enumerate(_images(m)):
            images["item_id"].append(item)
            images["image_idx"].append(i)
            images["uri"].append(url)
    report.add(
        "meta_without_item_id", "dropped", len(no_id), f"meta line {no_id[0]}" if no_id else ""
    )
    return RawSource(
        dataset,
        pl.DataFrame(items, schema={k: pl.String for k in items}),
        pl.DataFrame(
            inter,
            schema={
                "user_id": pl.String,
                "item_id": pl.String,
                "ts": pl.Int64,
                "rating": pl.Float32,
                "row": pl.Int64,
            },
        ),
        pl.DataFrame(
            images, schema={"item_id": pl.String, "image_idx": pl.Int32, "uri": pl.String}
        ),
        report,
        origin=f"{reviews.resolve()} + {meta.resolve()}",
        n_read_interactions=n_reviews,
        n_read_items=n_meta,
    )
