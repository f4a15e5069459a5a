"""The features flow: ingest -> tag -> embed for one dataset.

Each task is a thin call of one pipeline function and returns a small dict (counts, versions,
snapshot id), never frames or tensors. Steps that touch files or URLs retry twice with backoff.
Prefect's result cache is not used to skip work: the warehouse decides what is new (content
keys), so a rerun after adding items processes only those.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task

from features import store
from features.store import WarehouseConfig
from pipeline.embedding import EncoderConfig, embed_dataset
from pipeline.ingest import ingest
from pipeline.sources import read_source
from pipeline.tagging import TaggerConfig, tag_dataset

IO_RETRIES = dict(retries=2, retry_delay_seconds=[2, 10])


@task(name="ingest", **IO_RETRIES)
def ingest_task(kind: str, path: str | None, dataset: str | None) -> dict[str, Any]:
    """Read the source and mirror it into the warehouse."""
    s = ingest(read_source(kind, Path(path) if path else None, dataset), WarehouseConfig(), progress=False)
    return {k: v for k, v in asdict(s).items() if k != "report"} | {"n_report_rows": len(s.report)}


@task(name="tag", **IO_RETRIES)
def tag_task(dataset: str, tagger: dict[str, Any]) -> dict[str, Any]:
    """Tag the dataset's images whose keywords are missing for this tagger version."""
    return asdict(tag_dataset(dataset, TaggerConfig(**tagger), WarehouseConfig(), progress=False))


@task(name="embed")
def embed_task(dataset: str, encoder: dict[str, Any]) -> dict[str, Any]:
    """Encode the dataset's sentences and keyword texts that are missing for this encoder."""
    return asdict(embed_dataset(dataset, EncoderConfig(**encoder), WarehouseConfig(), progress=False))


def _seconds(value: float | dict[str, float]) -> float:
    """A stage's seconds: a number, or a per-step dict with a total."""
    if isinstance(value, dict):
        return float(value.get("total", sum(value.values())))
    return float(value)


@flow(name="msm4sr-features", log_prints=True)
def features_flow(
    source: str = "movielens",
    path: str | None = None,
    dataset: str | None = None,
    tag: bool = True,
    embed: bool = True,
    tagger: dict[str, Any] | None = None,
    encoder: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Ingest a source, tag its images, embed its text and keywords; return the run summary.

    Args:
        source: "movielens" or "amazon-office" (see pipeline.sources.KINDS).
        path: the source folder (default: under the data root).
        dataset: warehouse dataset name (default per source: ml-1m, amazon-office).
        tag / embed: run those stages.
        tagger / encoder: TaggerConfig / EncoderConfig fields overriding the defaults.
    """
    log = get_run_logger()
    t0 = time.perf_counter()
    summary: dict[str, Any] = {}
    s = ingest_task(source, path, dataset)
    summary["ingest"] = s
    name = s["dataset"]
    log.info("ingest: %s items, %s interactions, changed %s", s["n_items"], s["n_interactions"], s["rows_changed"])
    if tag:
        summary["tag"] = tag_task(name, tagger or {})
        log.info("tag: %s new images, %s tagged", summary["tag"]["n_new"], summary["tag"]["n_tagged"])
    if embed:
        summary["embed"] = embed_task(name, encoder or {})
        log.info("embed: %s", {k: v for k, v in summary["embed"].items() if k.startswith("n_")})
    with store.connect(WarehouseConfig(), create=False, read_only=True) as con:
        summary["snapshot_id"] = store.snapshot_id(con)
    summary["dataset"] = name
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    summary["seconds_per_stage"] = {
        k: round(_seconds(v.get("seconds", 0.0)), 2) for k, v in summary.items() if isinstance(v, dict)
    }
    log.info("features flow done: snapshot %s, %ss", summary["snapshot_id"], summary["seconds"])
    return summary
