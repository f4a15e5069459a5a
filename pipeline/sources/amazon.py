"""Amazon review data: 2014/2018 (`reviews_*.json(.gz)` + `meta_*.json(.gz)`) and 2023
(`<Category>.jsonl(.gz)` reviews + `meta_<Category>.jsonl(.gz)`).

2014 meta files are Python dict literals, not JSON; both are read. Image URLs: `imUrl` (2014),
`imageURLHighRes` / `imageURL` (2018), `images[].hi_res|large` (2023).
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Any

import polars as pl

from pipeline.sources.base import RawSource, Report, SourceError, decode_lines, read_bytes

_TAG = re.compile(r"<[^>]+>")


def _records(path: Path, report: Report, what: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    bad: list[str] = []
    for line in decode_lines(read_bytes(path), "utf-8", report, what):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            try:
                rec = ast.literal_eval(line)  # 2014 meta: Python literals
            except (ValueError, SyntaxError):
                bad.append(line)
                continue
        if isinstance(rec, dict):
            out.append(rec)
        else:
            bad.append(line)
    report.add(f"unparseable_{what}_line", "dropped", len(bad), bad[0][:200] if bad else "")
    return out


def _text(value: Any) -> str:
    """Flatten a str / list of str (2018, 2023 descriptions) and strip HTML tags."""
    if value is None:
        return ""
    if isinstance(value, list):
        value = " ".join(_text(v) for v in value)
    return " ".join(_TAG.sub(" ", str(value)).split())


def _categories(rec: dict[str, Any]) -> str:
    cats = rec.get("categories") or rec.get("category") or []
    if cats and isinstance(cats[0], list):  # 2014: [["Office Products", "Paper", ...]]
        cats = cats[0]
    parts = [_text(c) for c in cats if _text(c)]
    brand = _text(rec.get("brand") or rec.get("store") or "")
    if brand:
        parts.append(brand)
    return ", ".join(dict.fromkeys(parts))


def _images(rec: dict[str, Any]) -> list[str]:
    if rec.get("imUrl"):
        return [rec["imUrl"]]
    for key in ("imageURLHighRes", "imageURL"):
        if rec.get(key):
            return list(rec[key])
    urls = []
    for im in rec.get("images") or []:
        if isinstance(im, dict):
            url = im.get("hi_res") or im.get("large") or im.get("thumb")
            if url:
                urls.append(url)
        elif isinstance(im, str):
            urls.append(im)
    return urls


def read_amazon(reviews: Path, meta: Path, dataset: str) -> RawSource:
    """Read one Amazon category (any of the 2014, 2018, 2023 layouts)."""
    reviews, meta = Path(reviews), Path(meta)
    for p in (reviews, meta):
        if not p.is_file():
            raise SourceError(f"Amazon file not found: {p}")
    report = Report()
    revs = _records(reviews, report, "review")
    inter = {"user_id": [], "item_id": [], "ts": [], "rating": [], "row": []}
    missing = 0
    for row, r in enumerate(revs):
        user = r.get("reviewerID") or r.get("user_id")
        item = r.get("parent_asin") or r.get("asin")
        ts = r.get("unixReviewTime")
        if ts is None and r.get("timestamp") is not None:
            ts = int(r["timestamp"]) // 1000  # 2023: milliseconds
        if not user or not item or ts is None:
            missing += 1
            continue
        inter["user_id"].append(str(user))
        inter["item_id"].append(str(item))
        inter["ts"].append(int(ts))
        rating = r.get("overall", r.get("rating"))
        inter["rating"].append(float(rating) if rating is not None else None)
        inter["row"].append(row)
    report.add("review_without_user_item_or_time", "dropped", missing)

    items = {"item_id": [], "title": [], "text": [], "categories": []}
    images = {"item_id": [], "image_idx": [], "uri": []}
    for m in _records(meta, report, "meta"):
        item = m.get("parent_asin") or m.get("asin")
        if not item:
            continue
        items["item_id"].append(str(item))
        items["title"].append(_text(m.get("title")))
        desc = _text(m.get("description"))
        feats = _text(m.get("features") or m.get("feature"))
        items["text"].append(" ".join(x for x in (desc, feats) if x))
        items["categories"].append(_categories(m))
        for i, url in enumerate(_images(m)):
            images["item_id"].append(str(item))
            images["image_idx"].append(i)
            images["uri"].append(url)
    return RawSource(
        dataset,
        pl.DataFrame(items, schema={k: pl.String for k in items}),
        pl.DataFrame(inter, schema={"user_id": pl.String, "item_id": pl.String, "ts": pl.Int64, "rating": pl.Float32, "row": pl.Int64}),
        pl.DataFrame(images, schema={"item_id": pl.String, "image_idx": pl.Int32, "uri": pl.String}),
        report,
        origin=f"{reviews.resolve()} + {meta.resolve()}",
    )
