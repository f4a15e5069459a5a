"""The stage entry points: pretrain, finetune (from a pre-trained run or from scratch), train
(both), and resuming a killed run, each at one warehouse snapshot."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from features import store
from features.store import WarehouseConfig
from trainer import distributed as ddp  # DDP hooks (torchrun); identity on one process
from trainer.config import ARCHITECTURE_FIELDS, Config
from trainer.data import (
    SeqDataset,
    load_dataset,
)
from trainer.runlog import RunResult, load_checkpoint
from trainer.trainer import Trainer

log = logging.getLogger(__name__)


def data_for(cfg: Config, wh: WarehouseConfig | None) -> SeqDataset:
    # DDP hooks: every rank reads rank 0's snapshot, and nobody writes before all have read.
    ddp.setup(cfg.runtime.device)
    cfg = ddp.pin_snapshot(cfg, lambda: _latest_snapshot(wh))
    modalities = cfg.model.modalities if cfg.model.arch == "m2se" else None
    data = load_dataset(cfg.data, wh, modalities)
    ddp.barrier()
    return data


def _latest_snapshot(wh: WarehouseConfig | None) -> int:
    with store.connect(wh, create=False, read_only=True) as con:
        return store.snapshot_id(con)


def _resume(
    run_id: str,
    stage: str,
    cfg: Config,
    wh: WarehouseConfig | None,
    on_epoch_end: Callable[[int], None] | None,
) -> RunResult:
    """Continue run `run_id` from its last.pt with the config and data it started with."""
    st = load_checkpoint(run_id, cfg, wh, "last.pt")
    cfg = Config.from_dict(st["config"])
    data = data_for(cfg_at(cfg, st["data"]), wh)
    tr = Trainer(
        cfg,
        data,
        stage,
        wh,
        run_id=run_id,
        parent_run_id=st["parent_run_id"],
        on_epoch_end=on_epoch_end,
    )
    return tr.fit(resume=True)


def pretrain(
    cfg: Config,
    wh: WarehouseConfig | None = None,
    *,
    resume: str | None = None,
    on_epoch_end: Callable[[int], None] | None = None,
    run_id: str | None = None,
) -> RunResult:
    """Pre-train M2SE on cfg.data.dataset (or resume run `resume`); `run_id`: a chosen id."""
    if resume:
        return _resume(resume, "pretrain", cfg, wh, on_epoch_end)
    data = data_for(cfg, wh)
    return Trainer(cfg, data, "pretrain", wh, run_id=run_id, on_epoch_end=on_epoch_end).fit()


def cfg_at(cfg: Config, meta: dict[str, Any]) -> Config:
    """cfg with the data section pinned to a checkpoint's dataset, snapshot and versions."""
    return Config.from_dict(
        {
            **cfg.to_dict(),
            "data": {
                **cfg.to_dict()["data"],
                "dataset": meta["dataset"],
                "snapshot": meta["snapshot"],
                "encoder_version": meta["encoder_version"],
                "tagger_version": meta["tagger_version"],
            },
        }
    )


def finetune(
    cfg: Config,
    wh: WarehouseConfig | None = None,
    *,
    from_run: str | None = None,
    resume: str | None = None,
    on_epoch_end: Callable[[int], None] | None = None,
    run_id: str | None = None,
) -> RunResult:
    """Fine-tune from pre-trained run `from_run` (None: from scratch), or resume run `resume`;
    `run_id`: a chosen id."""
    if resume:
        return _resume(resume, "finetune", cfg, wh, on_epoch_end)
    weights = None
    if from_run:
        parent = load_checkpoint(from_run, cfg, wh)
        if parent["stage"] != "pretrain":
            log.warning(
                "fine-tuning from %s, a %s run (not a pre-training run)", from_run, parent["stage"]
            )
        # Architecture from the pre-trained run (dropouts and the ID embedding's init from this
        # config); data defaults to the same snapshot and vectors.
        pmodel = Config.from_dict(parent["config"]).to_dict()["model"]
        pdata = parent["data"]
        d = cfg.data
        same = d.dataset == pdata["dataset"]
        cfg = Config.from_dict(
            {
                **cfg.to_dict(),
                "model": {
                    **cfg.to_dict()["model"],
                    **{k: pmodel[k] for k in ARCHITECTURE_FIELDS},
                },
                "data": {
                    **cfg.to_dict()["data"],
                    "encoder_version": d.encoder_version or pdata["encoder_version"],
                    "tagger_version": d.tagger_version
                    or (pdata["tagger_version"] if same else None),
                    "snapshot": d.snapshot
                    if d.snapshot is not None
                    else (pdata["snapshot"] if same else None),
                },
            }
        )
        weights = parent["model"]
    data = data_for(cfg, wh)
    return Trainer(
        cfg,
        data,
        "finetune",
        wh,
        run_id=run_id,
        parent_run_id=from_run,
        init_weights=weights,
        on_epoch_end=on_epoch_end,
    ).fit()


def train(
    cfg: Config, wh: WarehouseConfig | None = None, *, inductive: bool = False
) -> tuple[RunResult, RunResult]:
    """Pre-train, then fine-tune from it (the fine-tune run ends with its test evaluation)."""
    pre = pretrain(cfg, wh)
    if inductive:
        cfg = Config.from_dict(
            {**cfg.to_dict(), "finetune": {**cfg.to_dict()["finetune"], "transductive": False}}
        )
    ft = finetune(cfg, wh, from_run=pre.run_id)
    return pre, ft
