"""The train flow: pretrain -> finetune -> evaluate on cached features at one warehouse snapshot.

Tasks pass run ids between them (the checkpoints and metrics live in the warehouse and under
warehouse/checkpoints/), never models or tensors.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task

from features import store
from features.store import WarehouseConfig
from trainer.config import Config
from trainer.finished_runs import evaluate_run
from trainer.recommend import recommend_users
from trainer.stages import finetune, pretrain


@task(name="pretrain")
def pretrain_task(cfg: dict[str, Any]) -> str:
    """Pre-train M2SE with NIP + CMCL; returns the run id."""
    return pretrain(Config.from_dict(cfg), WarehouseConfig()).run_id


@task(name="finetune")
def finetune_task(cfg: dict[str, Any], from_run: str | None) -> str:
    """Fine-tune from a pre-trained run (None: from scratch); returns the run id."""
    return finetune(Config.from_dict(cfg), WarehouseConfig(), from_run=from_run).run_id


@task(name="evaluate")
def evaluate_task(run_id: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """Full-ranking evaluation of the run's best checkpoint; returns test metrics."""
    res = evaluate_run(run_id, WarehouseConfig(), Config.from_dict(cfg))
    return {
        "run_id": res.run_id,
        "valid": res.valid,
        "test": res.test,
        "popularity": res.popularity,
    }


@task(name="recommend")
def recommend_task(run_id: str, k: int) -> dict[str, Any]:
    """Top-k of every user by the run's best checkpoint into `recommendations`; the counts."""
    s = recommend_users(run_id, None, k, WarehouseConfig())
    return {"n_users": s.n_users, "n_rows": s.n_rows, "users_per_s": round(s.users_per_s, 1)}


@flow(name="msm4sr-train", log_prints=True)
def train_flow(
    dataset: str = "ml-1m",
    config: dict[str, Any] | None = None,
    snapshot: int | None = None,
    pretrain_epochs: int | None = None,
    finetune_epochs: int | None = None,
    skip_pretrain: bool = False,
    recommend_k: int | None = None,
) -> dict[str, Any]:
    """Pre-train, fine-tune and evaluate on `dataset`'s features at `snapshot` (default: latest).

    Args:
        config: nested trainer Config fields (YAML-shaped) overriding the defaults.
        pretrain_epochs / finetune_epochs: shortcuts for config pretrain/finetune max_epochs.
        skip_pretrain: fine-tune from scratch (the "no pre-training" baseline).
        recommend_k: after evaluation, write every user's top-k of the fine-tuned run to the
            `recommendations` table (None: none).
    Returns:
        {"pretrain_run", "finetune_run", "evaluate_run", "snapshot_id", "test", "popularity"},
        and "recommendations" (counts) with recommend_k.
    """
    log = get_run_logger()
    if recommend_k is not None and recommend_k < 1:
        raise ValueError(f"recommend_k={recommend_k} must be >= 1")
    cfg = Config.from_dict(config or {})
    cfg.data.dataset = dataset
    if snapshot is None:
        with store.connect(WarehouseConfig(), create=False, read_only=True) as con:
            snapshot = store.snapshot_id(con)
    cfg.data.snapshot = snapshot  # every stage reads the same snapshot
    if pretrain_epochs is not None:
        cfg.pretrain.max_epochs = pretrain_epochs
    if finetune_epochs is not None:
        cfg.finetune.max_epochs = finetune_epochs
    d = cfg.to_dict()
    pre = None if skip_pretrain else pretrain_task(d)
    log.info("pre-trained: %s", pre)
    ft = finetune_task(d, pre)
    log.info("fine-tuned: %s", ft)
    ev = evaluate_task(ft, d)
    log.info("test: %s", ev["test"].get("all", ev["test"]))
    out = {
        "pretrain_run": pre,
        "finetune_run": ft,
        "evaluate_run": ev["run_id"],
        "snapshot_id": snapshot,
    } | ev
    if recommend_k is not None:
        out["recommendations"] = recommend_task(ft, recommend_k)
        log.info("recommendations: %s", out["recommendations"])
    return out
