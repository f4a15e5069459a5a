"""The features flow: ingest -> tag -> embed for one dataset.

Each task is a thin call of one pipeline function and returns a small dict (counts, versions,
snapshot id), never frames or tensors. Steps that touch files or URLs retry twice with backoff.
Prefect's result cache is not used to skip work: the warehouse decides what is new (content
keys), so a rerun after adding items processes only those.

Task runner (ClusterConfig; flow parameters, `msm4sr features --task-runner dask --workers N`
or env MSM4SR_TASK_RUNNER / MSM4SR_WORKERS / MSM4SR_DASK_ADDRESS): "local" (default) runs
each stage in the flow's process; "dask" runs tagging and embedding as a subflow on a Dask
cluster (prefect-dask): a plan task, one task per shard of the missing keys (pipeline/shards.py),
a finish task that writes the stage's one pipeline_runs row.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from prefect import flow, get_run_logger, task, unmapped
from prefect.cache_policies import NO_CACHE
from prefect.context import get_run_context

from features import store
from features.store import WarehouseConfig
from pipeline import embedding, tagging
from pipeline.embedding import EncoderConfig, embed_dataset
from pipeline.ingest import REFUSALS, ingest
from pipeline.preprocess import PreprocessConfig
from pipeline.shards import Shard, ShardResult
from pipeline.sources.config import configured_source, read_spec
from pipeline.tagging import TaggerConfig, tag_dataset


def _retry_unless_refused(task: Any, task_run: Any, state: Any) -> bool:
    """Retry a failed I/O step, but not a refusal: a bad source or a re-ingest that would delete
    stored rows fails the same way every time (pipeline/ingest.py, features/store.py)."""
    return not isinstance(state.result(raise_on_failure=False), REFUSALS)


IO_RETRIES = dict(retries=2, retry_delay_seconds=[2, 10])
INGEST_RETRIES = IO_RETRIES | dict(retry_condition_fn=_retry_unless_refused)
TASK_RUNNERS = ("local", "dask")


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    return int(v) if v else None


@dataclass
class ClusterConfig:
    """Where the tagging and embedding stages run; the MSM4SR_* environment gives the defaults."""

    # "local": each stage in the flow's process, no Dask (the default); "dask": shards on Dask.
    task_runner: str = field(default_factory=lambda: os.environ.get("MSM4SR_TASK_RUNNER", "local"))
    # Worker processes of the local Dask cluster started for the run (1 thread each, 127.0.0.1).
    workers: int = field(default_factory=lambda: _env_int("MSM4SR_WORKERS") or 2)
    # Scheduler of an existing Dask cluster, e.g. "tcp://10.0.0.5:8786" (implies "dask"); None
    # starts a local cluster for the run and stops it after.
    address: str | None = field(default_factory=lambda: os.environ.get("MSM4SR_DASK_ADDRESS"))
    # Shards per stage; None: one per Dask worker thread (each worker loads its model once).
    shards: int | None = field(default_factory=lambda: _env_int("MSM4SR_SHARDS"))
    # torch / ONNX Runtime threads per worker; None: cores // workers on a local cluster, the
    # libraries' defaults on an existing cluster.
    threads: int | None = field(default_factory=lambda: _env_int("MSM4SR_THREADS"))

    def __post_init__(self) -> None:
        if self.address:
            self.task_runner = "dask"
        if self.task_runner not in TASK_RUNNERS:
            raise ValueError(f"task_runner={self.task_runner!r} is not one of {TASK_RUNNERS}")
        for name in ("workers", "shards", "threads"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"ClusterConfig.{name}={v!r} must be an integer >= 1")

    def worker_threads(self) -> int | None:
        if self.threads or self.address:
            return self.threads
        return max(1, (os.cpu_count() or 1) // self.workers)

    def dask_runner(self, api_url: str | None) -> Any:
        """A DaskTaskRunner on `address`, or on a LocalCluster of `workers` processes.

        Local workers get the flow's Prefect API URL: otherwise each would start a temporary
        Prefect server of its own. Workers of an existing cluster need PREFECT_API_URL set.
        """
        from prefect_dask import DaskTaskRunner

        if self.address:
            return DaskTaskRunner(address=self.address)
        logging.getLogger("distributed").setLevel(logging.WARNING)  # per-worker start/stop lines
        env = {"DASK_LOGGING__DISTRIBUTED": "warning"}
        if api_url:
            env["PREFECT_API_URL"] = api_url
        return DaskTaskRunner(
            cluster_kwargs=dict(
                n_workers=self.workers,
                threads_per_worker=1,
                processes=True,
                host="127.0.0.1",
                dashboard_address=None,
                env=env,
            )
        )


@task(name="ingest", **INGEST_RETRIES)
def ingest_task(
    source: str | None,
    source_file: str | None,
    path: str | None,
    dataset: str | None,
    progress: bool = False,
    allow_deletes: bool = False,
) -> dict[str, Any]:
    """Read the configured source (its file read now: edits apply to the next run) and mirror
    it into the warehouse; a re-ingest that would delete stored rows is refused unless
    `allow_deletes`."""
    spec = configured_source(source, source_file, path, dataset)
    pre = PreprocessConfig(min_user_interactions=spec.min_interactions)
    s = ingest(
        read_spec(spec), WarehouseConfig(), pre=pre, progress=progress, allow_deletes=allow_deletes
    )
    return {k: v for k, v in asdict(s).items() if k != "report"} | {"n_report_rows": len(s.report)}


@task(name="tag", **IO_RETRIES)
def tag_task(dataset: str, tagger: dict[str, Any], progress: bool = False) -> dict[str, Any]:
    """Tag the dataset's images whose keywords are missing for this tagger version."""
    return asdict(
        tag_dataset(dataset, TaggerConfig(**tagger), WarehouseConfig(), progress=progress)
    )


