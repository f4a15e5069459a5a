"""Data-parallel training on several processes: torch DistributedDataParallel under torchrun.

Launch (docs/cluster.md): `torchrun --nproc-per-node N -m flows.cli finetune ...`. Each
process reads RANK / WORLD_SIZE / LOCAL_RANK (set by torchrun); without them, or with
WORLD_SIZE=1, every function here is the identity and the trainer runs as one process.

What is shared and what is sharded (the equivalence with one process):
- Every rank reads the dataset at ONE snapshot (rank 0's, broadcast) and holds every sequence
  and item feature (the full softmax and the full-ranking evaluation need all items).
- Training windows: the epoch's windows and batches are the single-process ones (a function of
  (seed, epoch), so `--resume` repeats them); global batch k is the same windows (about
  `batch_size` targets) as on one process, and rank r takes its windows r, r + W, r + 2W... A
  rank whose share of a batch is empty runs one window with no targets (zero weight).
- Gradients: each rank's mean loss is weighted by n_local * W / n_global (targets of the step)
  before DDP averages the gradients, so the update is the gradient of the global batch's mean
  loss: fine-tuning (softmax over all items) is exactly data-parallel, up to float summation
  order. Pre-training (NIP / CMCL) uses in-batch negatives PER RANK: the negatives of a row are
  the targets of its rank's share of the batch, not of the whole global batch.
- Logged loss terms: per step, the n-weighted mean over ranks (the global batch's mean for the
  fine-tuning softmax), so the train rows match a single-process run.
- Dropout / item drop / mixup draw from a per-rank stream re-seeded from (seed, epoch, rank)
  at each epoch, so a resumed run repeats them.
- Evaluation: each rank ranks the cases of users u with u % W == rank; the per-rank metrics
  (means over cases) are gathered and merged weighted by their case counts on every rank, so
  every rank takes the same early-stopping decision.
- Rank 0 alone writes the `runs` / `metrics` rows, metrics.csv and the checkpoints (which must
  lie on a file system every rank can read: resume and the final evaluation load them).
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)

T = TypeVar("T")
BACKENDS = ("gloo", "nccl")


class DistError(RuntimeError):
    """The distributed environment is inconsistent; the message names the bad value."""


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job, from torchrun's environment variables."""

    rank: int  # RANK: 0..world - 1 over all nodes
    world: int  # WORLD_SIZE: processes in the job
    local_rank: int  # LOCAL_RANK: index on this node (its GPU)


def env() -> DistEnv:
    """RANK / WORLD_SIZE / LOCAL_RANK from the environment (0 / 1 / 0 when absent)."""
    vals = {}
    for name, default in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)):
        raw = os.environ.get(name, str(default))
        try:
            vals[name] = int(raw)
        except ValueError:
            raise DistError(f"environment variable {name}={raw!r} is not an integer") from None
    e = DistEnv(vals["RANK"], vals["WORLD_SIZE"], vals["LOCAL_RANK"])
    if e.world < 1 or not 0 <= e.rank < e.world:
        raise DistError(f"RANK={e.rank} is not in 0..WORLD_SIZE-1 (WORLD_SIZE={e.world})")
    return e


def active() -> bool:
    """True inside a process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0 (or the only process): the one that writes rows, files and output."""
    return rank() == 0


def choose_backend(device: str) -> str:
    """nccl for CUDA devices, gloo for CPU; env MSM4SR_DIST_BACKEND overrides."""
    forced = os.environ.get("MSM4SR_DIST_BACKEND")
    if forced:
        if forced not in BACKENDS:
            raise DistError(f"MSM4SR_DIST_BACKEND={forced!r} is not one of {BACKENDS}")
        return forced
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    return "nccl" if cuda else "gloo"


def setup(device: str = "auto") -> DistEnv:
    """Join torchrun's process group once (no-op without torchrun or with WORLD_SIZE=1).

    `device` is runtime.device ("auto", "cpu", "cuda"...): it picks the backend, and on CUDA
    this process's GPU is LOCAL_RANK.
    """
    e = env()
    if e.world == 1 or (dist.is_available() and dist.is_initialized()):
        return e
    if not dist.is_available():
        raise DistError(f"WORLD_SIZE={e.world} but this torch build has no torch.distributed")
    backend = choose_backend(device)
    if backend == "nccl":
        n = torch.cuda.device_count()
        if e.local_rank >= n:
            raise DistError(
                f"LOCAL_RANK={e.local_rank} but this node has {n} GPU(s): "
                f"use --nproc-per-node {n} or fewer, or runtime.device=cpu (gloo)"
            )
        torch.cuda.set_device(e.local_rank)
    dist.init_process_group(backend=backend, init_method="env://")
    atexit.register(_teardown)
    log.info("rank %d of %d (local %d), backend %s", e.rank, e.world, e.local_rank, backend)
    return e


def _teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def local_device(device: torch.device) -> torch.device:
    """Under DDP, a bare "cuda" becomes this process's GPU, cuda:LOCAL_RANK."""
    if active() and device.type == "cuda" and device.index is None:
        return torch.device("cuda", env().local_rank)
    return device


def _coll_device() -> torch.device:
    """Where collective tensors live: the current GPU for nccl, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast_object(obj: T) -> T:
    """Rank 0's `obj` on every rank (identity on one process)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj: T) -> list[T]:
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


