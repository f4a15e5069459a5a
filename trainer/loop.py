"""One Trainer for pre-training and fine-tuning, full-ranking evaluation, and recommendation.

A run reads its data at one warehouse snapshot, trains epoch by epoch (Adam, gradient clip,
early stopping on validation Recall@20), writes a checkpoint every epoch (model, optimizer, RNG
state, early-stopping state: `--resume` continues a killed run to the same final metrics), logs
every loss term and metric to the `runs` / `metrics` tables and to `metrics.csv` beside the
checkpoint, and ends with an evaluation of its best epoch on valid and test (all cases and the
cold-start subset) next to a popularity reference.

Files: <checkpoint root>/<run_id>/{last.pt, best.pt, metrics.csv}.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from tqdm import tqdm

from features import store
from features.contract import METRICS, RUNS
from features.runlog import new_run_id
from features.store import REPO_ROOT, WarehouseConfig
from trainer import distributed as ddp  # DDP hooks (torchrun); identity on one process
from trainer.config import Config, TrainConfig, merge
from trainer.data import (
    EvalCases,
    SeqDataset,
    eval_cases,
    item_titles,
    iterate_batches,
    load_dataset,
    train_samples,
)
from trainer.evaluate import metrics_from_ranks, popularity_ranks, rank_targets
from trainer.model import M2SE
from trainer.sasrec import SASRec

Model = M2SE | SASRec

log = logging.getLogger(__name__)

STAGES = ("pretrain", "finetune")
Metrics = dict[str, dict[str, float]]  # subset -> metric -> value


class RunError(RuntimeError):
    """A run cannot start or continue; the message names the run or file."""


# --------------------------------------------------------------------------- small helpers


def git_commit() -> str:
    """HEAD of the repository (+ "-dirty" with uncommitted tracked changes), or "unknown"."""
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head + ("-dirty" if dirty else "")) if head else "unknown"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RunError(f"device={name!r} asked for but CUDA is not available")
    return dev


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on cuda ("auto"/"bf16"), on CPU only with "bf16"."""
    on = amp == "bf16" or (amp == "auto" and device.type == "cuda")
    if not on:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def checkpoint_root(cfg: Config, wh: WarehouseConfig | None) -> Path:
    if cfg.runtime.checkpoint_dir:
        return Path(cfg.runtime.checkpoint_dir)
    return Path((wh or WarehouseConfig()).root) / "checkpoints"


def _atomic_save(obj: Any, path: Path) -> None:
    if not ddp.is_main():  # DDP hook: rank 0 alone writes checkpoints
        return
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def _set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- logging of runs