@task(name="embed")
def embed_task(dataset: str, encoder: dict[str, Any], progress: bool = False) -> dict[str, Any]:
    """Encode the dataset's sentences and keyword texts that are missing for this encoder."""
    cfg = EncoderConfig(**encoder)
    return asdict(embed_dataset(dataset, cfg, WarehouseConfig(), progress=progress))


# --------------------------------------------------------------------------- sharded stages
# Plan and finish run in the flow's process; shards run on the task runner's workers. Shard
# tasks are idempotent (content keys, each finds its own missing keys), so retries are safe.


@task(name="tag-plan", cache_policy=NO_CACHE)
def tag_plan_task(dataset: str, tagger: dict[str, Any], shards: int) -> tagging.TagPlan:
    """Count the missing image keys and split them into shards."""
    return tagging.tag_plan(dataset, TaggerConfig(**tagger), WarehouseConfig(), shards)


@task(name="tag-shard", cache_policy=NO_CACHE, **IO_RETRIES)
def tag_shard_task(plan: tagging.TagPlan, shard: Shard) -> ShardResult:
    """Tag one shard's missing images (model loaded once per worker)."""
    return tagging.tag_shard(plan, shard)


@task(name="tag-finish", cache_policy=NO_CACHE)
def tag_finish_task(
    plan: tagging.TagPlan, results: list[ShardResult], error: str | None
) -> dict[str, Any]:
    """Write the tag stage's run row; return its summary."""
    return asdict(tagging.tag_finish(plan, results, error))


@task(name="embed-plan", cache_policy=NO_CACHE)
def embed_plan_task(
    dataset: str, encoder: dict[str, Any], shards: int, threads: int | None
) -> embedding.EmbedPlan:
    """Write the item sentences, count the missing strings and split them into shards."""
    return embedding.embed_plan(
        dataset, EncoderConfig(**encoder), WarehouseConfig(), shards, threads=threads
    )


@task(name="embed-shard", cache_policy=NO_CACHE, **IO_RETRIES)
def embed_shard_task(plan: embedding.EmbedPlan, shard: Shard) -> ShardResult:
    """Encode one shard's missing strings (model loaded once per worker)."""
    return embedding.embed_shard(plan, shard)


@task(name="embed-finish", cache_policy=NO_CACHE)
def embed_finish_task(
    plan: embedding.EmbedPlan, results: list[ShardResult], error: str | None
) -> dict[str, Any]:
    """Record the encoder version and write the embed stage's run row; return its summary."""
    return asdict(embedding.embed_finish(plan, results, error))


def _run_shards(plan: Any, shard_task: Any, finish_task: Any) -> dict[str, Any]:
    """Every shard on the task runner; wait for all; finish (the run row) even when one failed."""
    futures = shard_task.map(unmapped(plan), plan.shards)
    results, errors = [], []
    for shard, fut in zip(plan.shards, futures, strict=True):
        try:
            results.append(fut.result())
        except Exception as e:
            errors.append(f"shard {shard.index}/{shard.count}: {type(e).__name__}: {e}")
    summary = finish_task(plan, results, "; ".join(errors) or None)
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(plan.shards)} shards failed: {errors[0]}")
    return summary


def _cluster_threads() -> int:
    """Worker threads of the flow's Dask cluster (one shard each by default); 1 off Dask."""
    client = getattr(get_run_context().task_runner, "client", None)
    return max(1, sum(client.nthreads().values())) if client is not None else 1