# --------------------------------------------------------------------------- data


def pin_snapshot(cfg: Any, read_snapshot: Any) -> Any:
    """cfg with data.snapshot set to rank 0's choice, so that every rank reads the same data.

    `read_snapshot()` returns the warehouse's latest snapshot id (called on rank 0 only, and only
    when cfg.data.snapshot is None). Also a synchronisation point: no rank starts reading the
    warehouse before rank 0 has finished what it was writing.
    """
    if not active():
        return cfg
    snap = cfg.data.snapshot
    if is_main() and snap is None:
        snap = int(read_snapshot())
    snap = broadcast_object(snap)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, snapshot=snap))


def shard_batches(
    data: Any, samples: Any, batch_targets: int, seed: int, epoch: int, r: int, w: int
) -> Iterator[Any]:
    """Rank r's part of each global batch: windows r, r + w, ... of the single-process batch.

    Every rank yields as many batches as one process would (DDP needs the same number of steps);
    an empty share (only in a batch of fewer than w windows) is one window with all targets 0.
    """
    from trainer.data import Batch, collate, epoch_batches

    for glob in epoch_batches(samples, batch_targets, seed, epoch):
        mine = glob[r::w]
        if len(mine):
            yield collate(data, samples, mine)
        else:
            b = collate(data, samples, glob[:1])
            yield Batch(b.inputs, torch.zeros_like(b.targets))


def seed_epoch(seed: int, epoch: int) -> None:
    """Under DDP: re-seed this rank's random stream from (seed, epoch, rank) (no-op otherwise)."""
    if active():
        torch.manual_seed((seed * 1_000_003 + epoch * 7_919 + rank() * 104_729) % (2**63 - 1))


# --------------------------------------------------------------------------- model and steps


class _LossCall(nn.Module):
    """Routes a named loss method of the model through forward(), which DDP needs to sync grads."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.model, method)(*args, **kwargs)


class _Proxy:
    """`proxy.pretrain_loss(...)` = DDP-wrapped `model.pretrain_loss(...)`."""

    def __init__(self, wrapped: nn.Module) -> None:
        self._wrapped = wrapped

    def __getattr__(self, name: str) -> Any:
        return functools.partial(self._wrapped, name)


def wrap(model: nn.Module, device: torch.device) -> Any:
    """An object whose loss methods run through DistributedDataParallel (the model itself on
    one process). The model's own parameters are shared, so checkpoints keep their keys."""
    if not active():
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    # find_unused_parameters: a modality whose items have one slot skips its pooler (pooling is
    # the identity there, trainer/model.py), so that pooler takes no part in the loss.
    return _Proxy(
        DistributedDataParallel(_LossCall(model), device_ids=ids, find_unused_parameters=True)
    )


def reduce_step(out: Any) -> tuple[Any, torch.Tensor]:
    """(the global batch's LossOutput for logging, the loss to call backward on).

    One all-reduce of [n, n * loss, n * term...] per step. The backward loss is this rank's mean
    loss times n_local * W / n_global, so DDP's gradient average is the global batch's mean.
    """
    if not active():
        return out, out.loss
    from trainer.model import LossOutput

    keys = sorted(out.terms)
    n = float(out.n_targets)
    vec = torch.tensor(
        [n, n * float(out.loss.detach()), *(n * float(out.terms[k]) for k in keys)],
        dtype=torch.float64,
        device=_coll_device(),
    )
    dist.all_reduce(vec)
    v = vec.cpu().tolist()
    n_glob = v[0]
    if n_glob <= 0:
        raise DistError("a training step has no targets on any rank")
    glob = LossOutput(
        torch.tensor(v[1] / n_glob, dtype=torch.float64),
        {k: v[2 + i] / n_glob for i, k in enumerate(keys)},
        int(round(n_glob)),
    )
    return glob, out.loss * (n * world_size() / n_glob)


# --------------------------------------------------------------------------- evaluation


def shard_cases(cases: T) -> T:
    """This rank's evaluation cases: users u with u % W == rank (all on one process)."""
    if not active():
        return cases
    keep = np.nonzero(cases.users % world_size() == rank())[0]
    return dataclasses.replace(
        cases, **{f.name: getattr(cases, f.name)[keep] for f in dataclasses.fields(cases)}
    )


def merge_metrics(local: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per-rank {subset: {metric: mean over its cases, n_cases}} -> the metrics of all cases.

    Means are merged weighted by n_cases, in rank order, on every rank (identical results on
    all ranks); they equal the single-process means up to float rounding (~1e-16).
    """
    if not active():
        return local
    return merge_metric_parts(all_gather_object(local))


def merge_metric_parts(parts: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Metrics of disjoint shards of cases -> the metrics of their union (n_cases-weighted)."""
    out: dict[str, dict[str, float]] = {}
    for subset in sorted({s for p in parts for s in p}, key=lambda s: (s != "all", s)):
        per = [p[subset] for p in parts if p.get(subset, {}).get("n_cases", 0) > 0]
        n = sum(p["n_cases"] for p in per)
        if n == 0:
            continue
        keys = [k for k in per[0] if k != "n_cases"]
        out[subset] = {k: sum(p[k] * p["n_cases"] for p in per) / n for k in keys}
        out[subset]["n_cases"] = float(n)
    return out