class RunLog:
    """The run's `runs` row, its `metrics` rows and the CSV beside the checkpoint."""

    CSV_FIELDS = ("run_id", "epoch", "split", "subset", "metric", "value")

    def __init__(
        self, wh: WarehouseConfig | None, row: dict[str, Any], csv_path: Path | None
    ) -> None:
        self.wh, self.row, self.csv_path = wh, row, csv_path
        self.history: list[dict[str, Any]] = []

    def write_run(self, **changes: Any) -> None:
        self.row.update(changes)
        if not ddp.is_main():  # DDP hook: rank 0 alone writes rows
            return
        with store.connect(self.wh) as con:
            store.upsert(con, RUNS.name, pa.Table.from_pylist([self.row], schema=RUNS.schema))

    def log(self, epoch: int, splits: dict[str, Metrics], **run_changes: Any) -> None:
        """Metrics of one epoch ({split: {subset: {metric: value}}}), in one warehouse connection;
        `run_changes` also updates the runs row (e.g. status) in the same connection."""
        rows = [
            {
                "run_id": self.row["run_id"],
                "epoch": epoch,
                "split": split,
                "subset": subset,
                "metric": k,
                "value": float(v),
            }
            for split, per in splits.items()
            for subset, ms in per.items()
            for k, v in ms.items()
        ]
        # A resumed epoch replaces what a killed attempt may have logged for it.
        keys = {(r["epoch"], r["split"], r["subset"], r["metric"]) for r in rows}
        self.history = [
            h
            for h in self.history
            if (h["epoch"], h["split"], h["subset"], h["metric"]) not in keys
        ]
        self.history.extend(rows)
        self.row.update(run_changes)
        if not ddp.is_main():  # DDP hook: rank 0 alone writes rows and the CSV
            return
        with store.connect(self.wh) as con:
            if rows:
                store.upsert(con, METRICS.name, pa.Table.from_pylist(rows, schema=METRICS.schema))
            if run_changes:
                store.upsert(con, RUNS.name, pa.Table.from_pylist([self.row], schema=RUNS.schema))
        self.write_csv()

    def write_csv(self) -> None:
        if self.csv_path is None:
            return
        tmp = self.csv_path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.CSV_FIELDS)
            w.writeheader()
            w.writerows(self.history)
        os.replace(tmp, self.csv_path)


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
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
    ecfg = cfg.eval
    was_training = model.training
    model.eval()
    with autocast(device, cfg.runtime.amp):
        tables = model.all_item_features(feats, ecfg.item_chunk)
    tables = {m: t.float() for m, t in tables.items()}
    ranks = []
    for s in range(0, len(cases), ecfg.user_batch):
        sl = slice(s, s + ecfg.user_batch)
        inputs = torch.from_numpy(cases.inputs[sl]).to(device)
        lengths = torch.from_numpy(cases.lengths[sl]).to(device)
        with autocast(device, cfg.runtime.amp):
            q = model.user_vectors(tables, inputs, lengths).float()
        hist = _history(data, cases, sl) if ecfg.exclude_history else None
        r = rank_targets(
            q,
            lambda a, b: model.candidates(tables, torch.arange(a, b, device=device)),
            data.n_items,
            torch.from_numpy(cases.targets[sl]).to(device),
            ecfg.item_chunk,
            hist,
        )
        ranks.append(r.cpu())
    model.train(was_training)
    return _by_subset(torch.cat(ranks).numpy(), cases, counts, cfg)


def _history(data: SeqDataset, cases: EvalCases, sl: slice) -> list[torch.Tensor]:
    starts = data.offsets[cases.users[sl]]
    return [
        torch.from_numpy(data.items[a:b])
        for a, b in zip(starts, cases.history_end[sl], strict=True)
    ]


def _by_subset(ranks: np.ndarray, cases: EvalCases, counts: np.ndarray, cfg: Config) -> Metrics:
    out = {"all": metrics_from_ranks(ranks, cfg.eval.ks)}
    cold = counts[cases.targets] <= cfg.eval.cold_threshold
    if cold.any():
        out["cold"] = metrics_from_ranks(ranks[cold], cfg.eval.ks)
        out["cold"]["n_cases"] = float(cold.sum())
    unseen = counts[cases.targets] == 0  # never in training (e.g. held-out items)
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


# --------------------------------------------------------------------------- the trainer


@dataclass
class RunResult:
    run_id: str
    kind: str
    checkpoint_dir: Path
    best_epoch: int
    best_valid: float
    epochs_run: int
    valid: Metrics = field(default_factory=dict)
    test: Metrics = field(default_factory=dict)
    popularity: dict[str, Metrics] = field(default_factory=dict)  # split -> subset -> metric


def build_model(cfg: Config, data: SeqDataset, stage: str) -> Model:
    if cfg.model.arch == "sasrec":
        if stage != "finetune":
            raise RunError("SASRec (model.arch=sasrec) has no pre-training stage: fine-tune it")
        return SASRec(cfg.model, data.n_items, data.max_len)
    dim = next(iter(data.features.values())).dim
    id_emb = stage == "finetune" and cfg.finetune.transductive
    return M2SE(cfg.model, data.n_items, dim, data.max_len, id_embedding=id_emb)


def without_empty_modality(cfg: Config, data: SeqDataset) -> Config:
    """Pre-training on a dataset without any image vector (e.g. Amazon Office, text only): the
    image NIP term, CMCL and mixup would only learn from zeros, so they are switched off (and the
    run's config says so). The architecture stays, so the weights fit any dataset."""
    img = data.features.get("image")
    if cfg.model.modalities != "both" or img is None or img.n_covered:
        return cfg
    log.warning(
        "%s has no image vectors: pre-training with text NIP only (no image NIP, CMCL, mixup)",
        data.dataset,
    )
    return merge(cfg, {"model": {"mixup": False}, "pretrain": {"cmcl": False, "nip_image": False}})


