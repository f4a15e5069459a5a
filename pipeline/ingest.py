"""Ingest: a source's raw rows -> preprocessed items, interactions, item_images in the warehouse.

The three data tables of a dataset are replaced in ONE transaction (a killed ingest leaves the
previous state), and only changed rows are written: re-ingesting the same files commits no data
snapshot. The run itself is always logged (pipeline_runs + data_report rows, one small commit),
with a report row per table for the rows it inserted, updated and deleted.

A re-ingest never removes rows it was not told to: an input that yields no items or no
interactions is refused (IngestRefused) before anything is written, and so is one that would
delete more than `max_delete_share` of a dataset's stored rows of any table, unless
`allow_deletes` is set (`--allow-deletes`); the refusal names what would go.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
from tqdm import tqdm

from features import store
from features.contract import IMAGE_OK
from features.runlog import log_run, new_run_id
from features.store import DeletePlan, DeleteRefused, WarehouseConfig, Write
from pipeline.images import ImageConfig, ImageResult, fetch_all
from pipeline.paths import image_cache_dir
from pipeline.preprocess import PreprocessConfig, preprocess
from pipeline.sources.base import RawSource, Report, SourceError, printable

# Default of `ingest(max_delete_share=...)`: more than this share of a dataset's stored rows of
# a table going needs allow_deletes.
MAX_DELETE_SHARE = 0.2
DELETE_HINT = "Pass --allow-deletes to replace the dataset anyway."


class IngestRefused(ValueError):
    """The input would empty or shrink a dataset without being told to; nothing was written."""


# What an ingest raises when it refuses its input (a bad source, an empty input, a delete it may
# not do, a bad value): the same every time, so a one-line error and never a retry.
REFUSALS: tuple[type[Exception], ...] = (SourceError, store.WarehouseError, ValueError)


@dataclass
class IngestSummary:
    run_id: str
    dataset: str
    n_items: int
    n_users: int
    n_interactions: int
    n_images: int
    images_by_status: dict[str, int]
    rows_changed: dict[str, int]  # table -> inserted + updated + deleted
    seconds: float
    snapshot_id: int
    report: list[dict] = field(default_factory=list)


def _known_downloads(con, dataset: str) -> dict[str, ImageResult]:
    """URL images already fetched and cached: reused, not downloaded again."""
    rows = store.query(
        con,
        "SELECT uri, local_path, sha256, status, width, height, n_bytes FROM item_images "
        "WHERE dataset = ? AND status = ? AND uri LIKE 'http%'",
        [dataset, IMAGE_OK],
    ).to_pylist()
    return {
        r["uri"]: ImageResult(
            r["uri"],
            r["local_path"],
            r["sha256"],
            r["status"],
            r["width"],
            r["height"],
            r["n_bytes"],
        )
        for r in rows
        if r["local_path"] and Path(r["local_path"]).is_file()
    }


def resolve_images(
    images: pl.DataFrame,
    known: dict[str, ImageResult],
    cfg: ImageConfig,
    report: Report,
    progress: bool = True,
) -> pl.DataFrame:
    """Fetch/validate/hash every image reference; rows in the item_images contract (no dataset)."""
    uris = images["uri"].unique(maintain_order=True).to_list()
    todo = [u for u in uris if u not in known]
    bar = tqdm(total=len(todo), desc="images", unit="img", disable=not progress, mininterval=0.5)
    fetched = fetch_all(todo, image_cache_dir(), cfg, on_done=lambda _r: bar.update(1))
    bar.close()
    by_uri = {**known, **{r.uri: r for r in fetched}}
    res = pl.DataFrame(
        [asdict(by_uri[u]) for u in uris],
        schema={
            "uri": pl.String,
            "local_path": pl.String,
            "sha256": pl.String,
            "status": pl.String,
            "width": pl.Int32,
            "height": pl.Int32,
            "n_bytes": pl.Int64,
            "error": pl.String,
        },
    )
    out = images.join(res, on="uri", how="left")
    for status, n in Counter(out["status"].to_list()).items():
        if status != IMAGE_OK:
            ex = out.filter(pl.col("status") == status).row(0, named=True)
            report.add(f"image_{status}", "kept", n, f"{ex['uri']}: {ex['error']}")
    return out


def _refuse_empty(raw: RawSource, items: pl.DataFrame, inter: pl.DataFrame) -> None:
    """IngestRefused when nothing valid is left: the input, not the dataset, is wrong."""
    empty = [name for name, df in (("items", items), ("interactions", inter)) if df.height == 0]
    if not empty:
        return
    reasons = sorted(
        (r for r in raw.report.rows if r.action == "dropped"), key=lambda r: r.n, reverse=True
    )
    why = "; ".join(f"{r.check_name} {r.n} ({printable(r.example)[:120]})" for r in reasons[:3])
    raise IngestRefused(
        f"{raw.origin or raw.dataset}: no valid {' and no valid '.join(empty)} "
        f"(read {raw.n_read_items} item rows, {raw.n_read_interactions} interaction rows"
        + (f"; dropped: {why}" if why else "")
        + f"); dataset {raw.dataset!r} left as it was"
    )


def _refuse_deletes(con, raw: RawSource, parts: dict[str, pl.DataFrame], limit: float) -> None:
    """DeleteRefused naming what would go, before any image is fetched or row written."""
    plans: list[DeletePlan] = [
        store.plan_replace(con, table, raw.dataset, rows) for table, rows in parts.items()
    ]
    over = [p for p in plans if p.share > limit]
    if over:
        raise DeleteRefused(over, limit, DELETE_HINT)


def ingest(
    raw: RawSource,
    wh: WarehouseConfig | None = None,
    *,
    pre: PreprocessConfig | None = None,
    images: ImageConfig | None = None,
    progress: bool = True,
    allow_deletes: bool = False,
    max_delete_share: float = MAX_DELETE_SHARE,
) -> IngestSummary:
    """Preprocess `raw`, resolve its images and mirror the dataset into the warehouse.

    Raises IngestRefused when the input yields no items or no interactions, DeleteRefused when
    it would delete more than `max_delete_share` of the dataset's stored rows of a table and
    `allow_deletes` is not set. Nothing is written in either case.
    """
    t0 = time.perf_counter()
    started = datetime.now(UTC)
    run_id = new_run_id("ingest", raw.dataset)
    items, inter = preprocess(raw, pre)
    _refuse_empty(raw, items, inter)
    img_cfg = images or ImageConfig()
    # Images of items that were dropped (unknown / duplicate ids) are not kept.
    imgs = raw.images.join(items.select("item_id"), on="item_id", how="semi")
    orphan = raw.images.height - imgs.height
    raw.report.add("image_of_unknown_item", "dropped", orphan)
    ds = pl.lit(raw.dataset).alias("dataset")
    limit = None if allow_deletes else max_delete_share
    with store.connect(wh) as con:
        if limit is not None:
            keys = {"items": items, "interactions": inter, "item_images": imgs}
            _refuse_deletes(con, raw, keys, limit)
        img_rows = resolve_images(
            imgs, _known_downloads(con, raw.dataset), img_cfg, raw.report, progress
        )
        n_ok = img_rows.filter(pl.col("status") == IMAGE_OK).group_by("item_id").len("n_images")
        item_rows = items.join(n_ok, on="item_id", how="left").with_columns(
            ds, pl.col("n_images").fill_null(0).cast(pl.Int32)
        )
        try:
            results = store.write(
                con,
                [
                    Write("items", item_rows, raw.dataset, limit),
                    Write("interactions", inter.with_columns(ds), raw.dataset, limit),
                    Write("item_images", img_rows.with_columns(ds), raw.dataset, limit),
                ],
            )
        except DeleteRefused as e:  # another writer changed the dataset since the check above
            raise DeleteRefused(e.plans, limit or 0.0, DELETE_HINT) from None
        for r in results:
            for action, n in (
                ("inserted", r.inserted),
                ("updated", r.updated),
                ("deleted", r.deleted),
            ):
                raw.report.add(f"{r.table}_rows_{action}", "changed", n)
        snap = store.snapshot_id(con)
        summary = IngestSummary(
            run_id=run_id,
            dataset=raw.dataset,
            n_items=items.height,
            n_users=inter["user_id"].n_unique(),
            n_interactions=inter.height,
            n_images=img_rows.height,
            images_by_status=dict(Counter(img_rows["status"].to_list())),
            rows_changed={r.table: r.inserted + r.updated + r.deleted for r in results},
            seconds=round(time.perf_counter() - t0, 3),
            snapshot_id=snap,
            report=[asdict(r) for r in raw.report.rows],
        )
        log_run(
            con,
            run_id,
            "ingest",
            raw.dataset,
            started,
            summary_json(summary, raw.origin),
            snap,
            raw.report,
        )
    return summary


def summary_json(summary: object, origin: str = "") -> str:
    d = asdict(summary)  # type: ignore[call-overload]
    d.pop("report", None)
    if origin:
        d["origin"] = origin
    return json.dumps(d, default=str)
