"""One Trainer for pre-training and fine-tuning.

A run reads its data at one warehouse snapshot, trains epoch by epoch (Adam, gradient clip,
early stopping on a validation metric), writes a checkpoint every epoch (model, optimizer, RNG
state, early-stopping state: `--resume` continues a killed run to the same final metrics), logs
every loss term and metric to the `runs` / `metrics` tables and to `metrics.csv` beside the
checkpoint, and ends with an evaluation of its best epoch on valid and test (all cases and the
cold-start subset) next to a popularity reference.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from features.runlog import new_run_id
from features.store import WarehouseConfig
from trainer import distributed as ddp  # DDP hooks (torchrun); identity on one process
from trainer.config import Config, TrainConfig, auto_batch, batch_lr, data_dropout, merge
from trainer.data import (
    Batch,
    SeqDataset,
    TrainSamples,
    epoch_batches,
    eval_cases,
    iterate_batches,
    train_samples,
)
from trainer.evaluation import evaluate_cases, log_popularity
from trainer.model import M2SE, MODS, LossOutput
from trainer.runlog import (
    Metrics,
    RunError,
    RunLog,
    RunResult,
    atomic_save,
    checkpoint_root,
    git_commit,
    rng_state,
    set_rng_state,
)
from trainer.runtime import autocast, resolve_device, seed_everything
from trainer.sasrec import SASRec

Model = M2SE | SASRec

log = logging.getLogger(__name__)

STAGES = ("pretrain", "finetune")


def stage_loss(model: Any, feats: Any, batch: Batch, stage: str, t: TrainConfig) -> LossOutput:
    """One batch's training loss in `stage`, with that stage's settings `t` (`model`: the model
    or its DDP proxy)."""
    if stage == "pretrain":
        return model.pretrain_loss(
            feats,
            batch.inputs,
            batch.targets,
            t.tau,
            t.cmcl_weight,
            t.cmcl,
            t.cmcl_rows,
            t.loss_block,
            t.nip_image,
        )
    return model.finetune_loss(feats, batch.inputs, batch.targets, t.tau, t.loss_block)


def build_model(cfg: Config, data: SeqDataset, stage: str) -> Model:
    if cfg.model.arch == "sasrec":
        if stage != "finetune":
            raise RunError("SASRec (model.arch=sasrec) has no pre-training stage: fine-tune it")
        return SASRec(cfg.model, data.n_items, data.max_len)
    dim = next(iter(data.features.values())).dim
    id_emb = stage == "finetune" and cfg.finetune.transductive
    return M2SE(cfg.model, data.n_items, dim, data.max_len, id_embedding=id_emb)


def without_empty_modality(cfg: Config, data: SeqDataset) -> Config:
    """A dataset without any image vector (e.g. Amazon Office, text only) trains a text model:
    an "image" half fed only zeros would be a second item-ID scorer, not a modality, and the
    image NIP term, CMCL and mixup would learn from nothing. The run's config (and so its model
    name in every table) says `modalities: text`."""
    img = data.features.get("image")
    if cfg.model.arch != "m2se" or cfg.model.modalities != "both" or img is None or img.n_covered:
        return cfg
    log.warning("%s has no image vectors: training a text-only M2SE", data.dataset)
    return merge(cfg, {"model": {"modalities": "text"}})


def with_data_defaults(cfg: Config, data: SeqDataset) -> Config:
    """The settings that depend on the data, resolved for a run: a dataset without images trains
    a text model (`without_empty_modality`); dropout None is `data_dropout` of the users' mean
    train length. The run's stored config holds the resolved values."""
    cfg = without_empty_modality(cfg, data)
    unset = [k for k in ("hidden_dropout", "attn_dropout") if getattr(cfg.model, k) is None]
    if unset:
        mean_train = float(np.maximum(data.lengths - 2, 0).mean()) if data.n_users else 0.0
        p = data_dropout(mean_train, data.max_len)
        log.info("%s: mean train sequence %.1f items -> dropout %s", data.dataset, mean_train, p)
        cfg = merge(cfg, {"model": dict.fromkeys(unset, p)})
    return cfg