class Trainer:
    """Pre-training (NIP + CMCL) or fine-tuning (softmax over all items) of M2SE on one dataset."""

    def __init__(
        self,
        cfg: Config,
        data: SeqDataset,
        stage: str,
        wh: WarehouseConfig | None = None,
        run_id: str | None = None,
        parent_run_id: str | None = None,
        init_weights: dict[str, torch.Tensor] | None = None,
        on_epoch_end: Callable[[int], None] | None = None,
    ) -> None:
        if stage not in STAGES:
            raise ValueError(f"{stage=} is not one of {STAGES}")
        if stage == "pretrain":
            cfg = without_empty_modality(cfg, data)
        self.cfg, self.data, self.stage, self.wh = cfg, data, stage, wh
        self.tcfg: TrainConfig = cfg.pretrain if stage == "pretrain" else cfg.finetune
        ddp.setup(cfg.runtime.device)  # DDP hook: join torchrun's group (no-op without it)
        self.run_id = ddp.broadcast_object(run_id or new_run_id(stage, data.dataset))  # rank 0's
        self.parent_run_id = parent_run_id
        self.on_epoch_end = on_epoch_end
        if cfg.runtime.threads > 0:
            torch.set_num_threads(cfg.runtime.threads)
        self.device = ddp.local_device(resolve_device(cfg.runtime.device))  # DDP: cuda:LOCAL_RANK
        self.dir = checkpoint_root(cfg, wh) / self.run_id
        seed_everything(self.tcfg.seed)
        self.feats = {m: s.to(self.device) for m, s in data.features.items()}
        self.model = build_model(cfg, data, stage).to(self.device)
        if init_weights is not None:
            self._load_pretrained(init_weights)
        self.train_model = ddp.wrap(self.model, self.device)  # DDP hook: the model itself on one process
        self.opt = torch.optim.Adam(
            self.model.parameters(), lr=self.tcfg.lr, weight_decay=self.tcfg.weight_decay
        )
        self.samples = train_samples(data, self.tcfg.sample_mode)
        self.valid_cases = eval_cases(data, "valid")
        self.test_cases = eval_cases(data, "test")
        self.counts = data.train_counts()
        self.epoch = 0  # last finished epoch
        self.best = -math.inf
        self.best_epoch = 0
        self.bad_epochs = 0
        self.runlog = RunLog(
            wh,
            {
                "run_id": self.run_id,
                "kind": stage,
                "dataset": data.dataset,
                "parent_run_id": parent_run_id,
                "model": self.model_name(),
                "config": self.config_json(),
                "snapshot_id": data.snapshot,
                "git_commit": git_commit(),
                "seed": self.tcfg.seed,
                "status": "running",
                "started_at": datetime.now(UTC),
                "finished_at": None,
                "checkpoint": str(self.dir),
            },
            self.dir / "metrics.csv",
        )

    # ------------------------------------------------------------------ bookkeeping

    def model_name(self) -> str:
        if self.cfg.model.arch == "sasrec":
            return "SASRec"
        if self.stage == "pretrain":
            return "M2SE"
        return "M2SE-transductive" if self.tcfg.transductive else "M2SE-inductive"

    def config_json(self) -> str:
        d = self.cfg.to_dict()
        d["data"].update(
            snapshot=self.data.snapshot,
            encoder_version=self.data.encoder_version,
            tagger_version=self.data.tagger_version,
        )
        d["stage"] = self.stage
        d["batch_size_used"] = self.tcfg.batch
        return json.dumps(d, sort_keys=True)

    def data_meta(self) -> dict[str, Any]:
        return {
            "dataset": self.data.dataset,
            "snapshot": self.data.snapshot,
            "encoder_version": self.data.encoder_version,
            "tagger_version": self.data.tagger_version,
            "n_items": self.data.n_items,
            "dim": next(iter(self.data.features.values())).dim,
        }

    def _load_pretrained(self, sd: dict[str, torch.Tensor]) -> None:
        own = self.model.state_dict()
        for k, v in sd.items():
            if k in own and own[k].shape != v.shape:
                raise RunError(
                    f"pre-trained weight {k} has shape {tuple(v.shape)}, this model needs {tuple(own[k].shape)}: "
                    f"pre-train and fine-tune must use the same encoder (vector size) and model config"
                )
        missing, unexpected = self.model.load_state_dict(sd, strict=False)
        if unexpected or any(k != "item_embedding.weight" for k in missing):
            raise RunError(
                f"pre-trained weights do not fit: missing {missing}, unexpected {unexpected}"
            )

    def _state(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "stage": self.stage,
            "parent_run_id": self.parent_run_id,
            "config": self.cfg.to_dict(),
            "data": self.data_meta(),
            "epoch": self.epoch,
            "best": self.best,
            "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs,
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "rng": _rng_state(),
            "history": self.runlog.history,
            "run_row": {k: v for k, v in self.runlog.row.items()},
        }

    def save_best(self) -> None:
        _atomic_save(
            {
                "run_id": self.run_id,
                "stage": self.stage,
                "config": self.cfg.to_dict(),
                "data": self.data_meta(),
                "item_ids": self.data.item_ids,
                "epoch": self.epoch,
                "model": self.model.state_dict(),
            },
            self.dir / "best.pt",
        )

    def restore(self) -> None:
        """Continue from <dir>/last.pt (after a kill): weights, optimizer, RNG, early stopping."""
        path = self.dir / "last.pt"
        if not path.is_file():
            raise RunError(f"cannot resume run {self.run_id!r}: {path} does not exist")
        # On CPU: RNG states must stay CPU tensors; weights and Adam state move to the params.
        st = torch.load(path, map_location="cpu", weights_only=False)
        self.model.load_state_dict(st["model"])
        self.opt.load_state_dict(st["optimizer"])
        self.epoch, self.best, self.best_epoch, self.bad_epochs = (
            st["epoch"],
            st["best"],
            st["best_epoch"],
            st["bad_epochs"],
        )
        self.runlog.history = list(st["history"])
        self.runlog.row.update({k: st["run_row"][k] for k in ("started_at", "git_commit")})
        _set_rng_state(st["rng"])

    # ------------------------------------------------------------------ training

    def _batches(self, epoch: int) -> Iterator:
        if ddp.active():  # DDP hook: this rank's share of each global batch
            t = self.tcfg
            return ddp.shard_batches(
                self.data, self.samples, t.batch, t.seed, epoch, ddp.rank(), ddp.world_size()
            )
        return iterate_batches(self.data, self.samples, self.tcfg.batch, self.tcfg.seed, epoch)

    def train_epoch(self, epoch: int) -> dict[str, float]:
        self.model.train()
        ddp.seed_epoch(self.tcfg.seed, epoch)  # DDP hook: per-rank dropout stream
        t = self.tcfg
        n_batches = math.ceil(len(self.samples) / t.batch)
        bar = tqdm(
            self._batches(epoch),
            total=n_batches,
            desc=f"{self.stage} epoch {epoch}",
            unit="batch",
            file=sys.stderr,
            disable=not self.cfg.runtime.progress or not ddp.is_main(),
            dynamic_ncols=True,
            mininterval=1.0,
        )
        sums: dict[str, float] = {}
        n_targets, n_steps = 0, 0
        t0 = time.perf_counter()
        for batch in bar:
            batch = batch.to(self.device)
            with autocast(self.device, self.cfg.runtime.amp):
                if self.stage == "pretrain":
                    out = self.train_model.pretrain_loss(
                        self.feats,
                        batch.inputs,
                        batch.targets,
                        t.tau,
                        t.cmcl_weight,
                        t.cmcl,
                        t.cmcl_rows,
                        t.loss_block,
                        t.nip_image,
                    )
                else:
                    out = self.train_model.finetune_loss(
                        self.feats, batch.inputs, batch.targets, t.tau, t.loss_block
                    )
            # DDP hook: `out` becomes the global batch's terms; this rank's loss is weighted.
            out, backward_loss = ddp.reduce_step(out)
            if not torch.isfinite(out.loss):
                raise FloatingPointError(
                    f"{self.stage} loss is {float(out.loss)} at epoch {epoch}, step {n_steps} ({out.terms}): "
                    f"lower the learning rate (lr={t.lr})"
                )
            self.opt.zero_grad(set_to_none=True)
            backward_loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.clip_norm)
            self.opt.step()
            n_steps += 1
            n_targets += out.n_targets
            sums["loss"] = sums.get("loss", 0.0) + float(out.loss.detach())
            for k, v in out.terms.items():
                sums[f"loss_{k}"] = sums.get(f"loss_{k}", 0.0) + v
            bar.set_postfix(
                loss=f"{sums['loss'] / n_steps:.4f}",
                samples_s=f"{n_targets / (time.perf_counter() - t0):.0f}",
            )
        bar.close()
        secs = time.perf_counter() - t0
        stats = {k: v / max(n_steps, 1) for k, v in sums.items()}
        stats.update(
            epoch_seconds=secs,
            samples_per_s=n_targets / max(secs, 1e-9),
            n_targets=float(n_targets),
        )
        return stats

    def evaluate(self, split: str) -> Metrics:
        cases = self.valid_cases if split == "valid" else self.test_cases
        cases = ddp.shard_cases(cases)  # DDP hook: this rank's users, merged below
        return ddp.merge_metrics(
            evaluate_cases(
                self.model, self.feats, self.data, cases, self.cfg, self.counts, self.device
            )
        )

    def fit(self, resume: bool = False) -> RunResult:
        """Train to early stop / max epochs, then evaluate the best epoch. `resume`: from last.pt."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if resume:
            self.restore()
        self.runlog.write_run(status="running", finished_at=None)
        t = self.tcfg
        try:
            while self.epoch < t.max_epochs and self.bad_epochs < t.patience:
                epoch = self.epoch + 1
                stats = self.train_epoch(epoch)
                valid = self.evaluate("valid")
                score = valid["all"][t.valid_metric]
                self.epoch = epoch
                if score > self.best:
                    self.best, self.best_epoch, self.bad_epochs = score, epoch, 0
                    self.save_best()
                else:
                    self.bad_epochs += 1
                self.runlog.log(epoch, {"train": {"all": stats}, "valid": valid})
                _atomic_save(self._state(), self.dir / "last.pt")
                log.info(
                    "%s epoch %d: loss %.4f, valid %s %.4f (best %.4f @ %d), %.1f s",
                    self.run_id,
                    epoch,
                    stats.get("loss", float("nan")),
                    t.valid_metric,
                    score,
                    self.best,
                    self.best_epoch,
                    stats["epoch_seconds"],
                )
                if self.on_epoch_end is not None:
                    self.on_epoch_end(epoch)
            return self.final_evaluation()
        except BaseException:
            with contextlib.suppress(Exception):
                self.runlog.write_run(status="failed", finished_at=datetime.now(UTC))
            raise

    def final_evaluation(self) -> RunResult:
        """Best epoch's weights on valid and test (epoch -1 rows) + the popularity reference run."""
        ddp.barrier()  # DDP hook: rank 0 has written best.pt
        best = torch.load(self.dir / "best.pt", map_location=self.device, weights_only=False)
        self.model.load_state_dict(best["model"])
        valid, test = self.evaluate("valid"), self.evaluate("test")
        pop = log_popularity(self.wh, self.run_id, self.data, self.cfg, self.counts)
        self.runlog.log(
            -1, {"valid": valid, "test": test}, status="finished", finished_at=datetime.now(UTC)
        )
        return RunResult(
            self.run_id,
            self.stage,
            self.dir,
            self.best_epoch,
            self.best,
            self.epoch,
            valid,
            test,
            pop,
        )


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