@flow(name="msm4sr-features-cluster", log_prints=True)
def cluster_stages_flow(
    dataset: str,
    tag: bool = True,
    embed: bool = True,
    tagger: dict[str, Any] | None = None,
    encoder: dict[str, Any] | None = None,
    shards: int | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Tag and embed `dataset` in shards on the flow's task runner (a Dask cluster)."""
    log = get_run_logger()
    n = shards or _cluster_threads()
    out: dict[str, Any] = {}
    if tag:
        tcfg = {"threads": threads, **(tagger or {})}
        out["tag"] = _run_shards(tag_plan_task(dataset, tcfg, n), tag_shard_task, tag_finish_task)
        log.info("tag: %s new images in %s shards", out["tag"]["n_new"], n)
    if embed:
        plan = embed_plan_task(dataset, encoder or {}, n, threads)
        out["embed"] = _run_shards(plan, embed_shard_task, embed_finish_task)
        log.info("embed: %s strings encoded in %s shards", out["embed"]["n_encoded"], n)
    return out


def _seconds(value: float | dict[str, float]) -> float:
    """A stage's seconds: a number, or a per-step dict with a total."""
    if isinstance(value, dict):
        return float(value.get("total", sum(value.values())))
    return float(value)


@flow(name="msm4sr-features", log_prints=True)
def features_flow(
    source: str | None = None,
    path: str | None = None,
    dataset: str | None = None,
    tag: bool = True,
    embed: bool = True,
    tagger: dict[str, Any] | None = None,
    encoder: dict[str, Any] | None = None,
    task_runner: str | None = None,
    workers: int | None = None,
    dask_address: str | None = None,
    shards: int | None = None,
    threads: int | None = None,
    source_file: str | None = None,
    progress: bool = False,
    allow_deletes: bool = False,
) -> dict[str, Any]:
    """Ingest a source, tag its images, embed its text and keywords; return the run summary.

    Args:
        source: a source's name: an entry of `source_file`, else a built-in of sources.yaml
            (movielens, amazon-office); None: the file's only source, else movielens.
        path: the source folder instead of the configured one.
        dataset: warehouse dataset name instead of the configured one.
        tag / embed: run those stages.
        tagger / encoder: TaggerConfig / EncoderConfig fields overriding the defaults.
        task_runner / workers / dask_address / shards / threads: ClusterConfig fields (None:
            the MSM4SR_* environment, else local: one process, no Dask).
        source_file: a sources YAML (pipeline/sources/config.py), read when the run starts.
        progress: progress bars on stderr (local stages).
        allow_deletes: let this run's ingest delete more than 20% of the dataset's stored rows
            (the input shrank on purpose). Scheduled runs keep it off; a refused run fails
            naming what would go, and a one-off run with it on applies the change
            (`prefect deployment run msm4sr-features/features -p allow_deletes=true`).
    """
    log = get_run_logger()
    t0 = time.perf_counter()
    summary: dict[str, Any] = {}
    s = ingest_task(source, source_file, path, dataset, progress, allow_deletes)
    summary["ingest"] = s
    name = s["dataset"]
    log.info(
        "ingest: %s items, %s interactions, changed %s",
        s["n_items"],
        s["n_interactions"],
        s["rows_changed"],
    )
    given = dict(
        task_runner=task_runner,
        workers=workers,
        address=dask_address,
        shards=shards,
        threads=threads,
    )
    cluster = ClusterConfig(**{k: v for k, v in given.items() if v is not None})
    if cluster.task_runner == "dask" and (tag or embed):
        api_url = str(get_run_context().client.api_url).rstrip("/")
        staged = cluster_stages_flow.with_options(task_runner=cluster.dask_runner(api_url))
        summary.update(
            staged(name, tag, embed, tagger, encoder, cluster.shards, cluster.worker_threads())
        )
        where = cluster.address or f"a local cluster of {cluster.workers} workers"
        summary["task_runner"] = f"dask on {where}"
    else:
        summary["task_runner"] = "local"
        if tag:
            summary["tag"] = tag_task(name, tagger or {}, progress)
        if embed:
            summary["embed"] = embed_task(name, encoder or {}, progress)
    if tag:
        log.info(
            "tag: %s new images, %s tagged", summary["tag"]["n_new"], summary["tag"]["n_tagged"]
        )
    if embed:
        log.info("embed: %s", {k: v for k, v in summary["embed"].items() if k.startswith("n_")})
    with store.connect(WarehouseConfig(), create=False, read_only=True) as con:
        summary["snapshot_id"] = store.snapshot_id(con)
    summary["dataset"] = name
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    summary["seconds_per_stage"] = {
        k: round(_seconds(v.get("seconds", 0.0)), 2)
        for k, v in summary.items()
        if isinstance(v, dict)
    }
    log.info("features flow done: snapshot %s, %ss", summary["snapshot_id"], summary["seconds"])
    return summary
