"""A finished run's best model with the data it was trained on, and its re-evaluation."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import torch

from features.runlog import new_run_id
from features.store import WarehouseConfig
from trainer.config import Config
from trainer.data import (
    SeqDataset,
    eval_cases,
)
from trainer.evaluation import evaluate_cases, log_popularity
from trainer.runlog import RunError, RunLog, RunResult, checkpoint_root, git_commit, load_checkpoint
from trainer.runtime import resolve_device
from trainer.stages import cfg_at, data_for
from trainer.trainer import Model, build_model, model_name


@dataclass
class Loaded:
    """A finished run's best model with the data it was trained on."""

    cfg: Config
    stage: str
    data: SeqDataset
    model: Model
    device: torch.device
    epoch: int  # the epoch of the best checkpoint


def load_run(run_id: str, wh: WarehouseConfig | None = None, cfg: Config | None = None) -> Loaded:
    best = load_checkpoint(run_id, cfg or Config(), wh)
    rcfg = Config.from_dict(best["config"])
    if cfg is not None:
        rcfg.runtime = cfg.runtime
    data = data_for(cfg_at(rcfg, best["data"]), wh)
    if data.item_ids != best["item_ids"]:
        raise RunError(
            f"run {run_id!r}: the items at snapshot {data.snapshot} differ from the checkpoint's"
        )
    device = resolve_device(rcfg.runtime.device)
    model = build_model(rcfg, data, best["stage"]).to(device)
    model.load_state_dict(best["model"])
    model.eval()
    return Loaded(rcfg, best["stage"], data, model, device, int(best.get("epoch", -1)))


def evaluate_run(
    run_id: str,
    wh: WarehouseConfig | None = None,
    cfg: Config | None = None,
    exclude_history: bool | None = None,
) -> RunResult:
    """Re-evaluate run `run_id`'s best checkpoint on valid and test; logged as an `evaluate` run."""
    ld = load_run(run_id, wh, cfg)
    if exclude_history is not None:
        ld.cfg.eval.exclude_history = exclude_history
    feats = {m: s.to(ld.device) for m, s in ld.data.features.items()}
    counts = ld.data.train_counts()
    res = {
        s: evaluate_cases(
            ld.model, feats, ld.data, eval_cases(ld.data, s), ld.cfg, counts, ld.device
        )
        for s in ("valid", "test")
    }
    eval_id = new_run_id("evaluate", ld.data.dataset)
    now = datetime.now(UTC)
    rl = RunLog(
        wh,
        {
            "run_id": eval_id,
            "kind": "evaluate",
            "dataset": ld.data.dataset,
            "parent_run_id": run_id,
            "model": model_name(ld.cfg, ld.stage),
            "config": ld.cfg.to_json(),
            "snapshot_id": ld.data.snapshot,
            "git_commit": git_commit(),
            "seed": None,
            "status": "finished",
            "started_at": now,
            "finished_at": now,
            "checkpoint": str(checkpoint_root(ld.cfg, wh) / run_id / "best.pt"),
        },
        None,
    )
    rl.log(-1, res, status="finished")
    pop = log_popularity(wh, eval_id, ld.data, ld.cfg, counts)
    return RunResult(
        eval_id,
        "evaluate",
        checkpoint_root(ld.cfg, wh) / run_id,
        ld.epoch,
        res["valid"]["all"][
            ld.cfg.finetune.valid_metric if ld.stage == "finetune" else ld.cfg.pretrain.valid_metric
        ],
        0,  # an evaluation trains no epochs
        res["valid"],
        res["test"],
        pop,
        model=model_name(ld.cfg, ld.stage),
    )
