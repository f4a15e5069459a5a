"""The trainer on 2 CPU processes (torchrun, gloo, 127.0.0.1) against one process.

Equivalence (trainer/distributed.py): the global batch is the single-process batch, split
between the ranks; each rank's loss is weighted so that DDP's averaged gradient is the global
batch's. With dropout off, fine-tuning (a softmax over all items, no in-batch negatives) is the
same computation as on one process up to float summation order, so:
- train losses agree to 1e-5 relative (float32 sums in a different order; ~3e-7 seen),
- valid / test metrics agree to 1e-9: every case gets the same rank (the model differs by
  ~1e-7, far from flipping a tie in 2 epochs); what remains is the merge of the per-rank means
  weighted by their case counts (~1e-16).
Pre-training uses in-batch negatives per rank, so it is only checked to run and improve.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from features import store
from tests.conftest import REPO
from tests.trainer_fixtures import ML_CUT, warehouse_copy
from trainer import distributed as ddp
from trainer.config import DataConfig
from trainer.data import epoch_batches, eval_cases, iterate_batches, load_dataset, train_samples
from trainer.evaluate import metrics_from_ranks

NO_DROPOUT = ["model.hidden_dropout=0", "model.attn_dropout=0", "model.adaptor_dropout=0"]
EPOCHS = 2
LOSS_RTOL = 1e-5
METRIC_ATOL = 1e-9


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch_size(samples, seed: int = 2020, epoch: int = 1) -> int:
    """Targets per batch such that one batch of the epoch holds ONE window (rank 1's share of
    it is empty) and the others several."""
    for b in range(16, samples.n_targets):
        sizes = [len(x) for x in epoch_batches(samples, b, seed, epoch)]
        if 1 in sizes and max(sizes) > 2:
            return b
    return 64


def _padded_rows(inputs: torch.Tensor, targets: torch.Tensor, L: int) -> list[tuple]:
    pad = L - inputs.shape[1]
    x = torch.nn.functional.pad(inputs, (0, pad))
    y = torch.nn.functional.pad(targets, (0, pad))
    return sorted(tuple(r) for r in torch.cat([x, y], 1).tolist())


@pytest.fixture(scope="module")
def wh(tmp_path_factory):
    return warehouse_copy(tmp_path_factory.mktemp("ddp") / "wh")


def test_rank_shards_rebuild_the_single_process_batches(wh) -> None:
    data = load_dataset(DataConfig(dataset=ML_CUT), wh)
    samples = train_samples(data, seed=2020, epoch=3)
    B = _batch_size(samples, 2020, 3)
    one = list(iterate_batches(data, samples, B, 2020, 3))
    solo = list(ddp.shard_batches(data, samples, B, 2020, 3, 0, 1))
    assert len(solo) == len(one)
    for a, b in zip(one, solo, strict=True):
        assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    r0 = list(ddp.shard_batches(data, samples, B, 2020, 3, 0, 2))
    r1 = list(ddp.shard_batches(data, samples, B, 2020, 3, 1, 2))
    assert len(r0) == len(r1) == len(one)  # same number of DDP steps on every rank
    for g, a, b in zip(one, r0, r1, strict=True):
        parts = [p for p in (a, b) if p.n_targets > 0]
        L = g.inputs.shape[1]
        rows = sorted(r for p in parts for r in _padded_rows(p.inputs, p.targets, L))
        assert rows == _padded_rows(g.inputs, g.targets, L)
        assert sum(p.n_targets for p in (a, b)) == g.n_targets
    single = [i for i, g in enumerate(epoch_batches(samples, B, 2020, 3)) if len(g) == 1]
    assert single  # _batch_size made one
    for i in single:
        assert r1[i].n_targets == 0 and r1[i].inputs.shape[0] == 1  # the empty share


def test_merged_shard_metrics_are_the_metrics_of_all_cases() -> None:
    rng = np.random.default_rng(0)
    ranks = rng.integers(0, 300, 101)
    cold = rng.random(101) < 0.1
    parts = []
    for r in range(3):
        sl = slice(r, None, 3)
        part = {"all": {**metrics_from_ranks(ranks[sl]), "n_cases": float(len(ranks[sl]))}}
        if cold[sl].any():
            part["cold"] = {
                **metrics_from_ranks(ranks[sl][cold[sl]]),
                "n_cases": float(cold[sl].sum()),
            }
        parts.append(part)
    merged = ddp.merge_metric_parts(parts)
    assert merged["all"] == pytest.approx({**metrics_from_ranks(ranks), "n_cases": 101.0})
    assert merged["cold"] == pytest.approx(
        {**metrics_from_ranks(ranks[cold]), "n_cases": float(cold.sum())}
    )


def _snapshots(wh) -> int:
    with store.connect(wh, create=False, read_only=True) as con:
        return store.snapshot_id(con)


def _rows(wh, run_id: str) -> dict[tuple, float]:
    with store.connect(wh, create=False, read_only=True) as con:
        rows = store.query(
            con,
            "SELECT epoch, split, subset, metric, value FROM metrics WHERE run_id = ?",
            [run_id],
        ).to_pylist()
    return {(r["epoch"], r["split"], r["subset"], r["metric"]): r["value"] for r in rows}


def test_two_processes_match_one_process(wh) -> None:
    from flows.cli_train import build_config
    from trainer.stages import finetune

    B = _batch_size(train_samples(load_dataset(DataConfig(dataset=ML_CUT), wh), seed=2020, epoch=1))
    sets = [f"pretrain.max_epochs={EPOCHS}", f"finetune.max_epochs={EPOCHS}", *NO_DROPOUT]
    args = ["--dataset", ML_CUT, "--batch-size", str(B), "--device", "cpu", "--threads", "1"]
    args += ["--no-progress", *(x for s in sets for x in ("--set", s))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    env.pop("MSM4SR_WAREHOUSE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1"]
    cmd += ["--nproc-per-node", "2", "--master-addr", "127.0.0.1"]
    cmd += ["--master-port", str(_free_port()), "-m", "flows.cli"]
    cmd += ["--warehouse", str(wh.root), "train", *args]
    s0 = _snapshots(wh)
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    s1 = _snapshots(wh)

    with store.connect(wh, create=False, read_only=True) as con:
        runs = store.query(con, "SELECT run_id, kind, status FROM runs").to_pylist()
    kinds = sorted(r["kind"] for r in runs)
    assert kinds == ["baseline", "baseline", "finetune", "pretrain"]  # one row per run
    assert all(r["status"] == "finished" for r in runs)
    pre = next(r["run_id"] for r in runs if r["kind"] == "pretrain")
    ft = next(r["run_id"] for r in runs if r["kind"] == "finetune")
    assert p.stdout.count(f"{ft} (finetune, ") == 1  # rank 0 alone prints
    ckpt = wh.root / "checkpoints"
    assert sorted(d.name for d in ckpt.iterdir()) == sorted([pre, ft])  # one run id per run
    for run in (pre, ft):
        assert sorted(f.name for f in (ckpt / run).iterdir()) == [
            "best.pt",
            "last.pt",
            "metrics.csv",
        ]

    # Pre-training (in-batch negatives per rank): runs and improves.
    pre_rows = _rows(wh, pre)
    assert pre_rows[(EPOCHS, "train", "all", "loss")] < pre_rows[(1, "train", "all", "loss")]
    assert pre_rows[(-1, "test", "all", "n_cases")] == len(
        eval_cases(load_dataset(DataConfig(dataset=ML_CUT), wh), "test")
    )

    # Fine-tuning from the same pre-trained run on one process, same global batch and seed.
    cfg = build_config("both", ML_CUT, None, sets, None, B, None, None, None, "cpu", 1, None, False)
    single = finetune(cfg, wh, from_run=pre)
    s2 = _snapshots(wh)
    # Warehouse commits: the 2-process job (pretrain + finetune, same epochs) made exactly twice
    # the commits of one single-process finetune: rank 1 wrote nothing.
    assert s1 - s0 == 2 * (s2 - s1)

    a, b = _rows(wh, ft), _rows(wh, single.run_id)
    assert set(a) == set(b)  # the same metrics rows, once each
    timing = {"epoch_seconds", "samples_per_s", "elapsed_seconds", "train_seconds"}
    for key, v in b.items():
        if key[3] in timing:
            continue
        if key[1] == "train":  # loss terms
            assert a[key] == pytest.approx(v, rel=LOSS_RTOL), key
        else:
            assert a[key] == pytest.approx(v, abs=METRIC_ATOL), key
    assert a[(-1, "test", "all", "Recall@20")] == pytest.approx(
        single.test["all"]["Recall@20"], abs=METRIC_ATOL
    )
