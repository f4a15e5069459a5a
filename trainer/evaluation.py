"""Full-ranking evaluation of a model on eval cases, by subset (all / cold / unseen), and the
popularity reference run logged beside every evaluation."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from features.store import WarehouseConfig
from trainer.config import Config
from trainer.data import (
    EvalCases,
    SeqDataset,
    eval_cases,
)
from trainer.evaluate import metrics_from_ranks, popularity_ranks, rank_targets
from trainer.runlog import Metrics, RunLog, git_commit
from trainer.runtime import autocast

if TYPE_CHECKING:
    from trainer.trainer import Model


def evaluate_cases(
    model: Model,
    feats: dict[str, Any],
    data: SeqDataset,
    cases: EvalCases,
    cfg: Config,
    counts: np.ndarray,
    device: torch.device,
) -> Metrics:
    """Full-ranking metrics of `model` on `cases`: subsets "all", "cold" (rare targets) and
    "unseen" (targets with no train interaction)."""
    ranks = rank_cases(model, feats, data, cases, cfg, device)
    return _by_subset(ranks, cases, counts, cfg)


@torch.no_grad()
def rank_cases(
    model: Model,
    feats: dict[str, Any],
    data: SeqDataset,
    cases: EvalCases,
    cfg: Config,
    device: torch.device,
) -> np.ndarray:
    """The 0-based full-ranking rank of each case's target under `model` ([len(cases)])."""
    ecfg = cfg.eval
    was_training = model.training
    model.eval()
    with autocast(device, cfg.runtime.amp):
        tables = model.all_item_features(feats, ecfg.item_chunk)
    tables = {m: t.float() for m, t in tables.items()}
    # Cases of similar length share a batch, cut to its longest input (less padding to encode).
    order = np.argsort(cases.lengths, kind="stable")
    ranks = np.zeros(len(cases), dtype=np.int64)
    for s in range(0, len(cases), ecfg.user_batch):
        idx = order[s : s + ecfg.user_batch]
        width = max(1, int(cases.lengths[idx].max()))
        inputs = torch.from_numpy(cases.inputs[idx, :width]).to(device)
        lengths = torch.from_numpy(cases.lengths[idx]).to(device)
        with autocast(device, cfg.runtime.amp):
            q = model.user_vectors(tables, inputs, lengths).float()
        hist = _history(data, cases, idx) if ecfg.exclude_history else None
        r = rank_targets(
            q,
            lambda a, b: model.candidates(tables, torch.arange(a, b, device=device)),
            data.n_items,
            torch.from_numpy(cases.targets[idx]).to(device),
            ecfg.item_chunk,
            hist,
        )
        ranks[idx] = r.cpu().numpy()
    model.train(was_training)
    return ranks


def _history(data: SeqDataset, cases: EvalCases, sl: slice | np.ndarray) -> list[torch.Tensor]:
    starts = data.offsets[cases.users[sl]]
    return [
        torch.from_numpy(data.items[a:b])
        for a, b in zip(starts, cases.history_end[sl], strict=True)
    ]


def subset_masks(cases: EvalCases, counts: np.ndarray, cfg: Config) -> dict[str, np.ndarray]:
    """Boolean masks over `cases`: "cold" (target with <= cold_threshold train interactions) and
    "unseen" (target never in training, e.g. a held-out item)."""
    n = counts[cases.targets]
    return {"cold": n <= cfg.eval.cold_threshold, "unseen": n == 0}


def _by_subset(ranks: np.ndarray, cases: EvalCases, counts: np.ndarray, cfg: Config) -> Metrics:
    out = {"all": metrics_from_ranks(ranks, cfg.eval.ks)}
    masks = subset_masks(cases, counts, cfg)
    cold = masks["cold"]
    if cold.any():
        out["cold"] = metrics_from_ranks(ranks[cold], cfg.eval.ks)
        out["cold"]["n_cases"] = float(cold.sum())
    unseen = masks["unseen"]
    if unseen.any():
        out["unseen"] = metrics_from_ranks(ranks[unseen], cfg.eval.ks)
        out["unseen"]["n_cases"] = float(unseen.sum())
    out["all"]["n_cases"] = float(len(ranks))
    return out


def popularity_metrics(
    data: SeqDataset, cases: EvalCases, cfg: Config, counts: np.ndarray
) -> Metrics:
    """The popularity reference row: rank by train interactions."""
    hist = _history(data, cases, slice(None)) if cfg.eval.exclude_history else None
    ranks = popularity_ranks(counts, cases.targets, cfg.eval.item_chunk, hist).numpy()
    return _by_subset(ranks, cases, counts, cfg)


def log_popularity(
    wh: WarehouseConfig | None, parent: str, data: SeqDataset, cfg: Config, counts: np.ndarray
) -> dict[str, Metrics]:
    """Popularity reference on valid and test, logged as a `baseline` run beside `parent`."""
    pop = {s: popularity_metrics(data, eval_cases(data, s), cfg, counts) for s in ("valid", "test")}
    now = datetime.now(UTC)
    rl = RunLog(
        wh,
        {
            "run_id": f"{parent}-popularity",
            "kind": "baseline",
            "dataset": data.dataset,
            "parent_run_id": parent,
            "model": "popularity",
            "config": json.dumps(
                {
                    "eval": cfg.to_dict()["eval"],
                    "data": {"dataset": data.dataset, "snapshot": data.snapshot},
                }
            ),
            "snapshot_id": data.snapshot,
            "git_commit": git_commit(),
            "seed": None,
            "status": "finished",
            "started_at": now,
            "finished_at": now,
            "checkpoint": None,
        },
        None,
    )
    rl.log(-1, pop, status="finished")
    return pop