# --------------------------------------------------------------------------- entry points


def _load_checkpoint(
    run_id: str, cfg: Config, wh: WarehouseConfig | None, name: str = "best.pt"
) -> dict[str, Any]:
    path = checkpoint_root(cfg, wh) / run_id / name
    if not path.is_file():
        raise RunError(f"run {run_id!r} has no checkpoint {path}")
    return torch.load(path, map_location="cpu", weights_only=False)


def _data_for(cfg: Config, wh: WarehouseConfig | None) -> SeqDataset:
    # DDP hooks: every rank reads rank 0's snapshot, and nobody writes before all have read.
    ddp.setup(cfg.runtime.device)
    cfg = ddp.pin_snapshot(cfg, lambda: _latest_snapshot(wh))
    data = load_dataset(cfg.data, wh, cfg.model.modalities)
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
    st = _load_checkpoint(run_id, cfg, wh, "last.pt")
    cfg = Config.from_dict(st["config"])
    data = _data_for(cfg_at(cfg, st["data"]), wh)
    tr = Trainer(
        cfg, data, stage, wh, run_id=run_id, parent_run_id=st["parent_run_id"], on_epoch_end=on_epoch_end
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
    data = _data_for(cfg, wh)
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
        parent = _load_checkpoint(from_run, cfg, wh)
        if parent["stage"] != "pretrain":
            log.warning(
                "fine-tuning from %s, a %s run (not a pre-training run)", from_run, parent["stage"]
            )
        # Architecture from the pre-trained run; data defaults to the same snapshot and vectors.
        pcfg = Config.from_dict(parent["config"])
        pdata = parent["data"]
        d = cfg.data
        same = d.dataset == pdata["dataset"]
        cfg = Config.from_dict(
            {
                **cfg.to_dict(),
                "model": pcfg.to_dict()["model"],
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
    data = _data_for(cfg, wh)
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


@dataclass
class Loaded:
    """A finished run's best model with the data it was trained on."""

    cfg: Config
    stage: str
    data: SeqDataset
    model: Model
    device: torch.device


def load_run(run_id: str, wh: WarehouseConfig | None = None, cfg: Config | None = None) -> Loaded:
    best = _load_checkpoint(run_id, cfg or Config(), wh)
    rcfg = Config.from_dict(best["config"])
    if cfg is not None:
        rcfg.runtime = cfg.runtime
    data = _data_for(cfg_at(rcfg, best["data"]), wh)
    if data.item_ids != best["item_ids"]:
        raise RunError(
            f"run {run_id!r}: the items at snapshot {data.snapshot} differ from the checkpoint's"
        )
    device = resolve_device(rcfg.runtime.device)
    model = build_model(rcfg, data, best["stage"]).to(device)
    model.load_state_dict(best["model"])
    model.eval()
    return Loaded(rcfg, best["stage"], data, model, device)


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
            "model": "M2SE",
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
        -1,
        float("nan"),
        0,
        res["valid"],
        res["test"],
        pop,
    )


@dataclass
class Recommendation:
    item_id: str
    title: str | None
    score: float


@torch.no_grad()
def recommend(
    run_id: str,
    user: str,
    k: int = 10,
    wh: WarehouseConfig | None = None,
    include_seen: bool = False,
) -> list[Recommendation]:
    """Top-k items for `user` after their whole history, scored by run `run_id`'s best model."""
    ld = load_run(run_id, wh)
    data = ld.data
    try:
        u = data.user_ids.index(str(user))
    except ValueError:
        raise RunError(
            f"user {user!r} is not in dataset {data.dataset!r} (e.g. {data.user_ids[:3]})"
        ) from None
    seq = data.user_items(u)
    inp = seq[-data.max_len :]
    inputs = torch.zeros(1, data.max_len, dtype=torch.long)
    inputs[0, : len(inp)] = torch.from_numpy(inp)
    feats = {m: s.to(ld.device) for m, s in data.features.items()}
    tables = {m: t.float() for m, t in ld.model.all_item_features(feats).items()}
    q = ld.model.user_vectors(
        tables, inputs.to(ld.device), torch.tensor([len(inp)], device=ld.device)
    )
    scores = (q @ ld.model.candidates(tables).T)[0].float().cpu()  # [n_items + 1]
    scores[0] = float("-inf")
    if not include_seen:
        scores[torch.from_numpy(seq)] = float("-inf")
    top = torch.topk(scores, min(k, int(torch.isfinite(scores).sum())))
    ids = [data.item_ids[i] for i in top.indices.tolist()]
    titles = item_titles(wh, data.dataset, data.snapshot, ids)
    return [
        Recommendation(i, titles.get(i), float(s))
        for i, s in zip(ids, top.values.tolist(), strict=True)
    ]


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