def model_name(cfg: Config, stage: str) -> str:
    """The true name of a run's model, as every table shows it: "SASRec", "M2SE (text+image)",
    "M2SE (text), transductive"..."""
    if cfg.model.arch == "sasrec":
        return "SASRec"
    mods = "text+image" if cfg.model.modalities == "both" else cfg.model.modalities
    name = f"M2SE ({mods})"
    if stage == "finetune":
        name += ", transductive" if cfg.finetune.transductive else ", inductive"
    return name


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
        cfg = with_data_defaults(cfg, data)
        self.cfg, self.data, self.stage, self.wh = cfg, data, stage, wh
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
        self.train_model = ddp.wrap(
            self.model, self.device
        )  # DDP hook: the model itself on one process
        self.samples = self.epoch_samples(1)  # the first epoch's windows (sizes, benches)
        self.batch = self.tcfg.batch_size or auto_batch(
            self.samples.n_targets, cfg.model.arch, stage
        )
        if self.tcfg.lr is None:  # by the batch; the run's stored config holds the value
            self.cfg = merge(cfg, {stage: {"lr": batch_lr(self.batch)}})
        # Fused Adam: one kernel for all parameters (5x faster steps than the per-tensor loop
        # on CPU, measured with this model's parameter shapes).
        self.opt = torch.optim.Adam(
            self.model.parameters(),
            lr=self.tcfg.lr,
            weight_decay=self.tcfg.weight_decay,
            fused=self.device.type in ("cpu", "cuda"),
        )
        self.valid_cases = eval_cases(data, "valid")
        self.test_cases = eval_cases(data, "test")
        self.counts = data.train_counts()
        self.epoch = 0  # last finished epoch
        self.best = -math.inf
        self.best_epoch = 0
        self.bad_epochs = 0  # epochs in a row without a better score (the lr schedule)
        # Early stopping: the score of the last epoch that reset the patience (it beat the one
        # before it that did by > min_delta), and the epochs since (best / bad_epochs when 0).
        self.stop_ref = -math.inf
        self.stale_epochs = 0
        self.elapsed = 0.0  # wall seconds of the finished epochs (training + validation)
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

    @property
    def tcfg(self) -> TrainConfig:
        """This stage's section of the run's (resolved) config."""
        return getattr(self.cfg, self.stage)

    def model_name(self) -> str:
        return model_name(self.cfg, self.stage)

    def config_json(self) -> str:
        d = self.cfg.to_dict()
        d["data"].update(
            snapshot=self.data.snapshot,
            encoder_version=self.data.encoder_version,
            tagger_version=self.data.tagger_version,
        )
        d["stage"] = self.stage
        d["batch_size_used"] = self.batch
        return json.dumps(d, sort_keys=True)

    def data_meta(self) -> dict[str, Any]:
        return {
            "dataset": self.data.dataset,
            "snapshot": self.data.snapshot,
            "encoder_version": self.data.encoder_version,
            "tagger_version": self.data.tagger_version,
            "n_items": self.data.n_items,
            "dim": next(iter(self.data.features.values())).dim if self.data.features else 0,
        }

    def _load_pretrained(self, sd: dict[str, torch.Tensor]) -> None:
        own = self.model.state_dict()
        for k, v in sd.items():
            if k in own and own[k].shape != v.shape:
                raise RunError(
                    f"pre-trained weight {k} has shape {tuple(v.shape)}, this model needs {tuple(own[k].shape)}: "
                    f"pre-train and fine-tune must use the same encoder (vector size) and model config"
                )
        # A text-only model (dataset without images) takes the text half of a two-modality one.
        # (keys "pool.image.*" / "adaptor.image.*" of the modality this model does not have).
        dropped = {m for m in MODS if m not in self.model.mods}
        sd = {k: v for k, v in sd.items() if k in own or k.split(".")[1] not in dropped}
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
            "stop_ref": self.stop_ref,
            "stale_epochs": self.stale_epochs,
            "elapsed": self.elapsed,
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "rng": rng_state(),
            "history": self.runlog.history,
            "run_row": {k: v for k, v in self.runlog.row.items()},
        }

    def save_best(self) -> None:
        atomic_save(
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
        # A checkpoint from before min_delta existed stopped on bad_epochs alone.
        self.stop_ref = float(st.get("stop_ref", self.best))
        self.stale_epochs = int(st.get("stale_epochs", self.bad_epochs))
        self.elapsed = float(st.get("elapsed", 0.0))
        self.runlog.history = list(st["history"])
        self.runlog.row.update({k: st["run_row"][k] for k in ("started_at", "git_commit")})
        set_rng_state(st["rng"])

    # ------------------------------------------------------------------ training

    def epoch_samples(self, epoch: int) -> TrainSamples:
        """The training windows of `epoch` (a function of the data, config, seed and epoch)."""
        t = self.tcfg
        return train_samples(self.data, t.sample_mode, t.window_stride, t.seed, epoch)

    def _batches(self, epoch: int) -> tuple[int, Iterator]:
        """(number of steps, batches) of `epoch`."""
        t = self.tcfg
        self.samples = self.epoch_samples(epoch)
        n = len(epoch_batches(self.samples, self.batch, t.seed, epoch))
        if ddp.active():  # DDP hook: this rank's share of each global batch
            return n, ddp.shard_batches(
                self.data, self.samples, self.batch, t.seed, epoch, ddp.rank(), ddp.world_size()
            )
        return n, iterate_batches(self.data, self.samples, self.batch, t.seed, epoch)

    def train_epoch(self, epoch: int) -> dict[str, float]:
        self.model.train()
        ddp.seed_epoch(self.tcfg.seed, epoch)  # DDP hook: per-rank dropout stream
        t = self.tcfg
        n_batches, batches = self._batches(epoch)
        bar = tqdm(
            batches,
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
                out = stage_loss(self.train_model, self.feats, batch, self.stage, t)
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

    def _epoch_fits(self, max_seconds: float | None) -> bool:
        """The time budget: an epoch starts only if, at the mean epoch time so far, it ends
        within `max_seconds` of training + validation; the first epoch always runs."""
        if max_seconds is None or self.epoch == 0:
            return True
        return self.elapsed * (self.epoch + 1) / self.epoch <= max_seconds

    def record_score(self, score: float, epoch: int) -> bool:
        """Early-stopping bookkeeping of one epoch's validation score; True if it is the best so
        far. Every `decay_patience` epochs in a row without one, the lr is multiplied by
        `lr_decay` (the lr lives in the optimizer's state, so a resumed run keeps it). Early
        stopping counts the epochs since the last one that beat its reference by more than
        `min_delta` (relative): with 0, the epochs without a better score."""
        t = self.tcfg
        if score > self.stop_ref * (1 + t.min_delta):  # stop_ref starts at -inf
            self.stop_ref, self.stale_epochs = score, 0
        else:
            self.stale_epochs += 1
        if score > self.best:
            self.best, self.best_epoch, self.bad_epochs = score, epoch, 0
            return True
        self.bad_epochs += 1
        if t.lr_decay < 1.0 and self.bad_epochs % t.decay_patience == 0:
            for group in self.opt.param_groups:
                group["lr"] *= t.lr_decay
        return False

    def fit(self, resume: bool = False) -> RunResult:
        """Train to early stop / max epochs, then evaluate the best epoch. `resume`: from last.pt."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if resume:
            self.restore()
        self.runlog.write_run(status="running", finished_at=None)
        t = self.tcfg
        try:
            while (
                self.epoch < t.max_epochs
                and self.stale_epochs < t.patience
                and self._epoch_fits(t.max_seconds)
            ):
                epoch = self.epoch + 1
                t0 = time.perf_counter()
                stats = self.train_epoch(epoch)
                valid = self.evaluate("valid")
                self.elapsed += time.perf_counter() - t0
                stats["elapsed_seconds"] = self.elapsed  # time-to-quality curves
                score = valid["all"][t.valid_metric]
                self.epoch = epoch
                if self.record_score(score, epoch):
                    self.save_best()
                stats["lr"] = self.opt.param_groups[0]["lr"]
                self.runlog.log(epoch, {"train": {"all": stats}, "valid": valid})
                atomic_save(self._state(), self.dir / "last.pt")
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
        # The run's summary as epoch -1 train rows: best epoch, epochs run, training seconds.
        summary = {
            "best_epoch": float(self.best_epoch),
            "epochs": float(self.epoch),
            "train_seconds": self.elapsed,
        }
        self.runlog.log(
            -1,
            {"train": {"all": summary}, "valid": valid, "test": test},
            status="finished",
            finished_at=datetime.now(UTC),
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
            model=self.model_name(),
            seconds=self.elapsed,
        )
